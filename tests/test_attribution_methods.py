"""Every attribution method on an NNX module defined here, the relevance methods on jfail's
small-stem ResNet-18 and a Flax model defined here; post-processing helpers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jfail import attribution
from jfail.models import init_classifier, logits_fn, resnet18

# Small sample counts: these tests check that every method runs and keeps its contract.
FAST = {
    "smoothgrad": {"num_samples": 4},
    "smoothgrad_squared": {"num_samples": 4},
    "vargrad": {"num_samples": 4},
    "integrated_gradients": {"steps": 8},
    "expected_gradients": {"num_samples": 4},
    "lime": {"num_samples": 32, "num_segments": 8},
    "kernel_shap": {"num_samples": 32, "num_segments": 8},
}


class _FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


class _NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense(nnx.relu(self.conv(x)).mean((1, 2)))


def _run_all(model, x, train_images, names=tuple(attribution.METHODS)):
    target = jnp.argmax(model(x), -1)
    patterns = attribution.fit_patterns(model, train_images, batch_size=len(train_images))
    results = {}
    for name in names:
        method = attribution.METHODS[name]
        kwargs = attribution.method_kwargs(name, train_images=train_images, patterns=patterns,
                                           key=jax.random.key(0))
        kwargs.update(FAST.get(name, {}))
        results[name] = np.asarray(method(model, x, target, **kwargs))
    return results


@pytest.mark.slow
def test_relevance_methods_keep_their_identities_on_the_small_stem_resnet18():
    # Every method runs on the NNX module below and, in every model style, in
    # test_attribution_functional.py; here the rewriting methods meet BatchNorm and residuals
    # (each ResNet-18 program takes seconds to compile, so three of them).
    module = resnet18(5, stem="small", width=4)
    params, state = init_classifier(module, (16, 16, 1), jax.random.key(0))
    model = logits_fn(module, {"params": params, **state})
    images = np.asarray(jax.random.uniform(jax.random.key(1), (10, 16, 16, 1)))
    results = _run_all(model, images[:2], images[2:],
                       names=("input_x_gradient", "lrp_z", "pattern_attribution"))
    for name, value in results.items():
        assert value.shape == (2, 16, 16, 1), name
        assert np.all(np.isfinite(value)), name
        assert np.abs(value).max() > 0, name
    # The relevance methods keep their identities on a network with BatchNorm and residuals.
    grad_x_input = results["input_x_gradient"]
    np.testing.assert_allclose(results["lrp_z"], grad_x_input,
                               atol=1e-5 * np.abs(grad_x_input).max())


def test_every_method_runs_on_an_nnx_module():
    images = np.asarray(jax.random.uniform(jax.random.key(1), (10, 12, 12, 1)))
    results = _run_all(_NNXNet(nnx.Rngs(0)), images[:2], images[2:])
    for name, value in results.items():
        assert value.shape == (2, 12, 12, 1), name
        assert np.all(np.isfinite(value)), name


def test_a_linen_model_defined_here_runs_through_the_rewriting_methods():
    images = np.asarray(jax.random.uniform(jax.random.key(1), (10, 12, 12, 1)))
    net = _FlaxNet()
    model = jax.tree_util.Partial(lambda v, x: net.apply(v, x),
                                  net.init(jax.random.key(0), images[:1]))
    x, target = images[:2], jnp.argmax(model(images[:2]), -1)
    # On a bias-free ReLU path LRP-z is input x gradient; with biases it still is (Ancona et al.).
    np.testing.assert_allclose(attribution.lrp_z(model, x, target),
                               attribution.input_x_gradient(model, x, target), atol=1e-6)
    patterns = attribution.fit_patterns(model, images[2:])
    for name in ("guided_backprop", "deconvnet", "lrp_sequential_preset_flat", "deep_taylor"):
        assert attribution.METHODS[name](model, x, target).shape == x.shape
    assert attribution.pattern_attribution(model, x, target, patterns=patterns).shape == x.shape


def test_nnx_weights_are_traced_not_baked_in():
    x = np.asarray(jax.random.uniform(jax.random.key(1), (2, 12, 12, 1)))
    model = _NNXNet(nnx.Rngs(0))
    before = np.asarray(attribution.guided_backprop(model, x, 0))
    model.dense.kernel[...] = model.dense.kernel[...] * 2.0
    after = np.asarray(attribution.guided_backprop(model, x, 0))
    np.testing.assert_allclose(after, 2.0 * before, rtol=1e-5, atol=1e-7)


def test_postprocess_helpers():
    a = jnp.array([[[[-2.0, 1.0], [0.5, 0.0]], [[1.0, -1.0], [3.0, 1.0]]]])  # [1, 2, 2, 2]
    np.testing.assert_allclose(attribution.absolute(a), np.abs(a))
    summed = attribution.reduce_channels(a, "sum")
    assert summed.shape == (1, 2, 2)
    np.testing.assert_allclose(summed, np.asarray(a).sum(-1))
    unit = np.asarray(attribution.normalize_unit(summed))
    assert unit.min() == 0.0 and unit.max() == 1.0
    signed = np.asarray(attribution.normalize_signed(a))
    assert np.abs(signed).max() == 1.0 and signed.min() < 0
    np.testing.assert_allclose(signed * 3.0, a)


def test_method_kwargs_reports_what_is_missing():
    with pytest.raises(ValueError, match="key"):
        attribution.method_kwargs("smoothgrad")
    with pytest.raises(ValueError, match="train_images"):
        attribution.method_kwargs("expected_gradients", key=jax.random.key(0))
    with pytest.raises(ValueError, match="fit_patterns"):
        attribution.method_kwargs("pattern_net")
    with pytest.raises(KeyError, match="unknown"):
        attribution.method_kwargs("saliency")
