"""One small network written in each model style a jfail user brings, for the test matrix.

`network(style, sizes, key=...)` builds `x -> flatten -> Dense -> ReLU -> [BatchNorm] -> Dense ->
transform` as:

- "closure": a lambda reading a module-level-style dict of weights;
- "partial": `jax.tree_util.Partial(apply, params)`;
- "nnx": a Flax NNX module;
- "equinox": an Equinox module;
- "linen_bn": a Flax linen module with BatchNorm in inference mode, through `linen_model`.

`Styled.update(factor)` changes the weights the way that style's users do (the closure's dict
entry is replaced, the NNX module's variables are assigned in place, Equinox and Partial get a new
pytree, linen new variables) and returns the callable to use next; `Styled.reference()` is a
freshly built Partial over a copy of the current weights, computing the same function, which no
cache can have seen.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jfail.models import linen_model

STYLES = ("closure", "partial", "nnx", "equinox", "linen_bn")

_BN_EPSILON = 1e-5


def reference_apply(weights: dict, x, transform: Callable | None = None):
    """The network's function on plain weights: every style must compute exactly this."""
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ weights["w1"] + weights["b1"])
    if "mean" in weights:
        h = (h - weights["mean"]) / jnp.sqrt(weights["var"] + _BN_EPSILON)
        h = h * weights["scale"] + weights["bias"]
    out = h @ weights["w2"] + weights["b2"]
    return out if transform is None else transform(out)


def random_weights(sizes: tuple[int, int, int], key, batch_norm: bool = False) -> dict:
    """Weights for `in -> hidden -> out`, with BatchNorm statistics far from the identity."""
    d_in, hidden, d_out = sizes
    keys = jax.random.split(jax.random.key(key) if isinstance(key, int) else key, 6)
    weights = {
        "w1": jax.random.normal(keys[0], (d_in, hidden)) / np.sqrt(d_in),
        "b1": 0.1 * jax.random.normal(keys[1], (hidden,)),
        "w2": jax.random.normal(keys[2], (hidden, d_out)) / np.sqrt(hidden),
        "b2": 0.1 * jax.random.normal(keys[3], (d_out,)),
    }
    if batch_norm:
        weights["mean"] = 0.2 * jax.random.normal(keys[4], (hidden,))
        weights["var"] = 0.5 + jax.random.uniform(keys[5], (hidden,))
        weights["scale"] = 1.5 * jnp.ones((hidden,))
        weights["bias"] = 0.1 * jnp.ones((hidden,))
    return weights


@dataclasses.dataclass
class Styled:
    """One network in one style: `model` is what jfail is given."""

    style: str
    model: Callable
    weights: Callable[[], dict]  # the current weights as a plain dict
    _update: Callable[[float], Callable]
    transform: Callable | None
    trainable: Callable[[], Any] | None = None  # what `fit` takes in this style
    def update(self, factor: float) -> Callable:
        """Scale both kernels by `factor` as this style's users change weights; the model to
        use next (the same object for "closure" and "nnx")."""
        self.model = self._update(factor)
        return self.model

    def reference(self) -> Callable:
        copied = jax.tree_util.tree_map(jnp.array, self.weights())
        return jax.tree_util.Partial(_reference_call(self.transform), copied)


@functools.cache
def _reference_call(transform):
    """`apply(weights, x)` for one transform; one function object per transform, so Partials
    over it share a tree structure."""
    return functools.partial(_apply_then, transform=transform)


def _apply_then(weights, x, transform):
    return reference_apply(weights, x, transform)


def network(style: str, sizes=(64, 16, 3), *, key=0, transform=None) -> Styled:
    """The network of `sizes` = (inputs, hidden, outputs) in `style` (see the module doc)."""
    builders = {
        "closure": _closure, "partial": _partial, "nnx": _nnx, "equinox": _equinox,
        "linen_bn": _linen_bn,
    }
    return builders[style](sizes, key, transform)


def _closure(sizes, key, transform):
    weights = random_weights(sizes, key)
    model = lambda x: reference_apply(weights, x, transform)  # noqa: E731 - the style itself

    def update(factor):
        weights["w1"] = weights["w1"] * factor
        weights["w2"] = weights["w2"] * factor
        return model

    def to_train():  # a closure has no weights to hand over: train its apply function
        from jfail.train import trainable

        return trainable(_reference_call(transform), dict(weights))

    return Styled("closure", model, lambda: dict(weights), update, transform, to_train)


