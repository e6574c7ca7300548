"""Strided convolutions differentiated through space-to-depth or stride phases, transposed
convolutions by phases, few-channel convolutions as patches times a matrix, dense layers'
input gradients by the transposed kernel: the same values and gradients as JAX's own rules, the
slow convolutions and products gone from the program (gradients, decoders and modified
back-propagation), custom derivatives kept, loop bodies' convolutions in the layout XLA:CPU's
fast kernels take."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jcore

from jfail.xla import cpu_friendly_gradients, jit
from jfail.xla.cpu_gradients import (
    FEW_CHANNELS,
    dense,
    dense_dot,
    eligible,
    fast_conv,
    few_channel_conv,
    few_channels,
    one_window,
    one_window_conv,
    phased,
    phased_conv,
    strided_conv,
    transposed,
    transposed_conv,
)

# (x shape, kernel shape, strides, padding, dimension numbers)
CASES = [
    ((2, 28, 28, 3), (4, 4, 3, 5), (2, 2), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    ((2, 7, 7, 3), (4, 4, 3, 5), (2, 2), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),  # crops
    ((2, 3, 9, 10), (5, 3, 6, 2), (3, 2), ((2, 0), (0, 1)), ("NCHW", "OIHW", "NCHW")),
    ((3, 11, 9, 2), (4, 2, 2, 4), (2, 1), ((0, 3), (1, 1)), ("NHWC", "HWIO", "NCHW")),
    ((1, 12, 12, 1), (6, 6, 1, 2), (3, 3), ((0, 0), (0, 0)), ("NHWC", "HWIO", "NHWC")),
]


def _conv(strides, padding, numbers):
    return lambda x, w: jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=numbers, precision="highest")


def _params(fn, x, w):
    return jax.make_jaxpr(fn)(x, w).jaxpr.eqns[0].params


def _assert_same_value_and_gradients(rule, conv, x, w, params, rng):
    """`rule(x, w, **params)` equals `conv(x, w)` in value and in both cotangents (float32
    rounding of the largest entry)."""
    expected, expected_vjp = jax.vjp(conv, x, w)
    got, got_vjp = jax.vjp(lambda a, b: rule(a, b, **params), x, w)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    g = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    for ours, theirs in zip(got_vjp(g), expected_vjp(g)):
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


# (x shape, kernel shape, strides, padding, dimension numbers): kernels that do not tile the
# stride, smaller than it (1x1/2: phases without taps), one stride of 1, padding that leaves
# input rows unread, more output rows than phase rows, unit strides
PHASED_CASES = [
    ((2, 28, 28, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    ((2, 9, 9, 5), (1, 1, 5, 4), (2, 2), ((0, 0), (0, 0)), ("NHWC", "HWIO", "NHWC")),
    ((2, 6, 13, 11), (4, 6, 5, 3), (3, 2), ((2, 0), (0, 1)), ("NCHW", "OIHW", "NCHW")),
    ((3, 10, 9, 7), (3, 2, 7, 5), (1, 3), ((0, 0), (1, 0)), ("NHWC", "HWIO", "NCHW")),
    ((1, 8, 8, 6), (3, 3, 6, 4), (2, 2), ((0, 0), (0, 0)), ("NHWC", "HWIO", "NHWC")),
    ((1, 7, 7, 6), (2, 2, 6, 4), (3, 3), ((4, 4), (3, 5)), ("NHWC", "HWIO", "NHWC")),
    # unit strides (one phase): "SAME", padding beyond the kernel, other layouts
    ((2, 9, 8, 6), (3, 3, 6, 5), (1, 1), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    ((2, 6, 7, 9), (4, 6, 3, 2), (1, 1), ((4, 0), (0, 2)), ("NCHW", "OIHW", "NCHW")),
    ((3, 10, 9, 7), (3, 2, 7, 5), (1, 1), ((0, 0), (1, 0)), ("NHWC", "HWIO", "NCHW")),
]


# (x shape, kernel shape, strides, padding, dimension numbers): one output position each
ONE_WINDOW_CASES = [
    ((2, 3, 3, 6), (4, 4, 6, 5), (2, 2), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    ((2, 5, 4, 3), (5, 4, 3, 2), (1, 1), ((0, 0), (0, 0)), ("NHWC", "HWIO", "NHWC")),
    ((3, 4, 2, 3), (5, 4, 2, 3), (3, 2), ((0, 1), (1, 0)), ("NCHW", "OIHW", "NCHW")),
]


@pytest.mark.parametrize(
    "rule, case", [("space_to_depth", case) for case in CASES]
    + [("phases", case) for case in PHASED_CASES]
    + [("one_window", case) for case in ONE_WINDOW_CASES],
    ids=lambda value: value if isinstance(value, str) else f"{value[0]}-{value[1]}-{value[2]}")
def test_strided_and_one_window_rules_match_lax_in_value_and_both_gradients(rule, case):
    x_shape, w_shape, strides, padding, numbers = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    conv = _conv(strides, padding, numbers)
    params = _params(conv, x, w)
    if rule == "space_to_depth":
        assert eligible(params, w.shape)
        _assert_same_value_and_gradients(strided_conv, conv, x, w, params, rng)
    elif rule == "phases":
        assert phased(params)
        _assert_same_value_and_gradients(phased_conv, conv, x, w, params, rng)
    else:
        assert one_window(params, x.shape, w.shape)
        assert fast_conv(params, x.shape, w.shape) is one_window_conv
        _assert_same_value_and_gradients(one_window_conv, conv, x, w, params, rng)


# (x shape, kernel shape, input dilation, padding, dimension numbers): Flax's ConvTranspose
# 4x4/2 ("SAME" and the decoder's padding 2), a kernel smaller than the dilation, unequal
# dilations with cropping (negative) padding, other layouts
TRANSPOSED_CASES = [
    ((2, 4, 4, 8), (4, 4, 8, 6), (2, 2), ((2, 2), (2, 2)), ("NHWC", "HWIO", "NHWC")),
    ((2, 7, 7, 6), (4, 4, 6, 5), (2, 2), ((2, 1), (2, 1)), ("NHWC", "HWIO", "NHWC")),
    ((1, 5, 5, 3), (1, 1, 3, 5), (2, 2), ((0, 0), (0, 0)), ("NHWC", "HWIO", "NHWC")),
    ((2, 6, 6, 3), (5, 3, 3, 7), (2, 3), ((4, -2), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    ((2, 3, 5, 6), (6, 3, 3, 2), (3, 2), ((0, 1), (-1, 2)), ("NCHW", "OIHW", "NCHW")),
]


@pytest.mark.parametrize("case", TRANSPOSED_CASES,
                         ids=lambda case: f"{case[0]}-{case[1]}-{case[2]}")
def test_transposed_conv_matches_lax_in_value_and_both_gradients(case):
    x_shape, w_shape, dilation, padding, numbers = case
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)

    def conv(a, b):
        return jax.lax.conv_general_dilated(a, b, (1, 1), padding, lhs_dilation=dilation,
                                            dimension_numbers=numbers, precision="highest")

    params = _params(conv, x, w)
    assert transposed(params, w.shape)
    _assert_same_value_and_gradients(transposed_conv, conv, x, w, params, rng)


def test_a_vae_decoder_keeps_its_values_and_gradients_and_loses_its_dilated_convolutions():
    """Defuse's decoder (narrower): its three 8-channel transposed convolutions go phase by
    phase, the 1-channel output layer stays XLA's."""
    from jfail.models import BetaVAE

    vae = BetaVAE(image_shape=(28, 28, 1), latent_dim=4, decoder_features=(8, 8, 8, 8))
    z = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4)), jnp.float32)
    variables = vae.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jax.random.key(1))

    def decode(params, latents):
        return vae.apply({"params": params}, latents, method=BetaVAE.decode)

    params = variables["params"]
    rewritten = cpu_friendly_gradients(decode, platform="cpu")
    np.testing.assert_allclose(jax.jit(rewritten)(params, z), jax.jit(decode)(params, z),
                               rtol=0, atol=1e-5)
    def loss(fn):
        return jax.grad(lambda p, q: jnp.sum(jnp.sin(fn(p, q))), argnums=(0, 1))

    expected, got = jax.jit(loss(decode))(params, z), jax.jit(loss(rewritten))(params, z)
    for ours, theirs in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert _convs(decode, params, z, which=_input_dilated) == 4
    assert _convs(rewritten, params, z, which=_input_dilated) == 1  # the 1-channel output layer
    # with gradients: each layer's value and kernel cotangent, against the output layer's
    assert _convs(loss(decode), params, z, which=_input_dilated) == 8
    assert _convs(loss(rewritten), params, z, which=_input_dilated) == 2


