"""TensorBoard scalars of a training run, one point per epoch, written beside its other files.

`epoch_summaries(log_dir)` yields a `write(epoch, record)` that fits `fit(on_epoch_end=...)` and
`defuse.train_vae(on_epoch_end=...)`: each number in an epoch's record becomes a scalar at step
`epoch`, so `tensorboard --logdir runs/` shows every run's curves. The event files are written
with tensorboardX, which needs no TensorFlow; only process 0 of a multi-process run writes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax

__all__ = ["epoch_summaries", "scalar_tag"]

# Entries of an epoch record that are not curves: the step itself and the wall-clock time.
NOT_SCALARS = ("epoch", "seconds")


def scalar_tag(key: str, prefix: str = "") -> str:
    """The TensorBoard tag of a record entry: `train_loss` -> `train/loss`, `val_accuracy` ->
    `val/accuracy` (TensorBoard groups tags by what comes before the slash); any other key is
    `prefix + key`, e.g. `vae/kl` for `kl` with `prefix="vae/"`.

    Args:
      key: the record entry's name.
      prefix: put before keys that do not start with `train_`, `val_` or `test_`.

    Returns:
      The tag, a str.
    """
    for split in ("train", "val", "test"):
        if key.startswith(split + "_"):
            return f"{prefix}{split}/{key[len(split) + 1:]}"
    return prefix + key


@contextlib.contextmanager
def epoch_summaries(
    log_dir: str | Path, *, prefix: str = ""
) -> Iterator[Callable[[int, Mapping[str, Any]], None]]:
    """A writer of per-epoch TensorBoard scalars into `log_dir`, closed when the block ends.

    Args:
      log_dir: the directory of the event file (`events.out.tfevents.*`), created if missing. A
        resumed run adds a second event file there; TensorBoard reads them as one run.
      prefix: put before each tag that is not a `train_`/`val_`/`test_` entry.

    Yields:
      `write(epoch, record)`: writes every finite number of `record` (a `dict` such as an entry
      of `FitResult.history`) except `epoch` and `seconds` as a scalar at step `epoch`, under
      `scalar_tag(key, prefix)`, and flushes, so a run that is killed keeps its finished
      epochs. Values are stored as float32, as TensorBoard keeps scalars. On any process other
      than process 0 it does nothing.
    """
    if jax.process_index() != 0:
        yield lambda epoch, record: None
        return
    writers = []  # the one writer, made at the first epoch: a run with nothing left to train
    # (a finished run started again) leaves no empty event file behind

    def write(epoch: int, record: Mapping[str, Any]) -> None:
        if not writers:
            from tensorboardX import SummaryWriter  # imported here: only training needs it

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            writers.append(SummaryWriter(str(log_dir)))
        writer = writers[0]
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) or getattr(value, "shape", None) == ():
                value = float(value)
                if math.isfinite(value):
                    writer.add_scalar(scalar_tag(key, prefix), value, int(epoch))
        writer.flush()

    try:
        yield write
    finally:
        for writer in writers:
            writer.close()
