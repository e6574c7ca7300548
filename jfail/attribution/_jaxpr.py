"""Modified back-propagation on any JAX function, by rewriting its jaxpr.

`modified_forward(model, rules)` traces `model(x)` to a jaxpr with the model's weights as inputs
and re-evaluates it equation by equation (with the environment and call handling of
`jfail.xla.jaxpr`). Equations that do not depend on the image run as they are, all of them
first. Equations that do are rewritten:

- ReLU (`jax.nn.relu`, i.e. a `custom_jvp_call` around `max(x, 0)`, or a bare `max(x, 0)`) becomes
  a `custom_vjp` whose backward pass is the rule's: gradient, guided or deconvnet.
- A linear block, i.e. `dot_general` or `conv_general_dilated` with one image-dependent operand,
  followed by the chain of element-wise affine operations with image-independent operands that
  comes after it (bias, inference-mode BatchNorm: `add`, `sub`, `mul`, `div`, `neg`), becomes one
  `custom_vjp`. Folding the chain makes z = S ⊙ (x ⊛ W) + T, with S and T read off the chain,
  the layer the LRP rules see; BatchNorm therefore needs no special case.
- A residual `add` of two image-dependent values splits relevance in proportion to the summands.

Relevance rules work in "gradient form": the cotangent g of a value v carries relevance v ⊙ g, so
ReLUs, pooling and reshapes keep their ordinary backward pass and only linear blocks and sums are
rewritten. Input-layer rules (flat, bounded) produce relevance not proportional to the input;
they write it into a zero "sink" input whose cotangent is added to x ⊙ g at the end. The sink
follows the image through image-independent affine and reshaping operations (e.g. a normalizer),
so relevance reported at x is the relevance of the first layer's input, pixel for pixel.

With `rules.strict`, any other image-dependent primitive raises an error that names it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jfail.models.adapter import split_model
from jfail.xla.cpu_gradients import fast_conv, on_cpu
from jfail.xla.jaxpr import ALL_CALLS, bind, called_jaxpr, consumers, read, write

__all__ = [
    "Rules",
    "Epsilon",
    "AlphaBeta",
    "Flat",
    "Bounded",
    "PatternRule",
    "LinearBlock",
    "modified_forward",
    "linear_blocks",
    "UnsupportedPrimitiveError",
]


class UnsupportedPrimitiveError(NotImplementedError):
    """An image-dependent primitive the chosen propagation rules do not define."""


# --------------------------------------------------------------------------------------------
# Rules.


@dataclasses.dataclass(frozen=True)
class Epsilon:
    """LRP-ε: R_in = x ⊙ Wᵀ (R / (z + ε·sign z)); ε = 0 is LRP-z (0/0 taken as 0)."""

    epsilon: float = 0.0


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    """LRP-αβ: α · positive contributions − β · negative ones; `bias` adds b⁺ / b⁻ to z⁺ / z⁻."""

    alpha: float = 1.0
    beta: float = 0.0
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class Flat:
    """Flat rule (input layer): relevance spread uniformly over each unit's receptive field."""


@dataclasses.dataclass(frozen=True)
class Bounded:
    """z^B rule (input layer) for inputs bounded in [low, high] (Montavon et al. 2017)."""

    low: float = 0.0
    high: float = 1.0


@dataclasses.dataclass(frozen=True)
class PatternRule:
    """PatternNet (`'net'`: backward through patterns A) or PatternAttribution (`'attribution'`:
    backward through W ⊙ A); patterns come from `fit_patterns`, one per linear block."""

    kind: str = "net"