def test_fast_conv_picks_one_window_patches_space_to_depth_phases_then_transposed():
    numbers = ("NHWC", "HWIO", "NHWC")
    cases = [((1, 8, 8, 1), (4, 4, 1, 3), (2, 2), few_channel_conv),
             ((1, 8, 8, 8), (4, 4, 8, 3), (2, 2), strided_conv),
             ((1, 8, 8, 8), (3, 3, 8, 3), (2, 2), phased_conv),
             ((1, 8, 8, 8), (1, 1, 8, 3), (2, 2), phased_conv),
             ((1, 8, 8, 8), (3, 3, 8, 3), (1, 1), phased_conv)]
    for x_shape, w_shape, strides, expected in cases:
        x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
        params = _params(_conv(strides, ((1, 1), (1, 1)), numbers), x, w)
        assert fast_conv(params, x.shape, w.shape) is expected, (x_shape, w_shape, strides)
    for out_channels, expected in ((FEW_CHANNELS + 1, transposed_conv), (FEW_CHANNELS, None)):
        x, w = jnp.zeros((1, 4, 4, 8)), jnp.zeros((4, 4, 8, out_channels))
        params = _params(lambda a, b: jax.lax.conv_transpose(  # noqa: E731
            a, b, (2, 2), "SAME", dimension_numbers=numbers), x, w)
        assert fast_conv(params, x.shape, w.shape) is expected
    dilated = lambda a, b: jax.lax.conv_general_dilated(  # noqa: E731
        a, b, (2, 2), ((1, 1), (1, 1)), rhs_dilation=(2, 2), dimension_numbers=numbers)
    x, w = jnp.zeros((1, 8, 8, 8)), jnp.zeros((3, 3, 8, 3))
    assert not phased(_params(dilated, x, w))
    # one output position takes precedence; two do not qualify
    x, w = jnp.zeros((1, 3, 3, 1)), jnp.zeros((4, 4, 1, 3))
    assert fast_conv(_params(_conv((2, 2), ((1, 1), (1, 1)), numbers), x, w), x.shape,
                     w.shape) is one_window_conv
    x, w = jnp.zeros((1, 4, 3, 8)), jnp.zeros((4, 4, 8, 3))  # output 2x1
    assert not one_window(_params(_conv((2, 2), ((1, 1), (1, 1)), numbers), x, w), x.shape,
                          w.shape)
    assert not phased(_params(_conv((2, 2), ((-1, 0), (0, 0)), numbers), x, w))


