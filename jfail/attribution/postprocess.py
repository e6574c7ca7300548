"""Post-processing of attribution maps for display and comparison (paper appendix B): absolute
values, channel reduction, and per-example normalisation to [0, 1] or [-1, 1].

Every function takes a batch `[B, ...]` (usually `[B, H, W, C]` or `[B, H, W]`) and treats each
example on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["absolute", "reduce_channels", "normalize_unit", "normalize_signed"]

_REDUCTIONS = ("sum", "mean", "max_abs")


def absolute(attributions) -> jax.Array:
    """Element-wise `|a|`, same shape (e.g. the paper's Grad map is `absolute(gradient)`).

    Args:
        attributions: array-like `[B, ...]` of signed attributions.

    Returns:
        `jax.Array` of `|attributions|`, shape `[B, ...]`.
    """
    return jnp.abs(jnp.asarray(attributions))


def reduce_channels(attributions, how: str = "sum") -> jax.Array:
    """`[B, H, W, C] -> [B, H, W]` over the last (channel) axis.

    Args:
        attributions: array-like `[B, H, W, C]`.
        how: "sum" (signed), "mean" (signed), or "max_abs" (the largest `|a|` over channels,
            >= 0).

    Returns:
        `jax.Array` `[B, H, W]`.

    Raises:
        ValueError: if `attributions` is not 4-D or `how` is not one of the three reductions.
    """
    attributions = jnp.asarray(attributions)
    if attributions.ndim != 4:
        raise ValueError(f"reduce_channels expects [B, H, W, C], got shape {attributions.shape}.")
    if how == "sum":
        return attributions.sum(axis=-1)
    if how == "mean":
        return attributions.mean(axis=-1)
    if how == "max_abs":
        return jnp.abs(attributions).max(axis=-1)
    raise ValueError(f"reduce_channels: how must be one of {_REDUCTIONS}, got {how!r}.")


def normalize_unit(attributions) -> jax.Array:
    """Per-example min-max scaling to [0, 1], same shape `[B, ...]`; a constant map gives 0.

    Args:
        attributions: array-like `[B, ...]`.

    Returns:
        float32 `jax.Array` `[B, ...]` with values in [0, 1].
    """
    attributions = jnp.asarray(attributions, jnp.float32)
    axes = tuple(range(1, attributions.ndim))
    low = attributions.min(axis=axes, keepdims=True)
    spread = attributions.max(axis=axes, keepdims=True) - low
    return jnp.where(spread > 0, (attributions - low) / jnp.where(spread > 0, spread, 1.0), 0.0)


def normalize_signed(attributions) -> jax.Array:
    """Per-example division by `max |a|`, into [-1, 1] keeping signs, same shape `[B, ...]`;
    an all-zero map stays 0.

    Args:
        attributions: array-like `[B, ...]`.

    Returns:
        float32 `jax.Array` `[B, ...]` with values in [-1, 1].
    """
    attributions = jnp.asarray(attributions, jnp.float32)
    axes = tuple(range(1, attributions.ndim))
    scale = jnp.abs(attributions).max(axis=axes, keepdims=True)
    return attributions / jnp.where(scale > 0, scale, 1.0)