@dataclasses.dataclass(frozen=True)
class Rules:
    """How a modified backward pass treats ReLUs, linear blocks and residual sums.

    relu: 'gradient' (1[z>0] g), 'guided' (1[z>0] 1[g>0] g) or 'deconv' (1[g>0] g).
    dense / conv: the rule for linear blocks built on `dot_general` / `conv_general_dilated`
      (None: ordinary gradient). input_layer: rule for blocks fed by the image (None: as others).
    residual_epsilon: stabilizer of the proportional split at residual sums (None: gradient).
    strict: raise on image-dependent primitives without a relevance rule.
    relevance: return relevance (x ⊙ g plus the input-layer sink) instead of the cotangent of x.
    """

    relu: str = "gradient"
    dense: Any = None
    conv: Any = None
    input_layer: Any = None
    residual_epsilon: float | None = None
    strict: bool = False
    relevance: bool = False

    def for_block(self, kind: str, on_input: bool):
        """The rule for one linear block.

        Args:
            kind: 'dense' (`dot_general`) or 'conv' (`conv_general_dilated`).
            on_input: whether the block is fed by the image.

        Returns:
            `input_layer` for a block on the input when it is set, else `dense` or `conv`
            (None: the ordinary gradient).
        """
        if on_input and self.input_layer is not None:
            return self.input_layer
        return self.dense if kind == "dense" else self.conv


@dataclasses.dataclass(frozen=True)
class LinearBlock:
    """What `linear_blocks` reports of one linear block, in evaluation order."""

    kind: str  # 'dense' or 'conv'
    weight_shape: tuple
    output_shape: tuple
    relu_gated: bool
    on_input: bool
    weight_unit_axes: tuple  # axes of the weight that index output units (features, filters)
    output_unit_axes: tuple  # the same units' axes in the block output


def modified_forward(model: Callable, rules: Rules, patterns: Sequence[jax.Array] | None = None):
    """`f(x, sink) -> logits` equal to `model(x)` whose VJP follows `rules`.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        rules: how ReLUs, linear blocks and residual sums are differentiated.
        patterns: one array per linear block, shaped like its weight, for `PatternRule`
            (from `fit_patterns`); None otherwise.

    Returns:
        `f(x, sink)`: x `[B, H, W, C]`; sink zeros shaped like x, whose cotangent is the
        input-layer relevance. Returns the logits `[B, K]`.

    Raises:
        UnsupportedPrimitiveError: (when `f` is called) with `rules.strict`, for an
            image-dependent primitive without a rule.
        ValueError: (when `f` is called) if `patterns` is missing for a `PatternRule`, has
            another length than the model's linear blocks, or a pattern is not shaped like its
            block's weight.
    """
    dynamic, call = _traceable(model)

    def forward(x, sink):
        closed = jax.make_jaxpr(call)(dynamic, x)
        args = list(dynamic) + [x]
        depends = [False] * len(dynamic) + [True]
        sinks = [None] * len(dynamic) + [sink if rules.relevance else None]
        interpreter = _Interpreter(rules, patterns)
        outs, _ = interpreter.run(closed.jaxpr, closed.consts, args, depends, sinks)
        if patterns is not None and len(interpreter.blocks) != len(patterns):
            raise ValueError(
                f"{len(patterns)} patterns were given but the model has {len(interpreter.blocks)} "
                "linear blocks: fit the patterns on this model with fit_patterns."
            )
        return outs[0]

    return forward


def linear_blocks(model: Callable, x: jax.Array, collect: Callable | None = None):
    """The model's linear blocks in evaluation order and what `collect` reads of each on `x`.

    Args:
        model: any JAX callable `model(x) -> logits [B, K]`.
        x: images `[B, H, W, C]`.
        collect: None, or `collect(block, u, weight, lin_out, z, lin)` called per block: u its
            input, lin_out the linear primitive's output, z the block output after the folded
            affine chain, `lin(u, w)` the block's linear primitive applied with weight w.

    Returns:
        `(blocks, collected)`: the `LinearBlock`s, and the list of `collect`'s results (empty
        when `collect` is None).

    Raises:
        UnsupportedPrimitiveError: for an image-dependent primitive modified back-propagation
            has no rule for.
    """
    dynamic, call = _traceable(model)
    closed = jax.make_jaxpr(call)(dynamic, x)
    interpreter = _Interpreter(Rules(strict=True), None, collect=collect)
    interpreter.run(
        closed.jaxpr, closed.consts, list(dynamic) + [x], [False] * len(dynamic) + [True],
        [None] * (len(dynamic) + 1),
    )
    return interpreter.blocks, interpreter.collected


# --------------------------------------------------------------------------------------------
# The interpreter.

