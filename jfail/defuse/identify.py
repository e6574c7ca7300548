"""Identification (seed 001, Algorithm 1): decoded latent perturbations the classifier gets wrong.

For every image, `num_draws` noise vectors `ε ~ Beta(a, b)^Z` are added to the encoder mean `μ`,
decoded and classified; a decode whose prediction differs from the image's label is an
unrestricted adversarial example. A whole chunk of images × draws is one jitted program (vmapped
over images, one decoder and classifier call over all draws), chunks are sharded over devices, and
the draws of image `i` depend only on `(key, i)`, so the result does not depend on the chunk size
or the device count.

`identify_batch` is the pure computation for one batch of images (usable inside the caller's
`jax.jit`, `jax.vmap` and `jax.grad`); `identify` is the host driver over it: input checks,
chunking, device sharding, the per-image cap, NaN checks and progress.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfail.data.batching import pad_rows_with_zeros
from jfail.keys import as_key
from jfail.logs import progress_disabled
from jfail.models.adapter import call_shape, in_trace, split_model
from jfail.train.parallel import DataParallel
from jfail.xla import cpu_friendly_gradients, jit

__all__ = ["Draws", "Failures", "identify", "identify_batch", "NOISE_MODES"]

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



class Draws(NamedTuple):
    """Every identification draw of one batch of `B` images, `Q` draws each (`identify_batch`).

    latents: [B, Q, Z] `μ + ε`; images: [B, Q, H, W, C] the decodes; predictions: [B, Q] int32
    the classifier's class; errors: [B, Q] bool, True where the prediction differs from the
    image's label (an unrestricted adversarial example).
    """

    latents: jax.Array
    images: jax.Array
    predictions: jax.Array
    errors: jax.Array


def identify_batch(
    decoder: Callable,
    classifier: Callable,
    mu,
    labels,
    *,
    key,
    num_draws: int,
    a: float = 50.0,
    b: float = 50.0,
    noise: str = "paper",
    index=None,
) -> Draws:
    """Algorithm 1's draws for one batch of images, as one pure computation.

    Image `i`'s noise is drawn from `fold_in(key, index[i])`, so a batch cut out of a larger set
    with its global `index` draws what `identify` draws for those images. Usable inside the
    caller's `jax.jit` and `jax.vmap` (wrap it in `jax.jit` for speed: called eagerly it runs op
    by op); shapes are checked, values are not (see `identify` for the host-side checks).

    Args:
        decoder: any JAX callable `decoder(z [n, Z]) -> images [n, H, W, C]`.
        classifier: any JAX callable `classifier(images [n, H, W, C]) -> logits [n, K]`.
        mu: [B, Z] encoder means.
        labels: [B] int, each image's class.
        key: PRNG key: an int seed, `jax.random.key(seed)` or a raw uint32 key.
        num_draws: `Q`, draws per image (a Python int).
        a, b: the Beta noise parameters.
        noise: `"paper"` adds `ε ~ Beta(a, b)`; `"centred"` adds `ε − a / (a + b)`.
        index: [B] int, the images' indices that select their noise (default `arange(B)`).

    Returns:
        `Draws` with `[B, Q, ...]` arrays.

    Raises:
        ValueError: bad shapes or settings, or a decoder output that is not `[n, H, W, C]`.
        ModelCallError: the decoder cannot take `[n, Z]` latents, or the classifier its images.
    """
    _check_settings(num_draws, a, b, 1, noise)
    mu = jnp.asarray(mu)
    labels = jnp.asarray(labels)
    if mu.ndim != 2 or mu.shape[0] == 0:
        raise ValueError(f"mu must be [B, Z] encoder means with B >= 1, got shape {mu.shape}.")
    if not jnp.issubdtype(mu.dtype, jnp.floating):
        mu = mu.astype(jnp.float32)
    if labels.shape != mu.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be [B] = [{mu.shape[0]}] integers, got shape {labels.shape} of dtype "
            f"{labels.dtype}."
        )
    index = jnp.arange(mu.shape[0]) if index is None else jnp.asarray(index)
    if index.shape != mu.shape[:1] or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index must be [B] = [{mu.shape[0]}] integers, got shape {index.shape}.")
    flat = jax.ShapeDtypeStruct((mu.shape[0] * num_draws, mu.shape[1]), mu.dtype)
    _model_shapes(decoder, classifier, flat)
    shift = _shift(a, b, noise)
    z, x, logits = _draws(
        cpu_friendly_gradients(decoder), cpu_friendly_gradients(classifier), mu, index,
        as_key(key), num_draws, a, b, shift,
    )
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return Draws(z, x, predictions, predictions != labels[:, None])


def identify(
    decoder: Callable,
    classifier: Callable,
    mu,
    labels,
    *,
    key,
    num_draws: int = 500,
    a: float = 50.0,
    b: float = 50.0,
    max_per_image: int = 100,
    noise: str = "paper",
    draws_per_chunk: int = 32_768,
    keep_images: bool = True,
    progress: bool | None = None,
) -> Failures:
    """Run Algorithm 1 on every image: `identify_batch` over chunks, keeping the failures.

    Keeps, per image, the first `max_per_image` misclassified draws in draw order. Memory is
    bounded by `draws_per_chunk` decodes per jitted call; the weights the models hold now are
    traced arguments of that program, and the result does not depend on `draws_per_chunk`.

    Args:
        decoder: any JAX callable `decoder(z [n, Z]) -> images [n, H, W, C]` (a closure, a
            `functools.partial`, `jax.tree_util.Partial`, a Flax NNX or Equinox module, ...).
        classifier: any JAX callable `classifier(images [n, H, W, C]) -> logits [n, K]`.
        mu: [N, Z] encoder means.
        labels: [N] int in `[0, K)`.
        key: PRNG key: an int seed, `jax.random.key(seed)` or a raw uint32 key (`key=0` and
            `key=jax.random.key(0)` give the same draws).
        num_draws: draws per image.
        a, b: the Beta noise parameters. `noise="paper"` adds `ε ~ Beta(a, b)` as written
            (Beta(50, 50) has mean 0.5, so every latent dimension shifts by about +0.5, as in the
            authors' code); `"centred"` adds `ε − a / (a + b)`.
        max_per_image: misclassified draws kept per image.
        draws_per_chunk: decodes per jitted call.
        keep_images: keep the failures' decoded images (else `images` is `[F, 0]`).
        progress: show a progress bar (None: jfail's default).

    Returns:
        `Failures`.

    Raises:
        ValueError: empty or non-finite `mu`, labels of the wrong shape or outside the
            classifier's `K` classes, bad settings, a decoder output that is not
            `[n, H, W, C]`, or a decoder or classifier that returned NaN or infinite values.
        ModelCallError: the decoder cannot take `[n, Z]` latents, or the classifier cannot take
            the decoder's images.
        TypeError: called inside `jax.jit`/`vmap`/`grad` (use `identify_batch` there).
    """
    if in_trace(decoder, classifier, mu, labels, key):
        raise TypeError(
            "identify returns a data-dependent number of failures and cannot run inside "
            "jax.jit, vmap or grad; call jfail.defuse.identify_batch there."
        )
    mu, labels = _check_inputs(mu, labels, num_draws, a, b, max_per_image, noise)
    labels = labels.astype(np.int32)
    parts: dict[str, list] = {name: [] for name in ("z", "x", "pred", "valid", "count")}
    chunks = identification_chunks(decoder, classifier, lambda start, stop: mu[start:stop],
                                   labels, mu.shape[1], key=key, num_draws=num_draws, a=a, b=b,
                                   max_per_image=max_per_image, noise=noise,
                                   draws_per_chunk=draws_per_chunk, keep_images=keep_images,
                                   progress=progress)
    for _, _, *values in chunks:
        for name, value in zip(parts, values):
            parts[name].append(value)
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


def identification_chunks(
    decoder: Callable,
    classifier: Callable,
    read_mu: Callable[[int, int], np.ndarray],
    labels: np.ndarray,
    latent_dim: int,
    *,
    key,
    num_draws: int,
    a: float,
    b: float,
    max_per_image: int,
    noise: str,
    draws_per_chunk: int,
    keep_images: bool,
    progress: bool | None,
):
    """`identify`'s loop over chunks of images, one chunk at a time (host memory: one chunk).

    Args:
        read_mu: `read_mu(start, stop)` -> [stop - start, Z] float32 encoder means of those images
            (a slice of an array, or a read from an on-disk store).
        labels: [N] int32 in the classifier's classes.
        latent_dim: Z.
        Others: as for `identify` (settings already checked).

    Yields:
        `(start, stop, z [b, k, Z], x [b, k, H, W, C] (or [b, k, 0]), predictions [b, k],
        valid [b, k] bool, misclassified [b])` per chunk of images `start:stop`, in order:
        the first `k = min(max_per_image, num_draws)` misclassified draws of each image, `valid`
        marking the real ones.

    Raises:
        ValueError: as `identify`; non-finite means of a chunk, or NaN decodes or logits.
    """
    if not isinstance(draws_per_chunk, (int, np.integer)) or draws_per_chunk < 1:
        raise ValueError(f"draws_per_chunk must be a positive integer, got {draws_per_chunk!r}")
    key = as_key(key)
    num_images = len(labels)
    parallel = DataParallel()
    images_per_chunk = min(max(1, draws_per_chunk // num_draws), num_images)
    images_per_chunk = -(-images_per_chunk // parallel.num_devices) * parallel.num_devices
    keep = min(max_per_image, num_draws)
    flat = jax.ShapeDtypeStruct((images_per_chunk * num_draws, latent_dim), jnp.float32)
    images, classes = _model_shapes(decoder, classifier, flat)
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(
            f"labels must lie in [0, {classes}) (the classifier returns {classes} logits), got "
            f"range [{labels.min()}, {labels.max()}]."
        )
    decoder_weights, decoder_rest = split_model(decoder, flat)
    classifier_weights, classifier_rest = split_model(classifier, images)
    program = _chunk_program(decoder_rest, classifier_rest, num_draws, float(a), float(b),
                             _shift(a, b, noise), keep, bool(keep_images))

    starts = range(0, num_images, images_per_chunk)
    for start in tqdm(starts, desc="identify", disable=progress_disabled(progress), leave=False):
        stop = min(start + images_per_chunk, num_images)
        mu = np.asarray(read_mu(start, stop), np.float32)
        if mu.shape != (stop - start, latent_dim):
            raise ValueError(f"mu rows {start}:{stop} have shape {mu.shape}, expected "
                             f"({stop - start}, {latent_dim}).")
        if not np.all(np.isfinite(mu)):
            raise ValueError(
                f"mu holds {int(np.sum(~np.isfinite(mu)))} non-finite values in rows "
                f"{start}:{stop}; check the encoder")
        index = np.arange(start, start + images_per_chunk)  # padded rows are dropped below
        (mu_dev, labels_dev, index_dev), _ = parallel.shard_batch(
            pad_rows_with_zeros(mu, images_per_chunk),
            pad_rows_with_zeros(labels[start:stop], images_per_chunk),
            index,
        )
        *values, decoded_finite, logits_finite = jax.device_get(
            program(decoder_weights, classifier_weights, mu_dev, labels_dev, index_dev, key)
        )
        _raise_for_nonfinite(decoded_finite[: stop - start], "decoder", "decodes", start)
        _raise_for_nonfinite(logits_finite[: stop - start], "classifier", "logits", start)
        yield (start, stop, *(value[: stop - start] for value in values))


# --------------------------------------------------------------------------------------------
# Private helpers.


def _draws(decoder, classifier, mu, index, key, num_draws, a, b, shift):
    """`(z [B, Q, Z], images [B, Q, H, W, C], logits [B, Q, K])` of image `i`'s draws from
    `fold_in(key, index[i])`; one decoder and one classifier call over all `B·Q` draws."""

    def noise(i):
        eps = jax.random.beta(jax.random.fold_in(key, i), a, b, (num_draws, mu.shape[-1]))
        return eps - shift

    z = mu[:, None, :] + jax.vmap(noise)(index)  # [B, Q, Z]
    x = decoder(z.reshape(-1, z.shape[-1]))
    logits = classifier(x)
    return z, x.reshape(*z.shape[:2], *x.shape[1:]), logits.reshape(*z.shape[:2], -1)


@functools.lru_cache(maxsize=16)
def _chunk_program(decoder_rest, classifier_rest, num_draws, a, b, shift, keep, keep_images):
    """The jitted program of one chunk: the kept draws, the misclassified count, and per image
    whether its decodes and logits are finite (one transfer for all)."""

    @jit
    def program(decoder_weights, classifier_weights, mu, labels, index, key):
        decoder = cpu_friendly_gradients(decoder_rest.rebuild(decoder_weights))
        classifier = cpu_friendly_gradients(classifier_rest.rebuild(classifier_weights))
        z, x, logits = _draws(decoder, classifier, mu, index, key, num_draws, a, b, shift)
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        wrong = pred != labels[:, None]
        # the first `keep` wrong draws of each image, in draw order (a stable sort puts them first)
        order = jnp.argsort(~wrong, axis=1, stable=True)[:, :keep]
        valid = jnp.take_along_axis(wrong, order, axis=1)
        z_kept = jnp.take_along_axis(z, order[..., None], axis=1)
        pred_kept = jnp.take_along_axis(pred, order, axis=1)
        if keep_images:
            x_kept = jax.vmap(lambda images, rows: images[rows])(x, order)
        else:
            x_kept = jnp.zeros(z.shape[:1] + (keep, 0), x.dtype)
        decoded_finite = jnp.all(jnp.isfinite(x.reshape(len(x), -1)), axis=1)
        logits_finite = jnp.all(jnp.isfinite(logits.reshape(len(x), -1)), axis=1)
        return z_kept, x_kept, pred_kept, valid, wrong.sum(1), decoded_finite, logits_finite

    return program


def _model_shapes(decoder, classifier, flat: jax.ShapeDtypeStruct):
    """`(images, K)`: the decoder's output shape on latents `flat` and the classifier's number of
    classes on those images; raises a clear error when either model cannot make the call."""
    for name, model in (("decoder", decoder), ("classifier", classifier)):
        if not callable(model):
            raise TypeError(f"{name} must be a callable JAX model, got {type(model).__name__}.")
    n = flat.shape[0]
    images = call_shape(decoder, flat)
    if not isinstance(images, jax.ShapeDtypeStruct) or len(images.shape) != 4 \
            or images.shape[0] != n:
        got = getattr(images, "shape", type(images).__name__)
        raise ValueError(
            f"decoder(z [{n}, {flat.shape[1]}]) must return images [{n}, H, W, C], got {got}."
        )
    logits = call_shape(classifier, images)
    if not isinstance(logits, jax.ShapeDtypeStruct) or len(logits.shape) != 2 \
            or logits.shape[0] != n:
        got = getattr(logits, "shape", type(logits).__name__)
        raise ValueError(
            f"classifier(images {list(images.shape)}) must return logits [{n}, K], got {got}."
        )
    return images, logits.shape[1]


def _raise_for_nonfinite(finite: np.ndarray, model: str, what: str, start: int) -> None:
    if finite.all():
        return
    bad = np.flatnonzero(~finite) + start
    raise ValueError(
        f"the {model} returned NaN or infinite {what} for the draws of {len(bad)} image(s) "
        f"(first: image {bad[0]} of mu); check its weights and the latents."
    )


def _shift(a, b, noise) -> float:
    return a / (a + b) if noise == "centred" else 0.0


def _check_settings(num_draws, a, b, max_per_image, noise) -> None:
    for name, value in (("num_draws", num_draws), ("max_per_image", max_per_image)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, (int, float, np.number)) and not (math.isfinite(value) and value > 0):
            raise ValueError(f"Beta parameter {name} must be positive, got {value!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")


def _check_inputs(mu, labels, num_draws, a, b, max_per_image, noise):
    mu = np.asarray(mu, np.float32)
    labels = np.asarray(labels)
    if mu.size == 0 or labels.size == 0:
        raise ValueError(
            f"mu (shape {mu.shape}) or labels (shape {labels.shape}) is empty: pass the encoder "
            "means [N, Z] and labels [N] of at least one image"
        )
    if mu.ndim != 2:
        raise ValueError(f"mu must be [N, Z] encoder means, got shape {mu.shape}")
    if labels.shape != (len(mu),):
        raise ValueError(f"labels must be [N] = [{len(mu)}], got shape {labels.shape}")
    if not np.all(np.isfinite(mu)):
        raise ValueError(
            f"mu holds {int(np.sum(~np.isfinite(mu)))} non-finite values; check the encoder"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    _check_settings(num_draws, a, b, max_per_image, noise)
    return mu, labels.astype(np.int64)
