"""Surrogate attributions over superpixels: LIME and KernelSHAP (paper section 2.2, appendix B).

An image is cut into about `num_segments` superpixels (SLIC, on the host). A perturbation keeps a
subset of the segments and paints the others with a fill image; the model's target logit on
the perturbed images is fitted by a weighted linear model over the binary keep-masks, and each
segment's coefficient is painted over its pixels (all channels): the returned attributions have
the shape of `x`, `[B, H, W, C]`. Mask sampling, the model queries (in groups of
`sample_batch_size` perturbations per example) and the weighted least-squares fits run in JAX
inside one jitted kernel per chunk of `batch_size` examples, vectorised over examples.

Images have different numbers of segments; the masks are `[num_samples, S]` with `S` the largest
label of the batch plus one, rounded up to a multiple of 8 (so batches with slightly different
segment counts share one compiled program). A label absent from an image is never kept, never
counted in distances or coalition sizes, and gets coefficient 0.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from skimage.segmentation import slic

from jfail.attribution._core import (
    check_inputs,
    check_positive_int,
    map_over_samples,
    pick_logits,
    require_key,
    run_chunked,
    sample_group_size,
)
from jfail.models.adapter import in_trace
from jfail.xla import cpu_friendly_gradients, jit

__all__ = ["segment", "segments", "lime", "kernel_shap"]

_SEGMENT_BUCKET = 8  # the static segment count is rounded up to a multiple of this


def segment(image, num_segments: int = 50, *, compactness: float | None = None) -> np.ndarray:
    """SLIC superpixels of one image `[H, W, C]` -> int32 labels `[H, W]`, `0 .. S-1`.

    The image is min-max scaled to [0, 1] first (so the labels do not depend on how it was
    normalised); 3 channels are segmented in Lab colour as SLIC does for RGB, 1 channel as a
    grey image, other channel counts as raw channels. `S` is about `num_segments`.

    Args:
        image: one image `[H, W, C]`.
        num_segments: the approximate number of superpixels (a positive integer).
        compactness: SLIC's balance of colour and space; None = 10 for Lab colour (values up
            to 100), 0.1 for the [0, 1] intensities of other channel counts (the same balance
            of colour and space).

    Returns:
        int32 labels `[H, W]`, contiguous from 0.

    Raises:
        ValueError: if `image` is not `[H, W, C]` or `num_segments` is not a positive integer.
    """
    image = np.asarray(image, np.float64)
    if image.ndim != 3:
        raise ValueError(f"segment: image must be [H, W, C], got shape {image.shape}.")
    check_positive_int("segment", "num_segments", num_segments)
    spread = image.max() - image.min()
    scaled = (image - image.min()) / spread if spread > 0 else np.zeros_like(image)
    if compactness is None:
        compactness = 10.0 if image.shape[-1] == 3 else 0.1
    if scaled.shape[-1] == 1:
        labels = slic(scaled[..., 0], n_segments=num_segments, compactness=compactness,
                      start_label=0, channel_axis=None)
    else:
        labels = slic(scaled, n_segments=num_segments, compactness=compactness, start_label=0,
                      channel_axis=-1, convert2lab=scaled.shape[-1] == 3)
    _, contiguous = np.unique(labels, return_inverse=True)
    return contiguous.reshape(labels.shape).astype(np.int32)


def segments(x, num_segments: int = 50, *, compactness: float | None = None) -> np.ndarray:
    """`segment` of every image of `x: [B, H, W, C]` -> int32 labels `[B, H, W]`.

    Args:
        x: images `[B, H, W, C]`.
        num_segments: the approximate number of superpixels per image.
        compactness: as in `segment`.

    Returns:
        int32 labels `[B, H, W]`, each image's contiguous from 0.

    Raises:
        ValueError: if `x` is not `[B, H, W, C]` or `num_segments` is not a positive integer.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"segments: x must be [B, H, W, C], got shape {x.shape}.")
    return np.stack([segment(image, num_segments, compactness=compactness) for image in x])


