"""Model contamination (seed 002, §4): re-initialized layers, top-down or one at a time.

Parameters are a mapping from layer name to that layer's weights (a Flax `params` dict). Its
keys may be sorted by name rather than by depth (JAX sorts dict keys when it maps over a tree), so
`forward_layer_order` reads the order from the forward pass itself. Fresh weights come from the
same initializer with another key (`module.init(other_key, x)['params']`), so a re-initialized
layer is a draw from the distribution it was trained from.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax

__all__ = [
    "layer_order",
    "forward_layer_order",
    "cascading_randomization",
    "independent_randomization",
]


def layer_order(params: Mapping[str, Any]) -> list[str]:
    """Layer names from the output layer down to the input layer."""
    return list(params)[::-1]


def forward_layer_order(apply_fn: Callable, params: Mapping[str, Any], x) -> list[str]:
    """Layer names from the output layer down to the input layer, in the order the forward pass
    `apply_fn(params, x)` first uses each layer's weights (read from its jaxpr)."""
    names = list(params)
    structures = [jax.tree_util.tree_structure(params[name]) for name in names]
    leaves = [jax.tree_util.tree_leaves(params[name]) for name in names]
    owner = [i for i, layer in enumerate(leaves) for _ in layer]

    def forward(*flat):
        rebuilt, start = {}, 0
        for name, structure, layer in zip(names, structures, leaves):
            rebuilt[name] = jax.tree_util.tree_unflatten(structure, flat[start : start + len(layer)])
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
    params: Mapping[str, Any], fresh: Mapping[str, Any], layers: Sequence[str] | None = None
) -> list[tuple[str, dict]]:
    """Figure 7's cascade: step k re-initializes the top k layers of `layers` (default: all,
    output first). Returns `[(last layer re-initialized, params), ...]`, one entry per layer."""
    layers = _checked_layers(params, fresh, layers)
    steps, current = [], dict(params)
    for name in layers:
        current = {**current, name: fresh[name]}
        steps.append((name, current))
    return steps


def independent_randomization(
    params: Mapping[str, Any], fresh: Mapping[str, Any], layers: Sequence[str] | None = None
) -> list[tuple[str, dict]]:
    """One layer re-initialized at a time, the others trained: `[(layer, params), ...]`."""
    layers = _checked_layers(params, fresh, layers)
    return [(name, {**params, name: fresh[name]}) for name in layers]


def _checked_layers(params, fresh, layers):
    layers = layer_order(params) if layers is None else list(layers)
    missing = [name for name in layers if name not in params or name not in fresh]
    if missing:
        raise KeyError(f"layers {missing} are not in both parameter sets; layers: {list(params)}")
    return layers
