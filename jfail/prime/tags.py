"""Tags: named binary attributes of images, and where they come from.

PRIME (seed 004, section 3.1) tags every image with human-understandable concepts and then, per
class, keeps the tags that are not rare. Here a tag source is anything that yields a
:class:`TagMatrix`:

- a :class:`Tagger` computes tags from images (the shape tagger in `jfail.prime.shape`, the
  zero-shot vision-language tagger in `jfail.prime.vlm`);
- :func:`tags_from_table` reads attributes a data set already provides (CelebA's 40 attributes,
  CUB's 312), from a CSV file or an array;
- :func:`background_tags` turns the known background of each image of a composited data set
  (Waterbirds-style) into one tag per background.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "TagMatrix",
    "Tagger",
    "as_tag_array",
    "background_tags",
    "concat_tags",
    "frequent_tags",
    "tags_from_table",
]


class TagMatrix(NamedTuple):
    """Binary tags of N images.

    tags: [N, T] bool, tags[i, t] is true when image i shows tag t.
    names: T distinct, human-readable tag names.
    """

    tags: np.ndarray
    names: tuple[str, ...]

    def select(self, names: Sequence[str]) -> TagMatrix:
        """The columns called `names`, in that order.

        Args:
          names: tag names, each one of `self.names`.

        Returns:
          A `TagMatrix` with `[N, len(names)]` tags.

        Raises:
          KeyError: a name is not one of `self.names`.
        """
        index = {name: i for i, name in enumerate(self.names)}
        missing = [name for name in names if name not in index]
        if missing:
            raise KeyError(f"unknown tag names {missing}; known: {list(self.names)}")
        return TagMatrix(self.tags[:, [index[name] for name in names]], tuple(names))


@runtime_checkable
class Tagger(Protocol):
    """Computes tags from images.

    names: the T tag names, in column order.
    tag(images [N, H, W, C] float in [0, 1], labels [N] int or None) -> TagMatrix with [N, T] tags.
    Taggers whose thresholds depend on the class (the shape tagger) need the labels.
    """

    @property
    def names(self) -> tuple[str, ...]:
        """The T tag names, in column order."""
        ...

    def tag(self, images: np.ndarray, labels: np.ndarray | None = None) -> TagMatrix:
        """Tags of a batch of images.

        Args:
          images: `[N, H, W, C]` float in [0, 1].
          labels: `[N]` int classes, or None for taggers that do not need them.

        Returns:
          A `TagMatrix` with `[N, T]` tags, columns in the order of `names`.
        """
        ...


def as_tag_array(tags, *, name: str = "tags") -> np.ndarray:
    """Validate a tag matrix and return it as `[N, T]` bool.

    Accepts bool arrays and numeric arrays whose values are all 0 or 1; anything else (other
    values, NaN, a wrong number of dimensions) raises ValueError.

    Args:
      tags: a `TagMatrix` or an `[N, T]` array of bools or 0/1 numbers.
      name: the argument's name in error messages.

    Returns:
      The tags as an `[N, T]` bool array (the input itself when already bool).

    Raises:
      ValueError: not 2-D, not bool or numeric, or a value other than 0 and 1.
    """
    if isinstance(tags, TagMatrix):
        tags = tags.tags
    array = np.asarray(tags)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, T] matrix, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {array.dtype}")
    bad = ~((array == 0) | (array == 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} must hold only 0/1 (or bool) values; entry [{row}, {col}] is "
            f"{array[row, col]!r} ({int(bad.sum())} bad entries)"
        )
    return array.astype(bool)


def frequent_tags(tags, labels, min_count: int, *, num_classes: int | None = None) -> np.ndarray:
    """Which tags each class keeps: `[C, T]` bool, true where the tag is on `>= min_count` images
    of that class (section 3.1 drops rarer tags; the paper uses 50, 100 or 200).

    Args:
      tags: `[N, T]` bool (or 0/1, or a `TagMatrix`).
      labels: `[N]` int classes.
      min_count: the fewest images of a class a tag must be on to be kept.
      num_classes: C; None uses `labels.max() + 1`.

    Returns:
      `[C, T]` bool.

    Raises:
      ValueError: bad tags (see `as_tag_array`), labels not `[N]`, or a label >= `num_classes`.
    """
    tags = as_tag_array(tags)
    labels = np.asarray(labels)
    if labels.shape != (tags.shape[0],):
        raise ValueError(f"labels has shape {labels.shape}, expected ({tags.shape[0]},) like tags")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"labels go up to {labels.max()} but num_classes is {num_classes}")
    counts = np.zeros((num_classes, tags.shape[1]), np.int64)
    for label in np.unique(labels):
        counts[label] = tags[labels == label].sum(axis=0)
    return counts >= min_count


def concat_tags(*matrices: TagMatrix) -> TagMatrix:
    """Columns of several tag matrices side by side (same images, distinct names).

    Args:
      *matrices: `TagMatrix`es of the same N images.

    Returns:
      A `TagMatrix` with the columns of all, in the order given.

    Raises:
      ValueError: no matrices, different numbers of images, bad tags, or a name repeated.
    """
    if not matrices:
        raise ValueError("concat_tags needs at least one TagMatrix")
    rows = {m.tags.shape[0] for m in matrices}
    if len(rows) != 1:
        raise ValueError(f"tag matrices describe different numbers of images: {sorted(rows)}")
    names = tuple(name for m in matrices for name in m.names)
    _check_names(names)
    return TagMatrix(np.concatenate([as_tag_array(m.tags) for m in matrices], axis=1), names)


def tags_from_table(
    table,
    *,
    names: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    drop_columns: Sequence[str] = (),
    delimiter: str = ",",
) -> TagMatrix:
    """Tags from a table of binary attributes, one row per image.

    table: a CSV file path (first row: column names) or an [N, T] array (then `names` names the
    columns). A value > 0 is "on": this reads CUB's 0/1 and CelebA's -1/+1 alike.
    Args:
      table: a CSV file path (first row: column names) or an `[N, T]` array (then `names`
        names the columns). A value > 0 is "on": this reads CUB's 0/1 and CelebA's -1/+1 alike.
      names: the column names of an array table; None names them `attr0`, `attr1`, ...
      columns: keep only these columns (by name), in this order.
      drop_columns: columns that are not attributes, e.g. an image-id column of a CSV.
      delimiter: the CSV file's field separator.

    Returns:
      A `TagMatrix` with `[N, T']` tags, the kept columns.

    Raises:
      FileNotFoundError: the CSV file does not exist.
      ValueError: `names` given with a CSV file, an array that is not 2-D, names that do not
        match the columns, an empty or ragged CSV file, a value that is not a number, a missing
        value, or a column name repeated.
      KeyError: a name in `columns` or `drop_columns` is not a column of the table.
    """
    if isinstance(table, (str, Path)):
        header, values = _read_csv(Path(table), delimiter)
        if names is not None:
            raise ValueError("names is for arrays; a CSV file names its columns in its first row")
        names = header
    else:
        values = np.asarray(table)
        if values.ndim != 2:
            raise ValueError(f"table must be a 2-D [N, T] array, got shape {values.shape}")
        if names is None:
            names = tuple(f"attr{i}" for i in range(values.shape[1]))
        names = tuple(names)
        if len(names) != values.shape[1]:
            raise ValueError(f"{len(names)} names for a table with {values.shape[1]} columns")
    names = tuple(str(name) for name in names)
    unknown = [c for c in (*drop_columns, *(columns or ())) if c not in names]
    if unknown:
        raise KeyError(f"columns {unknown} are not in the table; its columns: {list(names)}")
    keep = [c for c in (columns if columns is not None else names) if c not in set(drop_columns)]
    index = [names.index(c) for c in keep]
    values = values[:, index]
    try:
        numeric = values.astype(np.float64)
    except ValueError as error:
        raise ValueError(f"table attributes must be numbers (0/1 or -1/+1): {error}") from None
    if np.isnan(numeric).any():
        row, col = np.argwhere(np.isnan(numeric))[0]
        raise ValueError(f"table has a missing value at row {row}, column {keep[col]!r}")
    _check_names(tuple(keep))
    return TagMatrix(numeric > 0, tuple(keep))


def background_tags(backgrounds, background_names: Sequence[str]) -> TagMatrix:
    """One tag per known background of a composited data set (e.g. Waterbirds' land / water).

    Args:
      backgrounds: `[N]` int, the background index of each image.
      background_names: one name per background index.

    Returns:
      A `TagMatrix` with `[N, len(background_names)]` tags, one on per row.

    Raises:
      ValueError: `backgrounds` is not a 1-D integer array, an index is outside
        `[0, len(background_names))`, or a name is repeated.
    """
    backgrounds = np.asarray(backgrounds)
    if backgrounds.ndim != 1 or not np.issubdtype(backgrounds.dtype, np.integer):
        raise ValueError(
            f"backgrounds must be a 1-D integer array, got {backgrounds.dtype} {backgrounds.shape}"
        )
    names = tuple(str(name) for name in background_names)
    if backgrounds.size and (backgrounds.min() < 0 or backgrounds.max() >= len(names)):
        raise ValueError(
            f"background indices must be in [0, {len(names)}), got "
            f"[{backgrounds.min()}, {backgrounds.max()}]"
        )
    _check_names(names)
    return TagMatrix(backgrounds[:, None] == np.arange(len(names))[None, :], names)


def _read_csv(path: Path, delimiter: str) -> tuple[tuple[str, ...], np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"tag table {path} does not exist")
    with path.open(newline="") as file:
        rows = list(csv.reader(file, delimiter=delimiter))
    if not rows:
        raise ValueError(f"tag table {path} is empty")
    header = tuple(cell.strip() for cell in rows[0])
    body = [row for row in rows[1:] if row]
    widths = {len(row) for row in body}
    if widths - {len(header)}:
        raise ValueError(
            f"{path}: rows have {sorted(widths)} cells but the header has {len(header)}"
        )
    return header, np.array(body, dtype=object).reshape(len(body), len(header))


def _check_names(names: tuple[str, ...]) -> None:
    seen, duplicates = set(), []
    for name in names:
        if name in seen:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        raise ValueError(f"tag names must be distinct; repeated: {sorted(set(duplicates))}")
