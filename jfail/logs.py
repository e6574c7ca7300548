"""Logging set-up shared by the command line and the experiments."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

__all__ = ["quiet_libraries", "progress_disabled", "log_to_file", "stdout_to_file"]


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
    """tqdm's `disable` for a `progress` argument: None shows a bar only when stderr is a
    terminal."""
    if progress is None:
        return not sys.stderr.isatty()
    return not progress


def log_to_file(path: str | Path) -> logging.Handler:
    """Copy jfail's log (INFO and above) into `path`; remove the returned handler to stop."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("jfail")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def stdout_to_file(path: str | Path):
    """Append what is printed inside the block (a pipeline's Markdown, "wrote ...") to `path`."""
    with open(path, "a", buffering=1) as handle, contextlib.redirect_stdout(handle):
        yield
