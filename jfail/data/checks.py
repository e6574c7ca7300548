"""Validation of image and label arrays at the boundary of the library."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PIXEL_RANGE_TOLERANCE = 1e-6
"""How far outside [0, 1] a pixel value may be before check_images rejects it."""


def check_images(images, *, name: str = "images", expect_channels: int | None = None) -> None:
    """Raises ValueError unless `images` is a valid float batch in [0, 1].

    Args:
        images: `[N, H, W, C]`, a floating numpy or jax array with N >= 1, all values finite and
            within [0, 1] up to PIXEL_RANGE_TOLERANCE.
        name: what the array is called in error messages.
        expect_channels: if given, C must equal it.

    Raises:
        TypeError: if `images` is not a numpy or jax array.
        ValueError: if `images` is not 4-D, is empty, has the wrong number of channels, is not
            floating point, holds NaN/Inf, or has values outside [0, 1].
    """
    _require_array(images, name)
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(_ndim_message(name, shape))
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {shape} has no examples.")
    if expect_channels is not None and shape[3] != expect_channels:
        raise ValueError(
            f"{name} must have {expect_channels} channel(s) in the last axis "
            f"([N, H, W, C]), got shape {shape} with C={shape[3]}."
        )
    dtype = images.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be floating point with values in [0, 1], got dtype "
            f"{dtype}. For 8-bit pixels use images.astype(np.float32) / 255."
        )

    xp = jnp if isinstance(images, jax.Array) else np
    not_finite = ~xp.isfinite(images)
    num_not_finite = int(not_finite.sum())
    if num_not_finite:
        first = np.unravel_index(int(xp.argmax(not_finite.reshape(-1))), shape)
        first_index = tuple(int(i) for i in first)
        raise ValueError(
            f"{name} contains {num_not_finite} NaN/Inf value(s); the first is at "
            f"index {first_index} (example {first_index[0]})."
        )
    low, high = float(xp.min(images)), float(xp.max(images))
    if low < -PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must have values in [0, 1], got min={low:.6g}, max={high:.6g}. "
            "Scale 8-bit pixels by 1/255; undo any mean/std normalisation."
        )


def check_labels(labels, num_examples: int, num_classes: int | None = None) -> None:
    """Raises ValueError unless `labels` are valid integer class indices.

    Args:
        labels: `[num_examples]`, integer dtype, values in [0, num_classes) when num_classes is
            given (otherwise only >= 0 is required).
        num_examples: the number of examples the labels belong to.
        num_classes: the number of classes, or None to check only that labels are >= 0.

    Raises:
        TypeError: if `labels` is not a numpy or jax array.
        ValueError: if `labels` is not 1-D, has another length than `num_examples`, is not of an
            integer dtype, or has a value below 0 or at least `num_classes`.
    """
    _require_array(labels, "labels")
    shape = tuple(labels.shape)
    if len(shape) != 1:
        hint = " (one-hot labels? use labels.argmax(-1))" if len(shape) == 2 else ""
        raise ValueError(f"labels must be 1-D [N], got shape {shape}{hint}.")
    if shape[0] != num_examples:
        raise ValueError(
            f"labels has {shape[0]} entries but there are {num_examples} examples."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integer class indices, got dtype {labels.dtype}."
        )
    if num_examples == 0:
        return
    xp = jnp if isinstance(labels, jax.Array) else np
    low, high = int(xp.min(labels)), int(xp.max(labels))
    if low < 0:
        raise ValueError(f"labels must be >= 0, got min={low}.")
    if num_classes is not None and high >= num_classes:
        raise ValueError(
            f"labels must be < num_classes={num_classes}, got max={high}."
        )


def _require_array(array, name: str) -> None:
    if not isinstance(array, (np.ndarray, jax.Array)):
        raise TypeError(f"{name} must be a numpy or jax array, got {type(array).__name__}.")


def _ndim_message(name: str, shape: tuple[int, ...]) -> str:
    message = f"{name} must be 4-D [N, H, W, C], got {len(shape)}-D shape {shape}."
    if len(shape) == 3:
        message += (
            f" If these are single-channel [N, H, W] images, add a channel axis: {name}[..., None]."
        )
    elif len(shape) == 2:
        message += " If these are flattened images, reshape them to [N, H, W, C]."
    return message