def lime(
    model: Callable,
    x,
    target=None,
    *,
    key=None,
    batch_size: int | None = None,
    num_segments: int = 50,
    num_samples: int = 1000,
    kernel_width: float = 0.25,
    segments=None,
    baseline=None,
    sample_batch_size: int | None = 100,
):
    """LIME over superpixels (Ribeiro et al., 2016), following lime-image; `[B, H, W, C]`.

    - segments: int labels `[B, H, W]` (or `[H, W]` for all images); None = `segments(x,
      num_segments)` (SLIC; lime-image's default segmenter is quickshift).
    - Perturbations: `num_samples` keep-masks, each segment kept with probability 1/2, the first
      mask keeping every segment (the image itself), as lime-image samples them.
    - Hidden segments are painted with `baseline`: None = the mean colour of that segment in the
      image, lime-image's `hide_color=None`; or a float / an array broadcastable to `x`.
    - Sample weights: `sqrt(exp(-d^2 / kernel_width^2))`, `d` the cosine distance between the
      keep-mask and the all-kept mask (lime-image's kernel, width 0.25).
    - Fit: weighted ridge regression with an unpenalised intercept and `alpha = 1` (lime's
      default `Ridge(alpha=1)`), of the target logit (lime is usually fed probabilities) on all
      segments (lime-image's default `num_features=100000` keeps them all).
    The attribution of a pixel is the coefficient of its segment. Needs a PRNG `key`.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: a PRNG key for the keep-masks (required).
        batch_size: examples per jitted chunk (None: all at once).
        num_segments: the approximate number of SLIC superpixels when `segments` is None.
        num_samples: perturbations per example.
        kernel_width: width of the exponential kernel on the cosine distance (> 0).
        segments: int labels `[B, H, W]` or `[H, W]`; None = `segments(x, num_segments)`.
        baseline: the fill of hidden segments: None (per-segment mean colour), a float, or an
            array broadcastable to `x`.
        sample_batch_size: perturbations per model call and example (None: all at once).

    Returns:
        `[B, H, W, C]` float array, each pixel the ridge coefficient of its segment.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `key` is missing, `kernel_width`, `num_samples`, `num_segments` or
            `batch_size` is out of range, `x` is not a non-empty `[B, H, W, C]` batch of
            finite values, a target is out of range, `segments` or `baseline` do not fit `x`,
            or the model cannot be called on `x`.
    """
    if not np.isscalar(kernel_width) or not kernel_width > 0:
        raise ValueError(f"lime: kernel_width must be a float > 0, got {kernel_width!r}.")
    x, target, segment_map, count, fill = _prepare(
        "lime", model, x, target, key, num_samples, num_segments, segments, baseline,
        per_segment_mean=True,
    )
    return run_chunked(
        _lime_kernel, model, x, target, key=key, batch_size=batch_size,
        per_example=(segment_map, fill), num_segments=count, num_samples=int(num_samples),
        kernel_width=float(kernel_width), sample_batch_size=sample_group_size(sample_batch_size),
    )


def kernel_shap(
    model: Callable,
    x,
    target=None,
    *,
    key=None,
    batch_size: int | None = None,
    num_segments: int = 50,
    num_samples: int = 1000,
    segments=None,
    baseline=None,
    sample_batch_size: int | None = 100,
):
    """KernelSHAP over superpixels (Lundberg and Lee, 2017): Shapley values, `[B, H, W, C]`.

    - segments: as in `lime`.
    - Hidden segments are painted with `baseline`: None = the mean colour of the whole image
      (per channel: one background for every segment, so that a coalition's value does not
      depend on the colours of the segments it hides); or a float / an array broadcastable to
      `x`. The value of a coalition is the target logit of the image keeping
      exactly its segments.
    - Coalitions, as the SHAP package's KernelExplainer spends its budget: when `num_samples`
      allows (>= 2 S + 2, S the padded segment count) every coalition of size 1 and M - 1 (M =
      the image's segment count) is enumerated with its Shapley-kernel weight; the rest of the
      budget is drawn in complementary pairs, the size k in the remaining range with
      probability proportional to the kernel's total mass `(M - 1) / (k (M - k))` there, the
      subset uniform, and each drawn coalition weighted by the remaining mass over the number
      drawn.
    - Fit: the Shapley-kernel weighted least squares of `v(z) - v(empty)` on the keep-masks,
      solved exactly under the efficiency constraint `sum(phi) = v(full) - v(empty)` (its KKT
      system; the empty and full coalitions have infinite weight), without the SHAP package's
      optional l1 feature selection.
    For a model linear in the segments' keep-masks this recovers the exact Shapley values. The
    attribution of a pixel is the Shapley value of its segment. Needs a PRNG `key`.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: a PRNG key for the sampled coalitions (required).
        batch_size: examples per jitted chunk (None: all at once).
        num_segments: the approximate number of SLIC superpixels when `segments` is None.
        num_samples: sampled coalitions per example (besides the empty and full ones).
        segments: int labels `[B, H, W]` or `[H, W]`; None = `segments(x, num_segments)`.
        baseline: the fill of hidden segments: None (the image's mean colour), a float, or an
            array broadcastable to `x`.
        sample_batch_size: coalitions per model call and example (None: all at once).

    Returns:
        `[B, H, W, C]` float array, each pixel the Shapley value of its segment.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `key` is missing, `num_samples`, `num_segments` or `batch_size` is not
            a positive integer, `x` is not a non-empty `[B, H, W, C]` batch of finite values, a
            target is out of range, `segments` or `baseline` do not fit `x`, or the model
            cannot be called on `x`.
    """
    x, target, segment_map, count, fill = _prepare(
        "kernel_shap", model, x, target, key, num_samples, num_segments, segments, baseline,
        per_segment_mean=False,
    )
    return run_chunked(
        _kernel_shap_kernel, model, x, target, key=key, batch_size=batch_size,
        per_example=(segment_map, fill), num_segments=count, num_samples=int(num_samples),
        sample_batch_size=sample_group_size(sample_batch_size),
    )


