"""Reading image classification data sets through TensorFlow Datasets (TFDS).

Uses ``tfds.data_source``, the random-access reader, which does not need
TensorFlow. Data is never downloaded from here: a data set must have been
prepared once (on a machine with network access) in the TFDS data dir.
"""

from __future__ import annotations

import numpy as np

from jfail.data.errors import DatasetNotFoundError

INSTALL_HINT = "pip install 'jfail[tfds]'"
"""The command that installs the optional TFDS dependency."""

_CHUNK_SIZE = 1024


def read_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Reads a whole TFDS split into memory.

    Returns (images, labels, class_names) with images: [N, H, W, C] float32
    in [0, 1] (uint8 pixels are divided by 255; [H, W] images get C=1),
    labels: [N] int32 and class_names from the label feature's names (or
    "0", "1", ... when the feature has none).

    Raises:
      ImportError: tensorflow_datasets is not installed.
      ValueError: TFDS knows no data set ``name``, or its examples lack the
        keys or have images/labels this loader cannot use.
      DatasetNotFoundError: the data set is not prepared in the TFDS data dir
        (its ``searched`` attribute holds the directory TFDS looked in).
    """
    tfds = _import_tfds(name)
    source = _open_source(tfds, name, split, data_dir)
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError(f"TFDS split {split!r} of {name!r} has no examples.")

    images = labels = None
    for start, examples in _read_chunks(source, num_examples):
        chunk_images, chunk_labels = _unpack_examples(examples, name, image_key, label_key)
        if images is None:
            images = np.empty((num_examples, *chunk_images.shape[1:]), chunk_images.dtype)
            labels = np.empty(num_examples, np.int64)
        elif chunk_images.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"TFDS data set {name!r} has images of different shapes "
                f"({images.shape[1:]} and {chunk_images.shape[1:]}); only "
                "fixed-size images can be loaded into one array."
            )
        stop = start + len(chunk_labels)
        images[start:stop] = chunk_images
        labels[start:stop] = chunk_labels

    if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
        raise ValueError(
            f"TFDS data set {name!r} has labels outside [0, 2**31): "
            f"min={labels.min()}, max={labels.max()}."
        )
    class_names = _class_names(source, label_key, int(labels.max()) + 1)
    return _to_unit_float(images, name), labels.astype(np.int32), class_names


def _import_tfds(name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"Loading {name!r} through TensorFlow Datasets needs the "
            f"tensorflow_datasets package, which is not installed: {INSTALL_HINT}"
        ) from error
    return tfds


def _open_source(tfds, name: str, split: str, data_dir: str | None):
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"TensorFlow Datasets has no data set named {name!r}; see "
            "https://www.tensorflow.org/datasets/catalog/overview"
        ) from None
    except Exception as error:
        # TFDS reports missing data with various exceptions; when the data is
        # in fact prepared, the error is about something else and is kept.
        location = _prepared_location(tfds, name, data_dir)
        if location is None:
            raise
        raise DatasetNotFoundError(
            _not_prepared_message(name, split, data_dir, location), searched=(location,)
        ) from error


def _prepared_location(tfds, name: str, data_dir: str | None) -> str | None:
    """None if the data set is prepared, else the directory TFDS looked in."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            return None
        return str(builder.data_dir)
    except Exception:  # an unusable builder: report the data dir we passed
        return data_dir or "the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"


def _not_prepared_message(name: str, split: str, data_dir: str | None, location: str) -> str:
    arguments = f"{name!r}, split={split!r}"
    if data_dir is not None:
        arguments += f", data_dir={data_dir!r}, builder_kwargs={{'file_format': 'array_record'}}"
    command = f'python -c "import tensorflow_datasets as tfds; tfds.data_source({arguments})"'
    return (
        f"TFDS data set {name!r} is not prepared in {location}. It has to be "
        "downloaded and prepared once, which needs network access; on a "
        f"machine with network access (and the same TFDS data dir) run:\n  {command}"
    )


def _read_chunks(source, num_examples: int):
    """Yields (start, examples) with up to _CHUNK_SIZE examples at a time."""
    read_many = getattr(source, "__getitems__", None)
    for start in range(0, num_examples, _CHUNK_SIZE):
        keys = list(range(start, min(start + _CHUNK_SIZE, num_examples)))
        if read_many is not None:
            try:
                yield start, list(read_many(keys))
                continue
            except (TypeError, NotImplementedError):
                # Some sources (TFDS's own mock_data among them) expose a
                # __getitems__ that cannot be called; read one at a time.
                read_many = None
        yield start, [source[key] for key in keys]


def _unpack_examples(examples, name: str, image_key: str, label_key: str):
    first = examples[0]
    for key, argument in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in first:
            raise ValueError(
                f"TFDS data set {name!r} has no feature {key!r}; its features are "
                f"{sorted(first)}. Pass {argument}= to pick one."
            )
    images = [_channels_last(np.asarray(example[image_key]), name) for example in examples]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"TFDS data set {name!r} has images of different shapes "
            f"({sorted(shapes)[:3]}...); only fixed-size images can be loaded "
            "into one array."
        )
    labels = np.asarray([example[label_key] for example in examples])
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"TFDS feature {label_key!r} of {name!r} is not an integer class "
            f"label (dtype {labels.dtype}); pass label_key= to pick another."
        )
    return np.stack(images), labels


def _channels_last(image: np.ndarray, name: str) -> np.ndarray:
    if image.ndim == 2:
        return image[..., None]
    if image.ndim == 3:
        return image
    raise ValueError(
        f"TFDS data set {name!r} has images of shape {image.shape}; expected "
        "[H, W] or [H, W, C]."
    )


def _to_unit_float(images: np.ndarray, name: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return np.divide(images, np.float32(255), dtype=np.float32)
    if np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float32)
    raise ValueError(
        f"TFDS data set {name!r} has images of dtype {images.dtype}; only uint8 "
        "(scaled by 1/255) and floating point images are supported."
    )


def _class_names(source, label_key: str, num_labels: int) -> tuple[str, ...]:
    info = getattr(source, "dataset_info", None)
    try:
        names = info.features[label_key].names
    except (AttributeError, KeyError, TypeError):
        names = None
    if names:
        return tuple(str(class_name) for class_name in names)
    return tuple(str(index) for index in range(num_labels))