_LINEAR = {"dot_general": "dense", "conv_general_dilated": "conv"}
_AFFINE = {"add", "sub", "mul", "div", "neg"}
_STRUCTURAL = {
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "pad",
    "concatenate", "convert_element_type", "copy", "rev", "dynamic_slice", "gather",
    "select_and_gather_add",
}
_POOLING = {"reduce_window_max", "reduce_window_sum", "reduce_sum", "reduce_max", "reduce_window"}


class _Interpreter:
    def __init__(self, rules: Rules, patterns, collect=None):
        self.rules = rules
        self.patterns = patterns
        self.collect = collect
        self.blocks: list[LinearBlock] = []
        self.collected: list = []

    def run(self, jaxpr, consts, args, depends, sinks):
        env: dict = {}
        dep: dict = {}
        sink_env: dict = {}
        value_of = functools.partial(read, env)

        def is_dep(atom):
            return not isinstance(atom, jcore.Literal) and dep.get(atom, False)

        for var, value in zip(jaxpr.constvars, consts):
            env[var], dep[var] = value, False
        for var, value, d, s in zip(jaxpr.invars, args, depends, sinks):
            env[var], dep[var] = value, d
            if s is not None:
                sink_env[var] = s

        # Dependence on the image, then every image-independent equation first, so that the
        # constants of an affine chain exist when its linear block is evaluated.
        image_dependent = []
        for eqn in jaxpr.eqns:
            image_dependent.append(any(is_dep(v) for v in eqn.invars))
            for out in eqn.outvars:
                dep[out] = image_dependent[-1]
        for eqn, dependent in zip(jaxpr.eqns, image_dependent):
            if not dependent:
                write(env, eqn, bind(eqn, [value_of(v) for v in eqn.invars]))

        users = consumers(jaxpr)
        fused: set = set()
        for index, eqn in enumerate(jaxpr.eqns):
            if index in fused or not image_dependent[index]:
                continue
            name = eqn.primitive.name
            dep_mask = [is_dep(v) for v in eqn.invars]
            values = [value_of(v) for v in eqn.invars]
            in_sinks = [
                None if isinstance(v, jcore.Literal) else sink_env.get(v) for v in eqn.invars
            ]
            if name in _LINEAR and sum(dep_mask) == 1:
                tail = _layout_tail(jaxpr, index, users)
                last = tail[-1] if tail else index
                chain = _affine_chain(jaxpr, last, users, is_dep)
                fused.update(tail)
                fused.update(chain)
                out_var = jaxpr.eqns[chain[-1] if chain else last].outvars[0]
                env[out_var] = self._linear_block(
                    eqn, [jaxpr.eqns[i] for i in tail], [jaxpr.eqns[i] for i in chain], values,
                    dep_mask, in_sinks, value_of, relu_gated=_relu_gated(jaxpr, out_var, users),
                )
                continue
            if _is_relu(eqn):
                x_value = values[dep_mask.index(True)]
                write(env, eqn, [_relu(x_value, self.rules.relu)])
                continue
            if name in ALL_CALLS:
                inner, inner_consts = called_jaxpr(eqn)
                outs, out_sinks = self.run(inner, inner_consts, values, dep_mask, in_sinks)
                write(env, eqn, outs)
                for var, s in zip(eqn.outvars, out_sinks):
                    if s is not None:
                        sink_env[var] = s
                continue
            if name == "add" and all(dep_mask):
                env[eqn.outvars[0]] = _residual_add(values[0], values[1], self.rules)
                continue
            known = name in _STRUCTURAL or name in _POOLING or (
                name in _AFFINE and sum(dep_mask) == 1 and not (name == "div" and dep_mask[1])
            )
            if self.rules.strict and not known:
                raise UnsupportedPrimitiveError(
                    f"modified back-propagation has no rule for the image-dependent primitive "
                    f"'{name}' (operands {[getattr(v, 'aval', v) for v in eqn.invars]}); "
                    "supported: dot_general and conv_general_dilated with a weight operand, ReLU, "
                    "residual add, pooling, reshaping and affine operations with constants."
                )
            outs = bind(eqn, values)
            write(env, eqn, outs)
            if any(s is not None for s in in_sinks) and (name in _STRUCTURAL or name in _AFFINE):
                sink_env[eqn.outvars[0]] = _follow_sink(eqn, values, dep_mask, in_sinks, outs)

        outs = [value_of(v) for v in jaxpr.outvars]
        out_sinks = [
            None if isinstance(v, jcore.Literal) else sink_env.get(v) for v in jaxpr.outvars
        ]
        return outs, out_sinks

    def _linear_block(self, eqn, tail_eqns, chain_eqns, values, dep_mask, in_sinks, value_of,
                      relu_gated):
        kind = _LINEAR[eqn.primitive.name]
        position = dep_mask.index(True)
        u, weight = values[position], values[1 - position]
        sink = in_sinks[position]
        on_input = sink is not None
        tail = [(t.primitive, t.primitive.get_bind_params(t.params)) for t in tail_eqns]
        block_out = (tail_eqns[-1] if tail_eqns else eqn).outvars[0]
        out_aval = block_out.aval
        chain, chain_consts, carried = [], [], block_out
        for c in chain_eqns:
            dep_pos = [i for i, v in enumerate(c.invars) if v is carried][0]
            chain.append((c.primitive, c.primitive.get_bind_params(c.params), dep_pos))
            chain_consts.append([value_of(v) for i, v in enumerate(c.invars) if i != dep_pos])
            carried = c.outvars[0]

        # On XLA:CPU, strided and few-channel convolutions get faster input gradients
        # (jfail/xla/cpu_gradients.py); the rules below differentiate `lin`.
        conv = (fast_conv(eqn.params, eqn.invars[0].aval.shape, eqn.invars[1].aval.shape)
                if kind == "conv" and on_cpu() else None)

        def lin(inp, w):  # the linear primitive, then the layout operations right after it
            args = [inp, w] if position == 0 else [w, inp]
            out = conv(*args, **eqn.params) if conv is not None else eqn.primitive.bind(
                *args, **eqn.params)
            for primitive, params in tail:
                out = primitive.bind(out, **params)
            return out

        def affine(lin_out, consts):
            out = lin_out
            for (primitive, params, dep_pos), operands in zip(chain, consts):
                args = list(operands)
                args.insert(dep_pos, out)
                out = primitive.bind(*args, **params)
            return out

        weight_axes, output_axes = _unit_axes(eqn, position)
        output_axes = _follow_axes(output_axes, tail_eqns, eqn.outvars[0].aval.shape)
        if output_axes is None:
            weight_axes, output_axes = (), ()
        block = LinearBlock(kind, tuple(weight.shape), tuple(out_aval.shape), relu_gated,
                            on_input, weight_axes, output_axes)
        block_index = len(self.blocks)
        self.blocks.append(block)
        if self.collect is not None:
            lin_out = lin(u, weight)
            self.collected.append(
                self.collect(block, u, weight, lin_out, affine(lin_out, chain_consts), lin)
            )
        rule = self.rules.for_block(kind, on_input)
        if rule is None:
            return affine(lin(u, weight), chain_consts)
        if isinstance(rule, PatternRule):
            if self.patterns is None or block_index >= len(self.patterns):
                raise ValueError("PatternNet / PatternAttribution need the patterns of "
                                 "fit_patterns(model, images) for every linear block.")
            pattern = self.patterns[block_index]
            if tuple(pattern.shape) != tuple(weight.shape):
                raise ValueError(
                    f"pattern {block_index} has shape {tuple(pattern.shape)} but the block's "
                    f"weight has shape {tuple(weight.shape)}: the patterns belong to another model."
                )
            return _pattern_block(lin, affine, u, weight, chain_consts, pattern, rule)
        if not on_input:
            sink = jnp.zeros_like(u)
        return _relevance_block(lin, affine, rule, u, weight, sink, chain_consts, on_input)


