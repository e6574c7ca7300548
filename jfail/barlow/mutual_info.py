"""Mutual information between continuous features and a binary error indicator, batched in JAX.

The estimator is the one scikit-learn's `mutual_info_classif` uses, and hence the one Barlow's
authors used to pick a tree's features: the nearest-neighbour estimator of B. C. Ross ("Mutual
information between discrete and continuous data sets", PLoS ONE 9(2), 2014) with k = 3
neighbours. For each example i of class c (error or correct), let r_i be the distance to its k-th
nearest neighbour among the examples of class c, and m_i the number of examples of either class
strictly closer than r_i (itself included); then

    I(X; E) = psi(N) + <psi(k)> - <psi(N_c)> - <psi(m_i)>,   clipped at 0,

averaged over the examples whose class has at least two members. In one dimension all of this
follows from one sort of each column by (class, value): r_i is the narrowest window of k + 1
consecutive same-class values containing x_i; the same-class values closer than r_i lie in that
window, and the other class's are counted by two binary searches in its sorted values. Every
digamma argument is a count, so psi is a table. As in scikit-learn, each feature is first nudged
by 1e-10 max(std, mean |x|) times noise so that tied values (a ReLU feature's zeros) are ordered
at random; in float32 this moves only values below about 1e-3. On features without ties the
estimates equal scikit-learn's to float32 precision (about 1e-6 nats).

Every (group, feature) column is independent, so a whole chunk of groups by all their features is
one jitted, vmapped program. Sorting is where the time goes, and XLA's CPU sort is slow (about
0.15 us per element on a 2-core machine, against 3 ns for numpy's). So, when asked to,
`rank_features` can first *screen* each group's features with a cheap moment statistic, the
Gaussian class-conditional mutual information 0.5 log var(x) - sum_c p_c 0.5 log var(x | c), and
run the exact estimator only on the `screen` best-scoring candidates; `screen=None` (the
default) runs it on every feature, as the paper does. The screen sees mean and variance shifts,
which a threshold rule on a feature produces; a dependence that moves neither (errors at both
tails with the same variance) can be screened out.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import digamma as _scipy_digamma
from tqdm.auto import tqdm

from jfail.barlow._checks import check_features_and_errors, check_groups
from jfail.keys import as_key
from jfail.logs import progress_disabled
from jfail.train.parallel import DataParallel
from jfail.xla import jit

__all__ = ["FeatureRanking", "mutual_information", "mutual_information_batch", "rank_features"]

JITTER = 1e-10
"""Relative size of the tie-breaking noise, scikit-learn's value."""

_SIZE_BUCKETS = np.unique(np.concatenate([2 ** np.arange(3, 31), 3 * 2 ** np.arange(2, 30)]))
# Group sizes are padded up to the next of 8, 12, 16, 24, 32, 48, 64, 96, ...: at most a third of
# a chunk is padding, and a call compiles one program per bucket its groups fall in.


class FeatureRanking(NamedTuple):
    """The `k` features with the largest mutual information with the errors, per group.

    indices: [G, k] original feature indices by decreasing mutual information.
    mutual_information: [G, k] the estimates, in nats.
    """

    indices: np.ndarray
    mutual_information: np.ndarray