def test_only_overlapping_windows_that_tile_the_stride_are_eligible():
    x, w4, w3, w1 = (jnp.zeros((1, 8, 8, 2)), jnp.zeros((4, 4, 2, 3)), jnp.zeros((3, 3, 2, 3)),
                     jnp.zeros((1, 1, 2, 3)))
    numbers = ("NHWC", "HWIO", "NHWC")
    assert eligible(_params(_conv((2, 2), ((1, 1), (1, 1)), numbers), x, w4), w4.shape)
    assert not eligible(_params(_conv((1, 1), ((1, 1), (1, 1)), numbers), x, w4), w4.shape)
    assert not eligible(_params(_conv((2, 2), ((1, 1), (1, 1)), numbers), x, w3), w3.shape)
    assert not eligible(_params(_conv((2, 2), ((0, 0), (0, 0)), numbers), x, w1), w1.shape)
    dilated = lambda a, b: jax.lax.conv_general_dilated(  # noqa: E731
        a, b, (2, 2), ((1, 1), (1, 1)), rhs_dilation=(2, 2), dimension_numbers=numbers)
    assert not eligible(_params(dilated, x, w4), w4.shape)
    grouped = lambda a, b: jax.lax.conv_general_dilated(  # noqa: E731
        a, b, (2, 2), ((1, 1), (1, 1)), feature_group_count=2, dimension_numbers=numbers)
    w_grouped = jnp.zeros((4, 4, 1, 4))
    assert not eligible(_params(grouped, x, w_grouped), w_grouped.shape)


