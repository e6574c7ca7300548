"""Logging set-up shared by the command line and the experiments."""

from __future__ import annotations

import logging
import sys

__all__ = ["quiet_libraries", "progress_disabled"]


def quiet_libraries() -> None:
    """Silence the INFO chatter of orbax/absl and TFDS so jfail's own log stays readable."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # absl comes with orbax; guard anyway
        pass
    for name in ("absl", "orbax", "tensorflow_datasets", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("jfail").setLevel(logging.INFO)


def progress_disabled(progress: bool | None) -> bool:
    """tqdm's `disable` for a `progress` argument: None shows a bar only when stderr is a terminal."""
    if progress is None:
        return not sys.stderr.isatty()
    return not progress
