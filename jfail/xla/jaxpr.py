"""Re-evaluating a jaxpr equation by equation with some primitives rewritten.

JAX traces a function to a jaxpr; binding its equations' primitives again, in order, computes
the same values, and binding something else in place of an equation changes how that one
equation is computed (its value, or its derivative through a `custom_vjp`). Two parts of jfail do
this: the XLA:CPU rewrites (`jfail.xla.cpu_gradients`) replace slow convolutions and products,
and modified back-propagation (`jfail.attribution._jaxpr`) replaces ReLUs and linear blocks.
This module is what they share:

- an environment from jaxpr variables to values (`read`, `write`) and the plain evaluation of
  one equation (`bind`);
- call-like primitives (`pjit`, `closed_call`, `remat`, `custom_jvp_call`, `custom_vjp_call`):
  which parameter holds the called jaxpr (`CALLS`, `CUSTOM_DERIVATIVE_CALLS`) and that jaxpr
  with its constants (`called_jaxpr`);
- `evaluate`, the interpreter itself, driven by a table of rules (primitive name -> a function
  of the equation that returns its replacement, or None to keep it), descending into calls
  whose body holds an equation to rewrite and binding every other call as it is (so jit
  boundaries and custom derivatives of untouched code stay JAX's);
- `consumers`, which equations read each variable, for rewrites that look ahead.

`evaluate` is the whole interpreter of the CPU rewrites. Modified back-propagation walks the
jaxpr itself, because it evaluates the equations that do not depend on the image before those
that do and fuses a linear equation with the affine ones after it; it uses the environment,
the call tables and `called_jaxpr` from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jax.extend import core as jcore

__all__ = [
    "CALLS",
    "CUSTOM_DERIVATIVE_CALLS",
    "ALL_CALLS",
    "Rules",
    "evaluate",
    "rewrites",
    "rule_for",
    "called_jaxpr",
    "read",
    "write",
    "bind",
    "consumers",
]

# Call-like primitive -> the parameter that holds the jaxpr it calls.
CALLS = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "remat2": "jaxpr", "checkpoint": "jaxpr",
}
# Calls with a derivative of their own (`jax.custom_jvp`, `jax.custom_vjp`, e.g. `jax.nn.relu`):
# evaluating their body instead drops that derivative.
CUSTOM_DERIVATIVE_CALLS = {
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
ALL_CALLS = {**CALLS, **CUSTOM_DERIVATIVE_CALLS}

# Primitive name -> `pick(eqn)`: the function to bind in place of that equation (called like the
# primitive, `replacement(*operands, **eqn.params)`), or None to keep the equation.
Rules = Mapping[str, Callable[[Any], "Callable | None"]]


def evaluate(jaxpr, consts: Sequence, args: Sequence, rules: Rules,
             calls: Mapping[str, str] = CALLS) -> list:
    """The outputs of `jaxpr` on `args`, with the equations `rules` picks replaced.

    Args:
        jaxpr: an open jaxpr (`ClosedJaxpr.jaxpr`).
        consts: values of its `constvars` (`ClosedJaxpr.consts`).
        args: values of its `invars`, in order (arrays or tracers).
        rules: primitive name -> `pick(eqn)`, which returns the replacement bound instead of the
            equation (`replacement(*operands, **eqn.params)`) or None to keep it.
        calls: call-like primitives (name -> parameter holding the called jaxpr) to descend into
            when their body has an equation `rules` replaces; others are bound whole. The
            default leaves custom-derivative calls (`CUSTOM_DERIVATIVE_CALLS`) as they are.

    Returns:
        The values of `jaxpr.outvars`, a list.
    """
    env: dict = {}
    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        values = [read(env, v) for v in eqn.invars]
        replacement = rule_for(rules, eqn)
        if replacement is not None:
            outs = replacement(*values, **eqn.params)
        elif eqn.primitive.name in calls and rewrites(eqn.params[calls[eqn.primitive.name]],
                                                      rules, calls):
            inner, inner_consts = called_jaxpr(eqn, calls)
            outs = evaluate(inner, inner_consts, values, rules, calls)
        else:
            outs = bind(eqn, values)
        write(env, eqn, outs)
    return [read(env, v) for v in jaxpr.outvars]


def rewrites(jaxpr, rules: Rules, calls: Mapping[str, str] = CALLS) -> bool:
    """Whether `evaluate` would replace an equation of `jaxpr` (open or closed), at any depth of
    `calls`.

    Args:
        jaxpr: a `Jaxpr` or `ClosedJaxpr`.
        rules, calls: as for `evaluate`.

    Returns:
        True if some equation, or an equation of a call in `calls` inside it, gets a rule.
    """
    jaxpr = jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr
    for eqn in jaxpr.eqns:
        if rule_for(rules, eqn) is not None:
            return True
        name = eqn.primitive.name
        if name in calls and rewrites(eqn.params[calls[name]], rules, calls):
            return True
    return False


def rule_for(rules: Rules, eqn) -> Callable | None:
    """The replacement `rules` picks for `eqn`, or None (no rule for its primitive, or the rule
    keeps it).

    Args:
        rules: as for `evaluate`.
        eqn: a jaxpr equation.

    Returns:
        A function called like the primitive, or None.
    """
    pick = rules.get(eqn.primitive.name)
    return None if pick is None else pick(eqn)


def called_jaxpr(eqn, calls: Mapping[str, str] = ALL_CALLS) -> tuple:
    """The jaxpr a call-like equation calls, with its constants.

    Args:
        eqn: an equation whose primitive is in `calls`.
        calls: call-like primitive name -> the parameter holding the called jaxpr.

    Returns:
        `(jaxpr, consts)`: the open jaxpr and the values of its `constvars` (`()` when the
        parameter holds an open jaxpr).

    Raises:
        KeyError: if `eqn`'s primitive is not in `calls`.
    """
    closed = eqn.params[calls[eqn.primitive.name]]
    return (closed.jaxpr, closed.consts) if hasattr(closed, "jaxpr") else (closed, ())


def read(env: dict, atom):
    """The value of a jaxpr atom: a literal's own value, a variable's from `env`.

    Args:
        env: jaxpr variable -> value.
        atom: a `Literal` or a variable written to `env` before.

    Returns:
        The value.

    Raises:
        KeyError: if `atom` is a variable not in `env`.
    """
    return atom.val if isinstance(atom, jcore.Literal) else env[atom]


def write(env: dict, eqn, outs) -> None:
    """Records the outputs of `eqn` in `env` (dropped outputs, `_`, are skipped).

    Args:
        env: jaxpr variable -> value, updated in place.
        eqn: the equation evaluated.
        outs: its outputs: a list for a primitive with multiple results, else one value (or a
            list holding it).
    """
    if not eqn.primitive.multiple_results and not isinstance(outs, (list, tuple)):
        outs = [outs]
    for var, value in zip(eqn.outvars, outs):
        if not isinstance(var, jcore.DropVar):
            env[var] = value


def bind(eqn, values: Sequence):
    """The equation's own primitive applied to `values`, as JAX would evaluate it.

    Args:
        eqn: a jaxpr equation.
        values: its operands, in order.

    Returns:
        The primitive's output: a list for a primitive with multiple results, else one value.
    """
    return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))


def consumers(jaxpr) -> dict:
    """Which equations read each variable of `jaxpr`.

    Args:
        jaxpr: an open jaxpr.

    Returns:
        variable -> list of the indices of the equations that take it as an operand, in order,
        with -1 appended where it is an output of `jaxpr`.
    """
    users: dict = {}
    for index, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if not isinstance(var, jcore.Literal):
                users.setdefault(var, []).append(index)
    for var in jaxpr.outvars:
        if not isinstance(var, jcore.Literal):
            users.setdefault(var, []).append(-1)
    return users
