"""Orbax checkpoints of a training run: the pytree of arrays plus a JSON record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["RunCheckpointer"]


class RunCheckpointer:
    """Saves `(arrays, record)` per epoch under `directory`; restores the latest.

    Writes are synchronous and atomic (orbax writes to a temporary folder and renames it), so a
    process killed at any moment leaves either the previous checkpoint or the new one, never a
    partial one.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
            item_names=("arrays", "record"),
        )

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint under `directory`.

        Returns:
            The step, or None if there is no checkpoint yet.
        """
        return self._manager.latest_step()

    def save(self, step: int, arrays: Any, record: dict) -> None:
        """Write the checkpoint of `step` and wait until it is on disk (older ones beyond
        `max_to_keep` are removed).

        Args:
            step: the step (epoch) number; an existing checkpoint of that step is replaced.
            arrays: a pytree of arrays.
            record: a JSON-serialisable dict saved alongside.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure, shapes and shardings of `like`.

        Args:
            like: a pytree of arrays with the structure, shapes, dtypes and shardings to
                restore into (its values are not read).
            step: the step to restore; None for the latest.

        Returns:
            `(arrays, record)`: the restored pytree and the JSON record.

        Raises:
            FileNotFoundError: if `step` is None and there is no checkpoint.
        """
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
            ),
        )
        return restored["arrays"], dict(restored["record"])

    def close(self) -> None:
        """Release the checkpoint manager's resources; the checkpoints stay on disk."""
        self._manager.close()
