"""Influence functions for training-point ranking (seed 002, §G; Koh & Liang 2017).

The user passes `loss_fn(params, x, y) -> per-example losses [B]` and the parameters to
differentiate: a small subset, such as the final linear layer (`D x K`), with the rest of the
network folded into `loss_fn` (or into precomputed features `x`). The mean of `loss_fn` over
the training set is taken as the objective those parameters minimize: put any L2 term in
`loss_fn`; `damping` adds `damping * I` to its Hessian, which is formed explicitly
(`jax.hessian` over the flattened subset) and solved. `loss_fn` may be any JAX callable; the
arrays it reads besides `params` (a network folded into it) are traced arguments of the jitted
kernels, read at each call, so updated weights are seen and compilations are reused.

- `influence_scores`: Koh & Liang's `I_up,loss(z_train, z_test) = -g_test^T H^-1 g_train`.
- `self_influence`: `g^T H^-1 g` per point, or TracIn's `sum_c lr_c |g(theta_c)|^2` (Pruthi
  et al. 2020), to surface mislabelled examples.
- `fraction_checked_to_find`: how much of the training set, checked in decreasing score
  order, one must read to find the flagged (e.g. flipped) points.
- `top_fraction_flagged`: per test point, the fraction of the top 1 % most influential
  training points that are flagged (e.g. have a spurious background).

The paper's two checks (§G) on a linen classifier whose last layer is a dense `classifier` or
`fc`, with the Hessian of that layer:

- `background_influence`: on a spurious model, the share of each test input's most
  influential training images that carry its background;
- `find_flipped_labels`: on a model trained with flipped labels, how much of the training set
  one checks, in decreasing self-influence, to find them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jfail.debugtests.bugs import SpuriousData, spurious_backgrounds
from jfail.debugtests.metrics import mean_sem
from jfail.models.adapter import in_trace, traced_model
from jfail.models.callables import logits_fn, model_fns
from jfail.xla import jit

__all__ = [
    "influence_scores",
    "self_influence",
    "fraction_checked_to_find",
    "top_fraction_flagged",
    "background_influence",
    "find_flipped_labels",
]

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def influence_scores(
    loss_fn: LossFn, params, train_x, train_y, test_x, test_y, *, damping: float = 0.01,
    batch_size: int | None = None, max_params: int = 10_000,
) -> jax.Array:
    """`[n_test, n_train]` influence of up-weighting each training point on each test loss.

    Koh & Liang's `I_up,loss = -g_test^T (H + damping I)^-1 g_train`, with gradients of the
    per-example losses and `H` the Hessian of the mean training loss, all with respect to
    `params` (a pytree, flattened; at most `max_params` entries). Positive: the training point
    raises the test loss (harmful); removing training point i changes test loss j by about
    `-scores[j, i] / n_train`.

    Args:
        loss_fn: `loss_fn(params, x [B, ...], y [B, ...]) -> [B]` per-example losses.
        params: the floating-point pytree the influence is taken over.
        train_x: `[n_train, ...]` training inputs.
        train_y: `[n_train, ...]` training targets.
        test_x: `[n_test, ...]` test inputs.
        test_y: `[n_test, ...]` test targets.
        damping: added to the Hessian's diagonal, non-negative.
        batch_size: examples per gradient pass (None: all at once).
        max_params: the most parameters the dense Hessian may have.

    Returns:
        `[n_test, n_train]` float array of influences.

    Raises:
        ValueError: `loss_fn` is not callable or does not return `[B]` losses, `params` is empty,
            not floating point or larger than `max_params`, inputs and targets are empty or of
            different lengths, `damping` is negative, `batch_size` is not positive, or the
            influences are not finite (a singular Hessian or non-finite losses).
    """
    _checked_params(loss_fn, params, max_params)
    train_x, train_y = _checked_data(loss_fn, params, train_x, train_y, "train")
    test_x, test_y = _checked_data(loss_fn, params, test_x, test_y, "test")
    _check_damping(damping)
    loss_fn = _traced_loss(loss_fn, params, train_x, train_y)
    hessian = _hessian(loss_fn, params, train_x, train_y, damping, batch_size)
    test_grads = _per_example_grads(loss_fn, params, test_x, test_y, batch_size)
    train_grads = _per_example_grads(loss_fn, params, train_x, train_y, batch_size)
    return _finite(_influence_matrix(hessian, test_grads, train_grads))


def self_influence(
    loss_fn: LossFn, params, x, y, *, method: str = "influence", damping: float = 0.01,
    params_list: Sequence | None = None, learning_rates: Sequence[float] | None = None,
    batch_size: int | None = None, max_params: int = 10_000,
) -> jax.Array:
    """`[N]` self-influence of each training point `(x [N, ...], y [N, ...])`.

    `method="influence"`: `g_i^T (H + damping I)^-1 g_i` at `params`, `H` the Hessian of the
    mean loss over `(x, y)` (Koh & Liang's `-I_up,loss(z, z)`). `method="tracin"`: TracIn-CP
    self-influence, `sum_c learning_rates[c] * |g_i(params_list[c])|^2` over checkpoints
    (default: `[params]`, rates 1; `params` is unused when `params_list` is given; no Hessian,
    so no size limit). Large values mark points the model finds hard to fit, such
    as mislabelled ones.

    Args:
        loss_fn: `loss_fn(params, x [B, ...], y [B, ...]) -> [B]` per-example losses.
        params: the floating-point pytree the influence is taken over.
        x: `[N, ...]` training inputs.
        y: `[N, ...]` training targets.
        method: `"influence"` or `"tracin"`.
        damping: added to the Hessian's diagonal, non-negative (`"influence"` only).
        params_list: TracIn checkpoints (`"tracin"` only; None for `[params]`).
        learning_rates: one per checkpoint (`"tracin"` only; None for all 1).
        batch_size: examples per gradient pass (None: all at once).
        max_params: the most parameters the dense Hessian may have (`"influence"` only).

    Returns:
        `[N]` float array of self-influences.

    Raises:
        ValueError: an unknown `method`, checkpoint arguments with `method="influence"`, no
            checkpoints or a learning rate count that differs from theirs, or any of the input
            errors of `influence_scores`.
    """
    if method == "influence":
        if params_list is not None or learning_rates is not None:
            raise ValueError("params_list and learning_rates belong to method='tracin'.")
        _check_damping(damping)
        _checked_params(loss_fn, params, max_params)
        x, y = _checked_data(loss_fn, params, x, y, "x/y")
        loss_fn = _traced_loss(loss_fn, params, x, y)
        hessian = _hessian(loss_fn, params, x, y, damping, batch_size)
        grads = _per_example_grads(loss_fn, params, x, y, batch_size)
        return _finite(_quadratic_forms(hessian, grads))
    if method == "tracin":
        checkpoints = [params] if params_list is None else list(params_list)
        if not checkpoints:
            raise ValueError("params_list must hold at least one checkpoint.")
        rates = [1.0] * len(checkpoints) if learning_rates is None else list(learning_rates)
        if len(rates) != len(checkpoints):
            raise ValueError(
                f"learning_rates has {len(rates)} entries for {len(checkpoints)} checkpoints."
            )
        total = None
        for checkpoint, rate in zip(checkpoints, rates):
            _checked_params(loss_fn, checkpoint, max_params=None)
            x, y = _checked_data(loss_fn, checkpoint, x, y, "x/y")
            traced = _traced_loss(loss_fn, checkpoint, x, y)
            norms = _per_example_squared_norms(traced, checkpoint, x, y, batch_size)
            total = rate * norms if total is None else total + rate * norms
        return total
    raise ValueError(f"method must be 'influence' or 'tracin', got {method!r}.")


def fraction_checked_to_find(scores, flagged) -> dict[str, float | int]:
    """Check training points in decreasing `scores [N]`: how much must be read to find the
    `flagged [N]` (bool) points.

    Ranks start at 1; ties count against the ranking: a point's rank is the number of points
    scoring at least as high.

    Args:
        scores: `[N]` finite scores, higher read first.
        flagged: `[N]` bool, True on the points to find (at least one).

    Returns:
        A dict with `fraction_to_find_all` (rank of the last flagged point / N), `mean_fraction`
        (mean over flagged points of rank / N: the "average fraction of the training set
        checked") and `num_flagged`.

    Raises:
        ValueError: `scores` and `flagged` are not vectors of one shape, `flagged` is not
            boolean or flags nothing, or `scores` holds non-finite values.
    """
    scores, flagged = np.asarray(scores), np.asarray(flagged)
    if scores.ndim != 1 or flagged.shape != scores.shape:
        raise ValueError(
            f"scores and flagged must be vectors [N] of one shape, got {scores.shape} and "
            f"{flagged.shape}."
        )
    if flagged.dtype != np.bool_:
        raise ValueError(f"flagged must be a boolean mask, got dtype {flagged.dtype}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contains non-finite values.")
    num_flagged = int(flagged.sum())
    if num_flagged == 0:
        raise ValueError("no point is flagged: nothing to find.")
    ranks = np.asarray(_descending_ranks(jnp.asarray(scores)))[flagged].astype(np.int64)
    count = scores.shape[0]
    return {
        "fraction_to_find_all": int(ranks.max()) / count,
        "mean_fraction": int(ranks.sum()) / (count * num_flagged),
        "num_flagged": num_flagged,
    }


def top_fraction_flagged(
    influence, flagged, top: float = 0.01, *, by: str = "absolute"
) -> jax.Array:
    """`[n_test]`: of the `k = ceil(top * n_train)` (at least 1) most influential training points
    for each test point, the fraction that is `flagged [n_train]` (bool).

    "Most influential" is by `by="absolute"` value (most helpful and most harmful together, the
    default), `"harmful"` (largest influence: up-weighting raises the test loss) or `"helpful"`
    (most negative).

    Args:
        influence: `[n_test, n_train]`, e.g. from `influence_scores`.
        flagged: `[n_train]` bool.
        top: the share of training points taken per test point, in (0, 1].
        by: `"absolute"`, `"harmful"` or `"helpful"`.

    Returns:
        `[n_test]` float array in [0, 1].

    Raises:
        ValueError: `influence` is not `[n_test, n_train]` or `flagged` not a `[n_train]` bool
            mask, `top` outside (0, 1], or an unknown `by`.
    """
    influence, flagged = jnp.asarray(influence), np.asarray(flagged)
    if influence.ndim != 2 or flagged.shape != influence.shape[1:]:
        raise ValueError(
            f"influence must be [n_test, n_train] and flagged [n_train], got {influence.shape} "
            f"and {flagged.shape}."
        )
    if flagged.dtype != np.bool_:
        raise ValueError(f"flagged must be a boolean mask, got dtype {flagged.dtype}.")
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must lie in (0, 1], got {top}.")
    if by not in _RANKING_KEYS:
        raise ValueError(f"by must be one of {sorted(_RANKING_KEYS)}, got {by!r}.")
    count = max(1, math.ceil(top * influence.shape[1] - 1e-9))
    return _top_flagged(influence, jnp.asarray(flagged), count, by)


def background_influence(
    module, variables, train_images, train_labels, train_background_ids,
    test: SpuriousData, test_backgrounds, backgrounds: Sequence[np.ndarray], *,
    pool_size: int = 2000, test_size: int = 50, top: float = 0.01, damping: float = 0.01, key,
) -> dict:
    """Koh & Liang influence of a pool of a spurious model's training images on test losses.

    For each test input (its loss at the model's prediction), the `top` fraction of the pool
    with the largest influence, and the share of it on the input's own background. Three kinds
    of test input: composited as in training, the background alone, and the object moved onto
    another class's background (background and object disagree).

    Args:
        module, variables: the spurious model, a linen classifier with `features` output and a
            final dense layer `classifier` or `fc` (the parameters of the Hessian).
        train_images `[N, H, W, 1]`, train_labels `[N]`, train_background_ids `[N]`: its
            training set and the background behind each image.
        test: spurious test data; test_backgrounds `[M, H, W, 1]`: the background of each test
            image alone; backgrounds: the textures, indexed by background id.
        pool_size, test_size: training images drawn for the pool and test inputs of each kind;
        top: the fraction of the pool counted as most influential; damping: added to the
            Hessian's diagonal; key: PRNG key.

    Returns:
        A dict of plain values: the pool and its sizes, and per kind of test input the share of
        the most influential images on the input's background (`share_own_background`) and with
        the predicted label (`share_predicted_class`), by absolute value, most helpful and most
        harmful (mean, SEM), the base rate, and how often the prediction is the background's (and
        the object's) class; or `{"skipped": why}` without a final dense layer.

    Raises:
        RuntimeError: the last layer on the features does not reproduce the model's logits.
    """
    head_name = _head_name(variables["params"])
    if head_name is None:
        return {"skipped": "no final dense layer ('classifier' or 'fc') to take the Hessian of"}
    head = variables["params"][head_name]
    features = model_fns(module, variables).features
    labels, groups = np.asarray(train_labels), np.asarray(train_background_ids)
    k_pool, k_test, k_swap = jax.random.split(key, 3)
    pool = np.sort(np.asarray(jax.random.permutation(k_pool, len(labels)))[
        : max(1, min(int(pool_size), len(labels)))])
    picked = np.sort(np.asarray(jax.random.permutation(k_test, len(test.labels)))[
        : max(1, min(int(test_size), len(test.labels)))])
    objects = test.images[picked] * test.object_masks[picked][..., None]
    swapped = spurious_backgrounds(objects, test.labels[picked], backgrounds, key=k_swap,
                                   correlation=0.0)
    kinds = {
        "spurious inputs": (test.images[picked], test.background_ids[picked], test.labels[picked]),
        "backgrounds alone": (test_backgrounds[picked], test.background_ids[picked], None),
        "swapped backgrounds": (swapped.images, swapped.background_ids, test.labels[picked]),
    }
    pool_features = _features_of(features, train_images[pool])
    _check_head(logits_fn(module, variables), head, train_images[pool[:4]], pool_features[:4])
    pool_labels, pool_groups = labels[pool].astype(np.int32), groups[pool]
    top_count = max(1, math.ceil(top * len(pool) - 1e-9))
    out = {"pool": int(len(pool)), "test_inputs": int(len(picked)), "top": top,
           "top_count": top_count, "damping": damping, "layer": head_name,
           "parameters": int(sum(np.size(v) for v in jax.tree_util.tree_leaves(head))),
           "kinds": {}}
    for kind, (x, background_ids, object_labels) in kinds.items():
        test_features = _features_of(features, x)
        predictions = np.argmax(np.asarray(_head_logits(head, test_features)), -1)
        scores = np.asarray(influence_scores(
            _head_loss, head, pool_features, pool_labels, test_features,
            predictions.astype(np.int32), damping=damping, batch_size=1000))
        entry = {
            "share_own_background": {
                by: mean_sem(_flagged_by_group(scores, pool_groups, background_ids, top, by))
                for by in ("absolute", "helpful", "harmful")},
            # every training image's background is its label's: which of the two do they follow?
            "share_predicted_class": {
                by: mean_sem(_flagged_by_group(scores, pool_labels, predictions, top, by))
                for by in ("absolute", "helpful", "harmful")},
            "base_rate": mean_sem((pool_groups[None, :] == background_ids[:, None]).mean(1)),
            "predicted_background_class": float(np.mean(predictions == background_ids))}
        if object_labels is not None:
            entry["predicted_object_class"] = float(np.mean(predictions == object_labels))
        out["kinds"][kind] = entry
    return out


def find_flipped_labels(
    module, variables, images, labels, flipped, *, subset: int = 5000, damping: float = 0.01,
    key,
) -> dict:
    """Rank a subset of a training set with flipped labels by self-influence; how much of it
    must be checked, in that order, to find the flipped labels.

    Args:
        module, variables: the model trained on `(images, labels)`, a linen classifier with
            `features` output and a final dense layer `classifier` or `fc`.
        images `[N, H, W, C]`, labels `[N]`: its training set, labels as trained on (flipped).
        flipped: the indices of the flipped labels.
        subset: training examples drawn and ranked; damping: added to the Hessian's diagonal;
        key: PRNG key.

    Returns:
        A dict of plain values: the subset's size, its flipped count, and per ranking
        (self-influence of the last layer; TracIn over all layers when the model has no state
        besides its params; the training loss and a random order as baselines) the mean fraction
        checked per flipped label (mean, SEM), the fraction checked to find 50 %, 90 % and all of
        them, the share found among the top-k, and the fraction checked for each percent found
        (`curve`); or `{"skipped": why}`.

    Raises:
        RuntimeError: the last layer on the features does not reproduce the model's logits.
    """
    head_name = _head_name(variables["params"])
    if head_name is None:
        return {"skipped": "no final dense layer ('classifier' or 'fc') to take the Hessian of"}
    k_rows, k_random = jax.random.split(key)
    rows = np.sort(np.asarray(jax.random.permutation(k_rows, len(labels)))[
        : max(1, min(int(subset), len(labels)))])
    flagged = np.isin(rows, flipped)
    if not flagged.any():
        return {"skipped": f"none of the {len(rows)} training examples drawn has a flipped label"}
    x, y = images[rows], np.asarray(labels)[rows].astype(np.int32)
    head = variables["params"][head_name]
    feats = _features_of(model_fns(module, variables).features, x)
    _check_head(logits_fn(module, variables), head, x[:4], feats[:4])
    scores = {"self-influence (last layer)": self_influence(
        _head_loss, head, feats, y, damping=damping, batch_size=1000)}
    if set(variables) == {"params"}:  # no batch statistics: the whole network is its params
        scores["TracIn self-influence (all layers, final weights)"] = self_influence(
            _FullLoss(module), variables["params"], x, y, method="tracin", batch_size=100)
    scores["training loss (baseline)"] = _head_loss(head, feats, y)
    scores["random order (baseline)"] = jax.random.uniform(k_random, (len(rows),))
    rankings = {name: _checking(np.asarray(value, np.float64), flagged)
                for name, value in scores.items()}
    return {"subset": int(len(rows)), "flipped_in_subset": int(flagged.sum()),
            "damping": damping, "layer": head_name, "rankings": rankings}


@dataclasses.dataclass(frozen=True)
class _FullLoss:
    """Per-example cross-entropy of a stateless classifier, `loss(params, x, y) -> [B]`."""

    module: Any

    def __call__(self, params, x, y):
        logits = self.module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _head_logits(head, features):
    return features @ head["kernel"] + head["bias"]


def _head_loss(head, features, labels):
    """Per-example cross-entropy of the final dense layer on penultimate features."""
    return optax.softmax_cross_entropy_with_integer_labels(_head_logits(head, features), labels)


def _head_name(params):
    return next((name for name in ("classifier", "fc") if name in params), None)


def _check_head(model, head, x, features):
    if not np.allclose(np.asarray(_head_logits(head, features)), np.asarray(model(x)),
                       rtol=1e-3, atol=1e-3):
        raise RuntimeError("the last layer on the features does not reproduce the logits")


@jit
def _apply_features(features, x):
    return features(x)


def _features_of(features, x, batch: int = 500) -> jax.Array:
    """`features(x)` in chunks: `[N, D]`."""
    return jnp.concatenate([_apply_features(features, jnp.asarray(x[i:i + batch]))
                            for i in range(0, len(x), batch)])


def _flagged_by_group(influence, pool_groups, test_groups, top, by) -> np.ndarray:
    """Per test input, the share of its top `top` most influential pool points in its group."""
    result = np.empty(len(test_groups))
    for group in np.unique(test_groups):
        rows = test_groups == group
        result[rows] = np.asarray(top_fraction_flagged(influence[rows], pool_groups == group, top,
                                                       by=by))
    return result


def _checking(scores, flagged) -> dict:
    """Check the points in decreasing score: the fraction checked to find the flagged ones."""
    found = fraction_checked_to_find(scores, flagged)
    count = len(scores)
    ranks = count - np.searchsorted(np.sort(scores), scores, side="left")  # ties count against
    fractions = np.sort(ranks[flagged]) / count
    num = len(fractions)

    def to_find(share):
        return float(fractions[max(1, math.ceil(share * num - 1e-9)) - 1])

    return {"mean_fraction": mean_sem(ranks[flagged] / count),
            "to_find": {"50%": to_find(0.5), "90%": to_find(0.9),
                        "all": float(found["fraction_to_find_all"])},
            "found_in_top": float(np.mean(ranks[flagged] <= num)),
            "curve": [to_find(share) for share in np.linspace(0.01, 1.0, 100)]}


def _checked_params(loss_fn, params, max_params):
    """Check `loss_fn` and the parameter pytree; returns the number of parameters."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params holds no arrays to differentiate.")
    if not all(jnp.issubdtype(jnp.result_type(leaf), jnp.floating) for leaf in leaves):
        raise ValueError("params must be floating point.")
    size = sum(int(jnp.size(leaf)) for leaf in leaves)
    if max_params is not None and size > max_params:
        raise ValueError(
            f"params has {size} entries; the explicit Hessian is limited to max_params="
            f"{max_params}: pass a smaller subset (e.g. the final layer) or raise max_params."
        )
    return size


def _checked_data(loss_fn, params, x, y, name):
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"{name} inputs and targets must be non-empty batches of one length, got shapes "
            f"{x.shape} and {y.shape}."
        )
    size = min(2, x.shape[0])
    out = jax.eval_shape(loss_fn, params, *(_head_spec(v, size) for v in (x, y)))
    if getattr(out, "shape", None) != (size,):
        raise ValueError(
            f"loss_fn must return per-example losses [B]; for B={size} it returned "
            f"{getattr(out, 'shape', out)}."
        )
    return x, y


def _traced_loss(loss_fn, params, x, y):
    """`loss_fn` as a jit argument whose closed-over arrays (a network folded into it) are
    traced, so a later call sees weights updated since (`traced_model`)."""
    if in_trace(params, x, y):
        return loss_fn
    return traced_model(loss_fn, params, _head_spec(x, 1), _head_spec(y, 1))


def _head_spec(array, size):
    """Shape and dtype of `array[:size]`, for shape checks that compute nothing."""
    return jax.ShapeDtypeStruct((size,) + array.shape[1:], array.dtype)


def _check_damping(damping):
    if not damping >= 0.0:
        raise ValueError(f"damping must be non-negative, got {damping}.")


@jit
def _example_grads(loss_fn, params, x, y):
    """`[B, P]` gradients of each example's loss, with respect to the flattened params."""
    theta, unravel = ravel_pytree(params)

    def one(flat, xi, yi):
        return loss_fn(unravel(flat), xi[None], yi[None])[0]

    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(theta, x, y)


@jit
def _summed_hessian(loss_fn, params, x, y):
    """`[P, P]` Hessian of the summed loss of one batch, over the flattened params."""
    theta, unravel = ravel_pytree(params)
    return jax.hessian(lambda flat: jnp.sum(loss_fn(unravel(flat), x, y)))(theta)


def _per_example_grads(loss_fn, params, x, y, batch_size):
    return _map_batches(lambda xb, yb: _example_grads(loss_fn, params, xb, yb), x, y, batch_size)


def _per_example_squared_norms(loss_fn, params, x, y, batch_size):
    return _map_batches(
        lambda xb, yb: _example_squared_norms(loss_fn, params, xb, yb), x, y, batch_size
    )


def _hessian(loss_fn, params, x, y, damping, batch_size):
    """`[P, P]` Hessian of the mean loss over `(x, y)`, plus `damping * I`."""
    if batch_size is None or batch_size >= x.shape[0]:
        total = _summed_hessian(loss_fn, params, x, y)
    else:
        _check_batch_size(batch_size)
        total = sum(
            _summed_hessian(loss_fn, params, x[i:i + batch_size], y[i:i + batch_size])
            for i in range(0, x.shape[0], batch_size)
        )
    return _damped_mean(total, x.shape[0], damping)


@jit
def _damped_mean(total, count, damping):
    return total / count + damping * jnp.eye(total.shape[0], dtype=total.dtype)


@jit
def _influence_matrix(hessian, test_grads, train_grads):
    """`-g_test^T H^-1 g_train`: `[n_test, n_train]`."""
    return -(jnp.linalg.solve(hessian, test_grads.T).T @ train_grads.T)


@jit
def _quadratic_forms(hessian, grads):
    """`g_i^T H^-1 g_i`: `[N]`."""
    return jnp.sum(grads * jnp.linalg.solve(hessian, grads.T).T, axis=1)


@jit
def _example_squared_norms(loss_fn, params, x, y):
    return jnp.sum(_example_grads(loss_fn, params, x, y) ** 2, axis=1)


@jit
def _descending_ranks(scores):
    """`[N]` rank of each score from the top, ties counted against: #{j: s_j >= s_i}."""
    return scores.shape[0] - jnp.searchsorted(jnp.sort(scores), scores, side="left")


_RANKING_KEYS = {"absolute": jnp.abs, "harmful": lambda v: v, "helpful": lambda v: -v}


@jit(static_argnums=(2, 3))
def _top_flagged(influence, flagged, count, by):
    _, indices = jax.lax.top_k(_RANKING_KEYS[by](influence), count)
    return jnp.mean(flagged[indices].astype(jnp.float32), axis=1)


def _finite(result):
    if not np.all(np.isfinite(np.asarray(result))):
        raise ValueError(
            "non-finite influence: the Hessian is singular (increase damping) or the losses "
            "are not finite."
        )
    return result


def _map_batches(fn, x, y, batch_size):
    if batch_size is None or batch_size >= x.shape[0]:
        return fn(x, y)
    _check_batch_size(batch_size)
    return jnp.concatenate(
        [fn(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    )


def _check_batch_size(batch_size):
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
