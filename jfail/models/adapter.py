"""One model convention for every jfail function: a model is any JAX callable.

jfail's functions take `model(x) -> logits` (and likewise `features(x)`, `decoder(z)`,
`encoder(x)`) in any of these styles:

- a plain function or closure, a lambda, `functools.partial`, a bound method;
- `jax.tree_util.Partial` or any other callable pytree (Flax NNX modules, Equinox modules);
- Flax linen through `jfail.models.linen_model`, which also exposes a named intermediate as
  features.

A result is always computed from the weights the callable holds at the moment of the call. Host
drivers (the functions that take concrete arrays, chunk them and return NumPy) compile their
programs once per model structure and pass the weights as traced arguments, found this way:

- a callable pytree: its array leaves are the weights; the functions inside it (a Partial's
  `func`, a module's methods) are code, and arrays they reach only through a closure or a global
  are constants of the program, as under `jax.jit`;
- a bound method of a pytree (`nnx_module.features`, `eqx_module.__call__`): the pytree's leaves;
- any other callable (closures, lambdas, `functools.partial`, bound methods of other objects,
  callable objects that are not pytrees): it is traced once per call and every array it reads
  (closed-over, global, or a partial's argument) becomes a traced argument (`traced_model`). New
  arrays of the same shapes reuse the compiled program; Python numbers it reads stay constants
  of that program, as under `jax.jit`.

Inside the caller's own `jax.jit`, `vmap` or `grad` the kernels call the model as it is: its
weights are whatever the caller's trace holds.

`as_model` adapts conventions that differ from `[B, H, W, C] -> [B, K]`: per-example models
(Equinox's layers take one unbatched example) and channels-first models.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = [
    "ModelCallError", "StaticModel", "as_model", "call_shape", "in_trace", "needs_tracing",
    "split_model", "traced_model",
]


class ModelCallError(ValueError):
    """The model could not be called on the input jfail gave it (wrong image size, channels,
    latent size, or a model in training mode)."""

    @classmethod
    def wrap(cls, fn, args, error: Exception) -> ModelCallError:
        """The jfail error for `error`, raised by calling `fn(*args)`: it names the input
        shapes, the original error's first line, and a hint where one applies.

        Args:
          fn: the callable that failed.
          args: the arguments it was called with (their shapes go into the message).
          error: the exception the call raised.

        Returns:
          A `ModelCallError` (not raised; the caller raises it `from error`).
        """
        return _call_error(fn, args, error)


def as_model(model: Callable, *, per_example: bool = False, channels_first: bool = False):
    """A batched, channels-last view of `model`, as a pytree callable.

    Args:
      model: any JAX callable (see the module docstring).
      per_example: `model` takes one example without a batch axis (Equinox's convention, e.g.
        `eqx.nn.Conv2d` takes `[C, H, W]`); the view maps it over the batch with `jax.vmap`.
      channels_first: `model` takes `[B, C, H, W]` (or `[C, H, W]` with `per_example`); the view
        transposes jfail's `[B, H, W, C]` images before the call.

    Returns:
      `view(x: [B, H, W, C]) -> model's output`, a pytree whose leaves are `model`'s, so weights
      stay traced. With neither option the model is returned unchanged.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> conv = eqx.nn.Conv2d(1, 2, 3, key=jax.random.key(0))
      >>> view = as_model(lambda x: conv(x).mean(axis=(1, 2)), per_example=True,
      ...                 channels_first=True)
      >>> view(jnp.zeros((4, 8, 8, 1))).shape
      (4, 2)
    """
    if not callable(model):
        raise TypeError(f"model must be a callable model(x), got {type(model).__name__}.")
    if not per_example and not channels_first:
        return model
    return _ConventionView(model, bool(per_example), bool(channels_first))


def in_trace(*trees) -> bool:
    """Whether any leaf of `trees` is a tracer: the call happens inside the caller's `jit`,
    `vmap` or `grad`, where values cannot be checked on the host.

    Args:
      *trees: any pytrees.

    Returns:
      True if at least one leaf is a `jax.core.Tracer`.
    """
    return any(
        isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees)
    )


def traced_model(model: Callable, *example) -> Callable:
    """`model` as a pytree whose leaves are every array it reads now (host drivers' side).

    Args:
      model: any JAX callable.
      *example: arrays or `jax.ShapeDtypeStruct`s of one valid call, used to trace a model that
        is not a pytree.

    Returns:
      A callable pytree computing the same as `model`; pass it as an argument of a jitted
      function and its weights are traced, not baked in.

    Raises:
      TypeError: `model` is not callable.
      ModelCallError: tracing `model` on `example` failed, or `model` is (or is a method of) a
        Flax NNX module in training mode, whose BatchNorm or Dropout would update state.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable, got {type(model).__name__}.")
    if not needs_tracing(model, jax.tree_util.tree_leaves(model)):
        return model
    owner = getattr(model, "__self__", None)
    if isinstance(model, types.MethodType) and not _hides_arrays(owner) and _has_arrays(owner):
        return _BoundMethod(owner, model.__func__)
    consts = _trace(model, example)[1]
    return _ClosureModel(model, tuple(consts))


def needs_tracing(model: Callable, leaves: list) -> bool:
    """Whether `traced_model` must trace `model` to find its weights, given its pytree `leaves`
    (a driver that flattens the model anyway passes them, so the check costs one pass).

    Args:
      model: any JAX callable.
      leaves: `jax.tree_util.tree_leaves(model)`.

    Returns:
      True if a leaf is a Python function, method, partial or other callable that may read
      arrays JAX does not see.

    Raises:
      ModelCallError: `model` is (or is a method of) an NNX module in training mode.
    """
    owner = getattr(model, "__self__", model)
    if isinstance(owner, _nnx_module_type()):
        _refuse_training_mode(owner)
    return any(_is_opaque(leaf) for leaf in leaves)


def split_model(model: Any, *example) -> tuple[list, StaticModel]:
    """The model's array leaves (traced under jit) and a hashable rest to rebuild it with.

    `example`: the arguments of one valid call (arrays or `ShapeDtypeStruct`s), with which a
    model that is not a pytree is traced to find the arrays it reads
    (`traced_model`). Without it the model is split as it is (inside a
    trace, where whatever a closure reads is already part of the caller's computation).

    Args:
      model: any JAX callable.
      *example: arguments of one valid call (arrays or `jax.ShapeDtypeStruct`s), optional.

    Returns:
      `(dynamic, static)`: a list with the array leaves (None elsewhere), and a hashable
      `StaticModel` whose `rebuild(dynamic)` gives the model back.

    Raises:
      ModelCallError: tracing the model on `example` failed, or it is a Flax NNX module in
        training mode.
    """
    leaves, treedef = jax.tree_util.tree_flatten(model)
    if example and needs_tracing(model, leaves):
        leaves, treedef = jax.tree_util.tree_flatten(traced_model(model, *example))
    dynamic = [leaf if _is_array(leaf) else None for leaf in leaves]
    static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
    return dynamic, StaticModel(treedef, static)


def call_shape(model: Callable, *example):
    """`jax.eval_shape(model, *example)`, with a failing call turned into a `ModelCallError`
    that names the input shapes.

    Args:
      model: any JAX callable.
      *example: arrays or `jax.ShapeDtypeStruct`s of the call.

    Returns:
      The pytree of `jax.ShapeDtypeStruct`s of the model's output.

    Raises:
      ModelCallError: the model cannot be called on `example`.
    """
    try:
        return jax.eval_shape(model, *example)
    except ModelCallError:
        raise
    except Exception as error:  # noqa: BLE001 - any library's error becomes one jfail error
        raise ModelCallError.wrap(model, example, error) from error


# --------------------------------------------------------------------------------------------
# Private helpers.


_OPAQUE = (types.FunctionType, types.MethodType, functools.partial)
_PURE_JAX_CALLABLES = (jax.custom_jvp, jax.custom_vjp)


def _is_opaque(leaf) -> bool:
    """A pytree leaf that may read arrays JAX does not see: a Python function, method or
    `functools.partial` (closure, globals, arguments), or any other callable object that is not
    a pytree (its attributes). JAX's own function wrappers (`custom_jvp`, `custom_vjp`, jitted
    functions such as `jax.nn.relu` inside an Equinox module) are code."""
    if isinstance(leaf, _OPAQUE):
        return True
    if not callable(leaf) or _is_array(leaf) or isinstance(leaf, (type, *_PURE_JAX_CALLABLES)):
        return False
    return type(leaf).__module__.split(".")[0] not in ("jax", "jaxlib", "builtins", "numpy")


def _hides_arrays(obj) -> bool:
    """Whether `obj` may read arrays that are not its pytree leaves (see `_is_opaque`). A
    `Partial`'s function and a module's methods are code, not leaves."""
    return needs_tracing(obj, jax.tree_util.tree_leaves(obj))


class StaticModel:
    """Tree structure plus non-array leaves of a model; hashable for jit's cache."""

    def __init__(self, treedef, static_leaves):
        self.treedef = treedef
        self.static_leaves = static_leaves
        try:
            self._hash = hash((treedef, static_leaves))
        except TypeError:  # unhashable static leaves: fall back to identity
            self._hash = hash((treedef, tuple(id(leaf) for leaf in static_leaves)))

    def rebuild(self, dynamic):
        """The model back from its array leaves.

        Args:
          dynamic: the list `split_model` returned (or traced arrays in its place).

        Returns:
          The model, with `dynamic`'s arrays as its leaves.
        """
        leaves = [s if d is None else d for d, s in zip(dynamic, self.static_leaves)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if not isinstance(other, StaticModel) or self.treedef != other.treedef:
            return False
        if len(self.static_leaves) != len(other.static_leaves):
            return False
        return all(
            a is b or _safe_equal(a, b) for a, b in zip(self.static_leaves, other.static_leaves)
        )


def _safe_equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain bool are compared by identity
        return False


@functools.lru_cache(maxsize=1)
def _nnx_module_type() -> type:
    from flax import nnx  # imported on first use: most calls never meet an NNX model

    return nnx.Module


def _refuse_training_mode(owner) -> None:
    """Raise for an NNX module with a layer in training mode: its batch statistics or dropout
    state would change inside jfail's programs."""
    from flax import nnx

    for path, node in nnx.iter_graph(owner):
        if isinstance(node, nnx.Module) and (
            getattr(node, "use_running_average", None) is False
            or getattr(node, "deterministic", None) is False
        ):
            where = "/".join(str(p) for p in path) or type(node).__name__
            raise ModelCallError(
                f"the NNX model {type(owner).__name__} is in training mode ({type(node).__name__} "
                f"at {where!r} would update its state); call model.eval() before passing it to "
                "jfail, and model.train() after."
            )


def _has_arrays(obj) -> bool:
    return any(_is_array(leaf) for leaf in jax.tree_util.tree_leaves(obj))


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or hasattr(leaf, "aval")


def _trace(fn, args):
    """`(jaxpr, consts, output tree)` of `fn(*args)`, traced afresh: `jax.make_jaxpr(fn)` would
    reuse an earlier trace of the same function and with it the arrays it read then."""
    try:
        closed, shape = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(*args)
    except ModelCallError:
        raise
    except Exception as error:  # noqa: BLE001
        raise _call_error(fn, args, error) from error
    return closed.jaxpr, closed.consts, jax.tree_util.tree_structure(shape)


def _call_error(fn, args, error: Exception) -> ModelCallError:
    shapes = ", ".join(str(tuple(getattr(a, "shape", ()))) for a in jax.tree_util.tree_leaves(args))
    name = getattr(fn, "__name__", type(fn).__name__)
    hint = ""
    if "TraceContext" in type(error).__name__ or "trace level" in str(error):
        hint = " A Flax NNX model must be in evaluation mode: call model.eval() first."
    elif "rank" in str(error) and "Conv" in str(error):
        hint = " For a model that takes one example [C, H, W], use jfail.models.as_model(model, " \
               "per_example=True, channels_first=True)."
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ModelCallError(
        f"calling the model {name} on inputs of shape {shapes} failed with "
        f"{type(error).__name__}: {first[:300]}. Check that the input's size and channels (or "
        f"latent size) are what the model expects.{hint}"
    )


@jax.tree_util.register_pytree_node_class
class _ClosureModel:
    """A callable that is not a pytree, with the arrays it read when traced as children."""

    def __init__(self, fn: Callable, consts: tuple):
        self.fn = fn
        self.consts = consts

    def __call__(self, *args):
        jaxpr, consts, out_tree = _trace(self.fn, args)
        if len(consts) != len(self.consts) or any(
            np.shape(a) != np.shape(b) for a, b in zip(consts, self.consts)
        ):
            raise ModelCallError(
                f"the model {getattr(self.fn, '__name__', self.fn)!r} reads {len(consts)} arrays "
                f"at input shape {[np.shape(a) for a in args]} but {len(self.consts)} at the "
                "shape it was first traced at; pass its weights explicitly, e.g. "
                "jax.tree_util.Partial(apply, params)."
            )
        outputs = jax.core.eval_jaxpr(jaxpr, list(self.consts), *jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(out_tree, outputs)

    def tree_flatten(self):
        return self.consts, self.fn

    @classmethod
    def tree_unflatten(cls, fn, consts):
        return cls(fn, tuple(consts))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class _BoundMethod:
    """`owner.method` with `owner`'s leaves as children."""

    owner: Any
    function: Callable

    def __call__(self, *args, **kwargs):
        return self.function(self.owner, *args, **kwargs)

    def tree_flatten(self):
        return (self.owner,), self.function

    @classmethod
    def tree_unflatten(cls, function, children):
        return cls(children[0], function)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class _ConventionView:
    model: Callable
    per_example: bool
    channels_first: bool

    def __call__(self, x):
        if self.channels_first:
            x = jax.numpy.moveaxis(x, -1, -3)
        return jax.vmap(self.model)(x) if self.per_example else self.model(x)

    def tree_flatten(self):
        return (self.model,), (self.per_example, self.channels_first)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)
