"""GT-2, the frozen-layer bug and contaminated test inputs do exactly what they say."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfail.debugtests import (
    freeze,
    frozen_layer_mask,
    ground_truth_background,
    ground_truth_weighted,
    ood_pairs,
    preprocessing_mismatch,
)


def _masks():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 3:6] = True
    masks[1, 0:4, 0:8] = True
    return masks


def test_gt2_is_gt1_for_a_uniform_background_attribution():
    masks = _masks()
    for uniform in (np.full((2, 8, 8), 0.3), np.full((2, 8, 8, 3), -2.0)):
        gt2 = ground_truth_weighted(uniform, masks)
        assert gt2.shape == (2, 8, 8) and gt2.dtype == np.float32
        np.testing.assert_array_equal(gt2, ground_truth_background(masks))
    random = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
    assert np.all(ground_truth_weighted(random, masks)[masks] == 0.0)


def test_gt2_weights_gt1_by_the_grey_background_attribution_scaled_to_unit_max():
    masks = _masks()
    attributions = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    gt2 = ground_truth_weighted(attributions, masks)
    grey = np.abs(attributions).sum(axis=-1) * ~masks
    expected = grey / grey.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(gt2, expected, rtol=1e-6)
    np.testing.assert_allclose(gt2.max(axis=(1, 2)), 1.0)
    assert gt2.min() == 0.0
    # Attribution only on the object: nothing on the background to weight by.
    np.testing.assert_array_equal(ground_truth_weighted(masks * 5.0, masks), 0.0)
    with pytest.raises(ValueError, match=r"object masks must be \[B, H, W\]"):
        ground_truth_weighted(attributions, masks[:, :4])
    with pytest.raises(ValueError, match="background attributions must be"):
        ground_truth_weighted(attributions[0, 0], masks)


class _TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(nn.relu(nn.Dense(4, name="hidden")(x)))


def test_a_frozen_layer_keeps_its_initialization_while_the_others_train():
    model = _TwoLayers()
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jax.random.normal(jax.random.key(1), (16, 2))
    params = model.init(jax.random.key(2), x)["params"]
    mask = frozen_layer_mask(params, ["hidden"])
    assert mask == {"hidden": {"kernel": True, "bias": True},
                    "out": {"kernel": False, "bias": False}}
    tx = freeze(optax.adamw(0.1, weight_decay=0.1), params, ["hidden"])
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    trained = params
    for _ in range(3):
        trained, state = step(trained, state)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(trained["hidden"][name], params["hidden"][name])
        assert not np.allclose(trained["out"][name], params["out"][name])


def test_unknown_layers_are_named_with_the_valid_ones():
    params = {"conv0": {"kernel": jnp.ones(2)}, "dense": {"kernel": jnp.ones(2)}}
    with pytest.raises(ValueError,
                       match=r"unknown layers \['conv1'\]; layers: \['conv0', 'dense'\]"):
        freeze(optax.sgd(0.1), params, ["conv0", "conv1"])
    with pytest.raises(ValueError, match="unknown layers"):
        frozen_layer_mask(params, ["fc"])


def test_preprocessing_mismatch_gives_the_stated_values():
    images = np.random.default_rng(2).uniform(size=(3, 4, 4, 2)).astype(np.float32)
    images[2] = 0.5  # a constant image
    np.testing.assert_allclose(preprocessing_mismatch(images, "inverted"), 1.0 - images)
    np.testing.assert_allclose(preprocessing_mismatch(images, "unnormalized"), images * 255.0)
    standardized = preprocessing_mismatch(images, "standardized")
    assert standardized.shape == images.shape and standardized.dtype == np.float32
    np.testing.assert_allclose(standardized[:2].mean(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(standardized[:2].std(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(standardized[2], 0.0)
    with pytest.raises(ValueError, match="unknown pre-processing 'flipped'; kinds"):
        preprocessing_mismatch(images, "flipped")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        preprocessing_mismatch(images * 255.0, "inverted")
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        preprocessing_mismatch(images[0], "inverted")


def test_ood_pairs_are_equal_sized_random_subsets():
    in_images = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1))
    ood_images = -np.arange(1, 7, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1))
    ins, oods = ood_pairs(in_images, ood_images, 5, jax.random.key(0))
    assert ins.shape == oods.shape == (5, 2, 2, 1)
    assert len(set(ins[:, 0, 0, 0])) == 5 and len(set(oods[:, 0, 0, 0])) == 5
    assert np.all(ins >= 0) and np.all(oods < 0)
    with pytest.raises(ValueError, match="num must lie in"):
        ood_pairs(in_images, ood_images, 7, jax.random.key(0))
    with pytest.raises(ValueError, match="share one input shape"):
        ood_pairs(in_images, ood_images[:, :1], 2, jax.random.key(0))


def test_forward_layer_order_follows_the_forward_pass_not_the_names():
    from flax import linen as nn

    from jfail.debugtests import forward_layer_order, layer_order

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(4, name="z_first")(x))
            x = nn.relu(nn.Dense(4, name="m_middle")(x))
            return nn.Dense(2, name="a_output")(x)

    x = np.zeros((1, 3), np.float32)
    params = jax.tree_util.tree_map(np.asarray, Net().init(jax.random.key(0), x)["params"])
    assert list(params) == ["a_output", "m_middle", "z_first"]  # sorted: names say nothing
    assert layer_order(params) == ["z_first", "m_middle", "a_output"]
    order = forward_layer_order(lambda p, v: Net().apply({"params": p}, v), params, x)
    assert order == ["a_output", "m_middle", "z_first"]
