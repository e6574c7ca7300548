"""SSIM and Spearman rank correlation of attribution maps against scikit-image and SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from jfail.debugtests import spearman, ssim


def _pairs(shape, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(np.float32)
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return a, b


def _skimage_ssim(a, b, **kwargs):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, **kwargs)


@pytest.mark.parametrize("shape", [(4, 28, 28), (2, 11, 16), (2, 40, 33)])
def test_ssim_equals_scikit_image(shape):
    a, b = _pairs(shape)
    expected = [_skimage_ssim(a[i], b[i]) for i in range(shape[0])]
    np.testing.assert_allclose(ssim(a, b), expected, atol=1e-5)


def test_ssim_per_channel_mean_and_identity():
    a, b = _pairs((2, 20, 20, 3), seed=1)
    expected = [_skimage_ssim(a[i], b[i], channel_axis=-1) for i in range(2)]
    np.testing.assert_allclose(ssim(a, b), expected, atol=1e-5)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :8, :8], b[:, :8, :8])
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, b[:, :19])


def test_spearman_equals_scipy_with_ties_and_absolute_values():
    a, b = _pairs((3, 12, 12), seed=2)
    a, b = np.round(a * 4) - 2, np.round(b * 4) - 2  # many ties, both signs
    for absolute in (False, True):
        x, y = (np.abs(a), np.abs(b)) if absolute else (a, b)
        expected = [spearmanr(x[i].ravel(), y[i].ravel())[0] for i in range(3)]
        np.testing.assert_allclose(spearman(a, b, absolute=absolute), expected, atol=1e-5)
    np.testing.assert_allclose(spearman(a, -a), -1.0, atol=1e-6)
    assert np.isnan(np.asarray(spearman(np.ones((1, 4, 4)), a[:1, :4, :4]))[0])


def test_cascading_and_independent_randomization_touch_exactly_the_stated_layers():
    import jax
    from flax import linen as nn

    from jfail.debugtests import cascading_randomization, independent_randomization, layer_order

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(2, (3, 3), name="conv")(x))
            x = nn.relu(nn.Dense(4, name="hidden")(x.reshape(x.shape[0], -1)))
            return nn.Dense(3, name="logits")(x)

    x = np.zeros((1, 6, 6, 1), np.float32)
    trained = Net().init(jax.random.key(0), x)["params"]
    fresh = Net().init(jax.random.key(1), x)["params"]
    assert layer_order(trained) == ["logits", "hidden", "conv"]

    def same(a, b):
        return all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a),
                                                          jax.tree_util.tree_leaves(b)))

    cascade = cascading_randomization(
        trained, fresh, apply_fn=lambda p, v: Net().apply({"params": p}, v), x=x)
    assert [name for name, _ in cascade] == ["logits", "hidden", "conv"]
    for step, (_, params) in enumerate(cascade):
        for index, layer in enumerate(layer_order(trained)):
            source = fresh if index <= step else trained
            assert same(params[layer], source[layer]), (step, layer)
            assert not same(params[layer], (trained if source is fresh else fresh)[layer])
    for layer, params in independent_randomization(trained, fresh):
        for other in trained:
            assert same(params[other], fresh[other] if other == layer else trained[other])
    with pytest.raises(KeyError, match="not in both"):
        cascading_randomization(trained, fresh, ["missing"])