# (x shape, kernel shape, strides, padding, kernel dilation, dimension numbers): 1 input channel
# (value, both cotangents by patches) and 2-4 (the input cotangent by patches)
FEW_CHANNEL_CASES = [
    ((3, 28, 28, 1), (3, 3, 1, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 28, 28, 1), (4, 4, 1, 6), (2, 2), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 1, 13, 11), (5, 1, 3, 2), (3, 2), ((2, 0), (0, 1)), (1, 2), ("NCHW", "OIHW", "NCHW")),
    ((2, 16, 16, 3), (7, 7, 3, 5), (2, 2), ((3, 3), (3, 3)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 4, 10, 9), (3, 3, 4, 5), (1, 1), ((0, 0), (2, 1)), (2, 1), ("NCHW", "HWIO", "NHWC")),
    ((1, 9, 9, 2), (1, 1, 2, 3), (2, 2), ((0, 0), (0, 0)), (1, 1), ("NHWC", "HWIO", "NHWC")),
]


@pytest.mark.parametrize("case", FEW_CHANNEL_CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def test_few_channel_conv_matches_lax_in_value_and_both_gradients(case):
    x_shape, w_shape, strides, padding, dilation, numbers = case
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)

    def conv(a, b):
        return jax.lax.conv_general_dilated(a, b, strides, padding, rhs_dilation=dilation,
                                            dimension_numbers=numbers, precision="highest")

    params = _params(conv, x, w)
    assert few_channels(params, x.shape)
    _assert_same_value_and_gradients(few_channel_conv, conv, x, w, params, rng)


def test_few_channels_only_for_plain_convolutions_of_few_input_channels():
    numbers = ("NHWC", "HWIO", "NHWC")
    plain = _conv((1, 1), ((1, 1), (1, 1)), numbers)
    for channels, expected in ((1, True), (FEW_CHANNELS, True), (FEW_CHANNELS + 1, False)):
        x, w = jnp.zeros((1, 8, 8, channels)), jnp.zeros((3, 3, channels, 2))
        assert few_channels(_params(plain, x, w), x.shape) is expected
    x, w = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 1, 4))
    grouped = lambda a, b: jax.lax.conv_general_dilated(  # noqa: E731
        a, b, (1, 1), ((1, 1), (1, 1)), feature_group_count=2, dimension_numbers=numbers)
    assert not few_channels(_params(grouped, x, w), x.shape)
    x, w = jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 4))
    transposed = lambda a, b: jax.lax.conv_general_dilated(  # noqa: E731
        a, b, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2), dimension_numbers=numbers)
    assert not few_channels(_params(transposed, x, w), x.shape)
    cropping = _conv((1, 1), ((-1, 0), (0, 0)), numbers)
    assert not few_channels(_params(cropping, x, w), x.shape)


def test_a_grey_image_network_keeps_its_gradients_and_loses_its_first_convolution():
    """A 1-channel first layer becomes patches times a matrix in the value and the gradient;
    the second layer (8 channels) stays a convolution."""

    def net(params, x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(
            x, params[0], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        h = jax.nn.relu(jax.lax.conv_general_dilated(
            h, params[1], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.sum(h * params[2])

    rng = np.random.default_rng(2)
    params = [jnp.asarray(rng.normal(size=shape), jnp.float32)
              for shape in ((3, 3, 1, 8), (3, 3, 8, 4), (6, 10, 10, 4))]
    x = jnp.asarray(rng.uniform(size=(6, 10, 10, 1)), jnp.float32)
    plain = jax.grad(net, argnums=(0, 1))
    rewritten = jax.grad(cpu_friendly_gradients(net, platform="cpu"), argnums=(0, 1))
    expected, got = jax.jit(plain)(params, x), jax.jit(rewritten)(params, x)
    for ours, theirs in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert _convs(plain, params, x) == 6  # per layer: value, 2 cotangents
    assert _convs(rewritten, params, x, which=lambda eqn: eqn.invars[0].aval.shape[-1] == 1) == 0
    # the 8-channel layer's value and two cotangents (the kernel cotangent's VJP recomputes
    # the value too, unused)
    assert _live_top_level_convs(rewritten, params, x) == 3


def _layered_net(params, x):
    """Stride 1, 3x3/2 (phases), uneven padding, and a layer written as NCHW."""
    numbers = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, params[0], (1, 1), "SAME",
                                                 dimension_numbers=numbers))
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, params[1], (2, 2), ((1, 1), (1, 1)),
                                                 dimension_numbers=numbers))
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, params[2], (1, 1), ((2, 0), (1, 1)),
                                                 dimension_numbers=numbers))
    h = jax.nn.relu(jax.lax.conv_general_dilated(  # written as NCHW, as ported models are
        h.transpose(0, 3, 1, 2), params[3], (1, 1), "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW")))
    return h.reshape(h.shape[0], -1) @ params[4]