# --------------------------------------------------------------------------------------------
# Rewritten operations.


def _relu(x, mode: str):
    @jax.custom_vjp
    def relu(v):
        return jnp.maximum(v, 0)

    def fwd(v):
        return jnp.maximum(v, 0), v

    def bwd(v, g):
        if mode == "guided":
            return (jnp.where((v > 0) & (g > 0), g, 0),)
        if mode == "deconv":
            return (jnp.maximum(g, 0),)
        return (jnp.where(v > 0, g, 0),)

    relu.defvjp(fwd, bwd)
    return relu(x)


def _residual_add(a, b, rules: Rules):
    if rules.residual_epsilon is None:
        return a + b

    @jax.custom_vjp
    def add(p, q):
        return p + q

    def fwd(p, q):
        return p + q, p + q

    def bwd(z, g):
        scaled = g * _ratio(z, _stabilize(z, rules.residual_epsilon))
        return scaled, scaled

    add.defvjp(fwd, bwd)
    return add(a, b)


def _relevance_block(lin, affine, rule, u, weight, sink, chain_consts, on_input):
    """Output of one linear block whose VJP applies an LRP rule (see module docstring)."""

    @jax.custom_vjp
    def block(u, weight, sink, chain_consts):
        return affine(lin(u, weight), chain_consts)

    def fwd(u, weight, sink, chain_consts):
        z = affine(lin(u, weight), chain_consts)
        return z, (u, weight, sink, chain_consts, z)

    def bwd(residuals, g):
        u, weight, sink, chain_consts, z = residuals
        relevance_in, grad_in = _rule_backward(rule, lin, affine, u, weight, chain_consts, z, g)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, (weight, chain_consts))
        if on_input:
            return jnp.zeros_like(u), zeros[0], relevance_in, zeros[1]
        return grad_in, zeros[0], jnp.zeros_like(sink), zeros[1]

    block.defvjp(fwd, bwd)
    return block(u, weight, sink, chain_consts)


