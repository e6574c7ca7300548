"""Gradients of strided convolutions without XLA:CPU's slow path.

JAX differentiates a strided convolution into a convolution with `lhs_dilation` (the output
cotangent spread out with zeros). XLA:CPU has no fast kernel for that and runs it as a generic
loop: on the 4x4/2 layers of the Defuse CNN (batch 200) the input gradient took 31-62 ms against
1-13 ms for the forward pass (XLA's Eigen convolutions, which `jfail.xla.jit` selects). A
stride-s convolution is also a stride-1 convolution of the space-to-depth rearranged input (s x s
blocks stacked into channels) with a rearranged kernel, and the transpose of that is an ordinary
convolution (4-8x faster on those layers).

`strided_conv(lhs, rhs, **params)` is the primitive in the forward pass, with the lhs (input)
cotangent computed through that rearrangement (the same sums in another order: agreement to
float32 rounding) and JAX's own rhs (weight) cotangent. `eligible` limits it to windows that
overlap and tile the stride (kernel a multiple of the stride, e.g. 4x4/2), where it does exactly
the original multiply-adds; 3x3/2 would pay 16/9 of them and measured no faster.

`cpu_friendly_gradients(fn)` re-evaluates `fn`'s jaxpr with every eligible convolution replaced;
off CPU (cuDNN has fast strided transposes) it returns `fn` itself. jfail's training steps, PGD,
feature attacks and gradient attributions apply it to the model before differentiating.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

__all__ = ["cpu_friendly_gradients", "strided_conv", "eligible", "on_cpu"]

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr"}


def cpu_friendly_gradients(fn: Callable, platform: str | None = None) -> Callable:
    """`fn(*args, **kwargs)` with the same values whose VJP avoids dilated convolutions on CPU.

    `platform`: where the program runs (None: JAX's default backend). Elsewhere `fn` is returned.
    Custom-derivative calls (`custom_jvp`, `custom_vjp`, e.g. `jax.nn.relu`) are kept as they are.
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
        outs = _evaluate(closed.jaxpr, closed.consts, arrays)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return rewritten


def on_cpu(platform: str | None = None) -> bool:
    """Whether programs run on XLA:CPU: `platform`, or JAX's default backend when None."""
    return (platform or jax.default_backend()) == "cpu"


def eligible(params: dict, rhs_shape: tuple) -> bool:
    """Whether `conv_general_dilated` with these params gets the space-to-depth backward pass:
    2 spatial dimensions, overlapping strided windows whose size is a multiple of the stride
    (4x4/2: the rearranged convolution does exactly the original multiply-adds; 1x1/2 has no
    overlap and a fast transpose already; 3x3/2 would pay 16/9 of them, for no gain measured on
    CPU), no dilation, no grouping, non-negative padding."""
    strides = tuple(params["window_strides"])
    spatial = [rhs_shape[axis] for axis in params["dimension_numbers"].rhs_spec[2:]]
    return (
        len(strides) == 2
        and any(s > 1 and k > s for s, k in zip(strides, spatial))
        and all(k % s == 0 for s, k in zip(strides, spatial))
        and all(d == 1 for d in params["lhs_dilation"])
        and all(d == 1 for d in params["rhs_dilation"])
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and all(lo >= 0 and hi >= 0 for lo, hi in params["padding"])
    )


def strided_conv(lhs, rhs, **params):
    """`lax.conv_general_dilated_p.bind(lhs, rhs, **params)` whose lhs cotangent is computed by
    space-to-depth (see the module docstring); the rhs cotangent is JAX's own."""

    @jax.custom_vjp
    def conv(lhs, rhs):
        return _bind_conv(lhs, rhs, params)

    def forward(lhs, rhs):
        return _bind_conv(lhs, rhs, params), (lhs, rhs)

    def backward(residuals, g):
        lhs, rhs = residuals
        _, lhs_vjp = jax.vjp(lambda v: _space_to_depth_conv(v, rhs, params), lhs)
        _, rhs_vjp = jax.vjp(lambda w: _bind_conv(lhs, w, params), rhs)
        return lhs_vjp(g)[0], rhs_vjp(g)[0]

    conv.defvjp(forward, backward)
    return conv(lhs, rhs)


# --------------------------------------------------------------------------------------------
# Private helpers.


def _evaluate(jaxpr, consts, args):
    env: dict = {}

    def read(atom):
        return atom.val if isinstance(atom, jcore.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "conv_general_dilated" and eligible(eqn.params, eqn.invars[1].aval.shape):
            outs = strided_conv(*values, **eqn.params)
        elif name in _CALLS and _contains_eligible_conv(eqn.params[_CALLS[name]]):
            closed = eqn.params[_CALLS[name]]
            inner, inner_consts = (closed.jaxpr, closed.consts) if hasattr(closed, "jaxpr") \
                else (closed, ())
            outs = _evaluate(inner, inner_consts, values)
        else:
            outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, value in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _contains_eligible_conv(closed) -> bool:
    jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated" and eligible(eqn.params, eqn.invars[1].aval.shape):
            return True
        if name in _CALLS and _contains_eligible_conv(eqn.params[_CALLS[name]]):
            return True
    return False


def _bind_conv(lhs, rhs, params):
    return jax.lax.conv_general_dilated_p.bind(lhs, rhs, **params)


def _space_to_depth_conv(lhs, rhs, params):
    """The strided convolution as a stride-1 convolution of space-to-depth blocks (in NHWC)."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    x = jnp.transpose(lhs, (lhs_spec[0], lhs_spec[2], lhs_spec[3], lhs_spec[1]))  # [N, H, W, C]
    w = jnp.transpose(rhs, (rhs_spec[2], rhs_spec[3], rhs_spec[1], rhs_spec[0]))  # [kh, kw, I, O]
    (sh, sw), ((ph_lo, ph_hi), (pw_lo, pw_hi)) = params["window_strides"], params["padding"]
    kh, kw, channels, out_channels = w.shape
    batch, height, width, _ = x.shape
    out_h = (height + ph_lo + ph_hi - kh) // sh + 1
    out_w = (width + pw_lo + pw_hi - kw) // sw + 1
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
    out = jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=params["precision"], preferred_element_type=params["preferred_element_type"],
    )  # [N, out_h, out_w, O]
    source = {0: 0, 2: 1, 3: 2, 1: 3}  # logical dimension (batch, feature, h, w) -> NHWC axis
    order = [0] * 4
    for logical, axis in enumerate(out_spec):
        order[axis] = source[logical]
    return jnp.transpose(out, order)