def _encoder_decoder_net(params, x):
    """A 4x4/2 convolution (space-to-depth) and a 4x4/2 transposed one (phases)."""
    numbers = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, params[0], (2, 2), ((1, 1), (1, 1)),
                                                 dimension_numbers=numbers))
    h = jax.nn.relu(jax.lax.conv_transpose(h, params[1], (2, 2), "SAME",
                                           dimension_numbers=numbers))
    return h.reshape(h.shape[0], -1) @ params[2]


@pytest.mark.parametrize("net, shapes", [
    (_layered_net, ((3, 3, 6, 8), (3, 3, 8, 8), (3, 2, 8, 5), (3, 5, 3, 3), (3 * 4 * 5, 3))),
    (_encoder_decoder_net, ((4, 4, 6, 8), (4, 4, 8, 6), (8 * 8 * 6, 3))),
], ids=["layers", "encoder_decoder"])
def test_gradients_inside_a_loop_run_as_canonical_convolutions(net, shapes):
    """XLA:CPU gives only the top-level computation's convolutions the NHWC / HWIO layout its
    Eigen kernels need; in a loop body JAX's input gradient keeps its flipped kernel as OIHW-like
    `01oi` and runs as a generic loop (7-12x slower). The rewritten gradient lays the kernel out
    itself, so that every convolution in the compiled loop is `b01f_01io->b01f`."""
    rng = np.random.default_rng(4)
    params = [jnp.asarray(rng.normal(scale=0.3, size=shape), jnp.float32) for shape in shapes]
    xs = jnp.asarray(rng.uniform(size=(3, 4, 8, 8, 6)), jnp.float32)

    def looped(fn):
        grad = jax.grad(lambda p, x: fn(p, x)[:, 1].sum(), argnums=1)
        return jit(lambda p, xs: jax.lax.map(lambda x: grad(p, x), xs))  # jfail's options

    rewritten = looped(cpu_friendly_gradients(net, platform="cpu"))
    expected = np.asarray(looped(net)(params, xs))
    got = np.asarray(rewritten(params, xs))
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    labels = _convolution_layouts(rewritten, params, xs)
    assert len(labels) >= 4  # a forward and an input-gradient convolution per layer, or more
    assert set(labels) == {"b01f_01io->b01f"}, labels


