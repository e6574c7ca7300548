"""Modified back-propagation: Guided Backprop, DeconvNet, LRP, DeepTaylor, PatternNet/-Attribution.

Every method works on an arbitrary `model(x) -> logits` by rewriting its jaxpr (`_jaxpr.py`):
ReLUs and linear blocks (dense or convolution, with their bias and inference-mode BatchNorm
folded in) get the method's backward rule; residual additions split relevance in proportion to
their summands. Defaults follow the innvestigate package the paper used (appendix B):
LRP-ε with ε = 1e-7, the sequential preset A-flat with ε = 0.1 for dense layers, α1β0 for
convolutions and the flat rule for the input layer, DeepTaylor as the z⁺ rule.

LRP methods return relevance at the input (its sum is the target logit when the rules conserve);
Guided Backprop, DeconvNet, PatternNet and PatternAttribution return the modified backward signal.
All outputs have the shape of `x`: `[B, H, W, C]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfail.attribution._core import (
    check_host_inputs,
    logits_shape,
    run_chunked,
    split_model,
)
from jfail.attribution._jaxpr import (
    AlphaBeta,
    Bounded,
    Epsilon,
    Flat,
    PatternRule,
    Rules,
    linear_blocks,
    modified_forward,
)
from jfail.logs import progress_disabled
from jfail.xla import jit

__all__ = [
    "guided_backprop",
    "deconvnet",
    "lrp_epsilon",
    "lrp_z",
    "lrp_alpha_beta",
    "lrp_sequential_preset_flat",
    "deep_taylor",
    "pattern_net",
    "pattern_attribution",
    "fit_patterns",
    "propagate",
]


def guided_backprop(model: Callable, x, target=None, *, batch_size: int | None = None, key=None):
    """Guided Backpropagation: gradient with ReLUs passing 1[z > 0] · 1[g > 0] · g.
    `[B, H, W, C]`."""
    return propagate(model, x, target, Rules(relu="guided"), batch_size=batch_size)


def deconvnet(model: Callable, x, target=None, *, batch_size: int | None = None, key=None):
    """DeconvNet: gradient with ReLUs passing 1[g > 0] · g, ignoring the forward sign.
    `[B, H, W, C]`."""
    return propagate(model, x, target, Rules(relu="deconv"), batch_size=batch_size)


def lrp_epsilon(model: Callable, x, target=None, *, epsilon: float = 1e-7,
                batch_size: int | None = None, key=None):
    """LRP-ε on every layer and residual sum (innvestigate's default ε = 1e-7). `[B, H, W, C]`."""
    _check_nonnegative("epsilon", epsilon)
    rule = Epsilon(float(epsilon))
    return propagate(model, x, target, _relevance_rules(rule, rule, residual=float(epsilon)),
                     batch_size=batch_size)


def lrp_z(model: Callable, x, target=None, *, batch_size: int | None = None, key=None):
    """LRP-z (ε = 0, 0/0 → 0); equals input × gradient on ReLU networks. `[B, H, W, C]`."""
    rule = Epsilon(0.0)
    return propagate(model, x, target, _relevance_rules(rule, rule, residual=0.0),
                     batch_size=batch_size)


def lrp_alpha_beta(model: Callable, x, target=None, *, alpha: float = 1.0, beta: float = 0.0,
                   bias: bool = True, batch_size: int | None = None, key=None):
    """LRP-αβ on every layer, α − β = 1 (default α1β0); `bias` counts b± in z±. `[B, H, W, C]`."""
    if not np.isclose(alpha - beta, 1.0) or beta < 0:
        raise ValueError(f"LRP-αβ needs α − β = 1 and β ≥ 0, got α={alpha}, β={beta}.")
    rule = AlphaBeta(float(alpha), float(beta), bool(bias))
    return propagate(model, x, target, _relevance_rules(rule, rule), batch_size=batch_size)


def lrp_sequential_preset_flat(model: Callable, x, target=None, *, epsilon: float = 0.1,
                               batch_size: int | None = None, key=None):
    """innvestigate's LRPSequentialPresetAFlat: α1β0 for convolutions, ε (0.1) for dense layers,
    the flat rule for layers fed by the image. `[B, H, W, C]`."""
    _check_nonnegative("epsilon", epsilon)
    rules = _relevance_rules(AlphaBeta(1.0, 0.0, True), Epsilon(float(epsilon)), input_layer=Flat())
    return propagate(model, x, target, rules, batch_size=batch_size)


def deep_taylor(model: Callable, x, target=None, *, low: float | None = None,
                high: float | None = None, batch_size: int | None = None, key=None):
    """Deep Taylor decomposition: the z⁺ rule (α1β0 without bias) on every layer; with `low` and
    `high` (the input domain, e.g. 0 and 1) the input layer uses the z^B rule. `[B, H, W, C]`."""
    input_layer = None
    if (low is None) != (high is None):
        raise ValueError("deep_taylor needs both low and high for the bounded input rule, "
                         "or neither.")
    if low is not None:
        if not low < high:
            raise ValueError(f"deep_taylor needs low < high, got low={low}, high={high}.")
        input_layer = Bounded(float(low), float(high))
    rule = AlphaBeta(1.0, 0.0, False)
    return propagate(model, x, target, _relevance_rules(rule, rule, input_layer=input_layer),
                     batch_size=batch_size)


def pattern_net(model: Callable, x, target=None, *, patterns: Sequence[jax.Array],
                batch_size: int | None = None, key=None):
    """PatternNet (Kindermans et al. 2018): the backward pass with each layer's weights replaced by
    its signal pattern A from `fit_patterns`; estimates the signal in x. `[B, H, W, C]`."""
    rules = Rules(dense=PatternRule("net"), conv=PatternRule("net"), strict=True)
    return propagate(model, x, target, rules, batch_size=batch_size, patterns=patterns)


def pattern_attribution(model: Callable, x, target=None, *, patterns: Sequence[jax.Array],
                        batch_size: int | None = None, key=None):
    """PatternAttribution (Kindermans et al. 2018): the backward pass through W ⊙ A, A from
    `fit_patterns`. `[B, H, W, C]`."""
    rules = Rules(dense=PatternRule("attribution"), conv=PatternRule("attribution"), strict=True)
    return propagate(model, x, target, rules, batch_size=batch_size, patterns=patterns)


def fit_patterns(model: Callable, images, *, batch_size: int = 256,
                 progress: bool | None = None) -> tuple[jax.Array, ...]:
    """Signal patterns of every linear block, fitted on training images (Kindermans et al. 2018).

    images: `[N, H, W, C]`. For a block with weights W, inputs x and outputs y = Wᵀx, the pattern
    of unit k is A_k = cov(x, y_k) / (w_kᵀ cov(x, y_k)), the covariance taken over all examples
    and positions where the unit's ReLU is active (the two-component estimator A⁺), or over all of
    them for blocks without a ReLU after them (the linear estimator). Returns one weight-shaped
    array per block, in the order `pattern_net` consumes them.

    A host function (it accumulates the statistics batch by batch in float64): call it outside
    `jax.jit`; the patterns it returns can then be passed into a jitted `pattern_net`.

    Raises:
      ValueError: `images` is not a non-empty finite float batch `[N, H, W, C]`, or `batch_size`
        is not a positive integer.
      ModelCallError: the model cannot be called on images of this size and channels.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable model(x) -> logits, got {type(model).__name__}.")
    images = np.asarray(images)
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be float [N, H, W, C], got {images.dtype} {images.shape}.")
    if images.shape[0] == 0:
        raise ValueError(f"fit_patterns got an empty batch of images (shape {images.shape}); "
                         "pass at least one training image.")
    if not np.all(np.isfinite(images)):
        raise ValueError("fit_patterns: images contain NaN or infinite values.")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise ValueError(f"fit_patterns: batch_size must be >= 1, an integer; got {batch_size!r}.")
    example = jnp.asarray(images[:1], jnp.float32)
    dynamic, static = split_model(model, example)
    logits_shape(dynamic, static, example)  # a ModelCallError for a wrong size or channels
    chunk = min(batch_size, len(images))
    stats_fn = _pattern_statistics_fn(static)
    totals = None
    weights = None
    for start in tqdm(range(0, len(images), chunk), desc="fit patterns", unit="batch", leave=False,
                      disable=progress_disabled(progress)):
        batch = jnp.asarray(images[start:start + chunk], jnp.float32)
        stats, block_weights = stats_fn(dynamic, batch)
        stats = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), stats)
        totals = stats if totals is None else jax.tree_util.tree_map(np.add, totals, stats)
        weights = block_weights
    blocks = _block_layout(model, jnp.asarray(images[:1], jnp.float32))
    return tuple(
        jnp.asarray(_pattern_from_statistics(block, np.asarray(w, np.float64), stat), jnp.float32)
        for block, w, stat in zip(blocks, weights, totals)
    )


def propagate(model: Callable, x, target, rules: Rules, *, batch_size: int | None = None,
              patterns: Sequence[jax.Array] | None = None) -> jax.Array:
    """Attribution by a modified backward pass with explicit `Rules`. `[B, H, W, C]`."""
    x, target, parts = check_host_inputs(model, x, target)
    shared = () if patterns is None else tuple(jnp.asarray(p) for p in patterns)
    return run_chunked(_propagation_kernel, model, x, target, parts=parts, batch_size=batch_size,
                       shared=shared, rules=rules)


# --------------------------------------------------------------------------------------------
# Private helpers.


def _propagation_kernel(model, x, target, keys, *patterns, rules):
    forward = modified_forward(model, rules, list(patterns) if patterns else None)
    sink = jnp.zeros_like(x)
    logits, vjp = jax.vjp(forward, x, sink)
    seed = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
    grad_x, sink_relevance = vjp(seed)
    return x * grad_x + sink_relevance if rules.relevance else grad_x


def _relevance_rules(conv_rule, dense_rule, *, input_layer=None, residual=None) -> Rules:
    return Rules(relu="gradient", dense=dense_rule, conv=conv_rule, input_layer=input_layer,
                 residual_epsilon=residual, strict=True, relevance=True)


@functools.lru_cache(maxsize=32)
def _pattern_statistics_fn(static):
    def statistics(dynamic, images):
        model = static.rebuild(dynamic)
        _, collected = linear_blocks(model, images, collect=_block_statistics)
        stats = [c[0] for c in collected]
        weights = [c[1] for c in collected]
        return stats, weights

    return jit(statistics)


def _block_layout(model, x):
    """The model's `LinearBlock`s, read off an abstract trace: nothing is computed."""
    blocks = []
    jax.eval_shape(lambda images: blocks.extend(linear_blocks(model, images)[0]), x)
    return blocks


def _block_statistics(block, u, weight, lin_out, z, lin):
    """Sums over one batch: (count, Σ y, Σ x y, Σ x) over the active region of each unit."""
    if not block.weight_unit_axes:
        raise NotImplementedError(
            f"fit_patterns cannot identify the output units of a {block.kind} block with weight "
            f"shape {block.weight_shape}."
        )
    mask = (z > 0).astype(lin_out.dtype) if block.relu_gated else jnp.ones_like(lin_out)
    reduce_axes = tuple(a for a in range(lin_out.ndim) if a not in block.output_unit_axes)
    count = mask.sum(reduce_axes)
    sum_y = (lin_out * mask).sum(reduce_axes)
    _, weight_vjp = jax.vjp(lambda w: lin(u, w), weight)
    (sum_xy,) = weight_vjp(lin_out * mask)
    (sum_x,) = weight_vjp(mask)
    return (count, sum_y, sum_xy, sum_x), weight


def _pattern_from_statistics(block, weight, stats):
    count, sum_y, sum_xy, sum_x = stats
    other_axes = tuple(a for a in range(weight.ndim) if a not in block.weight_unit_axes)

    def to_weight_layout(unit_values):
        return np.expand_dims(unit_values, other_axes)

    n = to_weight_layout(count)
    safe_n = np.where(n > 0, n, 1.0)
    covariance = sum_xy / safe_n - (sum_x / safe_n) * to_weight_layout(
        sum_y / np.where(count > 0, count, 1.0))
    denominator = to_weight_layout((weight * covariance).sum(other_axes))
    pattern = np.where((n > 0) & (denominator != 0),
                       covariance / np.where(denominator != 0, denominator, 1.0), 0.0)
    return pattern


def _check_nonnegative(name, value):
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
