"""A classifier as a sequence of its own layers: splits that reproduce the model exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail.models import (
    MLP,
    DefuseCNN,
    init_classifier,
    layer_names,
    layer_span,
    logits_fn,
    model_fns,
    resnet18,
    split_at,
)


@pytest.fixture(scope="module")
def cnn():
    module = DefuseCNN(num_classes=3, conv_features=(4, 4), hidden=(8,))
    params, _ = init_classifier(module, (12, 12, 1), jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 12, 12, 1)), jnp.float32)
    return module, {"params": params}, x


def test_defuse_cnn_layers_are_its_params_in_order(cnn):
    module, variables, _ = cnn
    assert layer_names(module) == ("conv0", "conv1", "dense0", "classifier")
    assert set(variables["params"]) == set(layer_names(module))


def test_every_split_reproduces_the_logits_exactly(cnn):
    module, variables, x = cnn
    logits = np.asarray(logits_fn(module, variables)(x))
    for layer in layer_names(module):
        features, head = split_at(module, variables, layer)
        np.testing.assert_array_equal(np.asarray(head(features(x))), logits)
    np.testing.assert_array_equal(
        np.asarray(layer_span(module, variables, layer_names(module))(x)), logits)


def test_splits_cut_after_the_activation_at_the_models_own_taps(cnn):
    module, variables, x = cnn
    taps = model_fns(module, variables)
    feature_map, _ = split_at(module, variables, "conv1")
    features, _ = split_at(module, variables, "dense0")
    np.testing.assert_array_equal(np.asarray(feature_map(x)), np.asarray(taps.feature_map(x)))
    np.testing.assert_array_equal(np.asarray(features(x)), np.asarray(taps.features(x)))
    assert feature_map(x).shape == (3, 3, 3, 4)
    assert float(jnp.min(feature_map(x))) >= 0.0  # after the ReLU


def test_a_span_is_jittable_and_follows_new_weights(cnn):
    module, variables, x = cnn
    _, head = split_at(module, variables, "conv0")
    h = split_at(module, variables, "conv0")[0](x)
    run = jax.jit(lambda fn, v: fn(v))
    doubled = jax.tree_util.tree_map(lambda w: 2 * w, variables)
    _, head2 = split_at(module, doubled, "conv0")
    np.testing.assert_allclose(np.asarray(run(head, h)), np.asarray(head(h)), rtol=1e-6)
    assert not np.allclose(np.asarray(run(head2, h)), np.asarray(head(h)))


def test_bad_layers_and_unlayered_models_are_refused(cnn):
    module, variables, _ = cnn
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        split_at(module, variables, "conv9")
    with pytest.raises(ValueError, match="not a run"):
        layer_span(module, variables, ("conv0", "dense0"))
    for other in (resnet18(num_classes=3, stem="small", width=4), MLP(num_classes=3)):
        with pytest.raises(TypeError, match="not laid out as a sequence of layers"):
            split_at(other, {}, "fc")