def test_lime_evaluates_an_nchw_model_in_its_loop_as_canonical_convolutions():
    """LIME and KernelSHAP query the model in groups of samples through `jax.lax.map`; a model
    written in NCHW runs there as NHWC convolutions, with unchanged logits."""
    from jfail.attribution.surrogates import _masked_target_logits

    def net(kernel, x):
        h = jax.lax.conv_general_dilated(x.transpose(0, 3, 1, 2), kernel, (1, 1), "SAME",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jax.nn.relu(h).mean(axis=(2, 3))

    rng = np.random.default_rng(6)
    model = jax.tree_util.Partial(net, jnp.asarray(rng.normal(size=(5, 3, 3, 3)), jnp.float32))
    x = jnp.asarray(rng.uniform(size=(2, 6, 6, 3)), jnp.float32)
    segment_map = jnp.asarray(np.arange(36).reshape(1, 6, 6) // 9 * np.ones((2, 1, 1), int))
    masks = jnp.asarray(rng.uniform(size=(2, 8, 4)) > 0.5, jnp.float32)
    program = jit(lambda m, x: _masked_target_logits(
        m, x, jnp.array([1, 4]), segment_map, jnp.zeros_like(x), masks, 4))
    keep = np.asarray(masks)[:, :, np.asarray(segment_map).reshape(2, -1)[0]]  # same map twice
    images = np.where(keep.reshape(2, 8, 6, 6, 1) > 0.5, np.asarray(x)[:, None], 0.0)
    expected = np.asarray(net(model.args[0], jnp.asarray(images.reshape(16, 6, 6, 3))))
    expected = expected.reshape(2, 8, 5)[np.arange(2), :, [1, 4]]
    np.testing.assert_allclose(np.asarray(program(model, x)), expected, rtol=1e-5, atol=1e-6)
    labels = _convolution_layouts(program, model, x)
    assert labels and set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.parametrize("attack", ["pgd", "feature"])
def test_attack_loops_compile_to_canonical_convolutions(attack):
    """PGD (adversarial training and evaluation) and Barlow's feature attack differentiate the
    model inside a `fori_loop`: their compiled loops hold only canonical convolutions."""
    from jfail.barlow.extraction import _apply_attack
    from jfail.train import Attack, pgd_attack

    numbers = ("NHWC", "HWIO", "NHWC")

    def features(params, x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, params[0], (1, 1), "SAME",
                                                     dimension_numbers=numbers))
        h = jax.nn.relu(jax.lax.conv_general_dilated(h, params[1], (1, 1), "SAME",
                                                     dimension_numbers=numbers))
        return h.mean(axis=(1, 2))

    rng = np.random.default_rng(5)
    params = [jnp.asarray(rng.normal(scale=0.3, size=shape), jnp.float32)
              for shape in ((3, 3, 6, 8), (3, 3, 8, 4))]
    model = jax.tree_util.Partial(features, params)
    x = jnp.asarray(rng.uniform(size=(2, 8, 8, 6)), jnp.float32)
    index, budget = jnp.array([0, 3]), jnp.full((2,), 0.5, jnp.float32)
    if attack == "pgd":
        program = jit(lambda m, x: pgd_attack(m, x, index, Attack(epsilon=0.5, steps=3),
                                              key=jax.random.key(0)))
    else:
        program = jit(lambda m, x: _apply_attack(m, x, index, budget, budget, steps=3))
    labels = _convolution_layouts(program, model, x)
    assert len(labels) >= 4, labels
    assert set(labels) == {"b01f_01io->b01f"}, labels


def _convolution_layouts(program, *args) -> list[str]:
    """The `dim_labels` of every convolution in `program`'s optimized XLA program."""
    hlo = program.lower(*args).compile().as_text()
    return re.findall(r" convolution\(.*?dim_labels=([^,\s]+)", hlo)


def _live_top_level_convs(fn, *args) -> int:
    """Convolution equations of `fn(*args)`'s top-level jaxpr whose result is used."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    used = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, jcore.Literal)}
    used |= {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    return sum(eqn.primitive.name == "conv_general_dilated" and eqn.outvars[0] in used
               for eqn in jaxpr.eqns)


def _convs(fn, *args, which=lambda eqn: True) -> int:
    """Convolution equations in the jaxpr of `fn(*args)` (nested included) that `which` accepts."""
    return _count_convs(jax.make_jaxpr(fn)(*args).jaxpr, which)


def _count_convs(jaxpr, which) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == "conv_general_dilated" and which(eqn)
        for value in eqn.params.values():
            for inner in (value if isinstance(value, (list, tuple)) else [value]):
                if hasattr(inner, "eqns") or hasattr(getattr(inner, "jaxpr", None), "eqns"):
                    total += _count_convs(inner.jaxpr if hasattr(inner, "jaxpr") else inner, which)
    return total


def _input_dilated(eqn) -> bool:
    return any(d > 1 for d in eqn.params["lhs_dilation"])


class _StridedNet(nn.Module):
    """Written here: 4x4/2 convolutions (space-to-depth), a 3x3/2 one (phases), BatchNorm, a jitted
    inner function, a Python flag."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(6, (4, 4), strides=2, padding=1)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = jax.jit(lambda h: nn.relu(h))(nn.Conv(8, (4, 4), strides=2, padding=1)(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_gradients_of_a_flax_model_equal_and_lose_their_dilated_convolutions():
    module = _StridedNet()
    x = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    variables = jax.jit(module.init, static_argnums=2)(jax.random.key(1), x, False)

    def loss(apply):
        def value(params, images):
            logits, updates = apply({**variables, "params": params}, images, True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.arange(4) % 5).mean() + 0.0 * sum(
                    jnp.sum(v) for v in jax.tree_util.tree_leaves(updates))
        return jax.grad(value, argnums=(0, 1))

    plain = loss(module.apply)
    rewritten = loss(cpu_friendly_gradients(module.apply, platform="cpu"))
    expected = jax.jit(plain)(variables["params"], x)
    got = jax.jit(rewritten)(variables["params"], x)
    for ours, theirs in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        ours, theirs = np.asarray(ours), np.asarray(theirs)  # numpy: no compile per leaf shape
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max() + 1e-7
    # JAX differentiates each strided convolution into one with lhs dilation:
    assert _convs(plain, variables["params"], x, which=_input_dilated) == 3
    assert _convs(rewritten, variables["params"], x, which=_input_dilated) == 0


def test_custom_derivatives_are_kept_and_other_platforms_untouched():
    def f(x):  # jax.nn.relu's custom JVP makes the derivative at 0 zero; max(x, 0)'s is 1/2
        return jnp.sum(jax.nn.relu(x))

    x = jnp.zeros((3,))
    np.testing.assert_array_equal(jax.grad(cpu_friendly_gradients(f, platform="cpu"))(x), 0.0)
    assert cpu_friendly_gradients(f, platform="gpu") is f


def test_modified_backpropagation_takes_the_fast_convolutions_with_unchanged_results(monkeypatch):
    """Every propagation method's linear blocks use `fast_conv` on CPU: no convolution of the
    1-channel image, none with a single output position and no input-dilated one is left in its
    program, and its attributions equal those of the primitive's own derivatives."""
    from jfail.attribution import _jaxpr, propagation

    def apply(params, x):
        numbers = ("NHWC", "HWIO", "NHWC")
        h = jax.nn.relu(jax.lax.conv_general_dilated(  # 1 channel: few_channel_conv
            x, params["c1"], (1, 1), "SAME", dimension_numbers=numbers) + 0.1)
        h = jax.nn.relu(jax.lax.conv_general_dilated(  # 6 channels, 4x4/2: strided_conv
            h, params["c2"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=numbers))
        h = jax.nn.relu(jax.lax.conv_general_dilated(  # 4x4 -> 1x1: one_window_conv
            h, params["c3"], (1, 1), "VALID", dimension_numbers=numbers))
        return h.reshape(x.shape[0], -1) @ params["dense"]

    rng = np.random.default_rng(3)
    params = {name: jnp.asarray(rng.normal(scale=0.5, size=shape), jnp.float32)
              for name, shape in (("c1", (4, 4, 1, 6)), ("c2", (4, 4, 6, 4)), ("c3", (4, 4, 4, 5)),
                                  ("dense", (5, 3)))}
    model = jax.tree_util.Partial(apply, params)
    x = jnp.asarray(rng.uniform(size=(3, 8, 8, 1)), jnp.float32)
    target = jnp.array([0, 1, 2])
    patterns = propagation.fit_patterns(model, rng.uniform(size=(64, 8, 8, 1)).astype(np.float32))
    # One method of each rule family (a ReLU rule, an LRP rule on every layer, a per-layer
    # preset, patterns): the blocks they rewrite are the same `fast_conv` calls.
    methods = {name: getattr(propagation, name) for name in (
        "guided_backprop", "lrp_alpha_beta", "lrp_sequential_preset_flat")}
    methods["pattern_attribution"] = functools.partial(propagation.pattern_attribution,
                                                       patterns=patterns)

    def program_and_value(kernel, model, x, target, *, batch_size=None, shared=(), parts=None,
                          **static):
        run = lambda images: kernel(model, images, target, None, *shared, **static)  # noqa: E731
        return jax.make_jaxpr(run)(x).jaxpr, np.asarray(jax.jit(run)(x))

    def slow(eqn):
        shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
        return _input_dilated(eqn) or any(1 in shape for shape in shapes)

    for name, method in methods.items():
        expected_public = np.asarray(method(model, x, target))
        with monkeypatch.context() as patch:
            patch.setattr(propagation, "run_chunked", program_and_value)
            fast_program, fast = method(model, x, target)
            patch.setattr(_jaxpr, "on_cpu", lambda platform=None: False)
            plain_program, plain = method(model, x, target)
        assert _count_convs(plain_program, slow) > 0, name
        assert _count_convs(fast_program, slow) == 0, name
        scale = np.abs(plain).max()
        assert np.abs(fast - plain).max() <= 1e-5 * scale, name
        assert np.abs(expected_public - fast).max() <= 1e-6 * scale, name


# (lhs shape, rhs shape): a batch of vectors, a sequence of them, a single one
DENSE_CASES = [((5, 12), (12, 7)), ((3, 4, 6), (6, 2)), ((9,), (9, 4))]


@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_dense_dot_matches_lax_in_value_and_both_gradients(case):
    lhs_shape, rhs_shape = case
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=rhs_shape), jnp.float32)
    numbers = (((len(lhs_shape) - 1,), (0,)), ((), ()))

    def product(a, b):
        return jax.lax.dot_general(a, b, numbers, precision="highest")

    params = jax.make_jaxpr(product)(x, w).jaxpr.eqns[0].params
    assert dense(params, lhs_shape, rhs_shape)
    _assert_same_value_and_gradients(dense_dot, product, x, w, params, rng)