# --------------------------------------------------------------------------------------------
# Kernels: one chunk of examples, jitted by run_chunked.


def _lime_kernel(model, x, target, keys, segment_map, fill, *, num_segments, num_samples,
                 kernel_width, sample_batch_size):
    present = _present_segments(segment_map, num_segments)  # [b, S]

    def draw(key, kept):
        masks = jax.random.bernoulli(key, 0.5, (num_samples, num_segments)) & kept
        return masks.at[0].set(kept)

    masks = jax.vmap(draw)(keys, present).astype(jnp.float32)  # [b, n, S]
    outputs = _masked_target_logits(model, x, target, segment_map, fill, masks, sample_batch_size)
    kept = masks.sum(axis=-1)
    total = present.sum(axis=-1, keepdims=True).astype(jnp.float32)
    similarity = jnp.where(kept > 0, jnp.sqrt(kept / total), 0.0)  # cosine to the all-kept mask
    distance = 1.0 - similarity
    weights = jnp.sqrt(jnp.exp(-(distance**2) / kernel_width**2))
    fit = jax.vmap(_weighted_ridge, in_axes=(0, 0, 0, None))
    coefficients, _ = fit(masks, outputs, weights, 1.0)  # lime's Ridge(alpha=1)
    return _paint(coefficients, segment_map, x.shape[-1])


def _kernel_shap_kernel(model, x, target, keys, segment_map, fill, *, num_segments, num_samples,
                        sample_batch_size):
    present = _present_segments(segment_map, num_segments)
    coalitions, weights = jax.vmap(_shap_coalitions, in_axes=(0, 0, None))(keys, present,
                                                                          num_samples)
    ends = jnp.stack([present, jnp.zeros_like(present)], axis=1).astype(jnp.float32)
    masks = jnp.concatenate([ends, coalitions], axis=1)  # [b, 2 + n, S]: full, empty, sampled
    outputs = _masked_target_logits(model, x, target, segment_map, fill, masks, sample_batch_size)
    full, empty = outputs[:, 0], outputs[:, 1]
    values = jax.vmap(_constrained_least_squares)(
        coalitions, outputs[:, 2:] - empty[:, None], weights, present, full - empty
    )
    return _paint(values, segment_map, x.shape[-1])


# --------------------------------------------------------------------------------------------
# Private helpers.


