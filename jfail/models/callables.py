"""Turn trained models into the callables jfail's algorithms take.

Algorithms receive `model(x) -> logits`, `features(x) -> [B, D]`, `feature_map(x) -> [B, h, w, C]`
and `decoder(z) -> x` as `jax.tree_util.Partial` objects: the weights are the Partial's pytree
children, so a jitted function that takes the callable as an argument traces the weights instead
of baking them in as constants, and new weights of the same shapes reuse the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax

__all__ = [
    "ModelFns",
    "as_callable",
    "model_fns",
    "logits_fn",
    "decoder_fn",
    "encoder_fn",
    "linen_apply",
    "stateless_apply",
]


class ModelFns(NamedTuple):
    """The inference callables of one classifier, each `[B, H, W, C] -> ...`."""

    logits: jax.tree_util.Partial
    features: jax.tree_util.Partial
    feature_map: jax.tree_util.Partial


def as_callable(apply_fn: Callable, params: Any) -> jax.tree_util.Partial:
    """`apply_fn(params, x)` -> a pytree callable `model(x)` holding `params` as its leaves."""
    return jax.tree_util.Partial(apply_fn, params)


def model_fns(module: nn.Module, variables: Any) -> ModelFns:
    """Inference callables for a jfail classifier (`DefuseCNN`, `ResNet`) in eval mode."""
    return ModelFns(
        *(as_callable(_LinenOutput(module, tap), variables) for tap in ModelFns._fields)
    )


def logits_fn(module: nn.Module, variables: Any) -> jax.tree_util.Partial:
    """`model(x) -> logits` for any Flax linen module whose `__call__(x)` returns logits."""
    return as_callable(_LinenMethod(module, "__call__"), variables)


def decoder_fn(vae: nn.Module, variables: Any) -> jax.tree_util.Partial:
    """`decoder(z: [B, Z]) -> images [B, H, W, C]` in [0, 1] (sigmoid of the Bernoulli logits)."""
    return as_callable(_LinenMethod(vae, "decode", sigmoid=True), variables)


def encoder_fn(vae: nn.Module, variables: Any) -> jax.tree_util.Partial:
    """`encoder(x: [B, H, W, C]) -> (mu [B, Z], logvar [B, Z])`."""
    return as_callable(_LinenMethod(vae, "encode"), variables)


def linen_apply(module: nn.Module) -> Callable:
    """The training-side signature jfail uses: `apply_fn(params, state, x, train) -> (logits, state)`.

    `state` holds the non-trainable collections (e.g. `{'batch_stats': ...}` for BatchNorm); it is
    updated only when `train` is true.
    """

    def apply_fn(params, state, x, train):
        variables = {"params": params, **state}
        if train and state:
            logits, updates = module.apply(variables, x, train=True, mutable=list(state))
            return logits, {**state, **updates}
        return module.apply(variables, x, train=train), state

    return apply_fn


def stateless_apply(fn: Callable) -> Callable:
    """Adapt `fn(params, x) -> logits` to `apply_fn(params, state, x, train) -> (logits, state)`."""

    def apply_fn(params, state, x, train):
        del train
        return fn(params, x), state

    return apply_fn


@dataclasses.dataclass(frozen=True)
class _LinenOutput:
    module: nn.Module
    output: str

    def __call__(self, variables, x):
        return self.module.apply(variables, x, train=False, output=self.output)


@dataclasses.dataclass(frozen=True)
class _LinenMethod:
    module: nn.Module
    method: str
    sigmoid: bool = False

    def __call__(self, variables, x):
        out = self.module.apply(variables, x, method=getattr(type(self.module), self.method))
        return jax.nn.sigmoid(out) if self.sigmoid else out
