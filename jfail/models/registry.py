"""Build classifiers by name, as configs name them."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfail.models.cnn import DefuseCNN
from jfail.models.mlp import MLP
from jfail.models.resnet import resnet18, resnet50

__all__ = ["MODEL_NAMES", "build_classifier", "init_classifier"]

MODEL_NAMES = ("defuse_cnn", "mlp", "resnet18", "resnet50")


def build_classifier(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """`defuse_cnn`, `mlp`, `resnet18` or `resnet50`; `kwargs` go to the constructor
    (`hidden` for `mlp`, `stem` and `width` for the ResNets).

    Args:
        name: one of `MODEL_NAMES`.
        num_classes: the number of logits `K`.
        **kwargs: passed to the model's constructor.

    Returns:
        The (uninitialized) Flax linen module.

    Raises:
        ValueError: if `name` is not one of `MODEL_NAMES`.
    """
    if name == "defuse_cnn":
        return DefuseCNN(num_classes=num_classes, **kwargs)
    if name == "mlp":
        return MLP(num_classes=num_classes, **kwargs)
    if name == "resnet18":
        return resnet18(num_classes=num_classes, **kwargs)
    if name == "resnet50":
        return resnet50(num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


def init_classifier(module: nn.Module, image_shape, key) -> tuple[Any, dict]:
    """Initialize on a `[1, H, W, C]` dummy input; returns `(params, state)`.

    Args:
        module: a classifier whose `__call__(x, train)` takes a `train` flag.
        image_shape: `(H, W, C)`.
        key: a PRNG key for the initial weights.

    Returns:
        `(params, state)`: the `params` collection and a dict of the other collections
        (e.g. `{'batch_stats': ...}`), as `jax.Array`s.
    """
    variables = module.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
    params = variables.pop("params")
    return params, variables
