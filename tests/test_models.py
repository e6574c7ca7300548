"""Model taps, the callable convention, and a user-defined Flax model plugging in the same way."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail.models import (
    BetaVAE,
    DefuseCNN,
    as_callable,
    build_classifier,
    decoder_fn,
    encoder_fn,
    init_classifier,
    linen_apply,
    logits_fn,
    model_fns,
    resnet18,
    resnet50,
    stateless_apply,
)


@pytest.mark.parametrize(
    "module, image_shape, feature_map_shape, feature_dim",
    [
        (DefuseCNN(num_classes=10), (28, 28, 1), (1, 1, 64), 256),
        (DefuseCNN(num_classes=7), (32, 32, 3), (2, 2, 64), 256),
        (resnet18(10, "small", width=8), (28, 28, 1), (4, 4, 64), 64),
        (resnet18(10, "small", width=8), (32, 32, 3), (4, 4, 64), 64),
        (resnet18(5, "imagenet", width=8), (64, 64, 3), (2, 2, 64), 64),
        (resnet50(3, "small", width=4), (28, 28, 1), (4, 4, 128), 128),
        (resnet50(3, "imagenet", width=4), (64, 64, 3), (2, 2, 128), 128),
    ],
)
def test_every_tap_has_the_documented_shape(module, image_shape, feature_map_shape, feature_dim):
    params, state = init_classifier(module, image_shape, jax.random.key(0))
    fns = model_fns(module, {"params": params, **state})
    x = jax.random.uniform(jax.random.key(1), (3, *image_shape))
    chex.assert_shape([fns.logits(x), fns.features(x), fns.feature_map(x)],
                      [(3, module.num_classes), (3, feature_dim), (3, *feature_map_shape)])


def test_resnet_features_are_the_pooled_feature_map_and_feed_the_classifier():
    module = resnet18(4, "small", width=8)
    params, state = init_classifier(module, (28, 28, 1), jax.random.key(0))
    fns = model_fns(module, {"params": params, **state})
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    np.testing.assert_allclose(fns.features(x), fns.feature_map(x).mean(axis=(1, 2)), rtol=1e-5)
    fc = params["fc"]
    np.testing.assert_allclose(
        fns.logits(x), fns.features(x) @ fc["kernel"] + fc["bias"], rtol=1e-5, atol=1e-5
    )


def test_resnet_batchnorm_updates_running_stats_only_in_training():
    module = resnet18(4, "small", width=8)
    params, state = init_classifier(module, (28, 28, 1), jax.random.key(0))
    apply_fn = linen_apply(module)
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    _, same = apply_fn(params, state, x, False)
    _, updated = apply_fn(params, state, x, True)
    chex.assert_trees_all_equal(same, state)
    chex.assert_trees_all_equal_structs(updated, state)
    leaves = jax.tree_util.tree_leaves
    assert any(not np.allclose(a, b) for a, b in zip(leaves(updated), leaves(state)))


def test_unknown_stem_output_and_model_name_are_refused():
    with pytest.raises(ValueError, match="stem"):
        init_classifier(resnet18(stem="tiny"), (28, 28, 1), jax.random.key(0))
    module = DefuseCNN()
    params, _ = init_classifier(module, (28, 28, 1), jax.random.key(0))
    with pytest.raises(ValueError, match="output='pixels'"):
        module.apply({"params": params}, jnp.zeros((1, 28, 28, 1)), output="pixels")
    with pytest.raises(ValueError, match="unknown model"):
        build_classifier("vgg", 10)


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_beta_vae_round_trip_shapes_and_ranges(image_shape):
    vae = BetaVAE(image_shape=image_shape, latent_dim=6)
    variables = vae.init(jax.random.key(0), jnp.zeros((1, *image_shape)), jax.random.key(1))
    x = jax.random.uniform(jax.random.key(2), (5, *image_shape))
    logits, mu, logvar = vae.apply(variables, x, jax.random.key(3))
    chex.assert_equal_shape([logits, x])
    chex.assert_shape([mu, logvar], (5, 6))
    mu_enc, _ = encoder_fn(vae, variables)(x)
    np.testing.assert_allclose(mu_enc, mu, rtol=1e-6)
    decoded = decoder_fn(vae, variables)(mu)
    chex.assert_equal_shape([decoded, x])
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0


def test_callables_keep_weights_as_traced_arguments_under_jit():
    module = DefuseCNN(num_classes=10)
    params, _ = init_classifier(module, (28, 28, 1), jax.random.key(0))
    params2, _ = init_classifier(module, (28, 28, 1), jax.random.key(1))
    traces = []

    @jax.jit
    def predict(model, x):
        traces.append(1)
        return model(x)

    x = jax.random.uniform(jax.random.key(2), (2, 28, 28, 1))
    model_a = logits_fn(module, {"params": params})
    model_b = logits_fn(module, {"params": params2})
    out_a, out_b = predict(model_a, x), predict(model_b, x)
    assert len(traces) == 1  # new weights, same program
    assert not np.allclose(out_a, out_b)
    # the weights are inputs of the jaxpr, not constants folded into it
    jaxpr = jax.make_jaxpr(predict.__wrapped__)(model_a, x)
    num_weights = len(jax.tree_util.tree_leaves(params))
    assert len(jaxpr.jaxpr.invars) == num_weights + 1
    assert all(np.size(c) < 64 for c in jaxpr.consts)


class _UserMLP(nn.Module):
    """A plain Flax model written by a user, knowing nothing of jfail."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))


def test_a_user_defined_flax_model_plugs_in_the_same_way():
    user = _UserMLP()
    variables = user.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    expected = user.apply(variables, x)
    via_partial = as_callable(user.apply, variables)
    via_module = logits_fn(user, variables)
    for model in (via_partial, via_module):
        np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(model, x), expected, rtol=1e-6)
        leaves = jax.tree_util.tree_leaves(model)
        assert len(leaves) == len(jax.tree_util.tree_leaves(variables))
    # training-side adapters give the (logits, state) signature for any apply function
    logits, state = stateless_apply(lambda p, x: user.apply({"params": p}, x))(
        variables["params"], {}, x, True
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-6)
    assert state == {}
