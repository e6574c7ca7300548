"""Random-access image sources: data sets read one example at a time.

A source is a sequence of examples that is never loaded whole: `len(source)`
examples, `source[i]` a dict ``{"image": [H, W, C] float32 in [0, 1],
"label": int32 scalar}``, decoded when asked for. That is the random-access
protocol of Grain (`grain.MapDataset.source(source)`,
`grain.DataLoader(data_source=source, ...)`), so sources plug into Grain's
samplers, sharding and prefetching (see `jfail.data.streaming`) and into
`jfail.engine.map_dataset`.

One function, `open_source`, resolves every data set name:

- `imagefolder:<path>` (or a path with a `/` in it, `./my_images`):
  an image folder, see below.
- `tfds:<name>`: a prepared TensorFlow Datasets data set, read through
  `tfds.data_source` (ArrayRecord, random access, no TensorFlow).
- `arrayrecord:<glob>`: ArrayRecord files written by
  `write_arrayrecord` (record format below).
- the built-in names of `jfail.data.load` (`fashion_mnist`, `mnist`,
  `mnist5k`, `digits`): loaded into memory by `load` and served from
  there, so their examples equal `load`'s arrays exactly.

An image folder has one sub-folder per class (class ids: the sorted folder
names; images at any depth below it, PNG, JPEG, BMP, GIF or WebP, decoded with
Pillow; every class folder must hold at least one), or split folders of such
class folders (`train/`, `test/`, `val/`, `validation/`, with the same
classes). Its rules, the same for `open_source`, `load_image_folder`
and `jfail.data.load`:

- split: `<path>/<split>` when that folder exists; otherwise, when the
  folder has split folders, an error naming them; otherwise `"test"` is a
  fixed class-stratified 20 percent of the images (`FIXED_TEST_FRACTION`,
  seed `FIXED_SPLIT_SEED`, as for mnist5k), `"train"` the rest and
  `"all"` everything, each in source order.
- channels: 1 (grayscale) when every image of the folder, all splits, is
  grayscale, else 3 (RGB; alpha dropped; a grayscale file in a colour folder
  is repeated); found from the files' headers. `channels=` overrides it
  (and skips reading every header, which matters for large folders).
- size: `@S` (or `image_size=S`) resizes the shorter side to S (bilinear)
  and crops the centre SxS, the ImageNet convention; square images are simply
  resized. Without it every image must have the same size.

Every name may end with `@S` and then `[:P%]`, as in `load` (or the
two the other way round; a subset does not depend on the image size):
`@S` makes every image SxS (streamed sources: the shorter side is resized
to S, bilinear, then the centre SxS is cropped; built-in names: `load`'s
bilinear resize), `[:P%]` keeps the same fixed class-stratified P percent
of the split that `load` keeps (seed `SUBSET_SEED`), in source order.

ArrayRecord record format (`RECORD_FORMAT`): each record is an 8-byte
header, the 4 bytes `b"JFI1"` and the label as a little-endian uint32,
followed by one encoded image file (PNG or JPEG bytes, anything Pillow
reads). Beside each `<file>` the writer puts `<file>.json`:
``{"format": "jfail-image-label-v1", "num_records": N, "labels": [...],
"class_names": [...]}``, which lets a reader learn labels and class names
without reading the records; without it they are read from the headers.
"""

from __future__ import annotations

import glob as globbing
import io
import json
import os
import re
import struct
from collections.abc import Sequence

import numpy as np

from jfail import jsonfile
from jfail.data.datasets import (
    DATASET_NAMES,
    FIXED_SPLIT_SEED,
    FIXED_TEST_FRACTION,
    SUBSET_SEED,
    Dataset,
    _check_split,
    _split_mask,
    load,
)
from jfail.data.errors import DatasetNotFoundError

