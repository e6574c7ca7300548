"""A classifier as a sequence of layers, for layer-wise methods (TCAV's split at a layer).

A linen module is layered when it names its layers in order, `module.layer_names`, and applies
one of them, `module.layer(name, x)` (a layer with its activation), its logits being their
composition; `DefuseCNN` is. The functions here read nothing else, so the split is the model's
own definition, not a copy of it:

- `layer_names(module)`: the names, in order, or a TypeError for a module that is not layered;
- `layer_span(module, variables, names)`: the consecutive layers `names` as one callable;
- `split_at(module, variables, layer)`: `(features, head)` with `head(features(x))` the logits.

The callables are `jax.tree_util.Partial`s holding the variables as pytree leaves, like
`jfail.models.logits_fn`: new weights of the same shapes reuse a jitted program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

__all__ = ["is_layered", "layer_names", "layer_span", "split_at"]


def is_layered(module: nn.Module) -> bool:
    """Whether `module` names its layers (`layer_names`) and applies them one by one (`layer`).

    Args:
      module: any Flax linen module.

    Returns:
      True if it has `layer_names` and a callable `layer`.
    """
    return hasattr(module, "layer_names") and callable(getattr(module, "layer", None))


def layer_names(module: nn.Module) -> tuple[str, ...]:
    """The layers of `module` in the order they apply, e.g. `('conv0', ..., 'classifier')`.

    Args:
      module: a layered module.

    Returns:
      tuple of layer names.

    Raises:
      TypeError: `module` is not layered (has no `layer_names` and `layer(name, x)`).
    """
    if not is_layered(module):
        raise TypeError(
            f"{type(module).__name__} is not laid out as a sequence of layers: a layer-wise "
            "method needs a module with `layer_names` and `layer(name, x)` (as DefuseCNN has)")
    return tuple(module.layer_names)


def layer_span(module: nn.Module, variables: Any, names) -> jax.tree_util.Partial:
    """The consecutive layers `names` of `module` as one callable `fn(x)`.

    Args:
      module: a layered module (see `layer_names`).
      variables: its variables, `{"params": ...}` (and any other collections).
      names: a run of `layer_names(module)`, in order; empty for the identity.

    Returns:
      `fn(x)`: `x` (the input of the first layer) through every layer of `names`, a
      `jax.tree_util.Partial` holding `variables`.

    Raises:
      TypeError: `module` is not layered.
      ValueError: `names` is not a consecutive run of the module's layers.
    """
    names = tuple(names)
    known = layer_names(module)
    if names:
        start = known.index(names[0]) if names[0] in known else -1
        if start < 0 or known[start : start + len(names)] != names:
            raise ValueError(f"{list(names)} is not a run of {type(module).__name__}'s layers "
                             f"{list(known)}, in order")
    return jax.tree_util.Partial(_LayerSpan(module, names), variables)


def split_at(module: nn.Module, variables: Any, layer: str
             ) -> tuple[jax.tree_util.Partial, jax.tree_util.Partial]:
    """`module` cut after `layer`: `(features, head)`, `head(features(x))` = the logits.

    Args:
      module: a layered module (see `layer_names`).
      variables: its variables.
      layer: one of `layer_names(module)`; `features(x)` is that layer's output (after its
        activation), e.g. `[B, h, w, C]` for a convolution or `[B, D]` for a dense layer.

    Returns:
      `(features, head)`, both `jax.tree_util.Partial`s holding `variables`.

    Raises:
      TypeError: `module` is not layered.
      ValueError: `layer` is not one of its layers.
    """
    names = layer_names(module)
    if layer not in names:
        raise ValueError(f"{type(module).__name__} has no layer {layer!r}; its layers are "
                         f"{list(names)}")
    cut = names.index(layer) + 1
    return layer_span(module, variables, names[:cut]), layer_span(module, variables, names[cut:])


@dataclasses.dataclass(frozen=True)
class _LayerSpan:
    module: nn.Module
    names: tuple

    def __call__(self, variables, x):
        if not self.names:
            return x
        return self.module.apply(variables, x, self.names, method=_apply_layers)


def _apply_layers(module, x, names):
    for name in names:
        x = module.layer(name, x)
    return x
