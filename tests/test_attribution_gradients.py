"""Gradient-family and surrogate attributions, and their post-processing, on tiny models.

Properties checked: exact answers on linear models (gradient = weight column, IG = (x - x') * w,
expected gradients = (x - mean baseline) * w, KernelSHAP = exact Shapley values of a model
linear in its segments), Integrated Gradients completeness on ReLU nets, SmoothGrad's limits,
KernelSHAP against brute-force Shapley values, LIME's ridge against scikit-learn's, results
independent of `batch_size`, weights traced (new weights, no recompilation), agreement with
Captum on the same weights with shared noise, and clear errors on bad input.
"""

from __future__ import annotations

import itertools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail.attribution import gradients as grads
from jfail.attribution import postprocess, surrogates

HEIGHT, WIDTH, CHANNELS, CLASSES = 8, 8, 3, 5


# --------------------------------------------------------------------------------------------
# Tiny models.


def _linear_apply(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _quadratic_apply(x):
    squares = 0.5 * jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
    return jnp.stack([squares, -squares], axis=1)


def _mlp_apply(params, x):
    hidden = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _linear_params(seed, features=HEIGHT * WIDTH * CHANNELS, classes=CLASSES):
    rng = np.random.default_rng(seed)
    return {"w": _normal(rng, (features, classes)), "b": _normal(rng, (classes,))}


def _mlp_params(seed, features=HEIGHT * WIDTH * CHANNELS, hidden=32, classes=CLASSES):
    rng = np.random.default_rng(seed)
    return {
        "w1": _normal(rng, (features, hidden), 1 / np.sqrt(features)),
        "b1": _normal(rng, (hidden,), 0.1),
        "w2": _normal(rng, (hidden, classes), 1 / np.sqrt(hidden)),
        "b2": jnp.asarray(np.zeros(classes), jnp.float32),
    }


class _LinenConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


def _images(seed, batch=4, shape=(HEIGHT, WIDTH, CHANNELS)):
    """numpy float32 images in [0, 1). (The tests compute expectations in numpy: every small
    eager JAX op would be one more program to compile.)"""
    return np.random.default_rng(seed).uniform(size=(batch,) + shape).astype(np.float32)


@jax.jit
def _logits(model, x):
    return model(x)


def _target_logits(model, x, target):
    return np.asarray(_logits(model, x))[np.arange(len(x)), np.asarray(target)]


_noisy_copies = jax.jit(grads._noisy_copies, static_argnums=3)


def _assert_same(ours, reference):
    """Equal up to float32 reordering (e.g. chunked vs whole batches)."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    scale = np.abs(reference).max()
    assert scale > 0
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(autouse=True, scope="module")
def _quick_compiling_prng():
    """The non-partitionable threefry compiles several times faster on CPU; every property
    tested here holds for any bit generator."""
    with jax.threefry_partitionable(False):
        yield


@pytest.fixture(scope="module")
def linear():
    params = _linear_params(0)
    return jax.tree_util.Partial(_linear_apply, params), params


@pytest.fixture(scope="module")
def mlp():
    return jax.tree_util.Partial(_mlp_apply, _mlp_params(0))


@pytest.fixture(scope="module")
def linen_conv():
    """The Flax module with numpy-drawn variables (shapes from `eval_shape`, nothing compiled)."""
    module = _LinenConvNet()
    shapes = jax.eval_shape(module.init, jax.random.key(4), _images(0, batch=1))
    rng = np.random.default_rng(4)
    def draw(leaf):  # kernels scaled by 1 / sqrt(fan-in), biases small
        fan_in = np.prod(leaf.shape[:-1])
        return _normal(rng, leaf.shape, 0.1 if leaf.ndim == 1 else 1 / np.sqrt(fan_in))

    variables = jax.tree_util.tree_map(draw, shapes)
    return jax.tree_util.Partial(module.apply, variables)


# --------------------------------------------------------------------------------------------
# Gradient, Input x Gradient, Integrated Gradients.


@pytest.mark.parametrize("wrapper", ["partial", "closure"])
def test_gradient_of_linear_model_is_its_weight_column(linear, wrapper):
    model, params = linear
    if wrapper == "closure":
        model = lambda images: _linear_apply(params, images)  # noqa: E731
    x = _images(1)
    target = np.array([0, 3, 1, 4])
    attributions = grads.gradient(model, x, target)
    expected = np.asarray(params["w"])[:, target].T.reshape(x.shape)
    np.testing.assert_allclose(attributions, expected, rtol=1e-5, atol=1e-6)
    signed = grads.input_x_gradient(model, x, target)
    np.testing.assert_allclose(signed, x * expected, rtol=1e-5, atol=1e-6)
    assert float(signed.min()) < 0  # no hidden absolute value


def test_gradient_of_linen_module_matches_jax_grad(linen_conv):
    x = _images(2)
    attributions = grads.gradient(linen_conv, x, None)
    predicted = np.argmax(_logits(linen_conv, x), axis=-1)
    one_gradient = jax.grad(lambda image, target: linen_conv(image[None])[0, target])
    expected = jax.jit(jax.vmap(one_gradient))(x, predicted)
    np.testing.assert_allclose(attributions, expected, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_of_linear_model_is_exact(linear):
    model, params = linear
    x = _images(3)
    target = np.array([2, 2, 0, 1])
    weights = np.asarray(params["w"])[:, target].T.reshape(x.shape)
    default = grads.integrated_gradients(model, x, target, steps=8)
    minimum = x.min(axis=(1, 2, 3), keepdims=True)  # the paper's all-minimum baseline
    np.testing.assert_allclose(default, (x - minimum) * weights, rtol=1e-4, atol=1e-5)
    grey = grads.integrated_gradients(model, x, target, steps=8, baseline=0.5)
    np.testing.assert_allclose(grey, (x - 0.5) * weights, rtol=1e-4, atol=1e-5)
    image = _images(9, batch=1)[0]  # one [H, W, C] baseline for every example
    shared = grads.integrated_gradients(model, x, target, steps=8, baseline=image)
    np.testing.assert_allclose(shared, (x - image) * weights, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", grads.IG_RULES)
def test_integration_rules(method):
    """Nodes in [0, 1], weights summing to 1 (exact IG on linear models), and the expected
    accuracy on a smooth integrand: Gauss-Legendre exact for degree <= 2 steps - 1."""
    nodes, weights = grads._quadrature(method, 16)
    assert nodes.shape == weights.shape == (16,)
    assert nodes.min() >= 0 and nodes.max() <= 1
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
    cubic = weights @ nodes**3  # integral of a^3 over [0, 1] = 1/4
    tolerance = 1e-12 if method == "gausslegendre" else 2e-3
    np.testing.assert_allclose(cubic, 0.25, atol=tolerance)


@pytest.mark.parametrize("model_name", ["mlp", "linen_conv"])
def test_integrated_gradients_completeness_on_relu_nets(model_name, request):
    model = request.getfixturevalue(model_name)
    x = _images(5)
    attributions = grads.integrated_gradients(model, x, None)  # default rule and steps
    error = grads.completeness_error(model, x, None, attributions)
    assert error.shape == (4,)
    assert float(error.max()) < 0.01, error
    assert np.abs(attributions).max() > 0
    if model_name == "mlp":  # chunks of 3, the last one padded: the same numbers
        chunked = grads.integrated_gradients(model, x, None, batch_size=3)
        _assert_same(chunked, attributions)


# --------------------------------------------------------------------------------------------
# SmoothGrad, SmoothGrad squared, VarGrad, Expected Gradients.


def test_smoothgrad_with_vanishing_noise_is_the_gradient(mlp):
    x = _images(6)
    key = jax.random.key(0)
    gradient = grads.gradient(mlp, x, 1)
    smooth = grads.smoothgrad(mlp, x, 1, key=key, noise_scale=1e-6, num_samples=16)
    np.testing.assert_allclose(smooth, gradient, rtol=1e-4, atol=1e-6)


def test_smoothgrad_squared_and_vargrad(mlp, linear):
    x = _images(7)
    key = jax.random.key(1)
    smooth = grads.smoothgrad(mlp, x, 2, key=key, num_samples=16)
    squared = grads.smoothgrad_squared(mlp, x, 2, key=key, num_samples=16)
    np.testing.assert_allclose(squared, smooth**2, rtol=1e-5, atol=1e-9)
    variance = grads.vargrad(mlp, x, 2, key=key, num_samples=16)
    assert np.min(variance) >= 0 and np.max(variance) > 0
    _assert_same(grads.vargrad(mlp, x, 2, key=key, num_samples=16, batch_size=3), variance)
    linear_model, _ = linear
    flat = grads.vargrad(linear_model, x, 2, key=key, num_samples=16)
    np.testing.assert_allclose(flat, 0.0, atol=1e-10)


def test_smoothgrad_noise_is_relative_to_each_input_range():
    """For logit 0 = |x|^2 / 2 the gradient is x itself, so VarGrad is the noise variance:
    (0.15 * (max - min) of that example)^2 in every element."""
    model = jax.tree_util.Partial(_quadratic_apply)
    x = np.stack([_images(8, batch=1)[0], 10.0 * _images(9, batch=1)[0] - 5.0])
    variance = np.asarray(grads.vargrad(model, x, 0, key=jax.random.key(0), num_samples=64))
    spread = x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3))
    np.testing.assert_allclose(variance.mean(axis=(1, 2, 3)), (0.15 * spread) ** 2, rtol=0.03)


def test_expected_gradients_of_linear_model(linear):
    model, params = linear
    x = _images(10, batch=3)
    baselines = _images(11, batch=10)
    target = np.array([0, 1, 2])
    attributions = grads.expected_gradients(
        model, x, target, key=jax.random.key(2), baselines=baselines, num_samples=4000,
        sample_batch_size=1000,
    )
    weights = np.asarray(params["w"])[:, target].T.reshape(x.shape)
    expected = (x - baselines.mean(axis=0)) * weights
    assert np.abs(attributions - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("method", ["smoothgrad", "vargrad", "integrated_gradients",
                                    "expected_gradients"])
def test_sample_groups_change_nothing_but_the_steps(mlp, method):
    """Every grouping of the samples (the CPU default, one sample a step, all at once) gives the
    same attributions: the same noise, path points and references, in another order."""
    x = _images(14, batch=3)
    extra = {"baselines": _images(15, batch=6)} if method == "expected_gradients" else {}
    run = lambda group: np.asarray(getattr(grads, method)(  # noqa: E731
        mlp, x, None, key=jax.random.key(4), sample_batch_size=group, **extra))
    default = run(None)
    scale = np.abs(default).max()
    for group in (1, 7, 10_000):
        assert np.abs(run(group) - default).max() <= 1e-5 * scale, group


def test_cpu_sample_groups_fill_steps_of_at_most_96_inputs_without_padding_where_possible():
    from jfail.attribution._core import CPU_INPUTS_PER_STEP, cpu_group_size

    assert CPU_INPUTS_PER_STEP == 96
    # (samples, inputs per sample) -> samples per step: SmoothGrad, IG and EG on 4 images,
    # SmoothGrad on 32 and on 1, more inputs per sample than a step holds, a prime count (no
    # padding)
    cases = {(50, 4): 10, (128, 4): 16, (200, 4): 20, (50, 32): 2, (50, 1): 50, (50, 200): 1,
             (7, 30): 1}
    for (count, inputs), group in cases.items():
        assert cpu_group_size(count, inputs) == group, (count, inputs)
    for count in range(1, 300):
        for inputs in (1, 3, 4, 32, 97):
            group = cpu_group_size(count, inputs)
            assert 1 <= group <= count
            assert group * inputs <= CPU_INPUTS_PER_STEP or group == 1
            assert group == count or 3 * group * inputs >= CPU_INPUTS_PER_STEP or inputs > 32


def test_expected_gradients_completeness_in_expectation(mlp):
    x = _images(12, batch=3)
    reference = _images(13, batch=1)
    attributions = grads.expected_gradients(
        mlp, x, None, key=jax.random.key(3), baselines=reference, num_samples=4000
    )  # one reference: Monte Carlo Integrated Gradients, complete in expectation
    chunked = grads.expected_gradients(
        mlp, x, None, key=jax.random.key(3), baselines=reference, num_samples=4000, batch_size=2
    )
    _assert_same(chunked, attributions)
    target = np.argmax(_logits(mlp, x), axis=-1)
    gap = _target_logits(mlp, x, target) - _target_logits(mlp, np.repeat(reference, 3, 0), target)
    total = np.asarray(attributions).sum(axis=(1, 2, 3))
    assert np.abs(total - gap).max() < 0.05 * np.abs(gap).max(), (total, gap)


# --------------------------------------------------------------------------------------------
# KernelSHAP and LIME.


def _grid_segments(height=HEIGHT, width=WIDTH, block=2):
    rows, cols = np.arange(height) // block, np.arange(width) // block
    return (rows[:, None] * (width // block) + cols[None, :]).astype(np.int32)


def _labels_with_a_gap():
    """Four 4x4 blocks labelled 0, 1, 2 and 7: labels 3 to 6 do not occur."""
    labels = _grid_segments(block=4)
    return np.where(labels == 3, 7, labels).astype(np.int32)


def _segment_linear_model(labels, values):
    """Logit k = sum_s values[k, s] * mean of segment s (over its pixels and channels)."""
    count = labels.max() + 1
    onehot = np.eye(count)[labels]  # [H, W, S]
    per_pixel = onehot / (onehot.sum(axis=(0, 1)) * CHANNELS)
    per_pixel = np.broadcast_to(per_pixel[:, :, None, :], labels.shape + (CHANNELS, count))
    weights = jnp.asarray(per_pixel.reshape(-1, count) @ values.T, jnp.float32)
    bias = jnp.asarray(np.full(values.shape[0], 0.3), jnp.float32)
    return jax.tree_util.Partial(_linear_apply, {"w": weights, "b": bias})


def _segment_means(x, labels):
    """`[B, S]` mean of each label's pixels (NaN for a label that does not occur)."""
    x = np.asarray(x)
    return np.stack([[x[b][labels == s].mean() if np.any(labels == s) else np.nan
                      for s in range(labels.max() + 1)] for b in range(x.shape[0])])


def _per_segment(attributions, labels):
    """`[B, S]` attribution of each segment (constant over its pixels)."""
    return _segment_means(attributions, labels)


def test_kernel_shap_recovers_shapley_values_of_segment_linear_model():
    labels = _grid_segments()  # 16 segments
    values = np.random.default_rng(0).normal(size=(CLASSES, labels.max() + 1))
    model = _segment_linear_model(labels, values)
    x = _images(14, batch=3)
    attributions = np.asarray(surrogates.kernel_shap(
        model, x, 2, key=jax.random.key(0), segments=labels, baseline=0.0, num_samples=200
    ))
    assert attributions.shape == x.shape
    np.testing.assert_allclose(attributions[..., 0], attributions[..., 2])  # painted on channels
    expected = values[2][None] * _segment_means(x, labels)
    np.testing.assert_allclose(_per_segment(attributions, labels), expected, atol=1e-4)


def test_kernel_shap_with_fewer_coalitions_than_segments_is_finite_and_efficient():
    # 8 coalitions for 16 segments leave the weighted least squares underdetermined: the
    # least-norm solution, finite, still meets the efficiency constraint exactly.
    labels = _grid_segments()
    values = np.random.default_rng(1).normal(size=(CLASSES, labels.max() + 1))
    model = _segment_linear_model(labels, values)
    x = _images(15, batch=2)
    attributions = np.asarray(surrogates.kernel_shap(
        model, x, 1, key=jax.random.key(0), segments=labels, baseline=0.0, num_samples=8
    ))
    assert np.isfinite(attributions).all()
    full = _target_logits(model, x, np.ones(2, int))
    empty = _target_logits(model, np.zeros_like(x), np.ones(2, int))
    np.testing.assert_allclose(_per_segment(attributions, labels).sum(1), full - empty,
                               rtol=1e-4, atol=1e-4)


def _exact_shapley(model, image, labels, target, fill):
    """Shapley values of the segments by enumerating all coalitions, `[S]`."""
    count = labels.max() + 1
    subsets = list(itertools.product([0, 1], repeat=count))
    keep = np.asarray(subsets, bool)[:, labels][..., None]  # [2^S, H, W, 1]
    images = np.where(keep, image[None], fill).astype(np.float32)
    values = _target_logits(model, images, np.full(len(subsets), target))
    value = dict(zip(subsets, values))
    shapley = np.zeros(count)
    for subset, v in value.items():
        size = sum(subset)
        for player in range(count):
            if subset[player]:
                without = subset[:player] + (0,) + subset[player + 1:]
                weight = math.factorial(size - 1) * math.factorial(count - size)
                shapley[player] += weight / math.factorial(count) * (v - value[without])
    return shapley


@pytest.mark.parametrize("count, tolerance", [(3, 1e-4), (5, 0.03)])
def test_kernel_shap_matches_brute_force_shapley_on_relu_net(mlp, count, tolerance):
    """Three segments are fully enumerated (exact); five need sampled coalitions of size 2, 3."""
    labels = (np.arange(WIDTH)[None, :] * count // WIDTH).repeat(HEIGHT, axis=0).astype(np.int32)
    x = _images(15)
    target = np.array([0, 3, 1, 2])
    attributions = surrogates.kernel_shap(
        mlp, x, target, key=jax.random.key(1), segments=labels, num_samples=3000
    )
    for b in range(4):
        fill = x[b].mean(axis=(0, 1))  # the default baseline: the image's mean colour
        exact = _exact_shapley(mlp, x[b], labels, int(target[b]), fill)
        estimate = _per_segment(attributions[b: b + 1], labels)[0]
        assert np.abs(estimate - exact).max() <= tolerance * np.abs(exact).max(), (estimate, exact)
        np.testing.assert_allclose(estimate.sum(), exact.sum(), rtol=1e-4, atol=1e-5)  # efficiency


def test_lime_recovers_segment_coefficients():
    labels = _grid_segments()
    values = np.random.default_rng(1).normal(size=(CLASSES, labels.max() + 1))
    model = _segment_linear_model(labels, values)
    x = _images(16, batch=2)
    attributions = surrogates.lime(model, x, 1, key=jax.random.key(2), segments=labels,
                                   baseline=0.0)
    expected = values[1][None] * _segment_means(x, labels)
    estimate = _per_segment(attributions, labels)
    # Ridge with alpha=1 shrinks slightly: proportional, same order, within a few percent.
    for b in range(2):
        assert np.corrcoef(estimate[b], expected[b])[0, 1] > 0.999
        np.testing.assert_array_equal(np.argsort(estimate[b]), np.argsort(expected[b]))
    assert np.abs(estimate - expected).max() < 0.05 * np.abs(expected).max()


def test_lime_ridge_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(3)
    design = rng.integers(0, 2, size=(200, 12)).astype(np.float32)
    targets = (design @ rng.normal(size=12) + rng.normal(size=200)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, size=200).astype(np.float32)
    coefficients, intercept = jax.jit(surrogates._weighted_ridge, static_argnums=3)(
        jnp.asarray(design), jnp.asarray(targets), jnp.asarray(weights), 1.0
    )
    reference = linear_model.Ridge(alpha=1.0).fit(design, targets, sample_weight=weights)
    np.testing.assert_allclose(coefficients, reference.coef_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(intercept, reference.intercept_, rtol=1e-4, atol=1e-4)


def test_surrogates_with_unused_labels_give_them_no_weight(mlp):
    labels = _labels_with_a_gap()
    x = _images(17)
    for method, num_samples in ((surrogates.lime, 64), (surrogates.kernel_shap, 3000)):
        attributions = method(mlp, x, None, key=jax.random.key(0), segments=labels,
                              num_samples=num_samples)
        assert attributions.shape == x.shape and bool(np.all(np.isfinite(attributions)))
        chunked = method(mlp, x, None, key=jax.random.key(0), segments=labels,
                         num_samples=num_samples, batch_size=3)  # the last chunk padded
        _assert_same(chunked, attributions)
    target = np.argmax(_logits(mlp, x), axis=-1)
    fill = np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    gap = _target_logits(mlp, x, target) - _target_logits(mlp, fill, target)
    totals = _per_segment(attributions, labels)[:, [0, 1, 2, 7]].sum(axis=1)
    np.testing.assert_allclose(totals, gap, rtol=1e-4, atol=1e-5)  # efficiency over present ones


def test_segment_gives_about_num_segments_labels():
    rows, cols = np.mgrid[0:32, 0:32] / 32.0
    image = np.stack([np.sin(6 * rows), np.cos(5 * cols), rows * cols], axis=-1)
    labels = surrogates.segment(image, num_segments=16)
    assert labels.shape == (32, 32) and labels.dtype == np.int32
    count = labels.max() + 1
    assert 8 <= count <= 32 and set(np.unique(labels)) == set(range(count))
    grey = surrogates.segment(image[..., :1], num_segments=16)
    assert grey.shape == (32, 32) and grey.max() >= 4
    batch = surrogates.segments(np.stack([image, image[::-1]]), num_segments=16)
    assert batch.shape == (2, 32, 32)
    attributions = surrogates.lime(
        jax.tree_util.Partial(_linear_apply, _linear_params(1, features=32 * 32 * 3)),
        jnp.asarray(np.stack([image, image[::-1]]), jnp.float32), 0, key=jax.random.key(0),
        num_segments=16, num_samples=50,
    )
    assert attributions.shape == (2, 32, 32, 3)


# --------------------------------------------------------------------------------------------
# Traced weights.


def test_new_weights_reuse_the_compiled_program():
    compiles = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    x = _images(20)
    target = np.array([0, 1, 2, 3])
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        results = []
        for seed in (100, 101):
            params = _mlp_params(seed)
            grads.gradient(jax.tree_util.Partial(_mlp_apply, params), x, target)  # compiled once
            before = len(compiles)
            attributions = grads.gradient(jax.tree_util.Partial(_mlp_apply, params), x, target)
            results.append((params, np.asarray(attributions), len(compiles) - before))
        narrower = _mlp_params(102, hidden=16)  # other shapes: the counter sees a compilation
        before = len(compiles)
        grads.gradient(jax.tree_util.Partial(_mlp_apply, narrower), x, target)
        assert len(compiles) > before
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert results[1][2] == 0  # new weights of the same shapes: no new program
    for params, attributions, _ in results:  # ... and the new weights' own gradients
        p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        flat = np.asarray(x, np.float64).reshape(4, -1)
        active = (flat @ p["w1"] + p["b1"]) > 0
        expected = np.einsum("dh,bh,hb->bd", p["w1"], active, p["w2"][:, target])
        np.testing.assert_allclose(attributions.reshape(4, -1), expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Post-processing.


def test_postprocess_shapes_and_ranges():
    a = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(postprocess.absolute(a), np.abs(a))
    np.testing.assert_allclose(postprocess.reduce_channels(a), a.sum(axis=-1), rtol=1e-6)
    np.testing.assert_allclose(postprocess.reduce_channels(a, "mean"), a.mean(axis=-1), rtol=1e-6)
    np.testing.assert_allclose(postprocess.reduce_channels(a, "max_abs"), np.abs(a).max(axis=-1))
    unit = np.asarray(postprocess.normalize_unit(a))
    assert unit.shape == a.shape
    np.testing.assert_allclose(unit.min(axis=(1, 2, 3)), 0.0)
    np.testing.assert_allclose(unit.max(axis=(1, 2, 3)), 1.0)
    np.testing.assert_allclose(unit[0], (a[0] - a[0].min()) / (a[0].max() - a[0].min()), rtol=1e-5)
    signed = np.asarray(postprocess.normalize_signed(a))
    np.testing.assert_allclose(np.abs(signed).max(axis=(1, 2, 3)), 1.0)
    np.testing.assert_allclose(signed[1], a[1] / np.abs(a[1]).max(), rtol=1e-6)
    zeros = np.zeros((2, 3, 3), np.float32)
    np.testing.assert_array_equal(postprocess.normalize_unit(zeros), 0.0)
    np.testing.assert_array_equal(postprocess.normalize_signed(zeros), 0.0)
    with pytest.raises(ValueError, match="how must be one of"):
        postprocess.reduce_channels(a, "median")


# --------------------------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_raise_clear_errors(mlp):
    x = _images(21, batch=2)
    with pytest.raises(ValueError, match="one class index per example"):
        grads.gradient(mlp, x, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="floating-point"):
        grads.gradient(mlp, np.zeros((2, HEIGHT, WIDTH, CHANNELS), np.uint8), 0)
    with pytest.raises(TypeError, match="integer class indices"):
        grads.gradient(mlp, x, np.array([0.0, 1.0]))
    # out of range, checked on the host (numpy, before an int32 conversion could wrap the value)
    # and on the device (a jax.Array target)
    for target, shown in ((np.array([0, CLASSES]), f"[0, {CLASSES}]"), (-1, "[-1, -1]"),
                          (np.array([0, 2**40]), f"[0, {2**40}]"),
                          (jnp.array([1, CLASSES + 3]), f"[1, {CLASSES + 3}]")):
        with pytest.raises(ValueError, match=rf"must lie in \[0, {CLASSES}\), got range "
                                             rf"{re.escape(shown)}"):
            grads.gradient(mlp, x, target)
    # the logits' shape is remembered per model structure and array shapes: a model returning
    # one number per image is refused at every batch size, a proper model still accepted
    scores = jax.tree_util.Partial(lambda model, images: model(images)[:, 0], mlp)
    for batch in (2, 3):
        with pytest.raises(ValueError, match=r"must return logits \[B, classes\]"):
            grads.gradient(scores, _images(23, batch=batch), 0)
        assert grads.gradient(mlp, _images(23, batch=batch), 0).shape == (batch, HEIGHT, WIDTH,
                                                                         CHANNELS)
    with_nan = x.copy()
    with_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        grads.integrated_gradients(mlp, with_nan, 0)
    for method in (grads.smoothgrad, grads.smoothgrad_squared, grads.vargrad):
        with pytest.raises(ValueError, match=f"{method.__name__} draws random samples"):
            method(mlp, x, 0)
    with pytest.raises(ValueError, match="expected_gradients draws random samples"):
        grads.expected_gradients(mlp, x, 0, baselines=x)
    with pytest.raises(ValueError, match="expected_gradients needs baselines"):
        grads.expected_gradients(mlp, x, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="baselines must be"):
        grads.expected_gradients(mlp, x, 0, key=jax.random.key(0), baselines=x[:, :4])
    with pytest.raises(ValueError, match="does not broadcast"):
        grads.integrated_gradients(mlp, x, 0, baseline=np.zeros((5, 5)))
    with pytest.raises(ValueError, match="method must be one of"):
        grads.integrated_gradients(mlp, x, 0, method="simpson")
    for method in (surrogates.lime, surrogates.kernel_shap):
        with pytest.raises(ValueError, match=f"{method.__name__} draws random perturbations"):
            method(mlp, x, 0, segments=_grid_segments())
        with pytest.raises(ValueError, match="segments must be"):
            method(mlp, x, 0, key=jax.random.key(0), segments=np.zeros((3, 3), np.int32))


def test_checks_made_inside_the_program_raise_for_every_family_and_chunking(mlp):
    """Finiteness of x and of baselines, and a device-held target's range, are computed in the
    method's own program (one wait for the device per call); they must still raise, whether
    the batch runs as one chunk or several."""
    from jfail.attribution import propagation

    x = _images(22, batch=3)
    with_nan = x.copy()
    with_nan[2, 1, 1, 0] = np.inf  # in the last chunk when chunks are single images
    key = jax.random.key(0)
    calls = {
        "gradient": lambda images, **kw: grads.gradient(mlp, images, 0, **kw),
        "vargrad": lambda images, **kw: grads.vargrad(mlp, images, 0, key=key, num_samples=2,
                                                      **kw),
        "expected_gradients": lambda images, **kw: grads.expected_gradients(
            mlp, images, 0, key=key, baselines=x, num_samples=2, **kw),
        "lrp_epsilon": lambda images, **kw: propagation.lrp_epsilon(mlp, images, 0, **kw),
    }
    for call in calls.values():
        for batch_size in (None, 1):
            with pytest.raises(ValueError, match="x contains NaN or infinite"):
                call(with_nan, batch_size=batch_size)
    for batch_size in (None, 1):
        with pytest.raises(ValueError, match=rf"must lie in \[0, {CLASSES}\), got range \[0, 12\]"):
            grads.smoothgrad(mlp, x, jnp.array([0, 12, 3]), key=key, num_samples=2,
                             batch_size=batch_size)
        with pytest.raises(ValueError, match="expected_gradients: baselines contain NaN"):
            grads.expected_gradients(mlp, x, 0, key=key, baselines=with_nan, num_samples=2,
                                     batch_size=batch_size)
        with pytest.raises(ValueError, match="integrated_gradients: baseline contains NaN"):
            grads.integrated_gradients(mlp, x, 0, baseline=with_nan, steps=2,
                                       batch_size=batch_size)
    # the same calls on clean inputs go through, and the paper's baseline is still the minimum
    minimum = x.min(axis=(1, 2, 3), keepdims=True) * np.ones_like(x)
    _assert_same(grads.integrated_gradients(mlp, x, 0, steps=4, batch_size=1),
                 grads.integrated_gradients(mlp, x, 0, steps=4, baseline=minimum))


# --------------------------------------------------------------------------------------------
# Agreement with Captum on the same weights.


def _torch_and_jax_conv_net(torch, strided_kernel=3):
    """A tiny NCHW torch conv net and the same function in JAX on NHWC images; its strided
    convolution is `strided_kernel` wide (4: differentiated through space-to-depth on CPU)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(CHANNELS, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, strided_kernel, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * (HEIGHT // 2) * (WIDTH // 2), CLASSES),
    ).eval()

    def numpy(tensor):
        return jnp.asarray(tensor.detach().numpy())

    params = {
        "conv1": (numpy(net[0].weight).transpose(2, 3, 1, 0), numpy(net[0].bias)),  # OIHW -> HWIO
        "conv2": (numpy(net[2].weight).transpose(2, 3, 1, 0), numpy(net[2].bias)),
        "dense": (numpy(net[5].weight).T, numpy(net[5].bias)),
    }

    def apply(params, x):
        def conv(h, kernel_bias, stride):
            kernel, bias = kernel_bias
            out = jax.lax.conv_general_dilated(
                h, kernel, (stride, stride), ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest",
            )
            return out + bias

        h = jax.nn.relu(conv(x, params["conv1"], 1))
        h = jax.nn.relu(conv(h, params["conv2"], 2))
        h = h.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch flattens C, H, W
        kernel, bias = params["dense"]
        return jnp.dot(h, kernel, precision="highest") + bias

    return net, jax.tree_util.Partial(apply, params)


def _to_torch(torch, x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)


def _from_torch(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close_relative(ours, theirs, tolerance=1e-4):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert np.abs(ours - theirs).max() <= tolerance * np.abs(theirs).max(), (
        np.abs(ours - theirs).max(), np.abs(theirs).max())


@pytest.mark.parametrize("strided_kernel", [3, 4])
def test_agrees_with_captum_on_the_same_weights(strided_kernel):
    torch = pytest.importorskip("torch")
    captum_attr = pytest.importorskip("captum.attr")
    net, model = _torch_and_jax_conv_net(torch, strided_kernel)
    x = _images(22, batch=3) * 2.0 - 1.0
    target = [1, 4, 0]
    target_tensor = torch.tensor(target)
    np.testing.assert_allclose(
        _logits(model, x), net(_to_torch(torch, x)).detach().numpy(), rtol=1e-5, atol=1e-5
    )

    saliency = captum_attr.Saliency(net).attribute(_to_torch(torch, x), target=target_tensor,
                                                   abs=False)
    _assert_close_relative(grads.gradient(model, x, target), _from_torch(saliency))

    times_input = captum_attr.InputXGradient(net).attribute(_to_torch(torch, x),
                                                            target=target_tensor)
    _assert_close_relative(grads.input_x_gradient(model, x, target), _from_torch(times_input))

    minimum = x.min(axis=(1, 2, 3), keepdims=True)
    baseline = torch.tensor(np.broadcast_to(minimum, x.shape).transpose(0, 3, 1, 2).copy())
    for method, steps in (("gausslegendre", 128), ("riemann_middle", 20)):
        theirs = captum_attr.IntegratedGradients(net).attribute(
            _to_torch(torch, x), baselines=baseline, target=target_tensor, n_steps=steps,
            method=method,
        )
        ours = grads.integrated_gradients(model, x, target, steps=steps, method=method)
        _assert_close_relative(ours, _from_torch(theirs))

    # SmoothGrad with shared noise: jfail's noisy copies (one key per example, split as
    # run_chunked splits it), through Captum's Saliency, averaged.
    key, num_samples = jax.random.key(7), 10
    keys = jax.random.split(key, x.shape[0])
    noisy = np.asarray(_noisy_copies(keys, x, grads._noise_std(x, 0.15), num_samples))
    per_sample = []
    for k in range(num_samples):
        per_sample.append(_from_torch(captum_attr.Saliency(net).attribute(
            _to_torch(torch, noisy[:, k]), target=target_tensor, abs=False)))
    per_sample = np.stack(per_sample)
    ours = grads.smoothgrad(model, x, target, key=key, num_samples=num_samples)
    _assert_close_relative(ours, per_sample.mean(axis=0))
    variance = grads.vargrad(model, x, target, key=key, num_samples=num_samples)
    _assert_close_relative(variance, per_sample.var(axis=0))