SCHEMES = ("imagefolder", "tfds", "arrayrecord")
"""Prefixes `<scheme>:` understood by `open_source`, besides the built-in names."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
"""File endings (any case) that an image folder source reads."""

RECORD_FORMAT = "jfail-image-label-v1"
"""Name of the ArrayRecord record format written by `write_arrayrecord`."""

RECORD_MAGIC = b"JFI1"
_HEADER = struct.Struct("<4sI")

_SUFFIXES = re.compile(r"(?:@(?P<size>\d+))?(?:\[:(?P<percent>\d+(?:\.\d+)?)%\])?$")
_SUFFIXES_PERCENT_FIRST = re.compile(r"\[:(?P<percent>\d+(?:\.\d+)?)%\]@(?P<size>\d+)$")
_SPLIT_FOLDERS = ("train", "test", "val", "validation")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImageSource(Sequence):
    """A random-access image classification source (Grain's data source protocol).

    Attributes:
        name: the name it was opened from (with suffixes).
        class_names: one name per class; labels are indices into it.
        image_shape: (H, W, C) of every image.

    `source[i]` is `{"image": [H, W, C] float32 in [0, 1], "label": int32}`;
    `source.labels()` is every label, [N] int32.
    """

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index):
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """[N] int32, the label of every example in order.

        Returns:
            `[N]` int32 numpy array, a copy the caller may change.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        height, width, channels = self.image_shape
        return (f"{type(self).__name__}({self.name!r}, {len(self)} examples of "
                f"{height}x{width}x{channels}, {len(self.class_names)} classes)")


class ArraySource(ImageSource):
    """An in-memory data set served as a source.

    Args:
        images: [N, H, W, C] float32 in [0, 1].
        labels: [N] integer class ids.
        class_names: one name per class.
        name: what to call it in messages.

    Raises:
        ValueError: images and labels of different lengths or bad shapes.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 name: str = "arrays"):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4:
            raise ValueError(f"{name}: images must be [N, H, W, C], got shape {images.shape}.")
        if labels.shape != (len(images),):
            raise ValueError(
                f"{name}: labels must be [N] with N={len(images)} (one per image), got shape "
                f"{labels.shape}."
            )
        self._images = images.astype(np.float32, copy=False)
        self._labels = labels.astype(np.int32)
        self.class_names = tuple(class_names)
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self.name = name

    @classmethod
    def from_dataset(cls, data: Dataset, name: str = "arrays") -> ArraySource:
        """The source of a `jfail.data.Dataset`.

        Args:
            data: the in-memory data set (images `[N, H, W, C]` float32 in [0, 1], labels `[N]`).
            name: what to call it in messages.

        Returns:
            An `ArraySource` serving `data`'s examples.

        Raises:
            ValueError: images and labels of different lengths or bad shapes.
        """
        return cls(data.images, data.labels, data.class_names, name)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index):
        index = _check_index(index, len(self))
        return {"image": self._images[index], "label": self._labels[index]}

    def labels(self) -> np.ndarray:
        """[N] int32, the label of every example in order (a copy)."""
        return self._labels.copy()


class _DecodedSource(ImageSource):
    """Base of the sources that decode one image per read and fit it to one shape."""

    def __init__(self, name: str, image_size: int | None, channels: int | None):
        self.name = name
        self._size = image_size
        self._channels = channels
        first = self._fit(self._raw(0)[0], index=0, check=False)
        self.image_shape = first.shape

    def _raw(self, index: int):
        """(image, label): a PIL image or an array, and an int."""
        raise NotImplementedError

    def __getitem__(self, index):
        index = _check_index(index, len(self))
        image, label = self._raw(index)
        return {"image": self._fit(image, index=index), "label": np.int32(label)}

    def _fit(self, image, *, index: int, check: bool = True) -> np.ndarray:
        array = _fit_image(image, self._size, self._channels, where=self._where(index))
        if check and array.shape != self.image_shape:
            height, width, _ = self.image_shape
            raise ValueError(
                f"{self._where(index)} is {array.shape[0]}x{array.shape[1]} but the first image "
                f"of {self.name!r} is {height}x{width}; give every image one size with "
                "image_size= (or an @S suffix on the name)."
            )
        if self._channels is None:
            self._channels = array.shape[-1]
        return array

    def _where(self, index: int) -> str:
        return f"example {index} of {self.name!r}"


class ImageFolderSource(_DecodedSource):
    """One split of an image folder: images in one sub-folder per class.

    Layout, labels, splits, channels and resizing follow the image-folder rules of the module
    doc: class ids are the sorted class folder names, examples are ordered by class, then by
    path (`<class>/**/<image>`, any depth).

    Args:
        root: the image folder (class folders, or split folders of class folders).
        split: `<root>/<split>` when that folder exists; else, for a folder of class folders,
            `"train"`, `"test"` (the fixed stratified split) or `"all"`.
        image_size: the side S of the square images (shorter side resized, centre crop), or None
            to keep each image's size (then all must have the first image's size).
        channels: 1, 3, or None: 1 when every image of the folder (all splits) is grayscale,
            else 3 (this reads every file's header; give it to skip that).
        name: what to call it in messages.

    Raises:
        DatasetNotFoundError: `root` is not a folder.
        ValueError: an unknown split, no class folders, a class folder without images, split
            folders with different classes.
    """

    def __init__(self, root: str | os.PathLike, *, split: str = "all",
                 image_size: int | None = None, channels: int | None = None,
                 name: str | None = None):
        root = os.fspath(root)
        name = name or f"imagefolder:{root}"
        folders = _image_folder_splits(root, name, split)
        if split in folders:
            folder, part = folders[split], "all"
        elif set(folders) != {_WHOLE}:
            raise ValueError(
                f"Unknown split {split!r} for {name!r}: {root} has split folders "
                f"({', '.join(folders)}) but no {split!r}; pass one of them as the split.")
        else:
            _check_split(name, split, ("train", "test", "all"))
            folder, part = root, split
        class_names, paths, labels = _class_files(folder, name)
        _check_same_classes(folders, class_names, folder, name)
        if part != "all":
            try:
                in_test = _split_mask(labels, FIXED_TEST_FRACTION, seed=FIXED_SPLIT_SEED,
                                      stratified=True)
            except ValueError as error:
                raise ValueError(
                    f"{name!r}: {len(labels)} images are too few for the fixed train/test split "
                    f"({str(error).rstrip('.')}); read split 'all', or add train/ and test/ "
                    "split folders."
                ) from None
            keep = np.flatnonzero(in_test if part == "test" else ~in_test)
            paths, labels = [paths[i] for i in keep], labels[keep]
        self.root = root
        self.paths = tuple(paths)
        self.class_names = tuple(class_names)
        self._labels = np.asarray(labels, np.int32)
        if channels is None:
            channels = 1 if _image_folder_headers(root, name, split)[1] else 3
        super().__init__(name, image_size, channels)

    def __len__(self) -> int:
        return len(self.paths)

    def labels(self) -> np.ndarray:
        """[N] int32, the label of every image in order (a copy)."""
        return self._labels.copy()

    def _raw(self, index: int):
        path = self.paths[index]
        try:
            with open(path, "rb") as handle:
                image = _decode(handle.read(), path)
        except OSError as error:
            raise ValueError(f"{path} could not be read: {error}") from None
        return image, int(self._labels[index])

    def _where(self, index: int) -> str:
        return self.paths[index]


class ArrayRecordSource(_DecodedSource):
    """ArrayRecord files of `RECORD_FORMAT` records (see the module doc), in file order.

    Args:
        paths: the files, in order (a glob is expanded by `open_source`).
        image_size, channels, name: as for `ImageFolderSource`.

    Raises:
        DatasetNotFoundError: no files.
        ValueError: a record that is not of this format, sidecars that
            disagree on the class names.
    """

    def __init__(self, paths: Sequence[str], *, image_size: int | None = None,
                 channels: int | None = None, name: str | None = None):
        import grain

        paths = [os.fspath(path) for path in paths]
        name = name or f"arrayrecord:{','.join(paths)}"
        if not paths:
            raise DatasetNotFoundError(f"{name!r}: no ArrayRecord files.", searched=())
        self.paths = tuple(paths)
        self._records = grain.sources.ArrayRecordDataSource(list(paths))
        self._labels = None
        self.class_names = self._read_sidecars()
        if not len(self._records):
            raise ValueError(f"{name!r}: the ArrayRecord files hold no records.")
        super().__init__(name, image_size, channels)
        if self.class_names is None:
            self.class_names = tuple(str(i) for i in range(int(self.labels().max()) + 1))

    def __len__(self) -> int:
        return len(self._records)

    def labels(self) -> np.ndarray:
        """[N] int32, the label of every record in order (a copy)."""
        if self._labels is None:
            self._labels = np.asarray(
                [_split_record(self._records[i], self._where(i))[0] for i in range(len(self))],
                np.int32,
            )
        return self._labels.copy()

    def _raw(self, index: int):
        label, encoded = _split_record(self._records[index], self._where(index))
        return _decode(encoded, self._where(index)), label

    def _where(self, index: int) -> str:
        return f"record {index} of {self.name!r}"

    def _read_sidecars(self):
        """Class names from the `<file>.json` sidecars (labels too, when every file has one)."""
        class_names, labels = None, []
        for path in self.paths:
            try:
                with open(path + ".json") as handle:
                    meta = json.load(handle)
            except FileNotFoundError:
                labels = None
                continue
            except (OSError, ValueError) as error:
                raise ValueError(f"{path}.json is not a readable sidecar: {error}") from None
            if meta.get("format") != RECORD_FORMAT:
                raise ValueError(f"{path}.json is not a {RECORD_FORMAT} sidecar.")
            names = tuple(meta.get("class_names") or ())
            if class_names is not None and names != class_names:
                raise ValueError(
                    f"The sidecars of {self.paths[0]} and {path} name different classes; files "
                    "of one source must share their class names."
                )
            class_names = names or None
            if labels is not None:
                labels.extend(meta["labels"])
        if labels is not None and len(labels) == len(self._records):
            self._labels = np.asarray(labels, np.int32)
        return class_names


class TfdsSource(_DecodedSource):
    """One split of a prepared TensorFlow Datasets data set, through `tfds.data_source`.

    Args:
        tfds_name: the TFDS name (`"mnist"`, `"cifar10:3.0.2"`).
        split: any TFDS split string (`"train"`, `"test[:10%]"`).
        image_size, channels, name: as for `ImageFolderSource`.
        data_dir: the TFDS data dir (None: TFDS's default).
        image_key, label_key: the features to read.

    Raises:
        ImportError: tensorflow_datasets is not installed.
        ValueError: unknown data set, missing features, an empty split.
        DatasetNotFoundError: the data set is not prepared locally.
    """

    def __init__(self, tfds_name: str, split: str, *, image_size: int | None = None,
                 channels: int | None = None, name: str | None = None,
                 data_dir: str | None = None, image_key: str = "image",
                 label_key: str = "label"):
        from jfail.data.tfds_source import _class_names, _import_tfds, _open_source

        if not tfds_name:
            raise ValueError("'tfds:' must be followed by a TFDS data set name, e.g. 'tfds:mnist'.")
        name = name or f"tfds:{tfds_name}"
        tfds = _import_tfds(tfds_name)
        self._source = _open_source(tfds, tfds_name, split, data_dir)
        if not len(self._source):
            raise ValueError(f"TFDS split {split!r} of {tfds_name!r} has no examples.")
        first = self._source[0]
        for key, argument in ((image_key, "image_key"), (label_key, "label_key")):
            if key not in first:
                raise ValueError(
                    f"TFDS data set {tfds_name!r} has no feature {key!r}; its features are "
                    f"{sorted(first)}. Pass {argument}= to pick one."
                )
        self._keys = (image_key, label_key)
        self._labels = None
        names = _class_names(self._source, label_key, 0)
        super().__init__(name, image_size, channels)
        self.class_names = names or tuple(
            str(i) for i in range(int(self.labels().max()) + 1))

    def __len__(self) -> int:
        return len(self._source)

    def labels(self) -> np.ndarray:
        """[N] int32, every label in order (a copy; the first call reads them all)."""
        if self._labels is None:
            self._labels = np.asarray(
                [self._raw(i)[1] for i in range(len(self))], np.int32)
        return self._labels.copy()

    def _raw(self, index: int):
        example = self._source[index]
        image_key, label_key = self._keys
        label = np.asarray(example[label_key])
        if not np.issubdtype(label.dtype, np.integer) or label.ndim:
            raise ValueError(
                f"TFDS feature {label_key!r} of {self.name!r} is not an integer class label "
                f"(dtype {label.dtype}, shape {label.shape}); pass label_key= to pick another."
            )
        return np.asarray(example[image_key]), int(label)


class SubsetSource(ImageSource):
    """The examples of `parent` at `indices`, in that order.

    Args:
        parent: any source.
        indices: [M] int, positions in `parent`.
        name: what to call it in messages.
    """

    def __init__(self, parent: ImageSource, indices, name: str):
        self.parent = parent
        self.indices = np.asarray(indices, np.int64)
        self.name = name
        self.class_names = parent.class_names
        self.image_shape = parent.image_shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.parent[int(self.indices[_check_index(index, len(self))])]

    def labels(self) -> np.ndarray:
        """[M] int32, the parent's labels at `indices`, in order."""
        return self.parent.labels()[self.indices]


def open_source(
    name: str,
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> ImageSource:
    """Opens a data set by name as a random-access source (nothing is loaded whole).

    Args:
        name: `imagefolder:<path>`, `tfds:<name>`, `arrayrecord:<glob>`
            or a built-in name (DATASET_NAMES), optionally followed by `@S` and
            then `[:P%]` (see the module doc), e.g. `"imagefolder:/data/pets@64[:10%]"`.
        split: `imagefolder`: the split rule of the module doc
            (`<path>/<split>`, else the fixed split: `"train"`, `"test"`,
            `"all"`); `tfds`: any TFDS split string; `arrayrecord`: ignored
            (the glob names the files); built-in names: as for `load`.
        image_size: the side S of the square images; the same as an `@S`
            suffix (give one or the other, or the same value). None keeps the
            stored size, which must then be the same for every image.
        channels: 1 (grayscale) or 3 (RGB); None: an image folder's channel
            rule (module doc), else the first image's.
        data_dir: the TFDS data dir (`tfds:`) or the IDX folder (built-ins).
        image_key, label_key: the TFDS features to read (`tfds:` only).

    Returns:
        An `ImageSource`: `len(source)` examples, `source[i]` =
        `{"image": [S, S, C] float32 in [0, 1], "label": int32}`.

    Raises:
        ValueError: an unknown scheme or name, bad suffixes, an empty folder,
            images that do not fit one shape.
        DatasetNotFoundError: a missing folder, no files matching the glob, a
            data set that is not available locally.
        ImportError: `tfds:` without tensorflow_datasets.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}.")
    scheme, rest, size, percent = _parse(name, image_size)
    if scheme is None:
        return _open_builtin(name, rest, split, size, percent, channels, data_dir)
    if (image_key, label_key) != ("image", "label") and scheme != "tfds":
        raise ValueError(
            f"image_key and label_key only apply to 'tfds:<name>' data sets, not {name!r}.")
    if scheme == "imagefolder":
        source = ImageFolderSource(os.path.expanduser(rest), split=split, image_size=size,
                                   channels=channels, name=name)
    elif scheme == "arrayrecord":
        paths = sorted(path for path in globbing.glob(os.path.expanduser(rest))
                       if not path.endswith(".json"))
        if not paths:
            raise DatasetNotFoundError(
                f"{name!r}: no files match {rest!r}. Write ArrayRecord files with "
                "jfail.data.write_arrayrecord, then name them by path or glob.",
                searched=(rest,),
            )
        source = ArrayRecordSource(paths, image_size=size, channels=channels, name=name)
    else:
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty TFDS split string, got {split!r}.")
        source = TfdsSource(rest, split, image_size=size, channels=channels, name=name,
                            data_dir=None if data_dir is None else os.fspath(data_dir),
                            image_key=image_key, label_key=label_key)
    return _percent(source, percent, name) if percent is not None else source


def check_source_name(name: str) -> None:
    """Raises unless `open_source` understands `name` (nothing is read or opened).

    Args:
        name: a source name, as for `open_source`.

    Raises:
        TypeError: `name` is not a non-empty string.
        ValueError: an unknown scheme or built-in name, a scheme without its argument, bad `@S`
            or `[:P%]` suffixes.
    """
    _parse(name, None)


def _parse(name, image_size):
    """(scheme or None for a built-in name, the rest without suffixes, size, percent)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a data set name must be a non-empty string, got {name!r}.")
    suffixes = _SUFFIXES_PERCENT_FIRST.search(name) or _SUFFIXES.search(name)
    base = name[: suffixes.start()]
    size = _size(name, suffixes["size"], image_size)
    percent = None if suffixes["percent"] is None else float(suffixes["percent"])
    if percent is not None and not 0 < percent <= 100:
        raise ValueError(f"{name!r}: the percentage must be in (0, 100], got {percent:g}.")
    scheme, colon, rest = base.partition(":")
    if not colon and base in DATASET_NAMES:
        return None, base, size, percent
    if is_image_folder_name(base) and scheme != "imagefolder":
        return "imagefolder", base, size, percent
    if not colon or scheme not in SCHEMES:
        raise ValueError(
            f"Unknown data set {name!r}. Known: {', '.join(f'{s}:...' for s in SCHEMES)} "
            f"({', '.join(_SCHEME_HELP)}) or a built-in name ({', '.join(DATASET_NAMES)}); "
            "each may end with @S (SxS images) and [:P%] (a stratified P percent)."
        )
    if not rest:
        raise ValueError(
            f"{name!r}: '{scheme}:' must be followed by {_SCHEME_HELP[SCHEMES.index(scheme)]}.")
    return scheme, rest, size, percent


def write_arrayrecord(
    path: str | os.PathLike,
    images,
    labels,
    *,
    class_names: Sequence[str] | None = None,
    image_format: str = "png",
) -> str:
    """Writes images and labels as one ArrayRecord file of `RECORD_FORMAT` records.

    Each image is encoded with Pillow (PNG: lossless; JPEG: quality 95) and
    stored after its 8-byte header; `<path>.json` records the labels and
    class names. Read the file back with `open_source("arrayrecord:<path>")`.

    Args:
        path: the file to write (replaced if it exists).
        images: [N, H, W, C] with C in {1, 3}: uint8, or float in [0, 1]
            (rounded to the nearest 8-bit level), or an iterable of such
            [H, W, C] images (written one at a time, so it may be a stream).
        labels: [N] non-negative integers.
        class_names: one name per class (default: none recorded, and readers
            call the classes "0", "1", ...).
        image_format: `"png"` or `"jpeg"`.

    Returns:
        `path` as a string.

    Raises:
        ValueError: a bad format, images of a shape Pillow cannot encode,
            labels that are negative or not one per image.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    image_format = image_format.lower()
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}.")
    labels = [int(label) for label in np.asarray(labels).reshape(-1)]
    if any(label < 0 or label >= 2**32 for label in labels):
        raise ValueError("labels must be integers in [0, 2**32).")
    path = os.fspath(path)
    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    try:
        for count, image in enumerate(images, start=1):
            if count > len(labels):
                raise ValueError(f"there are more images than the {len(labels)} labels.")
            writer.write(_HEADER.pack(RECORD_MAGIC, labels[count - 1])
                         + _encode(image, image_format, count - 1))
    finally:
        writer.close()
    if count != len(labels):
        raise ValueError(f"{count} images but {len(labels)} labels; give one label per image.")
    meta = {"format": RECORD_FORMAT, "num_records": count, "labels": labels,
            "class_names": list(class_names) if class_names is not None else []}
    jsonfile.write(path + ".json", meta)
    return path


def read_all(source: ImageSource) -> Dataset:
    """Reads a whole source into memory (for small sources only).

    Args:
        source: any `ImageSource`.

    Returns:
        A `Dataset`: images [N, H, W, C] float32, labels [N] int32, and the source's class names.
    """
    images = np.empty((len(source), *source.image_shape), np.float32)
    labels = np.empty(len(source), np.int32)
    for index in range(len(source)):  # one pass: a source may decode the image to get a label
        example = source[index]
        images[index], labels[index] = example["image"], example["label"]
    return Dataset(images, labels, source.class_names)


# ---------------------------------------------------------------- image folders


def is_image_folder_name(name: str) -> bool:
    """Whether `name` names an image folder: `imagefolder:<path>`, or a name with a path
    separator in it and no `<scheme>:` prefix (`./my_images`, `/data/pets@64`).

    Args:
        name: a data set name (anything that is not a string gives False).

    Returns:
        True if `name` is read as an image folder.
    """
    if not isinstance(name, str):
        return False
    if name.startswith("imagefolder:"):
        return True
    return not _SCHEME_PREFIX.match(name) and ("/" in name or os.sep in name)


def image_folder_name_parts(name: str) -> tuple[str, int | None, float | None]:
    """`(path, size or None, percent or None)` of an image-folder name, e.g.
    `"imagefolder:pets@64[:10%]"` -> `("pets", 64, 10.0)`.

    Args:
        name: an image-folder name (`imagefolder:<path>` or a path), with optional suffixes.

    Returns:
        `(path, size, percent)`: the folder, the `@S` size or None, the `[:P%]` percent or None.

    Raises:
        TypeError: `name` is not a non-empty string.
        ValueError: `name` is not an image-folder name, or has bad suffixes.
    """
    scheme, path, size, percent = _parse(name, None)
    if scheme != "imagefolder":
        raise ValueError(f"{name!r} is not an image folder name; write 'imagefolder:<path>'.")
    return path, size, percent


def image_folder_classes(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names of the image folder at `path` (sorted class folder names), checking
    its layout without reading any image.

    Args:
        path: the image folder.

    Returns:
        The class names, sorted.

    Raises:
        DatasetNotFoundError: `path` is not a folder.
        ValueError: no class folders, a class folder without images, split folders with
            different classes.
    """
    name = f"imagefolder:{os.fspath(path)}"
    folders = _image_folder_splits(path, name)
    classes = None
    for folder in folders.values():
        names = _class_files(folder, name)[0]
        if classes is not None:
            _check_same_classes(folders, names, folder, name)
        classes = names
    return classes


def image_folder_shape(path: str | os.PathLike, image_size: int | None = None
                       ) -> tuple[int, int, int]:
    """`(H, W, C)` of every image of the image folder at `path`, from the files' headers
    (no pixel is decoded).

    C is the folder's channel rule (1 when every image of every split is grayscale, else 3);
    `(image_size, image_size, C)` when `image_size` is given.

    Args:
        path: the image folder.
        image_size: the side the images are resized to, or None to keep their stored size.

    Returns:
        `(H, W, C)` ints.

    Raises:
        DatasetNotFoundError: `path` is not a folder.
        ValueError: a bad layout (`image_folder_classes`), a file that is not a readable
            image, or images of different sizes without `image_size`.
    """
    sizes, gray = _image_folder_headers(path, f"imagefolder:{os.fspath(path)}")
    channels = 1 if gray else 3
    if image_size is not None:
        return (image_size, image_size, channels)
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        raise ValueError(f"image folder {os.fspath(path)!r} holds images of {len(sizes)} sizes "
                         f"({shown}{', ...' if len(sizes) > 4 else ''}); add @S to the name to "
                         "make them all SxS, e.g. 'imagefolder:my_images@64', or give the "
                         "model's image_size.")
    width, height = sizes.pop()
    return (height, width, channels)


def load_image_folder(path: str | os.PathLike, split: str = "train", *,
                      image_size: int | None = None) -> Dataset:
    """One split of an image folder in memory: `read_all` of its `ImageFolderSource`,
    after checking from the headers that every image has one size (or `image_size`).

    Args:
        path: the folder (see the module doc for its layout and rules).
        split: `<path>/<split>` when that folder exists; else `"train"`, `"test"` (the
            fixed stratified split) or `"all"`.
        image_size: make every image `[image_size, image_size]` (shorter side resized,
            bilinear, centre crop); None keeps the files' size, which must then be the same for
            all.

    Returns:
        `Dataset` with images `[N, H, W, C]` float32 in [0, 1], labels `[N]` int32 (sorted
        class folder names), class_names.

    Raises:
        DatasetNotFoundError: `path` is not a folder.
        ValueError: a bad layout, an unreadable file, an unknown split, mixed sizes without
            `image_size`.
    """
    channels = image_folder_shape(path, image_size)[-1]
    return read_all(ImageFolderSource(os.path.expanduser(os.fspath(path)), split=split,
                                      image_size=image_size, channels=channels,
                                      name=f"imagefolder:{os.fspath(path)}"))


_WHOLE = "all"
_SCHEME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _image_folder_splits(path, name: str, split: str | None = None) -> dict[str, str]:
    """`{split: <path>/<split>}` for the split folders present (train, test, val, validation
    and `split`), or `{"all": <path>}` for a folder of class folders."""
    root = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(root):
        raise DatasetNotFoundError(
            f"image folder {os.fspath(path)!r} is not a directory ({os.path.abspath(root)} is "
            "not a folder); give a folder with one sub-folder of images per class.",
            searched=(root,),
        )
    names = list(_SPLIT_FOLDERS)
    if isinstance(split, str) and split and split not in names:
        names.append(split)
    present = {s: os.path.join(root, s) for s in names if os.path.isdir(os.path.join(root, s))}
    return present or {_WHOLE: root}


def _class_files(folder: str, name: str) -> tuple[list[str], list[str], np.ndarray]:
    """(sorted class names, image paths by class then path, [N] int32 labels) of `folder`."""
    class_names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not class_names:
        raise ValueError(
            f"{name!r}: {folder} has no class folders; put the images of each class in "
            f"their own sub-folder ({folder}/<class name>/<image>.png)."
        )
    paths, labels, empty = [], [], []
    for label, class_name in enumerate(class_names):
        found = []
        for parent, subfolders, files in os.walk(os.path.join(folder, class_name)):
            subfolders.sort()
            found += [os.path.join(parent, file_name) for file_name in sorted(files)
                      if file_name.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            empty.append(class_name)
        paths += found
        labels += [label] * len(found)
    if empty:
        raise ValueError(
            f"{name!r}: the class folders of {folder} ({', '.join(empty[:5])}"
            f"{', ...' if len(empty) > 5 else ''}) hold no images; a folder that holds no "
            f"{', '.join(IMAGE_EXTENSIONS[:-1])} or {IMAGE_EXTENSIONS[-1]} file is not a class: "
            "add images to it or remove it."
        )
    return class_names, paths, np.asarray(labels, np.int32)


def _check_same_classes(folders: dict[str, str], class_names, folder: str, name: str) -> None:
    for other in folders.values():
        if other == folder:
            continue
        others = sorted(entry.name for entry in os.scandir(other) if entry.is_dir())
        if others != list(class_names):
            raise ValueError(
                f"{name!r}: {folder} has classes {list(class_names)} but {other} has {others}; "
                "every split folder needs the same class folders.")


def _image_folder_headers(path, name: str, split: str | None = None
                          ) -> tuple[set[tuple[int, int]], bool]:
    """(the set of (width, height), whether every image is grayscale) over every split."""
    from PIL import Image, UnidentifiedImageError

    sizes, gray = set(), True
    for folder in _image_folder_splits(path, name, split).values():
        for file in _class_files(folder, name)[1]:
            try:
                with Image.open(file) as image:
                    sizes.add(image.size)
                    gray &= image.mode in _GRAY_MODES
            except (OSError, UnidentifiedImageError) as error:
                raise ValueError(f"{file} is not an image Pillow can read: {error}") from None
    return sizes, gray


_SCHEME_HELP = ("a folder of class folders", "a TFDS name", "a path or glob of ArrayRecord files")


def _size(name: str, suffix: str | None, image_size: int | None) -> int | None:
    size = None if suffix is None else int(suffix)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
            raise TypeError(f"image_size must be an int, got {type(image_size).__name__}.")
        if size is not None and size != image_size:
            raise ValueError(
                f"{name!r} asks for {size}x{size} images but image_size={image_size}; give one."
            )
        size = int(image_size)
    if size is not None and not 1 <= size <= 4096:
        raise ValueError(f"{name!r}: the image size must be in [1, 4096], got {size}.")
    return size


def _open_builtin(name, base, split, size, percent, channels, data_dir) -> ImageSource:
    full = base + (f"@{size}" if size is not None else "")
    full += f"[:{percent:g}%]" if percent is not None else ""
    data = load(full, split, data_dir=data_dir)
    images = data.images
    if channels is not None and images.shape[-1] != channels:
        images = _convert_channels(images, channels)
    return ArraySource(images, data.labels, data.class_names, name)


def _percent(source: ImageSource, percent: float, name: str) -> ImageSource:
    if percent == 100:
        return source
    keep = _split_mask(source.labels(), percent / 100, seed=SUBSET_SEED, stratified=True)
    return SubsetSource(source, np.flatnonzero(keep), name)


def _check_index(index, length: int) -> int:
    index = int(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for {length} examples.")
    return index % length


def _split_record(record: bytes, where: str) -> tuple[int, bytes]:
    if len(record) < _HEADER.size or record[:4] != RECORD_MAGIC:
        raise ValueError(
            f"{where} is not a {RECORD_FORMAT} record (it should start with {RECORD_MAGIC!r}); "
            "write the files with jfail.data.write_arrayrecord."
        )
    return _HEADER.unpack_from(record)[1], record[_HEADER.size:]


def _decode(encoded: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(encoded))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{where} is not an image Pillow can decode: {error}") from None
    return image


def _encode(image, image_format: str, index: int) -> bytes:
    from PIL import Image

    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"image {index} must be [H, W, C] with C 1 or 3, got shape {array.shape}.")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"image {index} must be uint8 or float in [0, 1], got {array.dtype}.")
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    options = {"quality": 95} if image_format == "jpeg" else {}
    pil.save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def _fit_image(image, size: int | None, channels: int | None, *, where: str) -> np.ndarray:
    """[S, S, C] float32 in [0, 1] from a PIL image or an [H, W(, C)] array."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{where} has shape {image.shape}; expected [H, W] or [H, W, C].")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(
                    f"{where} has dtype {array.dtype}; only uint8 and float images are supported.")
            return _fit_float(array.astype(np.float32), size, channels)
        if (array.shape[-1] in (1, 3) and channels in (None, array.shape[-1])
                and size in (None, array.shape[0]) and size in (None, array.shape[1])):
            return np.divide(array, np.float32(255), dtype=np.float32)  # what Pillow would give
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if channels is None:
        channels = 1 if image.mode in _GRAY_MODES else 3
    if image.mode in ("I", "I;16", "F"):
        image = image.point(lambda value: value / 256).convert("L")
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size, size):
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.BILINEAR)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return np.divide(array, np.float32(255), dtype=np.float32)


def _fit_float(array: np.ndarray, size: int | None, channels: int | None) -> np.ndarray:
    from PIL import Image

    if array.shape[-1] == 4:
        array = array[..., :3]
    if channels is not None and array.shape[-1] != channels:
        array = _convert_channels(array[None], channels)[0]
    if size is not None and array.shape[:2] != (size, size):
        height, width = array.shape[:2]
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        planes = [
            np.asarray(Image.fromarray(array[..., c], mode="F").resize(resized, Image.BILINEAR)
                       .crop((left, top, left + size, top + size)))
            for c in range(array.shape[-1])
        ]
        array = np.stack(planes, axis=-1)
    return np.clip(array, 0.0, 1.0).astype(np.float32)


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """[N, H, W, C] float -> [N, H, W, channels]: grey repeated, or ITU-R 601 luma."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = np.asarray([0.299, 0.587, 0.114], np.float32)
    return (images[..., :3] @ luma)[..., None].astype(np.float32)
