"""Mini-batch iteration with per-epoch shuffling that can be resumed exactly, and padding of a
short last chunk to the fixed row count a compiled program was built for.

The order of epoch `e` depends only on `(key, e, N)`: it is
`jax.random.permutation(jax.random.fold_in(key, e), N)`. A run restarted
with `first_epoch=k` therefore sees exactly the batches that epochs
`k, k+1, ...` of an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jfail.keys import as_key


class Batch(NamedTuple):
    """One mini-batch.

    images: [B, H, W, C]; labels: [B]; B == batch_size except possibly for
    the last batch of an epoch when drop_remainder is False.
    epoch: the epoch this batch belongs to.
    step: global step index, counting from 0 at the first batch of epoch 0
      (so `step == epoch * num_batches(N, batch_size, drop_remainder) + i`).
    """

    images: np.ndarray
    labels: np.ndarray
    epoch: int
    step: int


def batches(
    images,
    labels,
    batch_size: int,
    *,
    key=None,
    epochs: int = 1,
    first_epoch: int = 0,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
    """Yields mini-batches for `epochs` epochs, starting at epoch `first_epoch`.

    Batches are gathered with one permutation chunk at a time, so the data set is never copied as
    a whole. Arguments are checked when this is called, not on the first `next`.

    Args:
        images: `[N, ...]`, a numpy or jax array.
        labels: `[N]`, a numpy or jax array.
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        key: a jax PRNG key (or an int seed) to shuffle every epoch; None keeps the stored order.
        epochs: how many epochs to yield: `first_epoch, ..., first_epoch + epochs - 1`. Resuming
            a run of E epochs at epoch k is `batches(..., epochs=E - k, first_epoch=k)`; one
            epoch at a time is `batches(..., epochs=1, first_epoch=epoch)`.
        first_epoch: the number of the first epoch yielded (it picks the shuffle order).
        drop_remainder: skip the final batch of each epoch if it is smaller than `batch_size`.

    Returns:
        An iterator of `Batch` (images `[b, ...]`, labels `[b]`, epoch, global step).

    Raises:
        ValueError: if `images` or `labels` have no leading example axis or different lengths,
            `batch_size` is not positive, `drop_remainder=True` would leave no batch, or `epochs`
            or `first_epoch` is negative.
    """
    num_examples = _num_examples(images, labels)
    per_epoch = num_batches(num_examples, batch_size, drop_remainder)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}.")
    if first_epoch < 0:
        raise ValueError(f"first_epoch must be >= 0, got {first_epoch}.")
    if key is not None:
        key = as_key(key)
    return _iterate(images, labels, batch_size, key, per_epoch, first_epoch, epochs)


def epoch_permutation(key, epoch: int, n: int) -> np.ndarray:
    """The order of examples in `epoch`: int `[n]`, a permutation of range(n).

    Equal to `jax.random.permutation(jax.random.fold_in(key, epoch), n)`.

    Args:
        key: a jax PRNG key or an int seed.
        epoch: the epoch number, folded into `key`.
        n: the number of examples.

    Returns:
        `[n]` int numpy array, a permutation of `range(n)`.
    """
    epoch_key = jax.random.fold_in(as_key(key), epoch)
    return np.asarray(jax.random.permutation(epoch_key, n))


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Number of batches in one epoch of `n` examples.

    Args:
        n: the number of examples.
        batch_size: examples per batch.
        drop_remainder: whether a final smaller batch is dropped.

    Returns:
        `n // batch_size` with `drop_remainder`, else `ceil(n / batch_size)`.

    Raises:
        ValueError: if `batch_size` is not positive, `n` is negative, or `drop_remainder=True` and
            `batch_size > n` (no batch at all).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    if drop_remainder:
        if batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {n} examples, so "
                "drop_remainder=True would yield no batches; lower batch_size "
                "or set drop_remainder=False."
            )
        return n // batch_size
    return -(-n // batch_size)


def pad_rows_with_zeros(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` `[n, ...]` (numpy) with `rows - n` rows of zeros appended: `[rows, ...]`.

    For rows whose results are dropped or weighted 0 (e.g. `DataParallel.shard_batch`'s
    padding); returns `array` itself when it already has `rows` rows.

    Args:
        array: `[n, ...]` numpy array.
        rows: the number of rows wanted, at least `n`.

    Returns:
        `[rows, ...]` numpy array of `array`'s dtype.
    """
    if len(array) == rows:
        return array
    pad = np.zeros((rows - len(array), *array.shape[1:]), array.dtype)
    return np.concatenate([array, pad])


def pad_rows_repeating_last(array, rows: int):
    """`array` `[n, ...]` with its last row repeated `rows - n` times: `[rows, ...]`.

    For chunks fed to a model, where a row of zeros could be an input it was never meant to see
    (a NaN, a division by zero): the padding is a copy of a real row, and its results are
    dropped. numpy in, numpy out; JAX arrays (PRNG key arrays included) stay JAX arrays. Returns
    `array` itself when it already has `rows` rows.

    Args:
        array: `[n, ...]` numpy or JAX array with `n >= 1`.
        rows: the number of rows wanted, at least `n`.

    Returns:
        `[rows, ...]` array of the same kind and dtype as `array`.
    """
    missing = rows - array.shape[0]
    if missing == 0:
        return array
    xp = np if isinstance(array, np.ndarray) else jnp
    return xp.concatenate([array, xp.repeat(array[-1:], missing, axis=0)], axis=0)


def _iterate(images, labels, batch_size, key, per_epoch, first_epoch, epochs):
    num_examples = len(labels)
    for epoch in range(first_epoch, first_epoch + epochs):
        order = None if key is None else epoch_permutation(key, epoch, num_examples)
        for index in range(per_epoch):
            start = index * batch_size
            stop = min(start + batch_size, num_examples)
            if order is None:
                chunk = slice(start, stop)
            else:
                chunk = order[start:stop]
            yield Batch(images[chunk], labels[chunk], epoch, epoch * per_epoch + index)


def _num_examples(images, labels) -> int:
    num_images, num_labels = _length(images, "images"), _length(labels, "labels")
    if num_images != num_labels:
        raise ValueError(
            f"images and labels have different lengths: {num_images} vs {num_labels}."
        )
    return num_labels


def _length(array, name: str) -> int:
    try:
        return len(array)
    except TypeError:
        raise ValueError(
            f"{name} needs a leading example axis, got {type(array).__name__} "
            f"of shape {np.shape(array)}."
        ) from None
