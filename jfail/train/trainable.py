"""One training-side view of every model style: `trainable(model)` -> `TrainableModel`.

Training needs to tell a model's trainable weights from the rest of its state and to run it in
training or evaluation mode. `trainable` finds both for each style jfail accepts:

- a Flax NNX module: split with `nnx.split(module, nnx.Param, ...)`; the `nnx.Param`s are
  trained, every other variable (BatchNorm statistics, RNG counters) is state, updated by the
  forward pass in training mode (`module.train()`) and read in evaluation mode (`module.eval()`);
- an Equinox module, or any other callable pytree (`jax.tree_util.Partial(apply, params)`,
  `jfail.models.as_model(eqx_module, per_example=True, channels_first=True)`): its
  `eqx.is_inexact_array` leaves are trained (`eqx.partition` / `eqx.combine`), the rest is
  kept as it is; it is called as it is in both modes, on a batch `[B, H, W, C]`;
- `apply(params, x) -> logits` with its `params` (stateless): `trainable(apply, params)`;
- jfail's `apply_fn(params, state, x, train) -> (logits, state)` with `params` and `state`
  (Flax linen through `jfail.models.linen_apply`): `trainable(apply_fn, params, state)`.

A Flax linen module trains through `trainable(jfail.models.linen_apply(module), params, state)`
(a `Partial` over `module.apply` would train every floating-point variable, BatchNorm statistics
included, and never run in training mode).

`fit`, `evaluate`, `predict`, `errors`, `robust_accuracy` and `jfail.defuse.correct` all take a
model through this one function; `TrainableModel.model` gives the trained weights back in the
caller's style (a new NNX or Equinox module, or the `TrainableModel` itself, a callable
`model(x) -> logits` in evaluation mode).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TrainableModel", "trainable"]

_NO_STATE = object()


@jax.tree_util.register_pytree_node_class
class TrainableModel:
    """A model as training sees it: `apply(params, state, x, train) -> (logits, new_state)`.

    Attributes:
      apply: the forward pass; `train` selects training mode (BatchNorm batch statistics,
        which then come back updated in `new_state`). Hashable, so it can be a static argument.
      params: the trainable weights (a pytree the optimizer updates).
      state: the non-trainable rest (a pytree, possibly `{}` or `None`).

    A `TrainableModel` is a pytree (children `params`, `state`) and a callable:
    `model(x: [B, H, W, C]) -> logits [B, K]` in evaluation mode.
    """

    def __init__(self, apply: Callable, params: Any, state: Any, rebuild: Callable | None = None):
        self.apply = apply
        self.params = params
        self.state = state
        self._rebuild = rebuild

    def __call__(self, x):
        return self.apply(self.params, self.state, x, False)[0]

    def replace(self, params: Any = None, state: Any = _NO_STATE) -> TrainableModel:
        """The same model with other weights (`None`/omitted: keep this one's).

        Args:
          params: the new trainable weights, or None to keep these.
          state: the new non-trainable state (omit to keep this one; None is a state).

        Returns:
          A new `TrainableModel` with the same `apply`.
        """
        return TrainableModel(
            self.apply,
            self.params if params is None else params,
            self.state if state is _NO_STATE else state,
            self._rebuild,
        )

    def rebuild(self, params: Any, state: Any) -> Any:
        """The model in its caller's style with weights `(params, state)`.

        Args:
          params: the trainable weights.
          state: the non-trainable state.

        Returns:
          A new NNX or Equinox module for those styles, else a `TrainableModel`.
        """
        if self._rebuild is None:
            return self.replace(params, state)
        return self._rebuild(params, state)

    @property
    def model(self) -> Any:
        """This model in its caller's style: an NNX or Equinox module, else `self`.

        Returns:
          A new module with these weights, or an equal `TrainableModel`.
        """
        return self.rebuild(self.params, self.state)

    def tree_flatten(self):
        """JAX pytree protocol: the children `(params, state)` and the static rest.

        Returns:
          `((params, state), (apply, rebuild))`.
        """
        return (self.params, self.state), (self.apply, self._rebuild)

    @classmethod
    def tree_unflatten(cls, aux, children):
        """JAX pytree protocol: the inverse of `tree_flatten`.

        Args:
          aux: `(apply, rebuild)`.
          children: `(params, state)`.

        Returns:
          The `TrainableModel`.
        """
        return cls(aux[0], children[0], children[1], aux[1])

    def __repr__(self):
        return f"TrainableModel(apply={self.apply!r})"


def trainable(model: Any, params: Any = None, state: Any = _NO_STATE) -> TrainableModel:
    """The training view of `model`.

    Args:
      model: a Flax NNX module; an Equinox module or other callable pytree whose `__call__`
        takes a batch `[B, H, W, C]`; `apply(params, x) -> logits` (with `params`); or
        `apply_fn(params, state, x, train) -> (logits, state)` (with `params` and `state`); or
        a `TrainableModel` (returned as it is).
      params: the trainable weights of a function `model`.
      state: the non-trainable state of an `apply_fn(params, state, x, train)` model; give it
        (even `{}`) to select that convention, omit it for `apply(params, x)`.

    Returns:
      A `TrainableModel`.

    Raises:
      TypeError: `model` is not callable, or is a function without `params` (a closure's
        weights cannot be trained), or a pytree without floating-point leaves.
    """
    if isinstance(model, TrainableModel):
        if params is not None:
            raise TypeError("params are given twice: the TrainableModel holds its own")
        return model
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if params is not None:
        if state is _NO_STATE:
            return TrainableModel(_Stateless(model), params, None)
        return TrainableModel(model, params, state)
    if state is not _NO_STATE:
        raise TypeError("state was given without params: pass trainable(apply_fn, params, state)")
    nnx = _nnx_module_type()
    if nnx is not None and isinstance(model, nnx):
        return _from_nnx(model)
    return _from_pytree(model)


def is_trainable_style(model: Any) -> bool:
    """Whether `trainable(model)` needs no `params`: a `TrainableModel`, an NNX module, or a
    callable pytree holding floating-point arrays.

    Args:
      model: anything.

    Returns:
      True for those styles; False for plain functions and pytrees without float arrays.
    """
    if isinstance(model, TrainableModel):
        return True
    nnx = _nnx_module_type()
    if nnx is not None and isinstance(model, nnx):
        return True
    if isinstance(model, _FUNCTION_TYPES):
        return False
    return any(_is_inexact_array(leaf) for leaf in jax.tree_util.tree_leaves(model))


# --------------------------------------------------------------------------------------------
# Styles.


@dataclasses.dataclass(frozen=True)
class _Stateless:
    """`apply(params, x) -> logits` as `apply_fn(params, state, x, train) -> (logits, state)`."""

    fn: Callable

    def __call__(self, params, state, x, train):
        del train
        return self.fn(params, x), state


def _from_nnx(module) -> TrainableModel:
    from flax import nnx

    graphdef, params, state = nnx.split(module, nnx.Param, ...)
    return TrainableModel(_NnxApply(graphdef), params, state, _NnxRebuild(graphdef))


@dataclasses.dataclass(frozen=True)
class _NnxApply:
    graphdef: Any

    def __call__(self, params, state, x, train):
        from flax import nnx

        module = nnx.merge(self.graphdef, params, state)
        module.train() if train else module.eval()
        logits = module(x)
        if not train:
            return logits, state
        _, _, new_state = nnx.split(module, nnx.Param, ...)
        return logits, new_state


@dataclasses.dataclass(frozen=True)
class _NnxRebuild:
    graphdef: Any

    def __call__(self, params, state):
        from flax import nnx

        return nnx.merge(self.graphdef, params, state)


def _from_pytree(model) -> TrainableModel:
    leaves, treedef = jax.tree_util.tree_flatten(model)
    mask = [_is_inexact_array(leaf) for leaf in leaves]
    # a jax Partial is a functools.partial too, but a pytree whose arguments are its leaves
    function = isinstance(model, _FUNCTION_TYPES) and not isinstance(model, jax.tree_util.Partial)
    if function or not any(mask):
        name = getattr(model, "__name__", type(model).__name__)
        raise TypeError(
            f"cannot find the trainable weights of {name}: it holds no floating-point arrays "
            "as pytree leaves. Pass them explicitly: "
            "trainable(apply, params) for apply(params, x) -> logits, or "
            "trainable(apply_fn, params, state) for apply_fn(params, state, x, train)."
        )
    try:
        import equinox as eqx

        params, static = eqx.partition(model, eqx.is_inexact_array)
    except ImportError:  # the same split without Equinox: arrays in, None elsewhere
        params = jax.tree_util.tree_unflatten(
            treedef, [leaf if m else None for leaf, m in zip(leaves, mask)]
        )
        static = jax.tree_util.tree_unflatten(
            treedef, [None if m else leaf for leaf, m in zip(leaves, mask)]
        )
    static_leaves, static_def = jax.tree_util.tree_flatten(static)
    combine = _Combine(static_def, tuple(static_leaves))
    return TrainableModel(_PytreeApply(combine), params, None, _PytreeRebuild(combine))


@dataclasses.dataclass(frozen=True, eq=False)
class _Combine:
    """The non-trainable part of a pytree model (structure and leaves), hashable by value where
    its leaves are, so equal models share compiled programs."""

    treedef: Any
    leaves: tuple

    def __call__(self, params):
        static = jax.tree_util.tree_unflatten(self.treedef, self.leaves)
        p_leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda v: v is None)
        s_leaves = jax.tree_util.tree_leaves(static, is_leaf=lambda v: v is None)
        treedef = jax.tree_util.tree_structure(params, is_leaf=lambda v: v is None)
        merged = [p if p is not None else s for p, s in zip(p_leaves, s_leaves)]
        return jax.tree_util.tree_unflatten(treedef, merged)

    def _key(self):
        return (self.treedef, tuple(_hashable(leaf) for leaf in self.leaves))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Combine) and self._key() == other._key()


@dataclasses.dataclass(frozen=True)
class _PytreeApply:
    combine: _Combine

    def __call__(self, params, state, x, train):
        del train
        return self.combine(params)(x), state


@dataclasses.dataclass(frozen=True)
class _PytreeRebuild:
    combine: _Combine

    def __call__(self, params, state):
        del state
        return self.combine(params)


# --------------------------------------------------------------------------------------------
# Helpers.

_FUNCTION_TYPES = (types.FunctionType, types.MethodType, functools.partial)


def _is_inexact_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def _hashable(leaf):
    if isinstance(leaf, (jax.Array, np.ndarray)):  # a non-trainable array: by identity
        return ("array", id(leaf))
    try:
        hash(leaf)
    except TypeError:
        return ("object", id(leaf))
    return leaf


def _nnx_module_type():
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return None
    return nnx.Module