def _rule_backward(rule, lin, affine, u, weight, chain_consts, z, g):
    """(relevance at u, cotangent of u) for relevance z ⊙ g at the block output."""
    relevance_out = z * g
    if isinstance(rule, Epsilon):
        _, vjp = jax.vjp(lambda v: affine(lin(v, weight), chain_consts), u)
        (grad_in,) = vjp(_ratio(relevance_out, _stabilize(z, rule.epsilon)))
        return u * grad_in, grad_in
    scale, shift = _fold_chain(affine, chain_consts, z)
    positive_w, negative_w = jnp.maximum(weight, 0), jnp.minimum(weight, 0)

    def signed_part(p, n, sign):
        """Sum of the contributions of one sign, (x_j w_jk s_k)^±, from x = p + n."""
        same = lin(p, positive_w) + lin(n, negative_w)  # x w > 0 when w s > 0 ...
        cross = lin(p, negative_w) + lin(n, positive_w)
        if sign > 0:
            return scale * jnp.where(scale > 0, same, cross)
        return scale * jnp.where(scale > 0, cross, same)

    if isinstance(rule, AlphaBeta):
        u_pos, u_neg = jnp.maximum(u, 0), jnp.minimum(u, 0)
        relevance_in = jnp.zeros_like(u)
        grad_in = jnp.zeros_like(u)
        for sign, factor in ((1, rule.alpha), (-1, -rule.beta)):
            if factor == 0:
                continue
            part = lambda p, n, s=sign: signed_part(p, n, s)  # noqa: E731
            z_part, vjp = jax.vjp(part, u_pos, u_neg)
            if rule.bias:
                z_part = z_part + (jnp.maximum(shift, 0) if sign > 0 else jnp.minimum(shift, 0))
            g_pos, g_neg = vjp(_ratio(relevance_out, z_part))
            relevance_in = relevance_in + factor * (u_pos * g_pos + u_neg * g_neg)
            grad_in = grad_in + factor * jnp.where(u > 0, g_pos, jnp.where(u < 0, g_neg, 0))
        return relevance_in, grad_in
    if isinstance(rule, Flat):
        ones_w = jnp.ones_like(weight)
        denominator, vjp = jax.vjp(lambda v: lin(v, ones_w), jnp.ones_like(u))
        (relevance_in,) = vjp(_ratio(relevance_out, denominator))
        return relevance_in, _ratio(relevance_in, u)
    if isinstance(rule, Bounded):
        low, high = jnp.full_like(u, rule.low), jnp.full_like(u, rule.high)
        full = lambda v: scale * lin(v, weight)  # noqa: E731
        positive = lambda v: signed_part(v, jnp.zeros_like(v), 1)  # noqa: E731
        negative = lambda v: signed_part(v, jnp.zeros_like(v), -1)  # noqa: E731
        z_full, vjp_full = jax.vjp(full, u)
        z_low, vjp_low = jax.vjp(positive, low)
        z_high, vjp_high = jax.vjp(negative, high)
        ratio = _ratio(relevance_out, z_full - z_low - z_high)
        relevance_in = (u * vjp_full(ratio)[0] - low * vjp_low(ratio)[0]
                        - high * vjp_high(ratio)[0])
        return relevance_in, _ratio(relevance_in, u)
    raise TypeError(f"unknown propagation rule {rule!r}")