def mutual_information(features, errors, *, key, n_neighbors: int = 3) -> np.ndarray:
    """Mutual information (nats) between every feature and the errors of one group.

    Args:
      features: `[N, D]` real values.
      errors: `[N]` booleans (True where the model is wrong).
      key: the tie-breaking noise (an int seed or a PRNG key).
      n_neighbors: the neighbours of the Kraskov-style estimator.

    Returns:
      `[D]`, the estimate scikit-learn's
      `mutual_info_classif(features, errors, n_neighbors=n_neighbors)` computes, in float32.

    Raises:
      ValueError: `features` is not a non-empty finite numeric `[N, D]`, `errors` is not `[N]`
        booleans or 0/1, `n_neighbors < 1`, or `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    features, errors = check_features_and_errors(features, errors)
    num_features = features.shape[1]
    ranking = rank_features(
        features,
        errors,
        [np.arange(len(errors))],
        num_features=num_features,
        screen=None,
        n_neighbors=n_neighbors,
        key=key,
    )
    out = np.zeros(num_features, np.float32)
    out[ranking.indices[0]] = ranking.mutual_information[0]
    return out


def rank_features(
    features,
    errors,
    groups: Sequence[np.ndarray],
    *,
    num_features: int = 50,
    screen: int | None = None,
    n_neighbors: int = 3,
    key,
    chunk_examples: int = 8192,
    data_parallel: DataParallel | None = None,
    progress: bool | None = None,
) -> FeatureRanking:
    """Top-`num_features` features by mutual information with the errors, for every group at once.

    Groups are bucketed by size and processed about `chunk_examples` rows at a time, each chunk
    split over the devices of `data_parallel` (default: all).

    Args:
      features: `[N, D]` real values.
      errors: `[N]` booleans (True where the model is wrong).
      groups: G integer arrays of row indices into `features` (each non-empty).
      num_features: the features kept per group.
      screen: keep only that many candidates per group by the Gaussian moment statistic before
        the exact estimator (None, the default: no screening, every feature goes through the
        exact estimator as in the paper).
      n_neighbors: the neighbours of the Kraskov-style estimator.
      key: the tie-breaking noise (an int seed or a PRNG key).
      chunk_examples: about how many rows are estimated per device call.
      data_parallel: the devices to split each chunk over; None uses all.
      progress: show a progress bar (None: only when stderr is a terminal).

    Returns:
      A `FeatureRanking` of `[G, min(num_features, D)]` arrays.

    Raises:
      ValueError: bad `features` or `errors` (as for `mutual_information`), a group that is
        empty, not 1-D, a boolean mask or out of range, no groups, `num_features < 1`,
        `screen < 1` or `n_neighbors < 1`, or `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    features, errors = check_features_and_errors(features, errors)
    groups = check_groups(groups, len(features))
    return rank_groups(
        features,
        groups,
        [errors[members] for members in groups],
        num_features=num_features,
        screen=screen,
        n_neighbors=n_neighbors,
        key=key,
        chunk_examples=chunk_examples,
        data_parallel=data_parallel,
        progress=progress,
    )


def rank_groups(
    features: np.ndarray,
    groups: Sequence[np.ndarray],
    group_errors: Sequence[np.ndarray],
    *,
    num_features: int,
    screen: int | None,
    n_neighbors: int,
    key: jax.Array,
    chunk_examples: int = 8192,
    data_parallel: DataParallel | None = None,
    progress: bool | None = None,
) -> FeatureRanking:
    """`rank_features` on checked inputs, with each group's errors given separately.

    Args:
      features: `[N, D]` float32, already checked.
      groups: G row-index arrays, already checked.
      group_errors: G boolean arrays of the same lengths (a permutation of a group's errors
        gives the chance level of its ranking).
      num_features, screen, n_neighbors, key, chunk_examples, data_parallel, progress: as for
        `rank_features`.

    Returns:
      A `FeatureRanking` of `[G, min(num_features, D)]` arrays.

    Raises:
      ValueError: `num_features < 1`, `screen < 1`, `n_neighbors < 1`, or `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    dim = features.shape[1]
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}.")
    if screen is not None and screen < 1:
        raise ValueError(f"screen must be None or >= 1, got {screen}.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    top = min(num_features, dim)
    candidates = dim if screen is None else min(max(screen, top), dim)
    data_parallel = data_parallel or DataParallel()
    indices = np.zeros((len(groups), top), np.int32)
    values = np.zeros((len(groups), top), np.float32)

    chunks = _chunks_by_size([len(g) for g in groups], chunk_examples)
    bar = tqdm(
        total=len(groups),
        desc="mutual information",
        unit="group",
        disable=progress_disabled(progress),
        leave=False,
    )
    # One seed for the whole call: a value's nudge depends on (seed, its row within the group,
    # its feature), so a group gets the same tie-breaking alone or among others.
    seed = jax.random.bits(as_key(key), (), jnp.uint32)

    def collect(positions, candidate_index, estimate):
        candidate_index = np.asarray(candidate_index)[: len(positions)]
        estimate = np.asarray(estimate)[: len(positions)]
        # Largest first; ties (often at 0, where the estimate is clipped) by candidate order.
        order = np.argsort(-estimate, axis=1, kind="stable")[:, :top]
        indices[positions] = np.take_along_axis(candidate_index, order, axis=1)
        values[positions] = np.take_along_axis(estimate, order, axis=1)
        bar.update(len(positions))

    pending = None  # the chunk in flight: the next one is gathered on the host meanwhile
    with bar:
        for positions, padded_size, chunk_groups in chunks:
            rows = np.zeros((chunk_groups, padded_size), np.int64)
            valid = np.zeros((chunk_groups, padded_size), bool)
            is_error = np.zeros((chunk_groups, padded_size), bool)
            for slot, position in enumerate(positions):
                members = groups[position]
                rows[slot, : len(members)] = members
                valid[slot, : len(members)] = True
                is_error[slot, : len(members)] = group_errors[position]
            (x, is_error, valid), _ = data_parallel.shard_batch(features[rows], is_error, valid)
            outputs = _estimate_chunk(
                x,
                is_error,
                valid,
                seed,
                _digamma_table(padded_size),
                candidates=candidates,
                n_neighbors=n_neighbors,
            )
            if pending is not None:
                collect(*pending)
            pending = (positions, *outputs)
        if pending is not None:
            collect(*pending)
    return FeatureRanking(indices, values)


def mutual_information_batch(features, errors, *, key, n_neighbors: int = 3) -> jax.Array:
    """`mutual_information` as a pure JAX function, usable inside the caller's `jax.jit` and
    `jax.vmap` (no host checks: NaN features give meaningless estimates).

    Args:
      features: [N, D] real values.
      errors: [N] bool, True where the model is wrong.
      key: keyword-only, an int seed or a PRNG key (the tie-breaking noise).
      n_neighbors: k of the estimator (static).

    Returns:
      [D] float32, the estimates in nats; equal to `mutual_information` on the host to float32
      precision for the same key.

    Raises:
      ValueError: at trace time, `features` is not 2-D or `errors` is not `[N]`; or `key` is
        None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {features.shape}.")
    errors = jnp.asarray(errors).astype(bool)
    if errors.shape != features.shape[:1]:
        raise ValueError(
            f"errors must have shape ({features.shape[0]},) like features' rows, got "
            f"{errors.shape}."
        )
    size, dim = features.shape
    table = jax.scipy.special.digamma(jnp.arange(size + 1, dtype=jnp.float32)).at[0].set(0.0)
    seed = jax.random.bits(as_key(key), (), jnp.uint32)
    _, estimate = _estimate_chunk(
        features[None],
        errors[None],
        jnp.ones((1, size), bool),
        seed,
        table,
        candidates=dim,
        n_neighbors=int(n_neighbors),
    )
    return estimate[0]


# --------------------------------------------------------------------------------------------
# The jitted estimator.


@jit(static_argnames=("candidates", "n_neighbors"))
def _estimate_chunk(x, is_error, valid, seed, digamma_table, *, candidates, n_neighbors):
    """x: [G, n, D]; is_error, valid: [G, n]; seed: uint32; digamma_table: [n + 1], psi(0..n)
    (psi(0) unused) -> ([G, M] candidate features, [G, M] MI)."""
    dim = x.shape[-1]
    if candidates < dim:
        scores = _gaussian_mutual_information(x, is_error, valid)
        _, candidate_index = jax.lax.top_k(scores, candidates)  # [G, M]
        x = jnp.take_along_axis(x, candidate_index[:, None, :], axis=2)
    else:
        candidate_index = jnp.broadcast_to(jnp.arange(dim, dtype=jnp.int32), (x.shape[0], dim))
    columns = jnp.swapaxes(x, 1, 2)  # [G, M, n]: one column per row, sorted along the last axis
    noise = jax.vmap(_tie_breaking_noise, (0, 0, 0, None))(columns, valid, candidate_index, seed)
    estimate = jax.vmap(
        functools.partial(_knn_mutual_information, n_neighbors=n_neighbors), (0, 0, 0, None)
    )(columns + noise, is_error, valid, digamma_table)
    return candidate_index, estimate


def _knn_mutual_information(columns, is_error, valid, digamma_table, *, n_neighbors):
    """Ross's estimator for M columns of one group. columns: [M, n]; is_error, valid: [n].

    Every argument of the digamma function is a count in 1..n, so it is a table lookup.
    """
    digamma = lambda count: digamma_table[jnp.clip(count, 1, size)]  # noqa: E731
    size = columns.shape[-1]
    label = is_error.astype(jnp.int32)
    count = jnp.stack([jnp.sum(valid & (label == 0)), jnp.sum(valid & (label == 1))])
    kept_count = jnp.where(count > 1, count, 0)  # a class with one member is left out
    kept = valid & (count[label] > 1)
    sort_key = jnp.broadcast_to(jnp.where(kept, label, 2), columns.shape)
    _, values = jax.lax.sort((sort_key, columns), num_keys=2)  # class 0 | class 1 | rest

    position = jnp.arange(size)
    total = kept_count[0] + kept_count[1]
    position_class = jnp.where(position < kept_count[0], 0, jnp.where(position < total, 1, 2))
    start = jnp.where(position_class == 0, 0, kept_count[0])
    end = jnp.where(position_class == 0, kept_count[0], total)
    neighbors = jnp.clip(jnp.minimum(n_neighbors, end - start - 1), 1, None)  # [n]
    in_sample = position < total

    # Distances to the s-th same-class value below and above, s = 0..k: [k + 1, M, n].
    padded = jnp.pad(values, ((0, 0), (n_neighbors, n_neighbors)), mode="edge")
    shift = np.arange(n_neighbors + 1)
    below = values - jnp.stack([padded[:, n_neighbors - s : n_neighbors - s + size] for s in shift])
    above = jnp.stack([padded[:, n_neighbors + s : n_neighbors + s + size] for s in shift]) - values
    has_below = position - shift[:, None] >= start  # [k + 1, n]
    has_above = position + shift[:, None] < end

    # r: the narrowest window of k + 1 consecutive same-class values containing the value,
    # `left` values below it and `right` above, left + right = k.
    left, right = shift[:, None], shift[None, :]
    fits = (left + right)[..., None] == neighbors  # [k + 1, k + 1, n]
    fits &= has_below[:, None, :] & has_above[None, :, :]
    width = jnp.maximum(below[:, None], above[None, :])  # [k + 1, k + 1, M, n]
    radius = jnp.min(jnp.where(fits[:, :, None, :], width, jnp.inf), axis=(0, 1))

    # m: values of either class strictly closer than r, itself included (r = 0: exact ties).
    # Same-class values closer than r lie among the k nearest, inside the window; their
    # distances are computed exactly as r was, so the k-th neighbour itself never counts.
    def close(distance, inside):
        hit = jnp.where(radius > 0, distance < radius, distance <= 0)
        return jnp.sum(hit & inside[:, None, :], axis=0, dtype=jnp.int32)

    own = close(below, has_below) + close(above[1:], has_above[1:])
    # Other-class values: binary searches in the other class's sorted segment.
    other_start = jnp.where(position_class == 0, kept_count[0], 0)
    other_size = jnp.where(position_class == 0, kept_count[1], kept_count[0])
    upper = jnp.where(radius > 0, values + radius, jnp.nextafter(values, jnp.inf))
    lower = jnp.where(radius > 0, values - radius, jnp.nextafter(values, -jnp.inf))
    # other = #(< upper) - #(<= lower) = #(< upper) - #(< next float above lower)
    queries = jnp.stack([upper, jnp.nextafter(lower, jnp.inf)])
    below_upper, below_lower = _count_below(values, other_start, other_size, queries)
    other = below_upper - below_lower
    within = own + other

    weight = in_sample.astype(values.dtype)
    num = jnp.maximum(total, 1).astype(values.dtype)
    class_size = jnp.where(position_class == 0, kept_count[0], kept_count[1])
    estimate = (
        digamma(total)
        + jnp.sum(weight * digamma(neighbors)) / num
        - jnp.sum(weight * digamma(class_size)) / num
        - jnp.sum(weight * digamma(within), axis=-1) / num
    )
    return jnp.where(total > 1, jnp.maximum(estimate, 0.0), 0.0)


def _count_below(values, start, size, queries):
    """How many of values[..., start : start + size] (sorted) are < each query: a binary search.

    values: [M, n]; start, size: [n] (one segment per position, the same for every column);
    queries: [Q, M, n] -> [Q, M, n] counts.
    """
    columns = values.shape[-1]
    stacked = jnp.broadcast_to(values, queries.shape)

    def step(_, state):
        base, length = state
        half = length // 2
        middle = base + half
        probe = jnp.take_along_axis(stacked, jnp.clip(middle, 0, columns - 1), axis=-1)
        go_right = (length > 0) & (probe < queries)
        return jnp.where(go_right, middle + 1, base), jnp.where(go_right, length - half - 1, half)

    base = jnp.broadcast_to(start, queries.shape)
    length = jnp.broadcast_to(size, queries.shape)
    base, _ = jax.lax.fori_loop(0, int(np.ceil(np.log2(columns + 1))), step, (base, length))
    return base - start


def _tie_breaking_noise(columns, valid, feature_index, seed):
    """scikit-learn's jitter, 1e-10 * max(std, mean |x|) * noise, in the data's own units.

    columns: [M, n] of one group; feature_index: [M] original feature indices; seed: uint32.
    The noise is uniform on [-1/2, 1/2), a hash of (seed, row, original feature), so a value gets
    the same nudge whether or not its feature went through the screen; any continuous noise
    orders tied values uniformly at random, which is all the jitter is for.
    """
    weight = valid[None, :].astype(columns.dtype)
    count = jnp.maximum(jnp.sum(weight, -1, keepdims=True), 1.0)
    mean = jnp.sum(weight * columns, -1, keepdims=True) / count
    std = jnp.sqrt(jnp.sum(weight * (columns - mean) ** 2, -1, keepdims=True) / count)
    scale = jnp.where(std > 0, std, 1.0)
    mean_abs = jnp.sum(weight * jnp.abs(columns), -1, keepdims=True) / count
    size = JITTER * jnp.maximum(scale, mean_abs)
    row = jnp.arange(columns.shape[-1], dtype=jnp.uint32)[None, :]
    bits = _hash(
        seed ^ _hash(feature_index.astype(jnp.uint32)[:, None] * jnp.uint32(0x9E3779B1) ^ row)
    )
    uniform = (bits >> 8).astype(columns.dtype) * (1.0 / (1 << 24)) - 0.5
    return size * uniform


def _hash(value):
    """A 32-bit integer mixing function (the MurmurHash3 finalizer)."""
    value = value ^ (value >> 16)
    value = value * jnp.uint32(0x85EBCA6B)
    value = value ^ (value >> 13)
    value = value * jnp.uint32(0xC2B2AE35)
    return value ^ (value >> 16)


def _gaussian_mutual_information(x, is_error, valid):
    """The screening statistic: MI if X were Gaussian given E. x: [G, n, D] -> [G, D].

    Class moments come from one contraction over the rows (a matrix product), not a pass per
    class; the statistic only ranks candidates, so the one-pass variance is precise enough.
    """
    error = (is_error & valid).astype(x.dtype)
    weights = jnp.stack([valid.astype(x.dtype) - error, error], axis=1)  # [G, 2, n]
    count = jnp.sum(weights, axis=-1)[..., None]  # [G, 2, 1]
    sums = jnp.einsum("gcn,gnd->gcd", weights, x)
    squares = jnp.einsum("gcn,gnd->gcd", weights, x * x)
    total = jnp.maximum(count.sum(1), 1.0)  # [G, 1]
    mean = sums.sum(1) / total
    var = jnp.maximum(squares.sum(1) / total - mean**2, 0.0)
    class_mean = sums / jnp.maximum(count, 1.0)
    class_var = jnp.maximum(squares / jnp.maximum(count, 1.0) - class_mean**2, 0.0)
    floor = 1e-6 * var + 1e-12
    score = 0.5 * jnp.log(var + floor) - jnp.sum(
        count / total[:, None] * 0.5 * jnp.log(class_var + floor[:, None]), axis=1
    )
    return jnp.where(var > 0, score, -jnp.inf)


# --------------------------------------------------------------------------------------------
# Host-side functions.


def _digamma_table(size: int) -> np.ndarray:
    """psi(0..size) in float32 (psi(0) = -inf is never looked up)."""
    table = _scipy_digamma(np.arange(size + 1, dtype=np.float64))
    table[0] = 0.0
    return table.astype(np.float32)


def _chunks_by_size(sizes: Sequence[int], chunk_examples: int):
    """Bucket groups by padded size: yields (positions, padded size, groups per chunk)."""
    sizes = np.asarray(sizes)
    padded = _SIZE_BUCKETS[np.searchsorted(_SIZE_BUCKETS, sizes)]
    for size in np.unique(padded):
        positions = np.flatnonzero(padded == size)
        most = int(max(1, chunk_examples // size))
        if len(positions) <= most:
            # 1, 8, 64, ... groups, so that calls of similar sizes share compiled programs.
            per_chunk = min(most, 8 ** int(np.ceil(np.log(len(positions)) / np.log(8) - 1e-9)))
        else:
            # Equal chunks (a multiple of 8 groups) rather than full ones and a padded remainder.
            count = -(-len(positions) // most)
            per_chunk = min(most, -(-len(positions) // (8 * count)) * 8)
        for begin in range(0, len(positions), per_chunk):
            yield positions[begin : begin + per_chunk], int(size), per_chunk
