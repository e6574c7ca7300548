"""Data sets as in-memory arrays or random-access sources, batching, and input validation.

Images are always [N, H, W, C] float32 in [0, 1]; labels [N] int32.
"""

from jfail.data.batching import Batch, batches, epoch_permutation, num_batches
from jfail.data.checks import check_images, check_labels
from jfail.data.datasets import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    FASHION_MNIST_CLASS_NAMES,
    Dataset,
    check_dataset_name,
    dataset_image_shape,
    fashion_mnist_search_dirs,
    load,
    mnist_search_dirs,
    train_val_split,
)
from jfail.data.errors import DatasetNotFoundError
from jfail.data.idx import read_idx
from jfail.data.sources import (
    ArraySource,
    ImageSource,
    check_source_name,
    image_folder_name_parts,
    image_folder_shape,
    is_image_folder_name,
    load_image_folder,
    open_source,
    read_all,
    write_arrayrecord,
)
from jfail.data.streaming import loader

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "ArraySource",
    "FASHION_MNIST_CLASS_NAMES",
    "ImageSource",
    "Batch",
    "Dataset",
    "DatasetNotFoundError",
    "batches",
    "check_dataset_name",
    "check_images",
    "check_labels",
    "check_source_name",
    "dataset_image_shape",
    "epoch_permutation",
    "fashion_mnist_search_dirs",
    "image_folder_name_parts",
    "image_folder_shape",
    "is_image_folder_name",
    "load_image_folder",
    "load",
    "loader",
    "mnist_search_dirs",
    "num_batches",
    "open_source",
    "read_all",
    "read_idx",
    "train_val_split",
    "write_arrayrecord",
]
