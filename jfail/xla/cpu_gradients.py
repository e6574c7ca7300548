"""Convolutions and products whose values and gradients avoid XLA:CPU's slow paths.

XLA:CPU runs some convolutions as a generic loop, several times slower than its Eigen kernels:
input-dilated ones (JAX's input gradient of a strided convolution, transposed convolutions),
those of images with few channels, those with one output position, and any convolution in a
loop body (`jax.lax.map`, `scan`: only top-level convolutions get the NHWC / HWIO layouts Eigen
needs). JAX's input gradient of a dense layer `x @ W` is also slow, contracting `W` on its second
axis. Each rule below computes the same sums in another order (agreement to float32 rounding,
the original multiply-adds and no more), as a `custom_vjp` where only a cotangent changes:

- `strided_conv` (`eligible`: kernels a multiple of the stride, e.g. 4x4/2): the input cotangent
  through space-to-depth, a stride-1 convolution of `s x s` blocks stacked into channels;
- `phased_conv` (`phased`: other strides, e.g. ResNet's 3x3/2 and 1x1/2, and stride 1): the input
  cotangent one output phase (residue modulo the stride) at a time, each a stride-1 convolution
  with that phase's kernel taps, interleaved; at stride 1 one phase, the kernel laid out as HWIO
  by an explicit transpose, which XLA keeps inside loops;
- `transposed_conv` (`transposed`: input dilation, more than `FEW_CHANNELS` outputs): the value
  phase by phase too, its cotangents JAX's derivatives of that;
- `few_channel_conv` (`few_channels`: at most `FEW_CHANNELS` input channels; takes precedence):
  patches (`kh * kw * C` channels) times the kernel as a matrix;
- `one_window_conv` (`one_window`: a single output position): one matrix product;
- `dense_dot` (`dense`): the input cotangent times the kernel transposed in memory, behind an
  optimization barrier so that XLA does not fold the transpose back.

Every rewritten convolution computes its value on NHWC / HWIO operands (explicit transposes,
none for those layouts), so that it is fast inside loops too. `fast_conv` picks the rule for one
convolution. `cpu_friendly_gradients(fn)` re-evaluates `fn`'s jaxpr (`jfail.xla.jaxpr.evaluate`)
with every such convolution and `dense` product replaced (a transposed convolution's value
changes too, to float32 rounding); off CPU (cuDNN has fast strided transposes) it returns `fn`.
jfail's training steps, PGD, feature attacks and gradient attributions apply it to the model
before differentiating, LIME and KernelSHAP to the model they query in groups, Defuse's decoding
to the decoder; modified back-propagation uses `fast_conv` for its linear blocks' convolutions.

The timings behind each rule and threshold are in `benchmarks/results/cpu_gradients.md`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jfail.xla import jaxpr as jaxpr_interpreter

__all__ = ["cpu_friendly_gradients", "fast_conv", "strided_conv", "eligible", "phased_conv",
           "phased", "transposed_conv", "transposed", "few_channel_conv", "few_channels",
           "one_window_conv", "one_window", "dense_dot", "dense", "on_cpu", "FEW_CHANNELS"]

FEW_CHANNELS = 4  # `few_channels`: at most this many input channels; `transposed`: more outputs

def cpu_friendly_gradients(fn: Callable, platform: str | None = None) -> Callable:
    """`fn` with the same values whose VJP avoids XLA:CPU's slow convolutions and products.

    Custom-derivative calls (`custom_jvp`, `custom_vjp`, e.g. `jax.nn.relu`) are kept as they are.

    Args:
        fn: a JAX function `fn(*args, **kwargs)`; its array arguments are traced, the others
            (flags, Python numbers, modules) stay static.
        platform: where the program runs (None: JAX's default backend).

    Returns:
        On CPU, a function called like `fn` that traces it and re-evaluates its jaxpr with the
        convolutions `fast_conv` picks and the products `dense` accepts replaced; elsewhere
        `fn` itself. Errors `fn` raises while being traced propagate unchanged.
    """
    if not on_cpu(platform):
        return fn

    def rewritten(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

        def of_arrays(*arrays):  # non-array leaves (flags, Python numbers, modules) stay static
            it = iter(arrays)
            full = [next(it) if a else leaf for leaf, a in zip(leaves, is_array)]
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return fn(*call_args, **call_kwargs)

        arrays = [leaf for leaf, a in zip(leaves, is_array) if a]
        closed, out_shape = jax.make_jaxpr(of_arrays, return_shape=True)(*arrays)
        outs = jaxpr_interpreter.evaluate(closed.jaxpr, closed.consts, arrays, _RULES)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return rewritten


def on_cpu(platform: str | None = None) -> bool:
    """Whether programs run on XLA:CPU.

    Args:
        platform: a JAX platform name ("cpu", "gpu", "tpu"), or None for JAX's default backend.

    Returns:
        True for "cpu".
    """
    return (platform or jax.default_backend()) == "cpu"


def fast_conv(params: dict, lhs_shape: tuple, rhs_shape: tuple) -> Callable | None:
    """The rule that replaces a `conv_general_dilated` on CPU, if any.

    Args:
        params: the equation's parameters (`window_strides`, `padding`, `lhs_dilation`,
            `rhs_dilation`, `dimension_numbers` as `ConvDimensionNumbers`, group counts,
            `precision`, `preferred_element_type`).
        lhs_shape: the input's shape, in its own layout.
        rhs_shape: the kernel's shape, in its own layout.

    Returns:
        `one_window_conv`, `few_channel_conv`, `strided_conv`, `phased_conv` or
        `transposed_conv` (tried in that order), called like the primitive; None where XLA's own
        rules are fine.
    """
    if one_window(params, lhs_shape, rhs_shape):
        return one_window_conv
    if few_channels(params, lhs_shape):
        return few_channel_conv
    if eligible(params, rhs_shape):
        return strided_conv
    if phased(params):
        return phased_conv
    if transposed(params, rhs_shape):
        return transposed_conv
    return None


def eligible(params: dict, rhs_shape: tuple) -> bool:
    """Whether a convolution gets the space-to-depth input gradient (`strided_conv`).

    That is a convolution `phased` accepts whose windows overlap and tile the stride (4x4/2: the
    rearranged convolution does exactly the original multiply-adds; 3x3/2 would pay 16/9 of
    them and 1x1/2 does not overlap, both go phase by phase).

    Args:
        params: the equation's parameters (`window_strides`, `padding`, `lhs_dilation`,
            `rhs_dilation`, `dimension_numbers` as `ConvDimensionNumbers`, group counts,
            `precision`, `preferred_element_type`).
        rhs_shape: the kernel's shape, in its own layout.

    Returns:
        True if `strided_conv` applies.
    """
    strides = tuple(params["window_strides"])
    spatial = [rhs_shape[axis] for axis in params["dimension_numbers"].rhs_spec[2:]]
    return (
        phased(params)
        and any(s > 1 and k > s for s, k in zip(strides, spatial))
        and all(k % s == 0 for s, k in zip(strides, spatial))
    )


def strided_conv(lhs, rhs, **params):
    """`lax.conv_general_dilated_p.bind(lhs, rhs, **params)` whose lhs cotangent is computed by
    space-to-depth (see the module docstring); the value is computed on NHWC / HWIO operands
    and the rhs cotangent is JAX's derivative of that.

    Args:
        lhs: the input, laid out as `params["dimension_numbers"].lhs_spec` says (e.g.
            `[B, H, W, C]`).
        rhs: the kernel, laid out as `rhs_spec` says (e.g. `[kh, kw, C, O]`).
        **params: the parameters of the `conv_general_dilated` equation it replaces.

    Returns:
        The convolution, laid out as `out_spec` says (e.g. `[B, out_h, out_w, O]`), equal to the
        primitive's to float32 rounding.
    """
    return _with_rules(lhs, rhs, params, _nhwc_conv, _vjp_lhs(_space_to_depth_conv),
                            _vjp_rhs(_nhwc_conv))


def phased(params: dict) -> bool:
    """Whether a convolution gets `phased_conv`: 2 spatial dimensions, no dilation, no grouping,
    non-negative padding (any strides; stride 1 is one phase).

    Args:
        params: the equation's parameters (`window_strides`, `padding`, `lhs_dilation`,
            `rhs_dilation`, `dimension_numbers` as `ConvDimensionNumbers`, group counts,
            `precision`, `preferred_element_type`).

    Returns:
        True if `phased_conv` applies.
    """
    return (
        _ungrouped_2d(params)
        and all(d == 1 for d in params["lhs_dilation"])
        and all(d == 1 for d in params["rhs_dilation"])
        and _nonnegative_padding(params)
    )


def phased_conv(lhs, rhs, **params):
    """`lax.conv_general_dilated_p.bind(lhs, rhs, **params)` whose lhs cotangent is computed
    phase by phase (see the module docstring; with unit strides as one convolution with the
    kernel laid out as HWIO); the value is computed on NHWC / HWIO operands and the rhs
    cotangent is JAX's derivative of that.

    Args:
        lhs: the input, laid out as `params["dimension_numbers"].lhs_spec` says (e.g.
            `[B, H, W, C]`).
        rhs: the kernel, laid out as `rhs_spec` says (e.g. `[kh, kw, C, O]`).
        **params: the parameters of the `conv_general_dilated` equation it replaces.

    Returns:
        The convolution, laid out as `out_spec` says (e.g. `[B, out_h, out_w, O]`), equal to the
        primitive's to float32 rounding.
    """
    strided = any(s > 1 for s in params["window_strides"])
    lhs_cotangent = _phase_lhs_cotangent if strided else _flipped_kernel_lhs_cotangent
    return _with_rules(lhs, rhs, params, _nhwc_conv, lhs_cotangent, _vjp_rhs(_nhwc_conv))


def transposed(params: dict, rhs_shape: tuple) -> bool:
    """Whether a convolution gets `transposed_conv`: 2 spatial dimensions, input (lhs) dilation
    above 1 with unit window strides (a transposed convolution), no kernel dilation, no
    grouping, more than `FEW_CHANNELS` output channels.

    Args:
        params: the equation's parameters (`window_strides`, `padding`, `lhs_dilation`,
            `rhs_dilation`, `dimension_numbers` as `ConvDimensionNumbers`, group counts,
            `precision`, `preferred_element_type`).
        rhs_shape: the kernel's shape, in its own layout.

    Returns:
        True if `transposed_conv` applies.
    """
    return (
        _ungrouped_2d(params)
        and any(d > 1 for d in params["lhs_dilation"])
        and all(s == 1 for s in params["window_strides"])
        and all(d == 1 for d in params["rhs_dilation"])
        and rhs_shape[params["dimension_numbers"].rhs_spec[0]] > FEW_CHANNELS
    )


def transposed_conv(lhs, rhs, **params):
    """`lax.conv_general_dilated_p.bind(lhs, rhs, **params)` for a transposed convolution,
    computed phase by phase (see the module docstring); both cotangents are JAX's derivatives
    of that formulation (stride-1 convolutions, padding and interleaving).

    Args:
        lhs: the input, laid out as `params["dimension_numbers"].lhs_spec` says (e.g.
            `[B, H, W, C]`).
        rhs: the kernel, laid out as `rhs_spec` says (e.g. `[kh, kw, C, O]`).
        **params: the parameters of the `conv_general_dilated` equation it replaces.

    Returns:
        The convolution, laid out as `out_spec` says (e.g. `[B, out_h, out_w, O]`), equal to the
        primitive's to float32 rounding.
    """
    return _phase_dilated_conv(lhs, rhs, params)


def one_window(params: dict, lhs_shape: tuple, rhs_shape: tuple) -> bool:
    """Whether a convolution gets `one_window_conv`: 2 spatial dimensions and a single output
    position (the kernel window covers the padded input, e.g. the Defuse CNN's last
    convolution, 3x3 -> 1x1), no input dilation, no grouping, non-negative padding.

    Args:
        params: the equation's parameters (`window_strides`, `padding`, `lhs_dilation`,
            `rhs_dilation`, `dimension_numbers` as `ConvDimensionNumbers`, group counts,
            `precision`, `preferred_element_type`).
        lhs_shape: the input's shape, in its own layout.
        rhs_shape: the kernel's shape, in its own layout.

    Returns:
        True if `one_window_conv` applies.
    """
    return (
        _ungrouped_2d(params)
        and _output_size(params, lhs_shape, rhs_shape) == [1, 1]
        and all(d == 1 for d in params["lhs_dilation"])
        and _nonnegative_padding(params)
    )


def one_window_conv(lhs, rhs, **params):
    """`lax.conv_general_dilated_p.bind(lhs, rhs, **params)` for a convolution with one output
    position, as the window's patch times the kernel reshaped to a matrix (one matrix product);
    both cotangents are JAX's derivatives of that.

    Args:
        lhs: the input, laid out as `params["dimension_numbers"].lhs_spec` says (e.g.
            `[B, H, W, C]`).
        rhs: the kernel, laid out as `rhs_spec` says (e.g. `[kh, kw, C, O]`).
        **params: the parameters of the `conv_general_dilated` equation it replaces.

    Returns:
        The convolution, laid out as `out_spec` says (e.g. `[B, out_h, out_w, O]`), equal to the
        primitive's to float32 rounding.
    """
    return _patch_conv(lhs, rhs, params)


def few_channels(params: dict, lhs_shape: tuple) -> bool:
    """Whether a convolution gets `few_channel_conv`: 2 spatial dimensions, at most
    `FEW_CHANNELS` input channels, no input dilation (a transposed convolution), no grouping,
    non-negative padding (kernel dilation and strides are fine).

    Args:
        params: the equation's parameters (`window_strides`, `padding`, `lhs_dilation`,
            `rhs_dilation`, `dimension_numbers` as `ConvDimensionNumbers`, group counts,
            `precision`, `preferred_element_type`).
        lhs_shape: the input's shape, in its own layout.

    Returns:
        True if `few_channel_conv` applies.
    """
    return (
        _ungrouped_2d(params)
        and lhs_shape[params["dimension_numbers"].lhs_spec[1]] <= FEW_CHANNELS
        and all(d == 1 for d in params["lhs_dilation"])
        and _nonnegative_padding(params)
    )


def few_channel_conv(lhs, rhs, **params):
    """`lax.conv_general_dilated_p.bind(lhs, rhs, **params)` whose lhs cotangent is the
    transpose of patches times a matrix (see the module docstring); with one input channel the
    value and the rhs cotangent are computed that way too, otherwise on NHWC / HWIO operands.

    Args:
        lhs: the input, laid out as `params["dimension_numbers"].lhs_spec` says (e.g.
            `[B, H, W, C]`).
        rhs: the kernel, laid out as `rhs_spec` says (e.g. `[kh, kw, C, O]`).
        **params: the parameters of the `conv_general_dilated` equation it replaces.

    Returns:
        The convolution, laid out as `out_spec` says (e.g. `[B, out_h, out_w, O]`), equal to the
        primitive's to float32 rounding.
    """
    single = lhs.shape[params["dimension_numbers"].lhs_spec[1]] == 1
    value = _patch_conv if single else _nhwc_conv
    return _with_rules(lhs, rhs, params, value, _vjp_lhs(_patch_conv), _vjp_rhs(value))


def dense(params: dict, lhs_shape: tuple, rhs_shape: tuple) -> bool:
    """Whether a `dot_general` gets `dense_dot`: a matrix `rhs: [K, N]` contracted on its first
    axis with the last axis of `lhs: [..., K]`, no batch axes.

    Args:
        params: the equation's parameters (`dimension_numbers`, `precision`,
            `preferred_element_type`).
        lhs_shape: the left operand's shape.
        rhs_shape: the right operand's shape.

    Returns:
        True if `dense_dot` applies.
    """
    (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    return (
        len(rhs_shape) == 2 and not lhs_batch and not rhs_batch
        and tuple(rhs_contracting) == (0,) and tuple(lhs_contracting) == (len(lhs_shape) - 1,)
    )


def dense_dot(lhs, rhs, **params):
    """`lax.dot_general_p.bind(lhs, rhs, **params)` (a product `dense` accepts) whose lhs
    cotangent multiplies by the explicitly transposed `rhs` (see the module docstring); the rhs
    cotangent is JAX's.

    Args:
        lhs: `[..., K]`.
        rhs: `[K, N]`.
        **params: the parameters of the `dot_general` equation it replaces.

    Returns:
        `[..., N]`, the primitive's value.
    """
    return _with_rules(lhs, rhs, params, _bind_dot, _transposed_kernel_lhs_cotangent,
                       _vjp_rhs(_bind_dot))


# --------------------------------------------------------------------------------------------
# Private helpers.


def _ungrouped_2d(params) -> bool:
    """Whether a `conv_general_dilated` has 2 spatial dimensions and no feature or batch
    grouping, what every rewrite here assumes."""
    return (
        len(params["window_strides"]) == 2
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
    )


def _nonnegative_padding(params) -> bool:
    return all(lo >= 0 and hi >= 0 for lo, hi in params["padding"])


def _with_rules(lhs, rhs, params, value, lhs_cotangent, rhs_cotangent):
    """The convolution or product computed by `value(lhs, rhs, params)`, its cotangents by
    `lhs_cotangent(g, lhs, rhs, params)` and `rhs_cotangent(g, lhs, rhs, params)`."""

    @jax.custom_vjp
    def bilinear(lhs, rhs):
        return value(lhs, rhs, params)

    def forward(lhs, rhs):
        return value(lhs, rhs, params), (lhs, rhs)

    def backward(residuals, g):
        lhs, rhs = residuals
        return lhs_cotangent(g, lhs, rhs, params), rhs_cotangent(g, lhs, rhs, params)

    bilinear.defvjp(forward, backward)
    return bilinear(lhs, rhs)


def _bind_dot(lhs, rhs, params):
    return jax.lax.dot_general_p.bind(lhs, rhs, **params)


def _transposed_kernel_lhs_cotangent(g, lhs, rhs, params):
    """The lhs cotangent of a `dense` product: `g` times `rhs.T`, the transpose laid out in
    memory (an optimization barrier keeps XLA from folding it back into the product)."""
    transposed_kernel = jax.lax.optimization_barrier(rhs.T)
    out = jax.lax.dot_general(
        g, transposed_kernel, (((g.ndim - 1,), (0,)), ((), ())), precision=params["precision"],
        preferred_element_type=params["preferred_element_type"])
    return out.astype(lhs.dtype)


def _vjp_lhs(rule):
    """The lhs cotangent as the VJP of `rule(lhs, rhs, params)`, the convolution written
    another way."""
    def cotangent(g, lhs, rhs, params):
        return jax.vjp(lambda v: rule(v, rhs, params), lhs)[1](g)[0]
    return cotangent


def _vjp_rhs(rule):
    """The rhs cotangent as the VJP of `rule(lhs, rhs, params)`."""
    def cotangent(g, lhs, rhs, params):
        return jax.vjp(lambda w: rule(lhs, w, params), rhs)[1](g)[0]
    return cotangent


def _conv_rule(eqn):
    """`fast_conv`'s rule for a `conv_general_dilated` equation, or None."""
    return fast_conv(eqn.params, *[v.aval.shape for v in eqn.invars])


