"""The model convention: any callable, weights read at the moment of the call, clear errors."""

import functools
import subprocess
import sys

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jfail import attribution
from jfail.models import ModelCallError, as_model, linen_model, traced_model
from jfail.xla import jit

X = jnp.asarray(np.random.RandomState(0).rand(3, 4, 4, 1), jnp.float32)


def _output_of(model, x):
    """Calls `model` as jfail's drivers do: adapted on the host, then as a jit argument."""
    return _call(traced_model(model, x), x)


@jit
def _call(model, x):
    return model(x)


def test_closure_over_a_global_dict_sees_the_replaced_array():
    weights = {"w": jnp.ones((16, 2))}
    model = lambda x: x.reshape(len(x), -1) @ weights["w"]  # noqa: E731
    first = _output_of(model, X)
    weights["w"] = weights["w"] * 2
    np.testing.assert_allclose(_output_of(model, X), 2 * first, rtol=1e-6)


def test_closure_over_a_numpy_array_sees_an_in_place_update():
    w = np.ones((16, 2), np.float32)
    model = lambda x: x.reshape(len(x), -1) @ w  # noqa: E731
    first = _output_of(model, X)
    w *= 3
    np.testing.assert_allclose(_output_of(model, X), 3 * first, rtol=1e-6)


def test_functools_partial_arguments_are_weights():
    apply = lambda w, x: x.reshape(len(x), -1) @ w  # noqa: E731
    w = jnp.ones((16, 2))
    first = _output_of(functools.partial(apply, w), X)
    np.testing.assert_allclose(_output_of(functools.partial(apply, 5 * w), X), 5 * first, rtol=1e-6)


def test_a_bound_method_of_a_pytree_keeps_its_owner_as_leaves():
    class Net(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(16, 2, rngs=nnx.Rngs(0))

        def logits(self, x):
            return self.dense(x.reshape(len(x), -1))

    net = Net()
    adapted = traced_model(net.logits, X)
    assert len(jax.tree_util.tree_leaves(adapted)) == 2  # kernel and bias, no re-trace needed
    first = _output_of(net.logits, X)
    net.dense.kernel[...] = net.dense.kernel[...] * 2
    net.dense.bias[...] = net.dense.bias[...] * 2
    np.testing.assert_allclose(_output_of(net.logits, X), 2 * first, rtol=1e-6)


def test_pytrees_are_returned_unchanged():
    model = jax.tree_util.Partial(lambda w, x: x.reshape(len(x), -1) @ w, jnp.ones((16, 2)))
    assert traced_model(model, X) is model


def test_a_python_number_in_a_closure_is_a_constant_as_under_jit():
    """Documented: only arrays are traced; Python scalars are part of the program."""
    w = jnp.ones((16, 2))
    adapted = traced_model(lambda x: x.reshape(len(x), -1) @ w * 2.0, X)
    assert [leaf.shape for leaf in jax.tree_util.tree_leaves(adapted)] == [(16, 2)]


def test_as_model_runs_an_equinox_per_example_channels_first_model():
    conv = eqx.nn.Conv2d(1, 2, 3, padding=1, key=jax.random.key(0))
    per_example = lambda image: conv(image).mean(axis=(1, 2))  # noqa: E731 - [C, H, W] -> [2]
    view = as_model(per_example, per_example=True, channels_first=True)
    expected = jnp.stack([per_example(jnp.moveaxis(image, -1, 0)) for image in X])
    np.testing.assert_allclose(view(X), expected, rtol=1e-6)
    np.testing.assert_allclose(_output_of(view, X), expected, rtol=1e-6)
    assert as_model(per_example) is per_example


def test_wrong_image_size_is_a_model_call_error():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x.reshape(len(x), -1))

    variables = Net().init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    model = linen_model(Net(), variables)
    with pytest.raises(ModelCallError, match=r"shape \(3, 5, 5, 1\)"):
        attribution.gradient(model, jnp.zeros((3, 5, 5, 1)), 0)


def test_an_equinox_layer_given_a_batch_names_the_adapter():
    conv = eqx.nn.Conv2d(1, 2, 3, key=jax.random.key(0))
    with pytest.raises(ModelCallError, match="per_example=True, channels_first=True"):
        attribution.gradient(lambda x: conv(x).mean(axis=(1, 2)), X, 0)


def test_an_nnx_model_in_training_mode_is_refused_with_the_fix():
    class Net(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
            self.norm = nnx.BatchNorm(4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.norm(self.dense(x.reshape(len(x), -1)))

    net = Net()
    with pytest.raises(ModelCallError, match=r"call model.eval\(\)"):
        attribution.gradient(net, X, 0)
    with pytest.raises(ModelCallError, match=r"model.eval\(\)"):
        attribution.gradient(lambda x: net(x), X, 0)
    net.eval()
    assert attribution.gradient(net, X, 0).shape == X.shape


class _TrainArgNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):  # no default: linen_model supplies train=False
        h = nn.relu(nn.Dense(8, name="hidden")(x.reshape(len(x), -1)))
        h = nn.BatchNorm(use_running_average=not train, name="norm")(h)
        return nn.Dense(3, name="head")(h)


def test_linen_model_sets_inference_mode_and_reads_any_submodule():
    net = _TrainArgNet()
    variables = net.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), train=False)
    variables = {**variables, "batch_stats": jax.tree_util.tree_map(
        lambda a: a + 0.5, variables["batch_stats"])}
    logits = linen_model(net, variables)
    np.testing.assert_allclose(logits(X), net.apply(variables, X, train=False), rtol=1e-6)
    hidden = linen_model(net, variables, output="hidden")
    kernel, bias = variables["params"]["hidden"]["kernel"], variables["params"]["hidden"]["bias"]
    np.testing.assert_allclose(hidden(X), X.reshape(3, -1) @ kernel + bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="names no submodule.*'head', 'hidden', 'norm'"):
        linen_model(net, variables, output="body")


def test_import_jfail_reaches_every_package():
    code = "import jfail; print(jfail.attribution.gradient.__name__, jfail.prime.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["gradient", "jfail.prime"]