def _partial(sizes, key, transform):
    apply = _reference_call(transform)
    state = {"model": jax.tree_util.Partial(apply, random_weights(sizes, key))}

    def update(factor):
        weights = dict(state["model"].args[0])
        weights["w1"], weights["w2"] = weights["w1"] * factor, weights["w2"] * factor
        state["model"] = jax.tree_util.Partial(apply, weights)
        return state["model"]

    def to_train():
        from jfail.train import trainable

        return trainable(apply, dict(state["model"].args[0]))

    return Styled("partial", state["model"], lambda: dict(state["model"].args[0]), update,
                  transform, to_train)


class _NNXNet(nnx.Module):
    def __init__(self, weights, transform):
        d_in, hidden = weights["w1"].shape
        d_out = weights["w2"].shape[1]
        self.l1 = nnx.Linear(d_in, hidden, rngs=nnx.Rngs(0))
        self.l2 = nnx.Linear(hidden, d_out, rngs=nnx.Rngs(1))
        self.l1.kernel[...], self.l1.bias[...] = weights["w1"], weights["b1"]
        self.l2.kernel[...], self.l2.bias[...] = weights["w2"], weights["b2"]
        self.transform = transform

    def __call__(self, x):
        out = self.l2(jax.nn.relu(self.l1(x.reshape(x.shape[0], -1))))
        return out if self.transform is None else self.transform(out)


def _nnx(sizes, key, transform):
    module = _NNXNet(random_weights(sizes, key), transform)

    def update(factor):
        module.l1.kernel[...] = module.l1.kernel[...] * factor
        module.l2.kernel[...] = module.l2.kernel[...] * factor
        return module

    def weights():
        return {"w1": module.l1.kernel[...], "b1": module.l1.bias[...],
                "w2": module.l2.kernel[...], "b2": module.l2.bias[...]}

    return Styled("nnx", module, weights, update, transform, lambda: module)


class _EqxNet(eqx.Module):
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    transform: Any = eqx.field(static=True)

    def __call__(self, x):
        out = jax.nn.relu(x.reshape(x.shape[0], -1) @ self.w1 + self.b1) @ self.w2 + self.b2
        return out if self.transform is None else self.transform(out)


def _equinox(sizes, key, transform):
    state = {"model": _EqxNet(**random_weights(sizes, key), transform=transform)}

    def update(factor):
        m = state["model"]
        state["model"] = eqx.tree_at(lambda n: (n.w1, n.w2), m, (m.w1 * factor, m.w2 * factor))
        return state["model"]

    def weights():
        m = state["model"]
        return {"w1": m.w1, "b1": m.b1, "w2": m.w2, "b2": m.b2}

    return Styled("equinox", state["model"], weights, update, transform, lambda: state["model"])


class _LinenNet(nn.Module):
    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, x, train: bool):
        h = jax.nn.relu(nn.Dense(self.hidden, name="l1")(x.reshape(x.shape[0], -1)))
        h = nn.BatchNorm(use_running_average=not train, epsilon=_BN_EPSILON, name="bn")(h)
        return nn.Dense(self.outputs, name="l2")(h)


def _linen_bn(sizes, key, transform):
    weights = random_weights(sizes, key, batch_norm=True)
    net = _LinenNet(sizes[1], sizes[2])

    def variables_of(w):
        return {
            "params": {"l1": {"kernel": w["w1"], "bias": w["b1"]},
                       "l2": {"kernel": w["w2"], "bias": w["b2"]},
                       "bn": {"scale": w["scale"], "bias": w["bias"]}},
            "batch_stats": {"bn": {"mean": w["mean"], "var": w["var"]}},
        }

    def build(w):
        logits = linen_model(net, variables_of(w))
        if transform is None:
            return logits
        return jax.tree_util.Partial(functools.partial(_then, transform=transform), logits)

    state = {"weights": weights}

    def update(factor):
        w = dict(state["weights"])
        w["w1"], w["w2"] = w["w1"] * factor, w["w2"] * factor
        state["weights"] = w
        return build(w)

    def to_train():
        from jfail.models import linen_apply
        from jfail.train import trainable

        variables = variables_of(state["weights"])
        return trainable(linen_apply(net), variables["params"],
                         {"batch_stats": variables["batch_stats"]})

    return Styled("linen_bn", build(weights), lambda: dict(state["weights"]), update, transform,
                  to_train)


def _then(model, x, transform):
    return transform(model(x))