def _dot_rule(eqn):
    """`dense_dot` for a `dot_general` equation `dense` accepts, else None."""
    shapes = [v.aval.shape for v in eqn.invars]
    return dense_dot if len(shapes) == 2 and dense(eqn.params, *shapes) else None


# What `cpu_friendly_gradients` rewrites; calls into custom derivatives are kept whole.
_RULES = {"conv_general_dilated": _conv_rule, "dot_general": _dot_rule}


def _nhwc_conv(lhs, rhs, params):
    """The convolution computed on `[N, H, W, C]` and `[kh, kw, I, O]` operands, laid out so by
    explicit transposes (none for those layouts), which XLA:CPU keeps inside loop bodies too."""
    x, w = _to_nhwc_hwio(lhs, rhs, params)
    out = jax.lax.conv_general_dilated(
        x, w, params["window_strides"], params["padding"], params["lhs_dilation"],
        params["rhs_dilation"], ("NHWC", "HWIO", "NHWC"), params["feature_group_count"],
        params["batch_group_count"], precision=params["precision"],
        preferred_element_type=params["preferred_element_type"])
    return _from_nhwc(out, params["dimension_numbers"].out_spec)


def _patch_conv(lhs, rhs, params):
    """The convolution as patches `[N, out_h, out_w, kh * kw * C]` (its shifted, strided windows
    concatenated, tap-major) times the kernel as a `[kh * kw * C, O]` matrix."""
    x, w = _to_nhwc_hwio(lhs, rhs, params)
    (sh, sw), ((ph_lo, ph_hi), (pw_lo, pw_hi)) = params["window_strides"], params["padding"]
    dh, dw = params["rhs_dilation"]
    kh, kw, channels, out_channels = w.shape
    batch = x.shape[0]
    out_h, out_w = _output_size(params, lhs.shape, rhs.shape)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph_lo, ph_hi, 0), (pw_lo, pw_hi, 0),
                                                (0, 0, 0)))
    windows = [
        jax.lax.slice(x, (0, i * dh, j * dw, 0),
                      (batch, i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1,
                       channels), (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    patches = jnp.concatenate(windows, axis=-1)
    out = jax.lax.dot_general(
        patches, w.reshape(kh * kw * channels, out_channels), (((3,), (0,)), ((), ())),
        precision=params["precision"], preferred_element_type=params["preferred_element_type"],
    )  # [N, out_h, out_w, O]
    return _from_nhwc(out, params["dimension_numbers"].out_spec)


def _output_size(params, lhs_shape, rhs_shape) -> list[int]:
    """The spatial sizes of a convolution's output (without input dilation), from its operand
    shapes in their own layouts."""
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    return [
        (lhs_shape[lhs_axis] + low + high - dilation * (rhs_shape[rhs_axis] - 1) - 1) // stride + 1
        for lhs_axis, rhs_axis, (low, high), dilation, stride in zip(
            lhs_spec[2:], rhs_spec[2:], params["padding"], params["rhs_dilation"],
            params["window_strides"])
    ]


def _to_nhwc_hwio(lhs, rhs, params):
    """`lhs` as `[N, H, W, C]` and `rhs` as `[kh, kw, I, O]` from the convolution's layouts."""
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    return _to_nhwc(lhs, lhs_spec), _to_hwio(rhs, rhs_spec)


def _to_hwio(kernel, spec):
    """`kernel`, laid out as `spec` (its output, input and spatial axes), as `[kh, kw, I, O]`."""
    return jnp.transpose(kernel, (spec[2], spec[3], spec[1], spec[0]))


def _to_nhwc(array, spec):
    """`array`, laid out as `spec` (its batch, feature and spatial axes), as `[N, H, W, C]`."""
    return jnp.transpose(array, (spec[0], spec[2], spec[3], spec[1]))


def _from_nhwc(array, spec):
    """An `[N, H, W, C]` array laid out as `spec` (e.g. the output's `out_spec`)."""
    source = {0: 0, 2: 1, 3: 2, 1: 3}  # logical dimension (batch, feature, h, w) -> NHWC axis
    order = [0] * 4
    for logical, axis in enumerate(spec):
        order[axis] = source[logical]
    return jnp.transpose(array, order)


def _space_to_depth_conv(lhs, rhs, params):
    """The strided convolution as a stride-1 convolution of space-to-depth blocks (in NHWC)."""
    x, w = _to_nhwc_hwio(lhs, rhs, params)
    # The high padding enters only through `out_h, out_w`: the pad below reaches just the rows
    # and columns the windows read, cutting off any padded tail that no window reaches.
    (sh, sw), ((ph_lo, _), (pw_lo, _)) = params["window_strides"], params["padding"]
    kh, kw, channels, out_channels = w.shape
    batch, height, width, _ = x.shape
    out_h, out_w = _output_size(params, lhs.shape, rhs.shape)
    kernel_h, kernel_w = -(-kh // sh) * sh, -(-kw // sw) * sw  # kernel rounded up to the stride
    rows, cols = (out_h - 1) * sh + kernel_h, (out_w - 1) * sw + kernel_w  # input span read
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph_lo, rows - height - ph_lo, 0),
                                                (pw_lo, cols - width - pw_lo, 0), (0, 0, 0)))
    x = x.reshape(batch, rows // sh, sh, cols // sw, sw, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows // sh, cols // sw, sh * sw * channels)
    w = jnp.pad(w, ((0, kernel_h - kh), (0, kernel_w - kw), (0, 0), (0, 0)))
    w = w.reshape(kernel_h // sh, sh, kernel_w // sw, sw, channels, out_channels)
    w = w.transpose(0, 2, 1, 3, 4, 5).reshape(kernel_h // sh, kernel_w // sw,
                                              sh * sw * channels, out_channels)
    out = _stride_one_conv(x, w, params)  # [N, out_h, out_w, O]
    return _from_nhwc(out, params["dimension_numbers"].out_spec)


def _stride_one_conv(x, w, params):
    """A "VALID" stride-1 convolution of `x: [N, H, W, C]` with `w: [kh, kw, C, O]` (precision
    and result type from `params`) as `phased_conv`: the rules above differentiate it through
    JAX, and its input gradient stays a fast convolution inside loops too."""
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return phased_conv(
        x, w, window_strides=(1, 1), padding=((0, 0), (0, 0)), lhs_dilation=(1, 1),
        rhs_dilation=(1, 1), dimension_numbers=numbers, feature_group_count=1,
        batch_group_count=1, precision=params["precision"],
        preferred_element_type=params["preferred_element_type"])


def _phase_lhs_cotangent(g, lhs, rhs, params):
    """The lhs cotangent of a strided convolution: the input-dilated convolution JAX's transpose
    rule emits (`g` dilated by the strides, the kernel flipped with its channels swapped),
    evaluated by `_phase_dilated_conv`."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    swapped = (rhs_spec[1], rhs_spec[0], *rhs_spec[2:])
    transposed = dict(
        params, window_strides=(1, 1), lhs_dilation=tuple(params["window_strides"]),
        padding=_lhs_cotangent_padding(g, lhs, rhs, params),
        dimension_numbers=jax.lax.ConvDimensionNumbers(out_spec, swapped, lhs_spec))
    return _phase_dilated_conv(g, jnp.flip(rhs, rhs_spec[2:]), transposed).astype(lhs.dtype)


def _flipped_kernel_lhs_cotangent(g, lhs, rhs, params):
    """The lhs cotangent of a stride-1 convolution: `g` convolved with the flipped kernel, its
    channels swapped, both laid out as NHWC and HWIO by explicit transposes."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    kernel = jnp.flip(_to_hwio(rhs, rhs_spec), (0, 1)).transpose(0, 1, 3, 2)
    out = jax.lax.conv_general_dilated(
        _to_nhwc(g, out_spec), kernel, (1, 1), _lhs_cotangent_padding(g, lhs, rhs, params),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=params["precision"],
        preferred_element_type=params["preferred_element_type"])
    return _from_nhwc(out, lhs_spec).astype(lhs.dtype)


def _lhs_cotangent_padding(g, lhs, rhs, params) -> tuple:
    """The padding of the (input-dilated) convolution of the cotangent `g` that JAX's transpose
    rule emits for a convolution's lhs cotangent: `kernel - 1 - low` before, the rest after."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    padding = []
    for axis, (low, _), stride in zip(range(2), params["padding"], params["window_strides"]):
        size, kernel = lhs.shape[lhs_spec[2 + axis]], rhs.shape[rhs_spec[2 + axis]]
        out_size = g.shape[out_spec[2 + axis]]
        before = kernel - 1 - low
        padding.append((before, size + kernel - 1 - ((out_size - 1) * stride + 1) - before))
    return tuple(padding)


def _phase_dilated_conv(lhs, rhs, params):
    """A stride-1 convolution with input dilation `d` as `d * d` stride-1 convolutions, one per
    output phase, interleaved.

    Output row `m = d * q + r` (padded coordinates shifted by `pad_low`) reads kernel rows
    `u = u_r + d * t` with `u_r = (pad_low - r) mod d`, at input rows `q + t + shift_r`,
    `shift_r = (r + u_r - pad_low) / d`: a correlation of the shifted input with the kernel rows
    of that phase. Negative padding (cropping) is allowed.
    """
    x, w = _to_nhwc_hwio(lhs, rhs, params)
    (dh, dw), ((low_h, high_h), (low_w, high_w)) = params["lhs_dilation"], params["padding"]
    kh, kw, _, out_channels = w.shape
    batch, height, width, _ = x.shape
    out_h = (height - 1) * dh + low_h + high_h - kh + 2
    out_w = (width - 1) * dw + low_w + high_w - kw + 2
    rows, cols = -(-out_h // dh), -(-out_w // dw)  # phase grid covering the output
    phases = []
    for rh in range(dh):
        first_h = (low_h - rh) % dh
        for rw in range(dw):
            first_w = (low_w - rw) % dw
            taps = w[first_h::dh, first_w::dw]
            th, tw = taps.shape[:2]
            if th == 0 or tw == 0:  # a kernel smaller than the dilation: no input reaches it
                phases.append(jnp.zeros((batch, rows, cols, out_channels), x.dtype))
                continue
            shift_h, shift_w = (rh + first_h - low_h) // dh, (rw + first_w - low_w) // dw
            shifted = jax.lax.pad(x, jnp.zeros((), x.dtype), (
                (0, 0, 0), (-shift_h, rows + th - 1 - height + shift_h, 0),
                (-shift_w, cols + tw - 1 - width + shift_w, 0), (0, 0, 0)))
            phases.append(_stride_one_conv(shifted, taps, params))
    grid = jnp.stack(phases, axis=3).reshape(batch, rows, cols, dh, dw, out_channels)
    grid = grid.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * dh, cols * dw, out_channels)
    return _from_nhwc(grid[:, :out_h, :out_w], params["dimension_numbers"].out_spec)
