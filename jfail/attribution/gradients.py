"""Gradient-family attributions: Gradient, Input x Gradient, SmoothGrad, SmoothGrad², VarGrad,
Integrated Gradients and Expected Gradients (Adebayo et al., "Debugging Tests for Model
Explanations", section 2.2 and appendix B).

Every method is `method(model, x, target, *, key=None, batch_size=None, **hparams)` and returns
raw signed attributions shaped like `x: [B, H, W, C]`; `model(x) -> logits [B, K]` is any JAX
callable and the attributed scalar is the logit of `target` (`[B]` ints, an int, or None for the
predicted class). Gradients of one example are taken through a batched model call of many
examples (the gradient of the sum of the per-row target logits), so a model must treat the rows
of a batch independently (BatchNorm in inference mode, not training mode).

Noisy and path samples are built and evaluated inside one jitted kernel per chunk of `batch_size`
examples (see `jfail.attribution._core.run_chunked`): vectorised over examples and samples, with
no Python loop per image or per sample. `sample_batch_size` (where a method has it) evaluates the
samples in groups of that many per example with `jax.lax.map`, bounding the model's activation
memory to `batch_size * sample_batch_size` images; the inputs and gradients of all samples of a
chunk are still held, `batch_size * num_samples` images. The default, None, evaluates all
samples at once on an accelerator and, on CPU, in groups of at most 96 model inputs per step
(`_core.cpu_group_size`), which keeps the activations in cache (timings:
`benchmarks/results/cpu_step_size.md`). Pass `sample_batch_size=num_samples` for one step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jfail.attribution._core import (
    check_host_inputs,
    check_positive_int,
    map_over_samples,
    pick_logits,
    require_key,
    run_chunked,
    sample_group_size,
)
from jfail.xla import cpu_friendly_gradients, jit

__all__ = [
    "gradient",
    "input_x_gradient",
    "smoothgrad",
    "smoothgrad_squared",
    "vargrad",
    "integrated_gradients",
    "completeness_error",
    "expected_gradients",
    "IG_RULES",
]

IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_middle")


def gradient(model: Callable, x, target=None, *, key=None, batch_size: int | None = None):
    """Gradient of the target logit w.r.t. the input, signed: `[B, H, W, C]` like `x`.

    The paper's Grad map is the absolute value of this; apply `postprocess.absolute` for it.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: accepted for a uniform signature and unused.
        batch_size: examples per jitted chunk (None: all at once).

    Returns:
        `[B, H, W, C]` float array, `d logit[target_i] / d x_i`.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, or the model cannot be called
            on `x` (`ModelCallError`), or the attributions are not finite (the message says
            whether the logits are).
    """
    x, target, parts = check_host_inputs(model, x, target)
    return run_chunked(_gradient_kernel, model, x, target, parts=parts, batch_size=batch_size)


def input_x_gradient(model: Callable, x, target=None, *, key=None, batch_size: int | None = None):
    """Element-wise `x * gradient(x)`, signed: `[B, H, W, C]` (Shrikumar et al., 2016).

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: accepted for a uniform signature and unused.
        batch_size: examples per jitted chunk (None: all at once).

    Returns:
        `[B, H, W, C]` float array.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, or the model cannot be called
            on `x` (`ModelCallError`), or the attributions are not finite (the message says
            whether the logits are).
    """
    x, target, parts = check_host_inputs(model, x, target)
    return run_chunked(_input_x_gradient_kernel, model, x, target, parts=parts,
                       batch_size=batch_size)


def smoothgrad(
    model: Callable,
    x,
    target=None,
    *,
    key=None,
    batch_size: int | None = None,
    num_samples: int = 50,
    noise_scale: float = 0.15,
    sample_batch_size: int | None = None,
):
    """SmoothGrad (Smilkov et al., 2017): the mean gradient over noisy copies, `[B, H, W, C]`.

    Each example gets `num_samples` copies `x + n`, `n ~ N(0, sigma^2)` i.i.d. per element, with
    `sigma = noise_scale * (max(x_i) - min(x_i))`: the input range of that example, as in the
    paper (50 samples, 0.15).

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: a PRNG key (required) for the noise.
        batch_size: examples per jitted chunk (None: all at once).
        num_samples: noisy copies per example (>= 1).
        noise_scale: the noise's standard deviation as a fraction of each example's range.
        sample_batch_size: samples evaluated per example in one step with `jax.lax.map` (None:
            all at once on an accelerator, groups of at most 96 model inputs on CPU).

    Returns:
        `[B, H, W, C]` float array: the mean gradient of the noisy copies.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, `key` is missing, `num_samples` or
            `sample_batch_size` is not a positive integer, or `noise_scale` is not a finite float >=
            0; or if the model cannot be called on `x` (`ModelCallError`) or the attributions are
            not finite (the message says whether the logits are).
    """
    return _noisy_gradients(
        "smoothgrad", "mean", model, x, target, key, batch_size, num_samples, noise_scale,
        sample_batch_size,
    )


def smoothgrad_squared(
    model: Callable,
    x,
    target=None,
    *,
    key=None,
    batch_size: int | None = None,
    num_samples: int = 50,
    noise_scale: float = 0.15,
    sample_batch_size: int | None = None,
):
    """SmoothGrad squared as the paper defines it: `smoothgrad(x) ** 2`, `[B, H, W, C]`.

    This is the element-wise square of the SmoothGrad mean (Hooker et al., 2019; paper
    appendix B), not the mean of squared gradients that Captum's `smoothgrad_sq` computes. Same
    noise and hyperparameters as `smoothgrad` (the same `key` gives exactly `smoothgrad ** 2`).

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: a PRNG key (required) for the noise.
        batch_size: examples per jitted chunk (None: all at once).
        num_samples: noisy copies per example (>= 1).
        noise_scale: the noise's standard deviation as a fraction of each example's range.
        sample_batch_size: samples evaluated per example in one step with `jax.lax.map` (None:
            all at once on an accelerator, groups of at most 96 model inputs on CPU).

    Returns:
        `[B, H, W, C]` float array, >= 0.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, `key` is missing, `num_samples` or
            `sample_batch_size` is not a positive integer, or `noise_scale` is not a finite float >=
            0; or if the model cannot be called on `x` (`ModelCallError`) or the attributions are
            not finite (the message says whether the logits are).
    """
    return _noisy_gradients(
        "smoothgrad_squared", "mean_squared", model, x, target, key, batch_size, num_samples,
        noise_scale, sample_batch_size,
    )


def vargrad(
    model: Callable,
    x,
    target=None,
    *,
    key=None,
    batch_size: int | None = None,
    num_samples: int = 50,
    noise_scale: float = 0.15,
    sample_batch_size: int | None = None,
):
    """VarGrad (Adebayo et al., 2018): the variance of the noisy gradients, `[B, H, W, C]`, >= 0.

    Same noise as `smoothgrad`; the population variance (divided by `num_samples`), as Captum's
    NoiseTunnel `vargrad` computes it.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: a PRNG key (required) for the noise.
        batch_size: examples per jitted chunk (None: all at once).
        num_samples: noisy copies per example (>= 1).
        noise_scale: the noise's standard deviation as a fraction of each example's range.
        sample_batch_size: samples evaluated per example in one step with `jax.lax.map` (None:
            all at once on an accelerator, groups of at most 96 model inputs on CPU).

    Returns:
        `[B, H, W, C]` float array, >= 0.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, `key` is missing, `num_samples` or
            `sample_batch_size` is not a positive integer, or `noise_scale` is not a finite float >=
            0; or if the model cannot be called on `x` (`ModelCallError`) or the attributions are
            not finite (the message says whether the logits are).
    """
    return _noisy_gradients(
        "vargrad", "variance", model, x, target, key, batch_size, num_samples, noise_scale,
        sample_batch_size,
    )


def integrated_gradients(
    model: Callable,
    x,
    target=None,
    *,
    key=None,
    batch_size: int | None = None,
    steps: int = 128,
    baseline=None,
    method: str = "gausslegendre",
    sample_batch_size: int | None = None,
):
    """Integrated Gradients (Sundararajan et al., 2017), `[B, H, W, C]`.

    `(x - x') * integral_0^1 grad f(x' + a (x - x')) da`, the integral by a `steps`-point rule:
    - "gausslegendre" (default): Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1],
      the same nodes and weights as Captum's default `method="gausslegendre"`;
    - "riemann_middle": midpoints `(k + 1/2) / steps`, weights `1 / steps` (as Captum's);
    - "riemann_trapezoid": `k / (steps - 1)`, weights `1 / (steps - 1)` halved at both ends. (This
      is the textbook trapezoid rule, whose weights sum to 1; Captum's "riemann_trapezoid" uses
      weights `1 / steps`, which sum to `1 - 1/steps`, so the two differ by that factor.)
    The gradient of a ReLU network jumps along the path, so every rule's error decays only like
    `1 / steps`; with the default 128 Gauss-Legendre points completeness (`sum(attributions) =
    f(x) - f(x')`, see `completeness_error`) holds to < 1% on small ReLU networks. Check it with
    `completeness_error` and raise `steps` where it does not.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: accepted for a uniform signature and unused.
        batch_size: examples per jitted chunk (None: all at once).
        steps: points of the integration rule (>= 1; >= 2 for "riemann_trapezoid").
        baseline: None for the paper's baseline, the minimum possible value of each input: the
            minimum of that example over all its pixels and channels, broadcast (an all-black
            image); or a float, or an array broadcastable to `x` (e.g. `[H, W, C]` or
            `[B, H, W, C]`).
        method: the integration rule, one of `IG_RULES`.
        sample_batch_size: samples evaluated per example in one step with `jax.lax.map` (None:
            all at once on an accelerator, groups of at most 96 model inputs on CPU).

    Returns:
        `[B, H, W, C]` float array, summing per example to about `f(x) - f(x')`.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, `method` is not in `IG_RULES`,
            `steps` is too small, or `baseline` does not broadcast to `x` or is not finite; or if
            the model cannot be called on `x` (`ModelCallError`) or the attributions are not finite
            (the message says whether the logits are).
    """
    if method not in IG_RULES:
        raise ValueError(f"integrated_gradients: method must be one of {IG_RULES}, got {method!r}.")
    minimum_steps = 2 if method == "riemann_trapezoid" else 1
    check_positive_int("integrated_gradients", "steps", steps, minimum=minimum_steps)
    x, target, parts = check_host_inputs(model, x, target)
    baseline = _resolve_baseline("integrated_gradients", x, baseline)
    return run_chunked(
        _integrated_gradients_kernel, model, x, target, parts=parts, batch_size=batch_size,
        per_example=baseline, nonfinite_errors=_baseline_errors("integrated_gradients", baseline),
        steps=int(steps), method=method, sample_batch_size=sample_group_size(sample_batch_size),
    )


def completeness_error(
    model: Callable, x, target, attributions, baseline=None, *, batch_size: int | None = None
) -> jax.Array:
    """Relative completeness gap of path attributions, `[B]`.

    `|sum(attributions_i) - (f(x_i) - f(x'_i))| / |f(x_i) - f(x'_i)|` with `f` the target logit;
    `baseline` as in `integrated_gradients` (None = per-example minimum). Pass the same `target`
    the attributions were computed for (None = predicted class, as there). Where the two logits
    are equal the denominator is floored at 1e-12.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        attributions: `[B, H, W, C]`, shaped like `x`.
        baseline: as in `integrated_gradients`.
        batch_size: examples per jitted chunk (None: all at once).

    Returns:
        `[B]` float array, the relative gap per example.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, `attributions` is not shaped like
            `x`, or `baseline` does not broadcast to `x` or is not finite; or if the model cannot be
            called on `x` (`ModelCallError`) or its target logits are not finite.
    """
    x, target, parts = check_host_inputs(model, x, target)
    attributions = jnp.asarray(attributions, x.dtype)
    if attributions.shape != x.shape:
        raise ValueError(
            f"completeness_error: attributions must be shaped like x {x.shape}, got "
            f"{attributions.shape}."
        )
    baseline = _resolve_baseline("completeness_error", x, baseline)
    logit_gap = run_chunked(
        _logit_gap_kernel, model, x, target, parts=parts, batch_size=batch_size,
        per_example=baseline,
        nonfinite_errors=_baseline_errors("completeness_error", baseline),
    )
    total = attributions.reshape(x.shape[0], -1).sum(axis=1)
    return jnp.abs(total - logit_gap) / jnp.maximum(jnp.abs(logit_gap), 1e-12)


def expected_gradients(
    model: Callable,
    x,
    target=None,
    *,
    key=None,
    batch_size: int | None = None,
    baselines=None,
    num_samples: int = 200,
    sample_batch_size: int | None = None,
):
    """Expected Gradients (Erion et al., 2019), `[B, H, W, C]`.

    Integrated Gradients averaged over baselines from the data: for each of `num_samples`
    samples draw a reference `x'` uniformly from `baselines` (`[N, H, W, C]`, e.g. training
    images; the paper uses 200) and `a ~ U(0, 1)`, and average `(x - x') * grad f(x' + a (x - x'))`.
    In expectation, for a linear model, this is `(x - mean(baselines)) * w`.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]` (float, finite).
        target: the class attributed per example: `[B]` ints, an int, or None for the
            predicted class.
        key: a PRNG key (required) for the references and path positions.
        batch_size: examples per jitted chunk (None: all at once).
        baselines: reference images `[N, H, W, C]` (required), `N >= 1`.
        num_samples: (reference, position) draws per example (>= 1).
        sample_batch_size: samples evaluated per example in one step with `jax.lax.map` (None:
            all at once on an accelerator, groups of at most 96 model inputs on CPU).

    Returns:
        `[B, H, W, C]` float array.

    Raises:
        TypeError: if `model` is not callable or `x` / `target` have the wrong type.
        ValueError: if `x` is not a non-empty `[B, H, W, C]` batch of finite values, a target is
            out of range, `batch_size` is not a positive integer, `key` or `baselines` is missing,
            `baselines` is not `[N, H, W, C]` with `x`'s image shape or holds non-finite values, or
            `num_samples` is not a positive integer; or if the model cannot be called on `x`
            (`ModelCallError`) or the attributions are not finite (the message says whether the
            logits are).
    """
    require_key("expected_gradients", key)
    check_positive_int("expected_gradients", "num_samples", num_samples)
    x, target, parts = check_host_inputs(model, x, target)
    if baselines is None:
        raise ValueError(
            "expected_gradients needs baselines: an array [N, H, W, C] of reference images "
            "(e.g. training images)."
        )
    baselines = jnp.asarray(baselines, jnp.float32)
    if baselines.ndim != 4 or baselines.shape[1:] != x.shape[1:] or baselines.shape[0] < 1:
        raise ValueError(
            f"expected_gradients: baselines must be [N, {', '.join(map(str, x.shape[1:]))}], got "
            f"shape {baselines.shape}."
        )
    return run_chunked(
        _expected_gradients_kernel, model, x, target, parts=parts, key=key,
        batch_size=batch_size, shared=(baselines,),
        nonfinite_errors=("expected_gradients: baselines contain NaN or infinite values.",),
        num_samples=int(num_samples), sample_batch_size=sample_group_size(sample_batch_size),
    )


# --------------------------------------------------------------------------------------------
# Kernels: one chunk of examples, jitted by run_chunked.


def _gradient_kernel(model, x, target, keys):
    return target_logit_gradients(model, x, target)


def _input_x_gradient_kernel(model, x, target, keys):
    return x * target_logit_gradients(model, x, target)




def _noisy_gradient_kernel(model, x, target, keys, noise_scale, *, statistic, num_samples,
                           sample_batch_size):
    """`[b, H, W, C]`: the `statistic` ("mean", "mean_squared" or "variance") of the noisy
    gradients; the noise scale is traced, so one program serves every scale."""
    noisy = _noisy_copies(keys, x, _noise_std(x, noise_scale), num_samples)  # [b, n, H, W, C]
    grads = _sample_gradients(model, jnp.swapaxes(noisy, 0, 1), target, sample_batch_size)
    if statistic == "variance":
        return jnp.var(grads, axis=0)
    mean = jnp.mean(grads, axis=0)
    return mean * mean if statistic == "mean_squared" else mean


def _integrated_gradients_kernel(model, x, target, keys, *baseline, steps, method,
                                 sample_batch_size):
    baseline = baseline[0] if baseline else _minimum_baseline(x)
    alphas, weights = _quadrature(method, steps)
    alphas = jnp.asarray(alphas, jnp.float32).reshape(-1, 1, 1, 1, 1)
    delta = x - baseline
    path = baseline[None] + alphas * delta[None]  # [steps, b, H, W, C]
    grads = _sample_gradients(model, path, target, sample_batch_size)
    mean_grad = jnp.tensordot(jnp.asarray(weights, jnp.float32), grads, axes=1)
    return delta * mean_grad


def _logit_gap_kernel(model, x, target, keys, *baseline):
    baseline = baseline[0] if baseline else _minimum_baseline(x)
    logits = model(jnp.concatenate([x, baseline]))
    picked = pick_logits(logits, jnp.concatenate([target, target]))
    return picked[: x.shape[0]] - picked[x.shape[0]:]


def _expected_gradients_kernel(model, x, target, keys, baselines, *, num_samples,
                               sample_batch_size):
    count = baselines.shape[0]
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (2, num_samples)))(keys)  # [b, 2, n]
    index = jnp.minimum(jnp.floor(uniforms[:, 0] * count).astype(jnp.int32), count - 1)
    alpha = uniforms[:, 1]  # [b, n] each: the reference drawn uniformly, a ~ U(0, 1)
    references = jnp.swapaxes(baselines[index], 0, 1)  # [n, b, H, W, C]
    alpha = jnp.swapaxes(alpha, 0, 1)[..., None, None, None]
    delta = x[None] - references
    grads = _sample_gradients(model, references + alpha * delta, target, sample_batch_size)
    return jnp.mean(delta * grads, axis=0)


# --------------------------------------------------------------------------------------------
# Private helpers.


def _noisy_gradients(name, statistic, model, x, target, key, batch_size, num_samples,
                     noise_scale, sample_batch_size):
    require_key(name, key)
    check_positive_int(name, "num_samples", num_samples)
    if not np.isscalar(noise_scale) or not np.isfinite(noise_scale) or noise_scale < 0:
        raise ValueError(f"{name}: noise_scale must be a finite float >= 0, got {noise_scale!r}.")
    x, target, parts = check_host_inputs(model, x, target)
    return run_chunked(
        _noisy_gradient_kernel, model, x, target, parts=parts, key=key, batch_size=batch_size,
        shared=(np.float32(noise_scale),), statistic=statistic, num_samples=int(num_samples),
        sample_batch_size=sample_group_size(sample_batch_size),
    )


@jit
def _noise_std(x, noise_scale):
    """`[B]`: `noise_scale` times the input range (max - min) of each example of `x`."""
    return noise_scale * (jnp.max(x, axis=(1, 2, 3)) - jnp.min(x, axis=(1, 2, 3)))


def _noisy_copies(keys, x, noise_std, num_samples: int) -> jax.Array:
    """`[b, n, H, W, C]` copies of `x: [b, H, W, C]` plus i.i.d. Gaussian noise of std
    `noise_std: [b]`, drawn from each example's key."""

    def one(key, image, sigma):
        return image + sigma * jax.random.normal(key, (num_samples,) + image.shape, image.dtype)

    return jax.vmap(one)(keys, x, noise_std)


def _quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in [0, 1] and weights (summing to 1) of an integration rule with `steps` points."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if method == "riemann_middle":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] /= 2
    return np.linspace(0.0, 1.0, steps), weights


def target_logit_gradients(model, images, target):
    """d logit[target_i] / d images_i for a batch `images: [N, H, W, C]`, `target: [N]`.

    On CPU, 4x4/2-like convolutions are differentiated through space-to-depth and convolutions
    of few input channels through patches (`jfail.xla.cpu_gradients`)."""
    model = cpu_friendly_gradients(model)

    def objective(batch):
        return pick_logits(model(batch), target).sum()

    return jax.grad(objective)(images)


def _sample_gradients(model, samples, target, group):
    """Target-logit gradients of `samples: [n, b, H, W, C]` (sample-major), `target: [b]`."""

    def evaluate(sample_group):  # [m, b, H, W, C]
        flat = sample_group.reshape((-1,) + sample_group.shape[2:])
        tiled_target = jnp.tile(target, sample_group.shape[0])
        return target_logit_gradients(model, flat, tiled_target).reshape(sample_group.shape)

    return map_over_samples(evaluate, samples, group)


def _resolve_baseline(name: str, x: jax.Array, baseline) -> tuple:
    """`()` for the paper's baseline (each example's minimum, computed inside the kernel), else
    `(baseline,)` broadcast to `x`: `[B, H, W, C]`."""
    if baseline is None:
        return ()
    baseline = jnp.asarray(baseline, jnp.float32)
    try:
        return (jnp.broadcast_to(baseline, x.shape),)
    except ValueError:
        raise ValueError(
            f"{name}: baseline of shape {baseline.shape} does not broadcast to x {x.shape}."
        ) from None


def _baseline_errors(name: str, baseline: tuple) -> tuple:
    """`run_chunked`'s `nonfinite_errors` for a resolved baseline."""
    return (f"{name}: baseline contains NaN or infinite values.",) * len(baseline)


@jit
def _minimum_baseline(x):
    """Each example's minimum value broadcast over it: the paper's IG baseline, `[B, H, W, C]`."""
    return jnp.broadcast_to(jnp.min(x, axis=(1, 2, 3), keepdims=True), x.shape)
