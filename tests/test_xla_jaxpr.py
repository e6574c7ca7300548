"""jfail.xla.jaxpr.evaluate: a jaxpr re-evaluated with a table of rules, through calls."""

import jax
import jax.numpy as jnp
import numpy as np

from jfail.xla import jaxpr as interpreter

# `sin` evaluated as `cos`: a rewrite whose effect shows in the value.
SIN_AS_COS = {"sin": lambda eqn: (lambda x, **params: jax.lax.cos(x))}


@jax.custom_jvp
def _custom_sin(x):
    return jax.lax.sin(x)


_custom_sin.defjvp(lambda primals, tangents: (_custom_sin(primals[0]), tangents[0]))


def _run(fn, rules, calls=interpreter.CALLS, x=None):
    x = jnp.linspace(-1.0, 2.0, 5) if x is None else x
    closed = jax.make_jaxpr(fn)(x)
    return interpreter.evaluate(closed.jaxpr, closed.consts, [x], rules, calls), x


def test_without_rules_the_values_are_the_functions_own():
    def f(x):  # a nested jit, a multiple-result primitive with an unused output, a literal
        _, index = jax.lax.top_k(x, 2)
        return jax.jit(lambda v: v * 2.0 + 1.0)(x), index

    (doubled, index), x = _run(f, {})
    np.testing.assert_array_equal(doubled, x * 2.0 + 1.0)
    np.testing.assert_array_equal(index, [4, 3])


def test_rules_apply_inside_calls_but_not_inside_custom_derivatives_unless_asked():
    (inside_jit,), x = _run(jax.jit(jax.lax.sin), SIN_AS_COS)
    np.testing.assert_allclose(inside_jit, np.cos(x))
    (custom_kept,), _ = _run(_custom_sin, SIN_AS_COS)
    np.testing.assert_allclose(custom_kept, np.sin(x))
    (custom_entered,), _ = _run(_custom_sin, SIN_AS_COS, interpreter.ALL_CALLS)
    np.testing.assert_allclose(custom_entered, np.cos(x))


def test_calls_without_a_rewritten_equation_stay_whole():
    def f(x):
        return jax.jit(jax.lax.tanh)(x) + jax.lax.sin(x)

    closed = jax.make_jaxpr(f)(jnp.ones(3))
    rewritten = jax.make_jaxpr(
        lambda x: interpreter.evaluate(closed.jaxpr, closed.consts, [x], SIN_AS_COS))(jnp.ones(3))
    names = {eqn.primitive.name for eqn in rewritten.jaxpr.eqns}
    assert names & {"jit", "pjit"} and "sin" not in names and "cos" in names
    assert interpreter.rewrites(closed, SIN_AS_COS)
    assert not interpreter.rewrites(closed, {"sin": lambda eqn: None})