def _pattern_block(lin, affine, u, weight, chain_consts, pattern, rule):
    """Block output whose VJP runs through A (PatternNet) or W ⊙ A (PatternAttribution)."""

    @jax.custom_vjp
    def block(u, weight, pattern, chain_consts):
        return affine(lin(u, weight), chain_consts)

    def fwd(u, weight, pattern, chain_consts):
        return affine(lin(u, weight), chain_consts), (u, weight, pattern, chain_consts)

    def bwd(residuals, g):
        u, weight, pattern, chain_consts = residuals
        backward_weight = pattern if rule.kind == "net" else weight * pattern
        _, vjp = jax.vjp(lambda v: affine(lin(v, backward_weight), chain_consts), u)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, (weight, pattern, chain_consts))
        return (vjp(g)[0], *zeros)

    block.defvjp(fwd, bwd)
    return block(u, weight, pattern, chain_consts)


def _fold_chain(affine, chain_consts, z):
    """S and T with chain(v) = S ⊙ v + T, both shaped like the block output z."""
    shift = affine(jnp.zeros_like(z), chain_consts)
    scale = affine(jnp.ones_like(z), chain_consts) - shift
    return jnp.broadcast_to(scale, z.shape), jnp.broadcast_to(shift, z.shape)


def _stabilize(z, epsilon):
    return z + epsilon * jnp.where(z >= 0, 1.0, -1.0)


def _ratio(numerator, denominator):
    safe = jnp.where(denominator == 0, 1.0, denominator)
    return jnp.where(denominator == 0, 0.0, numerator / safe)


def _follow_sink(eqn, values, dep_mask, in_sinks, outs):
    """The sink's image under a reshaping op, or the sink itself through an affine op."""
    out = outs[0] if isinstance(outs, (list, tuple)) else outs
    name = eqn.primitive.name
    if name in _AFFINE:
        sink = next(s for s, d in zip(in_sinks, dep_mask) if d and s is not None)
        return jnp.broadcast_to(sink, out.shape)
    if any(d and s is None for s, d in zip(in_sinks, dep_mask)):
        return None
    args = [s if d else v for v, s, d in zip(values, in_sinks, dep_mask)]
    result = bind(eqn, args)
    return result[0] if isinstance(result, (list, tuple)) else result


# --------------------------------------------------------------------------------------------
# Jaxpr pattern helpers.


def _affine_chain(jaxpr, start, readers, is_dep) -> list[int]:
    """Indices of the element-wise affine equations with constant operands after `start`.

    The chain may pass through reshapes that only add or drop unit axes (`vmap` of a
    per-example layer, e.g. an Equinox convolution, wraps its output in such a pair) as long as
    it ends at the block's output shape, so that every value of the chain maps element by
    element onto the block output."""
    chain: list[int] = []
    accepted = 0
    shape = tuple(jaxpr.eqns[start].outvars[0].aval.shape)
    current = jaxpr.eqns[start].outvars[0]
    while True:
        users = readers.get(current, [])
        if len(users) != 1 or users[0] < 0:
            return chain[:accepted]
        eqn = jaxpr.eqns[users[0]]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if eqn.primitive.name in _UNIT_RESHAPES:
            if len(eqn.invars) != 1 or _without_units(out_shape) != _without_units(shape):
                return chain[:accepted]
        else:
            if eqn.primitive.name not in _AFFINE:
                return chain[:accepted]
            positions = [i for i, v in enumerate(eqn.invars) if v is current]
            others = [v for i, v in enumerate(eqn.invars) if i not in positions]
            if len(positions) != 1 or any(is_dep(v) for v in others):
                return chain[:accepted]
            if eqn.primitive.name == "div" and positions[0] != 0:
                return chain[:accepted]
            if out_shape != tuple(current.aval.shape):
                return chain[:accepted]
        chain.append(users[0])
        current = eqn.outvars[0]
        if out_shape == shape:
            accepted = len(chain)