def test_dense_only_for_matrices_contracted_on_their_first_axis():
    def params(lhs_shape, rhs_shape, numbers):
        return jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, numbers))(
            jnp.ones(lhs_shape), jnp.ones(rhs_shape)).jaxpr.eqns[0].params

    assert dense(params((4, 6), (6, 3), (((1,), (0,)), ((), ()))), (4, 6), (6, 3))
    # x @ W.T (a PyTorch-layout Linear): its input gradient is already the fast product
    assert not dense(params((4, 6), (3, 6), (((1,), (1,)), ((), ()))), (4, 6), (3, 6))
    # batched products and higher-rank right operands are not dense layers
    assert not dense(params((2, 4, 6), (2, 6, 3), (((2,), (1,)), ((0,), (0,)))), (2, 4, 6),
                     (2, 6, 3))
    assert not dense(params((4, 6), (6, 3, 2), (((1,), (0,)), ((), ()))), (4, 6), (6, 3, 2))
    # contracting an axis of x other than its last
    assert not dense(params((6, 4), (6, 3), (((0,), (0,)), ((), ()))), (6, 4), (6, 3))


def test_an_mlps_input_gradient_multiplies_by_laid_out_transposed_kernels():
    """JAX's input gradient of a Flax MLP contracts each kernel on its second axis (XLA:CPU's
    slow orientation); rewritten, every product of the compiled gradient contracts the right
    operand on its first axis, and the gradient is the same."""
    class _MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
            h = nn.relu(nn.Dense(16)(h))
            return nn.Dense(5)(h)

    module = _MLP()
    x = np.random.default_rng(3).uniform(size=(6, 8, 8, 1)).astype(np.float32)
    variables = module.init(jax.random.key(2), x)
    model = jax.tree_util.Partial(module.apply, variables)

    def input_gradient(wrap):
        return jax.jit(lambda m, images: jax.grad(
            lambda images: wrap(m)(images)[:, 1].sum())(images))

    plain = input_gradient(lambda m: m)
    rewritten = input_gradient(lambda m: cpu_friendly_gradients(m, platform="cpu"))
    np.testing.assert_allclose(rewritten(model, x), plain(model, x), rtol=0,
                               atol=1e-6 * np.abs(plain(model, x)).max())

    def rhs_contracting(fn):
        hlo = fn.lower(model, x).compile().as_text()
        return re.findall(r"rhs_contracting_dims=\{(\d+)\}", hlo)

    assert "1" in rhs_contracting(plain)
    assert rhs_contracting(rewritten) and set(rhs_contracting(rewritten)) == {"0"}
