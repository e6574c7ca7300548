"""jfail.xla.jit: jax.jit with jfail's per-program XLA options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail import xla
from jfail.xla import jit


def _conv_net(params, x):
    """A two-layer strided CNN defined here: x [B, H, W, C] -> logits [B, 10]."""
    h = jax.lax.conv_general_dilated(x, params["w1"], (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h)
    h = jax.lax.conv_general_dilated(h, params["w2"], (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(h).reshape(x.shape[0], -1) @ params["dense"]


def _params_and_input():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k1, (4, 4, 3, 16)) * 0.2,
        "w2": jax.random.normal(k2, (4, 4, 16, 16)) * 0.1,
        "dense": jax.random.normal(k3, (4 * 4 * 16, 10)) * 0.1,
    }
    return params, jax.random.uniform(k4, (8, 16, 16, 3))


def test_options_are_accepted_and_leave_no_library_fusion_in_the_program():
    options = xla.compiler_options() or {}
    if "xla_cpu_experimental_ynn_fusion_type" not in options:
        pytest.skip("this XLA does not know the option; jfail compiles with its defaults")
    assert options.items() <= xla.OPTIONS.items()
    params, x = _params_and_input()
    grad = jax.grad(lambda p, v: _conv_net(p, v).sum(), argnums=1)
    compiled = jit(grad).lower(params, x).compile().as_text()
    assert "ynn_fusion" not in compiled
    assert "convolution" in compiled


def test_values_and_gradients_agree_with_plain_jax_jit():
    params, x = _params_and_input()
    grad = jax.grad(lambda p, v: _conv_net(p, v)[:, 3].sum(), argnums=1)
    np.testing.assert_allclose(jit(_conv_net)(params, x), jax.jit(_conv_net)(params, x),
                               rtol=1e-5, atol=1e-5)
    want = jax.jit(grad)(params, x)
    got = jit(grad)(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_decorator_forms_static_arguments_and_jit_attributes():
    calls = []

    @jit(static_argnums=1)
    def scaled(x, factor):
        calls.append(factor)  # runs at trace time only
        return x * factor

    assert scaled.__name__ == "scaled"
    assert scaled._jitted is None  # nothing is built before the first use
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(scaled(x, 2), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(scaled(x, 2), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(scaled(x, 3), [0.0, 3.0, 6.0])
    assert calls == [2, 3]  # cached per static value, retraced for a new one
    assert "mul" in scaled.lower(x, 5).as_text()

    @jit
    def plus_one(x):
        return x + 1

    np.testing.assert_array_equal(plus_one(x), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(jax.vmap(plus_one)(x[:, None]), [[1.0], [2.0], [3.0]])


def test_nested_in_another_trace_it_becomes_part_of_that_program():
    params, x = _params_and_input()
    inner = jit(_conv_net)
    want = np.asarray(jax.jit(_conv_net)(params, x))

    @jit
    def outer_jfail(p, v):
        return inner(p, v) * 2

    np.testing.assert_allclose(jax.jit(lambda p, v: inner(p, v) * 2)(params, x), 2 * want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outer_jfail(params, x), 2 * want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(inner, in_axes=(None, 0))(params, x[:, None])[:, 0],
                               want, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda v: inner(params, v)[:, 1].sum())(x)
    want_grad = jax.grad(lambda v: _conv_net(params, v)[:, 1].sum())(x)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_an_option_this_xla_rejects_falls_back_to_the_defaults(monkeypatch):
    xla.compiler_options.cache_clear()
    monkeypatch.setattr(xla, "OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "no-such-type"})
    try:
        assert xla.compiler_options() is None
        np.testing.assert_array_equal(jit(lambda v: v * 2)(jnp.ones(2)), [2.0, 2.0])
    finally:
        xla.compiler_options.cache_clear()


def test_each_option_is_checked_alone_and_only_rejected_ones_are_dropped(monkeypatch):
    xla.compiler_options.cache_clear()
    monkeypatch.setattr(xla, "OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "no-such-type",
                                         "xla_gpu_force_conv_nchw": True,
                                         "xla_no_such_option": 1})
    try:
        assert xla.compiler_options() == {"xla_gpu_force_conv_nchw": True}
        np.testing.assert_array_equal(jit(lambda v: v + 1)(jnp.ones(2)), [2.0, 2.0])
    finally:
        xla.compiler_options.cache_clear()


def test_compiler_options_cannot_be_overridden():
    with pytest.raises(TypeError, match="compiler_options"):
        jit(lambda v: v, compiler_options={})
