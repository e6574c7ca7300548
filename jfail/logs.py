"""Logging set-up shared by the command line and the experiments."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

__all__ = ["quiet_libraries", "progress_disabled", "log_to_file", "stdout_to_file"]


def quiet_libraries() -> None:
    """Silence the INFO chatter of orbax/absl and TFDS so jfail's own log stays readable.

    Sets those libraries' loggers to WARNING and the `jfail` logger to INFO; returns nothing.
    """
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
    terminal.

    Args:
        progress: True to show a bar, False to hide it, None to decide from stderr.

    Returns:
        True where the bar should be hidden.
    """
    if progress is None:
        return not sys.stderr.isatty()
    return not progress


def log_to_file(path: str | Path) -> logging.Handler:
    """Copy jfail's log (INFO and above) into `path`; remove the returned handler to stop.

    In a process of a multi-host run other than process 0 (`jfail.engine.is_writer`) the log goes
    to stderr instead, each line prefixed with `process <i>:`, and `path` is not touched: the run
    directory's files are process 0's.

    Args:
        path: the log file, appended to.

    Returns:
        The `logging.Handler` added to the `jfail` logger (a file, stderr or null handler).

    Raises:
        OSError: the file cannot be opened.
    """
    from jfail.engine.distributed import is_writer

    if is_writer():
        handler = logging.FileHandler(path)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif any(getattr(h, "process_log", False) for h in logging.getLogger("jfail").handlers):
        handler = logging.NullHandler()  # the log already goes to stderr once
    else:
        import jax

        handler = logging.StreamHandler(sys.stderr)
        handler.process_log = True
        handler.setFormatter(logging.Formatter(
            f"process {jax.process_index()}: %(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("jfail")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def stdout_to_file(path: str | Path):
    """Append what is printed inside the block (a pipeline's Markdown, "wrote ...") to `path`;
    in a process of a multi-host run other than process 0 (`jfail.engine.is_writer`) it is
    dropped: process 0 prints the same.

    Args:
        path: the file appended to, line-buffered.

    Yields:
        None; `sys.stdout` is redirected for the duration of the block.

    Raises:
        OSError: the file cannot be opened.
    """
    from jfail.engine.distributed import is_writer

    with (open(path, "a", buffering=1) if is_writer() else open(os.devnull, "w")) as handle, \
            contextlib.redirect_stdout(handle):
        yield
