"""Turn trained models into the callables jfail's algorithms take.

Algorithms receive `model(x) -> logits`, `features(x) -> [B, D]`, `feature_map(x) -> [B, h, w, C]`
and `decoder(z) -> x` as `jax.tree_util.Partial` objects: the weights are the Partial's pytree
children, so a jitted function that takes the callable as an argument traces the weights instead
of baking them in as constants, and new weights of the same shapes reuse the compiled program.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

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
    "linen_model",
    "stateless_apply",
]

# Keyword arguments that put a linen module in inference mode, when its __call__ has them.
_INFERENCE_KWARGS = {"train": False, "training": False, "is_training": False,
                     "deterministic": True, "use_running_average": True}


class ModelFns(NamedTuple):
    """The inference callables of one classifier, each `[B, H, W, C] -> ...`."""

    logits: jax.tree_util.Partial
    features: jax.tree_util.Partial
    feature_map: jax.tree_util.Partial


def as_callable(apply_fn: Callable, params: Any) -> jax.tree_util.Partial:
    """`apply_fn(params, x)` -> a pytree callable `model(x)` holding `params` as its leaves.

    Args:
      apply_fn: `apply_fn(params, x) -> output`, hashable (it is the Partial's static part).
      params: any pytree of arrays.

    Returns:
      `model(x) = apply_fn(params, x)`, a `jax.tree_util.Partial`.
    """
    return jax.tree_util.Partial(apply_fn, params)


def model_fns(module: nn.Module, variables: Any) -> ModelFns:
    """Inference callables for a jfail classifier (`DefuseCNN`, `ResNet`) in eval mode.

    Args:
      module: a jfail classifier whose `__call__(x, train, output)` takes an `output` tap.
      variables: its variables (`{"params": ..., "batch_stats": ...}`).

    Returns:
      `ModelFns(logits, features, feature_map)`: `[B, K]`, `[B, D]` and `[B, h, w, C]`
      callables of images `[B, H, W, C]`.
    """
    return ModelFns(
        *(as_callable(LinenOutput(module, tap), variables) for tap in ModelFns._fields)
    )


def linen_model(
    module: nn.Module, variables: Any, *, output: str | None = None, **call_kwargs
) -> jax.tree_util.Partial:
    """Any Flax linen module as a jfail model callable, in inference mode.

    Args:
      module: a linen module whose `__call__(x, ...)` returns logits.
      variables: its variables, e.g. `{"params": ..., "batch_stats": ...}`; they become the
        callable's pytree leaves, traced under `jit`.
      output: None for the module's output; or the path of a submodule, names joined by "/" as
        in the params tree (e.g. "Dense_0" or "backbone/conv3"), whose `__call__` output is
        returned instead (features `[B, D]` or a feature map `[B, h, w, C]`), read through
        `capture_intermediates`: no change to the module is needed.
      **call_kwargs: passed to `__call__`. Arguments it has and that are not given are set for
        inference: `train`, `training`, `is_training` to False and `deterministic`,
        `use_running_average` to True.

    Returns:
      `model(x) -> [B, K]` (or the submodule's output), a `jax.tree_util.Partial`.

    Raises:
      ValueError: `output` names no submodule of `module`.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         h = nn.relu(nn.Dense(8)(x.reshape(len(x), -1)))
      ...         return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(h))
      >>> net = Net()
      >>> variables = net.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), train=False)
      >>> linen_model(net, variables)(jnp.zeros((2, 4, 4, 1))).shape
      (2, 3)
      >>> linen_model(net, variables, output="Dense_0")(jnp.zeros((2, 4, 4, 1))).shape
      (2, 8)
    """
    signature = inspect.signature(type(module).__call__)
    kwargs = {
        name: value for name, value in _INFERENCE_KWARGS.items()
        if name in signature.parameters and name not in call_kwargs
    }
    kwargs.update(call_kwargs)
    if output is not None:
        names = tuple(part for part in output.split("/") if part)
        if not _has_submodule(variables, names):
            raise ValueError(
                f"output={output!r} names no submodule of {type(module).__name__}; its "
                f"submodules with weights are {sorted(_submodule_paths(variables))}."
            )
        return as_callable(_LinenIntermediate(module, names, tuple(sorted(kwargs.items()))),
                           variables)
    return as_callable(_LinenCall(module, tuple(sorted(kwargs.items()))), variables)


def logits_fn(module: nn.Module, variables: Any) -> jax.tree_util.Partial:
    """`model(x) -> logits` for any Flax linen module whose `__call__(x)` returns logits; a
    `train`-style argument is set for inference (see `linen_model`).

    Args:
      module: a linen module returning logits.
      variables: its variables.

    Returns:
      `model(x: [B, H, W, C]) -> [B, K]`, a `jax.tree_util.Partial`.
    """
    return linen_model(module, variables)


def decoder_fn(vae: nn.Module, variables: Any) -> jax.tree_util.Partial:
    """`decoder(z: [B, Z]) -> images [B, H, W, C]` in [0, 1] (sigmoid of the Bernoulli logits).

    Args:
      vae: a linen VAE with a `decode(z)` method returning Bernoulli logits.
      variables: its variables.

    Returns:
      The decoder, a `jax.tree_util.Partial`.
    """
    return as_callable(_LinenMethod(vae, "decode", sigmoid=True), variables)


def encoder_fn(vae: nn.Module, variables: Any) -> jax.tree_util.Partial:
    """`encoder(x: [B, H, W, C]) -> (mu [B, Z], logvar [B, Z])`.

    Args:
      vae: a linen VAE with an `encode(x)` method.
      variables: its variables.

    Returns:
      The encoder, a `jax.tree_util.Partial`.
    """
    return as_callable(_LinenMethod(vae, "encode"), variables)


def linen_apply(module: nn.Module) -> Callable:
    """The training-side signature jfail uses:
    `apply_fn(params, state, x, train) -> (logits, state)`.

    `state` holds the non-trainable collections (e.g. `{'batch_stats': ...}` for BatchNorm); it is
    updated only when `train` is true.

    Args:
      module: a linen module whose `__call__(x, train)` returns logits.

    Returns:
      `apply_fn(params, state, x, train) -> (logits, state)`.
    """

    def apply_fn(params, state, x, train):
        variables = {"params": params, **state}
        if train and state:
            logits, updates = module.apply(variables, x, train=True, mutable=list(state))
            return logits, {**state, **updates}
        return module.apply(variables, x, train=train), state

    return apply_fn


def stateless_apply(fn: Callable) -> Callable:
    """Adapt `fn(params, x) -> logits` to `apply_fn(params, state, x, train) -> (logits, state)`.

    Args:
      fn: `fn(params, x) -> logits`, a model with no state and no train mode.

    Returns:
      `apply_fn(params, state, x, train) -> (logits, state)`, `state` passed through unchanged
      and `train` ignored.
    """

    def apply_fn(params, state, x, train):
        del train
        return fn(params, x), state

    return apply_fn


@dataclasses.dataclass(frozen=True)
class LinenOutput:
    """One tap (`output`: `logits`, `features` or `feature_map`) of a jfail linen classifier in
    inference mode, as the `apply(variables, x)` function `as_callable` takes."""

    module: nn.Module
    output: str

    def __call__(self, variables, x):
        return self.module.apply(variables, x, train=False, output=self.output)


@dataclasses.dataclass(frozen=True)
class _LinenCall:
    module: nn.Module
    kwargs: tuple

    def __call__(self, variables, x):
        return self.module.apply(variables, x, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class _LinenIntermediate:
    module: nn.Module
    path: tuple
    kwargs: tuple

    def __call__(self, variables, x):
        def wanted(submodule, method_name):
            return method_name == "__call__" and tuple(submodule.path) == self.path

        _, state = self.module.apply(
            variables, x, capture_intermediates=wanted, mutable=["intermediates"],
            **dict(self.kwargs),
        )
        node = state["intermediates"]
        for name in self.path:
            node = node[name]
        return node["__call__"][0]


def _submodule_paths(variables) -> set[tuple[str, ...]]:
    paths = set()
    for collection in variables.values():
        for path, _ in jax.tree_util.tree_flatten_with_path(collection)[0]:
            keys = tuple(getattr(k, "key", str(k)) for k in path)
            paths.update("/".join(keys[:i]) for i in range(1, len(keys)))
    return paths


def _has_submodule(variables, names: tuple) -> bool:
    return "/".join(names) in _submodule_paths(variables)


@dataclasses.dataclass(frozen=True)
class _LinenMethod:
    module: nn.Module
    method: str
    sigmoid: bool = False

    def __call__(self, variables, x):
        out = self.module.apply(variables, x, method=getattr(type(self.module), self.method))
        return jax.nn.sigmoid(out) if self.sigmoid else out
