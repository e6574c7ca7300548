"""Model contamination (seed 002, §4): re-initialized layers, top-down or one at a time.

Parameters are a mapping from layer name to that layer's weights (a Flax `params` dict, whose
keys follow the order the layers were created in, input to output). Fresh weights come from the
same initializer with another key (`module.init(other_key, x)['params']`), so a re-initialized
layer is a draw from the distribution it was trained from.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["layer_order", "cascading_randomization", "independent_randomization"]


def layer_order(params: Mapping[str, Any]) -> list[str]:
    """Layer names from the output layer down to the input layer."""
    return list(params)[::-1]


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
