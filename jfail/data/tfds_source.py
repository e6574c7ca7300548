"""Opening image classification data sets of TensorFlow Datasets (TFDS), for
`jfail.data.sources.TfdsSource`.

Uses `tfds.data_source`, the random-access reader, which does not need
TensorFlow. Data is never downloaded from here: a data set must have been
prepared once (on a machine with network access) in the TFDS data dir.
"""

from __future__ import annotations

from jfail.data.errors import DatasetNotFoundError

INSTALL_HINT = "pip install 'jfail[tfds]'"
"""The command that installs the optional TFDS dependency."""


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


def _class_names(source, label_key: str, num_labels: int) -> tuple[str, ...]:
    info = getattr(source, "dataset_info", None)
    try:
        names = info.features[label_key].names
    except (AttributeError, KeyError, TypeError):
        names = None
    if names:
        return tuple(str(class_name) for class_name in names)
    return tuple(str(index) for index in range(num_labels))
