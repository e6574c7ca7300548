"""Similarity of attribution maps, as the debugging-tests paper compares them (seed 002, §2.3).

- `ssim(a, b)`: the structural similarity of scikit-image's `structural_similarity` with
  `gaussian_weights=True, sigma=1.5, use_sample_covariance=False` (an 11x11 Gaussian window
  truncated at 3.5 σ, 'reflect' borders, K1 = 0.01, K2 = 0.03, the mean taken over the interior
  that the window fits without padding, 5 pixels from each border). The paper normalizes maps to
  [0, 1] first (`jfail.attribution.normalize_unit`), hence `data_range = 1` by default.
- `spearman(a, b)`: Spearman's rank correlation of the flattened maps, ties given their average
  rank (as `scipy.stats.spearmanr`); `absolute=True` ranks |a| and |b|.

Both take batches `[B, H, W]` (or `[B, H, W, C]`, compared per channel and averaged for SSIM,
flattened for Spearman) and return `[B]`. They are pure JAX functions: usable inside the
caller's `jax.jit`, and under `jax.vmap` over a further leading axis (e.g. `[R, B, H, W]` maps
of R randomized models), where they equal a loop over that axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jfail.xla import jit

__all__ = ["ssim", "spearman", "mean_sem"]

_SIGMA = 1.5
_TRUNCATE = 3.5
_K1, _K2 = 0.01, 0.03


def ssim(a, b, *, data_range: float = 1.0) -> jax.Array:
    """Mean structural similarity per example.

    Args:
        a, b: maps `[B, H, W]` or `[B, H, W, C]` of one shape, at least 11x11 pixels.
        data_range: the maps' value range (a float > 0, or a traced scalar inside a jit).

    Returns:
        `[B]` SSIM in [-1, 1], 1 for identical maps.

    Raises:
        ValueError: different shapes, a wrong rank, maps under 11x11, or `data_range <= 0`.
    """
    a, b = _paired(a, b, "ssim")
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]
    if a.ndim != 4:
        raise ValueError(f"ssim takes [B, H, W] or [B, H, W, C] maps, got shape {a.shape}.")
    window = 2 * int(_TRUNCATE * _SIGMA + 0.5) + 1
    if min(a.shape[1:3]) < window:
        raise ValueError(
            f"ssim needs maps of at least {window}x{window} pixels, got {a.shape[1:3]}."
        )
    if not isinstance(data_range, jax.core.Tracer) and not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range!r}.")
    return _ssim(a, b, jnp.asarray(data_range, jnp.float32))


def spearman(a, b, *, absolute: bool = False) -> jax.Array:
    """Spearman rank correlation per example of the flattened maps.

    Args:
        a, b: maps `[B, ...]` of one shape.
        absolute: rank `|a|` and `|b|` instead.

    Returns:
        `[B]` correlations in [-1, 1]; NaN where a map is constant (as SciPy).

    Raises:
        ValueError: different shapes, or fewer than 2 dimensions.
    """
    a, b = _paired(a, b, "spearman")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if absolute:
        a, b = jnp.abs(a), jnp.abs(b)
    return _spearman(a, b)


# --------------------------------------------------------------------------------------------
# Private helpers.


def mean_sem(values) -> dict:
    """The mean and standard error of the mean of the finite `values` (any shape), and their
    count: `{'mean', 'sem', 'count'}` as plain floats; NaN for a mean of none or an SEM of one.

    Args:
        values: numbers of any shape; NaN and Inf are left out.

    Returns:
        `{'mean': float, 'sem': float, 'count': int}` over the finite values (SEM with ddof=1).
    """
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()) if len(values) else float("nan"), "sem": sem,
            "count": int(len(values))}


def _paired(a, b, name):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"{name} compares maps of one shape, got {a.shape} and {b.shape}.")
    if a.ndim < 2:
        raise ValueError(f"{name} takes a batch of maps [B, ...], got shape {a.shape}.")
    return a, b


def _gaussian_kernel() -> np.ndarray:
    radius = int(_TRUNCATE * _SIGMA + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / _SIGMA) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _blur(images):
    """Separable Gaussian filter of `[B, H, W, C]` with scipy's 'reflect' (symmetric) borders."""
    kernel = jnp.asarray(_gaussian_kernel())
    radius = (kernel.shape[0] - 1) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(images, pad, mode="symmetric")
        length = images.shape[axis]
        images = sum(
            kernel[i] * jax.lax.slice_in_dim(padded, i, i + length, axis=axis)
            for i in range(kernel.shape[0])
        )
    return images


@jit
def _ssim(a, b, data_range):
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mean_a, mean_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mean_a * mean_a
    var_b = _blur(b * b) - mean_b * mean_b
    cov = _blur(a * b) - mean_a * mean_b
    numerator = (2 * mean_a * mean_b + c1) * (2 * cov + c2)
    denominator = (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    similarity = numerator / denominator
    pad = int(_TRUNCATE * _SIGMA + 0.5)
    interior = similarity[:, pad:-pad, pad:-pad, :]
    return interior.mean(axis=(1, 2, 3))


@jit
def _spearman(a, b):
    return jax.vmap(_pearson)(jax.vmap(_average_ranks)(a), jax.vmap(_average_ranks)(b))


def _average_ranks(values):
    """Ranks 1..n of `values: [n]`, ties sharing their average rank."""
    order = jnp.argsort(values)
    ordered = values[order]
    first = jnp.searchsorted(ordered, ordered, side="left")
    last = jnp.searchsorted(ordered, ordered, side="right")
    average = (first + last + 1) / 2.0  # mean of the 1-based ranks first+1 .. last
    return jnp.zeros_like(values).at[order].set(average)


def _pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    denominator = jnp.sqrt((x * x).sum() * (y * y).sum())
    return jnp.where(denominator > 0, (x * y).sum() / jnp.where(denominator > 0, denominator, 1.0),
                     jnp.nan)
