"""Identification (seed 001, Algorithm 1): decoded latent perturbations the classifier gets wrong.

For every image, `num_draws` noise vectors `ε ~ Beta(a, b)^Z` are added to the encoder mean `μ`,
decoded and classified; a decode whose prediction differs from the image's label is an
unrestricted adversarial example. A whole chunk of images × draws is one jitted program (vmapped
over images, one decoder and classifier call over all draws), chunks are sharded over devices, and
the draws of image `i` depend only on `(key, i)`, so the result does not depend on the chunk size
or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfail.logs import progress_disabled
from jfail.models.cpu_gradients import cpu_friendly_gradients
from jfail.train.parallel import DataParallel, _pad_rows
from jfail.xla import jit

__all__ = ["Failures", "identify", "NOISE_MODES"]

NOISE_MODES = ("paper", "centred")


@dataclasses.dataclass(frozen=True)
class Failures:
    """The unrestricted adversarial examples found by `identify`, one row per kept draw.

    latents: [F, Z] (`μ + ε`); images: [F, H, W, C] decoded; predictions: [F] the classifier's
    class; labels: [F] the source image's label; sources: [F] index of the source image in the
    `mu` passed to `identify`; per_image: [N] kept draws per source image; num_draws: draws tried
    per image; noise: the noise mode; misclassified_draws: all misclassified draws, before the cap.
    """

    latents: np.ndarray
    images: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    per_image: np.ndarray
    num_draws: int
    noise: str
    misclassified_draws: int

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def failure_rate(self) -> float:
        """Fraction of all draws whose decode was misclassified (before the per-image cap)."""
        return self.misclassified_draws / max(self.per_image.size * self.num_draws, 1)


def identify(
    decoder: Callable,
    classifier: Callable,
    mu,
    labels,
    key: jax.Array,
    *,
    num_draws: int = 500,
    a: float = 50.0,
    b: float = 50.0,
    max_per_image: int = 100,
    noise: str = "paper",
    draws_per_chunk: int = 32_768,
    keep_images: bool = True,
    progress: bool | None = None,
) -> Failures:
    """Run Algorithm 1 on every image at once.

    decoder: `decoder(z [B, Z]) -> images [B, H, W, C]`; classifier: `classifier(x) -> logits
    [B, K]`; both JAX callables (weights inside as a pytree). mu: [N, Z] encoder means; labels: [N].
    noise: `"paper"` adds `ε ~ Beta(a, b)` as written (Beta(50, 50) has mean 0.5, so every latent
    dimension shifts by about +0.5, as in the authors' code); `"centred"` adds `ε − a / (a + b)`.
    Keeps, per image, the first `max_per_image` misclassified draws in draw order. Memory is
    bounded by `draws_per_chunk` decodes per jitted call.
    """
    mu, labels = _check_inputs(mu, labels, num_draws, a, b, max_per_image, noise)
    parallel = DataParallel()
    images_per_chunk = min(max(1, draws_per_chunk // num_draws), len(mu))
    images_per_chunk = -(-images_per_chunk // parallel.num_devices) * parallel.num_devices
    keep = min(max_per_image, num_draws)
    shift = a / (a + b) if noise == "centred" else 0.0
    kernel = _identify_kernel(num_draws, float(a), float(b), keep, shift, keep_images)

    parts: dict[str, list] = {name: [] for name in ("z", "x", "pred", "valid", "count")}
    starts = range(0, len(mu), images_per_chunk)
    for start in tqdm(starts, desc="identify", disable=progress_disabled(progress), leave=False):
        stop = min(start + images_per_chunk, len(mu))
        index = np.arange(start, start + images_per_chunk)  # padded rows are dropped below
        (mu_dev, labels_dev, index_dev), _ = parallel.shard_batch(
            _pad_rows(mu[start:stop], images_per_chunk),
            _pad_rows(labels[start:stop], images_per_chunk),
            index,
        )
        z, x, pred, valid, count = jax.device_get(
            kernel(decoder, classifier, mu_dev, labels_dev, index_dev, key)
        )
        for name, value in zip(parts, (z, x, pred, valid, count)):
            parts[name].append(value[: stop - start])
    z, x, pred, valid, count = (np.concatenate(parts[name]) for name in parts)
    rows, cols = np.nonzero(valid)
    return Failures(
        latents=z[rows, cols],
        images=x[rows, cols] if keep_images else np.zeros((len(rows), 0), np.float32),
        predictions=pred[rows, cols].astype(np.int32),
        labels=labels[rows].astype(np.int32),
        sources=rows.astype(np.int64),
        per_image=valid.sum(1).astype(np.int64),
        num_draws=num_draws,
        noise=noise,
        misclassified_draws=int(count.sum()),
    )


@functools.lru_cache(maxsize=8)
def _identify_kernel(num_draws, a, b, keep, shift, keep_images):
    @jit
    def kernel(decoder, classifier, mu, labels, index, key):
        def noise(i):
            eps = jax.random.beta(jax.random.fold_in(key, i), a, b, (num_draws, mu.shape[-1]))
            return eps - shift

        z = mu[:, None, :] + jax.vmap(noise)(index)  # [C, Q, Z]
        flat = z.reshape(-1, z.shape[-1])
        x = cpu_friendly_gradients(decoder)(flat)  # on CPU: transposed convolutions by phases
        pred = jnp.argmax(cpu_friendly_gradients(classifier)(x), axis=-1).reshape(z.shape[:2])
        wrong = pred != labels[:, None]
        # the first `keep` wrong draws of each image, in draw order (a stable sort puts them first)
        order = jnp.argsort(~wrong, axis=1, stable=True)[:, :keep]
        valid = jnp.take_along_axis(wrong, order, axis=1)
        z_kept = jnp.take_along_axis(z, order[..., None], axis=1)
        pred_kept = jnp.take_along_axis(pred, order, axis=1)
        if keep_images:
            x = x.reshape(*z.shape[:2], *x.shape[1:])
            x_kept = jax.vmap(lambda images, rows: images[rows])(x, order)
        else:
            x_kept = jnp.zeros(z.shape[:1] + (keep, 0), x.dtype)
        return z_kept, x_kept, pred_kept, valid, wrong.sum(1)

    return kernel


def _check_inputs(mu, labels, num_draws, a, b, max_per_image, noise):
    mu = np.asarray(mu, np.float32)
    labels = np.asarray(labels)
    if mu.ndim != 2:
        raise ValueError(f"mu must be [N, Z] encoder means, got shape {mu.shape}")
    if labels.shape != (len(mu),):
        raise ValueError(f"labels must be [N] = [{len(mu)}], got shape {labels.shape}")
    if len(mu) == 0:
        raise ValueError("mu is empty: pass the encoder means of at least one image")
    if not np.all(np.isfinite(mu)):
        raise ValueError(
            f"mu holds {int(np.sum(~np.isfinite(mu)))} non-finite values; check the encoder"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    for name, value in (("num_draws", num_draws), ("max_per_image", max_per_image)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("a", a), ("b", b)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"Beta parameter {name} must be positive, got {value!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    return mu, labels.astype(np.int32)