def _prepare(name, model, x, target, key, num_samples, num_segments, segment_map, baseline, *,
             per_segment_mean):
    """Checked inputs, `[B, H, W]` int32 labels, the static segment count S, `[B, H, W, C]` fill."""
    require_key(name, key, "perturbations")
    check_positive_int(name, "num_samples", num_samples)
    check_positive_int(name, "num_segments", num_segments)
    x, target = check_inputs(model, x, target)
    if segment_map is None:
        if in_trace(x):
            raise ValueError(
                f"{name}: inside jax.jit/vmap/grad with traced images, SLIC cannot segment them "
                "(it runs on the host); pass segments=jfail.attribution.segments(images) "
                "computed outside, an int array [B, H, W]."
            )
        segment_map = segments(np.asarray(x), num_segments)
    if in_trace(segment_map):
        raise ValueError(
            f"{name}: segments must be a concrete int array (its largest label fixes the shapes "
            "of the program), not a traced value; compute it outside jax.jit/vmap."
        )
    segment_map = np.asarray(segment_map)
    if segment_map.ndim == 2:
        segment_map = np.broadcast_to(segment_map, (x.shape[0],) + segment_map.shape)
    if segment_map.shape != x.shape[:3]:
        raise ValueError(f"{name}: segments must be [B, H, W] = {x.shape[:3]}, got "
                         f"{segment_map.shape}.")
    if not np.issubdtype(segment_map.dtype, np.integer) or segment_map.min() < 0:
        raise ValueError(f"{name}: segments must hold non-negative integer labels.")
    count = -(-(int(segment_map.max()) + 1) // _SEGMENT_BUCKET) * _SEGMENT_BUCKET
    segment_map = jnp.asarray(segment_map, jnp.int32)
    if baseline is None:
        fill = _mean_fill(x, segment_map, count if per_segment_mean else 1)
    else:
        fill = jnp.asarray(baseline, jnp.float32)
        try:
            fill = jnp.broadcast_to(fill, x.shape)
        except ValueError:
            raise ValueError(f"{name}: baseline of shape {fill.shape} does not broadcast to x "
                             f"{x.shape}.") from None
        if not in_trace(fill) and not bool(jnp.all(jnp.isfinite(fill))):
            raise ValueError(f"{name}: baseline contains NaN or infinite values.")
    return x, target, segment_map, count, fill


@jit(static_argnums=2)
def _mean_fill(x, segment_map, count):
    """Each pixel painted with the mean colour of its segment (count=1: of the whole image)."""

    def one(image, labels):
        labels = jnp.minimum(labels, count - 1).reshape(-1)
        pixels = image.reshape(-1, image.shape[-1])
        sums = jax.ops.segment_sum(pixels, labels, num_segments=count)
        sizes = jax.ops.segment_sum(jnp.ones(labels.shape), labels, num_segments=count)
        means = sums / jnp.maximum(sizes, 1.0)[:, None]
        return means[labels].reshape(image.shape)

    return jax.vmap(one)(x, segment_map)


def _present_segments(segment_map, count):
    """`[b, S]` bool: which labels occur in each image."""
    return jax.vmap(lambda labels: jnp.zeros(count, bool).at[labels.reshape(-1)].set(True))(
        segment_map
    )


def _masked_target_logits(model, x, target, segment_map, fill, masks, group):
    """Target logits of the perturbed images `[b, n]` for keep-masks `masks: [b, n, S]`.

    The model runs through `cpu_friendly_gradients` for its values: on CPU a one-channel first
    convolution as patches times a matrix, and convolutions of other layouts (NCHW) as NHWC ones,
    which XLA keeps fast inside the `jax.lax.map` over sample groups.
    """
    model = cpu_friendly_gradients(model)

    def evaluate(mask_group):  # [m, b, S] -> [m, b]
        keep = jax.vmap(lambda m, labels: m[:, labels], in_axes=(1, 0), out_axes=1)(
            mask_group, segment_map
        )  # [m, b, H, W]
        images = jnp.where(keep[..., None] > 0.5, x[None], fill[None])
        flat = images.reshape((-1,) + x.shape[1:])
        logits = pick_logits(model(flat), jnp.tile(target, mask_group.shape[0]))
        return logits.reshape(mask_group.shape[:2])

    return map_over_samples(evaluate, jnp.swapaxes(masks, 0, 1), group).T


def _weighted_ridge(design, targets, weights, alpha):
    """Weighted ridge with an unpenalised intercept, as scikit-learn's `Ridge(alpha)` with
    `sample_weight`: minimises `sum_i w_i (y_i - z_i . c - c0)^2 + alpha |c|^2`.

    design `[n, S]`, targets `[n]`, weights `[n]` -> (coefficients `[S]`, intercept `[]`).
    """
    total = weights.sum()
    design_mean = weights @ design / total
    target_mean = weights @ targets / total
    centred = design - design_mean
    weighted = centred * weights[:, None]
    gram = weighted.T @ centred + alpha * jnp.eye(design.shape[1], dtype=design.dtype)
    factor = jax.scipy.linalg.cho_factor(gram)
    rhs = weighted.T @ (targets - target_mean)
    coefficients = jax.scipy.linalg.cho_solve(factor, rhs[:, None])[:, 0]
    return coefficients, target_mean - design_mean @ coefficients


def _shap_coalitions(key, present, num_samples):
    """Keep-masks `[n, S]` and Shapley-kernel weights `[n]` for one image (see `kernel_shap`)."""
    count = present.shape[0]
    kept = present.astype(jnp.float32)
    players = kept.sum()
    enumerate_edges = num_samples >= 2 * count + 2
    sizes = jnp.arange(1, count + 1, dtype=jnp.float32)  # candidate sizes; S is never drawable
    lowest = 2.0 if enumerate_edges else 1.0
    drawable = (sizes >= lowest) & (sizes <= players - lowest)
    size_mass = jnp.where(drawable, (players - 1) / (sizes * (players - sizes)), 0.0)
    pairs = max((num_samples - (2 * count if enumerate_edges else 0)) // 2, 1)
    uniforms = jax.random.uniform(key, (pairs, count + 1))  # one draw: sizes, then orders
    cumulative = jnp.cumsum(size_mass) / jnp.maximum(size_mass.sum(), 1e-30)
    size_index = jnp.sum(uniforms[:, :1] >= cumulative[None, :], axis=1)  # inverse CDF
    size = jnp.clip(size_index + 1, lowest, jnp.maximum(players - lowest, lowest))  # [pairs]
    order = jnp.where(present, uniforms[:, 1:], 2.0)
    rank = jnp.argsort(jnp.argsort(order, axis=1), axis=1)  # a random order of the present ones
    chosen = (rank < size[:, None]) & present
    complement = present & ~chosen
    chosen, complement = chosen.astype(jnp.float32), complement.astype(jnp.float32)
    drawn = jnp.concatenate([chosen, complement])
    drawn_weight = jnp.full((2 * pairs,), size_mass.sum() / (2 * pairs))
    if not enumerate_edges:
        return drawn, drawn_weight
    singletons = jnp.eye(count, dtype=jnp.float32) * kept[:, None]
    all_but_one = kept[None, :] - singletons
    edge_weight = jnp.where(present, 1.0 / jnp.maximum(players, 1.0), 0.0)
    masks = jnp.concatenate([singletons, all_but_one, drawn])
    return masks, jnp.concatenate([edge_weight, edge_weight, drawn_weight])


def _constrained_least_squares(design, targets, weights, present, total):
    """`argmin_phi sum_i w_i (y_i - z_i . phi)^2` subject to `sum(phi) = total`, absent
    segments fixed at 0. `[n, S]`, `[n]`, `[n]`, `[S]`, `[]` -> `[S]`.

    The KKT system `G phi + lambda 1 = Z^T W y`, `1 . phi = total` is solved by its Schur
    complement with the pseudo-inverse of `G = Z^T W Z` (plus 1 on the diagonal of the absent
    segments) from its eigendecomposition, eigenvalues under 1e-6 of the largest taken as 0: a
    budget of coalitions too small to determine every segment (fewer independent coalitions
    than segments) gives the least-norm solution, as a least-squares solver would, not NaN.
    """
    kept = present.astype(design.dtype)
    weighted = design * weights[:, None]
    gram = weighted.T @ design + jnp.diag(1.0 - kept)
    values, vectors = jnp.linalg.eigh(gram)
    inverse = jnp.where(values > 1e-6 * values[-1], 1.0 / values, 0.0)
    rhs = jnp.stack([weighted.T @ targets, kept], axis=1)
    solved = vectors @ (inverse[:, None] * (vectors.T @ rhs))
    unconstrained, direction = solved[:, 0], solved[:, 1]
    multiplier = (kept @ unconstrained - total) / (kept @ direction)
    return (unconstrained - multiplier * direction) * kept


def _paint(values, segment_map, channels):
    """Per-segment values `[b, S]` painted over `[b, H, W]` labels -> `[b, H, W, C]`."""
    painted = jax.vmap(lambda v, labels: v[labels])(values, segment_map)
    return jnp.broadcast_to(painted[..., None], painted.shape + (channels,))
