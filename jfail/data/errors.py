"""Exceptions raised by jfail.data."""

from __future__ import annotations

from collections.abc import Iterable


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not available locally.

    The message lists every place that was searched and the one command that
    makes the data available; `searched` holds those places (directories,
    files, or `tfds:<name>`) in search order.
    """

    def __init__(self, message: str, *, searched: Iterable[str] = ()):
        super().__init__(message)
        self.searched = tuple(searched)