_UNIT_RESHAPES = {"reshape", "squeeze", "expand_dims"}


def _layout_tail(jaxpr, start, readers) -> list[int]:
    """Indices of the transposes and unit-axis reshapes right after the linear equation `start`
    (an Equinox layer under `vmap` transposes or wraps its output so): they are linear, so
    they become part of the block, and its bias and BatchNorm chain can follow them."""
    tail: list[int] = []
    current = jaxpr.eqns[start].outvars[0]
    while True:
        users = readers.get(current, [])
        if len(users) != 1 or users[0] < 0:
            return tail
        eqn = jaxpr.eqns[users[0]]
        if len(eqn.invars) != 1:
            return tail
        if eqn.primitive.name not in _UNIT_RESHAPES | {"transpose"}:
            return tail
        if eqn.primitive.name != "transpose" and _without_units(
                eqn.outvars[0].aval.shape) != _without_units(current.aval.shape):
            return tail
        tail.append(users[0])
        current = eqn.outvars[0]


def _follow_axes(axes, tail_eqns, shape):
    """Where the output axes `axes` of a linear primitive lie after its layout tail; None when
    a unit-sized one of them is dropped."""
    axes = list(axes)
    shape = tuple(shape)
    for eqn in tail_eqns:
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if eqn.primitive.name == "transpose":
            permutation = list(eqn.params["permutation"])
            axes = [permutation.index(a) for a in axes]
        else:
            if any(shape[a] == 1 for a in axes):
                return None
            kept_in = [i for i, d in enumerate(shape) if d != 1]
            kept_out = [i for i, d in enumerate(out_shape) if d != 1]
            axes = [kept_out[kept_in.index(a)] for a in axes]
        shape = out_shape
    return tuple(axes)


def _without_units(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def _unit_axes(eqn, position) -> tuple[tuple, tuple]:
    """(weight axes, output axes) indexing the block's output units; () when not separable."""
    if eqn.primitive.name == "conv_general_dilated":
        if position != 0:
            return (), ()
        numbers = eqn.params["dimension_numbers"]
        return (numbers.rhs_spec[0],), (numbers.out_spec[1],)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval for v in eqn.invars)
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract and d not in lhs_batch]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract and d not in rhs_batch]
    if lhs_batch:
        return (), ()
    if position == 0:  # weight on the right
        start = len(lhs_free)
        return tuple(rhs_free), tuple(range(start, start + len(rhs_free)))
    return tuple(lhs_free), tuple(range(len(lhs_free)))


def _relu_gated(jaxpr, var, readers) -> bool:
    users = readers.get(var, [])
    return bool(users) and all(i >= 0 and _is_relu(jaxpr.eqns[i]) for i in users)


def _is_relu(eqn) -> bool:
    name = eqn.primitive.name
    if name == "max" and len(eqn.invars) == 2:
        return any(isinstance(v, jcore.Literal) and np.all(np.asarray(v.val) == 0)
                   for v in eqn.invars)
    if name in ("custom_jvp_call", "jit", "pjit") and eqn.params.get("name") == "relu":
        return True
    if name in ALL_CALLS:
        inner, _ = called_jaxpr(eqn)
        return len(inner.eqns) == 1 and _is_relu(inner.eqns[0])
    return False


def _traceable(model):
    """The model's array leaves and `call(leaves, x)`: the model as a function of its weights."""
    leaves, static = split_model(model)
    dynamic = [leaf for leaf in leaves if leaf is not None]

    def call(arrays, x):
        it = iter(arrays)
        return static.rebuild([None if leaf is None else next(it) for leaf in leaves])(x)

    return dynamic, call
