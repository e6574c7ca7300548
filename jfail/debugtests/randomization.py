"""Model contamination (seed 002, §4): re-initialized layers, top-down or one at a time.

Parameters are a mapping from layer name to that layer's weights (a Flax `params` dict). Its
keys may be sorted by name rather than by depth (JAX sorts dict keys when it maps over a tree), so
`forward_layer_order` reads the order from the forward pass itself. Fresh weights come from the
same initializer with another key (`module.init(other_key, x)['params']`), so a re-initialized
layer is a draw from the distribution it was trained from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

__all__ = [
    "layer_order",
    "forward_layer_order",
    "cascading_randomization",
    "independent_randomization",
]


def layer_order(params: Mapping[str, Any]) -> list[str]:
    """The mapping's keys reversed. Only right when the keys are in forward order; a sorted
    mapping (after an optax update or a checkpoint restore) is not: use `forward_layer_order`.

    Args:
        params: {layer name: weights}, its keys in forward order.

    Returns:
        The layer names, last key first.
    """
    return list(params)[::-1]


def forward_layer_order(apply_fn: Callable, params: Mapping[str, Any], x) -> list[str]:
    """Layer names from the output layer down to the input layer, in the order the forward pass
    `apply_fn(params, x)` first uses each layer's weights (read from its jaxpr).

    Args:
        apply_fn: `apply_fn(params, x) -> outputs`.
        params: {layer name: weights}.
        x: an example input batch for `apply_fn` (only its shape and dtype matter).

    Returns:
        The layer names, the one the forward pass uses last first.

    Raises:
        ValueError: the forward pass does not use the weights of some layer.
    """
    names = list(params)
    structures = [jax.tree_util.tree_structure(params[name]) for name in names]
    leaves = [jax.tree_util.tree_leaves(params[name]) for name in names]
    owner = [i for i, layer in enumerate(leaves) for _ in layer]

    def forward(*flat):
        rebuilt, start = {}, 0
        for name, structure, layer in zip(names, structures, leaves):
            layer_leaves = flat[start : start + len(layer)]
            rebuilt[name] = jax.tree_util.tree_unflatten(structure, layer_leaves)
            start += len(layer)
        return apply_fn(rebuilt, x)

    jaxpr = jax.make_jaxpr(forward)(*[leaf for layer in leaves for leaf in layer]).jaxpr
    position = {id(var): i for i, var in enumerate(jaxpr.invars)}
    first_use: dict[int, int] = {}
    for step, equation in enumerate(jaxpr.eqns):
        for var in equation.invars:
            if id(var) in position:
                first_use.setdefault(owner[position[id(var)]], step)
    unused = [names[i] for i in range(len(names)) if i not in first_use]
    if unused:
        raise ValueError(f"the forward pass does not use the weights of layers {unused}")
    return [names[i] for i in sorted(first_use, key=first_use.get, reverse=True)]


def cascading_randomization(
    params: Mapping[str, Any],
    fresh: Mapping[str, Any],
    layers: Sequence[str] | None = None,
    *,
    apply_fn: Callable | None = None,
    x=None,
) -> list[tuple[str, dict]]:
    """Figure 7's cascade: step k re-initializes the top k layers, output layer first.

    Args:
        params: {layer name: trained weights}.
        fresh: {layer name: re-initialized weights}, the same names.
        layers: the layers, output first. Default: `forward_layer_order(apply_fn, params, x)`,
            the order the forward pass uses them (never the mapping's key order, which an optax
            update or a checkpoint restore sorts by name).
        apply_fn: `apply_fn(params, x) -> outputs`, needed when `layers` is None.
        x: one example input batch for `apply_fn`, needed when `layers` is None.

    Returns:
        `[(last layer re-initialized, params), ...]`, one entry per layer.

    Raises:
        ValueError: neither `layers` nor (`apply_fn`, `x`) is given, or the forward pass leaves a
            layer unused.
        KeyError: a layer is missing from `params` or `fresh`.
    """
    layers = _checked_layers(params, fresh, layers, apply_fn, x, "cascading_randomization")
    steps, current = [], dict(params)
    for name in layers:
        current = {**current, name: fresh[name]}
        steps.append((name, current))
    return steps


def independent_randomization(
    params: Mapping[str, Any],
    fresh: Mapping[str, Any],
    layers: Sequence[str] | None = None,
    *,
    apply_fn: Callable | None = None,
    x=None,
) -> list[tuple[str, dict]]:
    """One layer re-initialized at a time, the others trained: `[(layer, params), ...]`.

    Layers in the order given, or (default) from the forward pass of `apply_fn(params, x)`,
    output first, as in `cascading_randomization`; without either, in the mapping's order
    (each step changes one layer, so the order only orders the list).

    Args:
        params: {layer name: trained weights}.
        fresh: {layer name: re-initialized weights}, the same names.
        layers: the layers, in the order of the steps; None for the forward pass's order or,
            without `apply_fn` and `x`, the mapping's order.
        apply_fn: `apply_fn(params, x) -> outputs`, to read the layer order from.
        x: one example input batch for `apply_fn`.

    Returns:
        `[(layer re-initialized, params), ...]`, one entry per layer.

    Raises:
        ValueError: only one of `apply_fn` and `x` is given without `layers`, or the forward pass
            leaves a layer unused.
        TypeError: `apply_fn` is not callable.
        KeyError: a layer is missing from `params` or `fresh`.
    """
    if layers is None and apply_fn is None and x is None:
        layers = list(params)
    layers = _checked_layers(params, fresh, layers, apply_fn, x, "independent_randomization")
    return [(name, {**params, name: fresh[name]}) for name in layers]


def _checked_layers(params, fresh, layers, apply_fn, x, name):
    if layers is None:
        if apply_fn is None or x is None:
            raise ValueError(
                f"{name} needs the layer order: pass layers=[output, ..., input], or "
                "apply_fn=(params, x) -> outputs and an example x, from whose forward pass the "
                "order is read (the parameter mapping's key order is not the network's)."
            )
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be callable apply_fn(params, x), got {apply_fn!r}.")
        layers = forward_layer_order(apply_fn, params, x)
    else:
        layers = list(layers)
    missing = [name for name in layers if name not in params or name not in fresh]
    if missing:
        raise KeyError(f"layers {missing} are not in both parameter sets; layers: {list(params)}")
    return layers
