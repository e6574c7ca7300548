"""Defuse over a data set that is never loaded whole: encoding, identification and distillation
from and to on-disk arrays.

1. `encode_to_store`: the VAE encoder over a source through
   `jfail.engine.map_dataset` (sharded, resumable): `mu` and `logvar` [N, Z].
2. `identify_to_store`: Algorithm 1's draws for every image, chunk by chunk (the same
   chunks, keys and programs as `jfail.defuse.identify`), the kept failures appended to
   on-disk arrays as they are found: host memory holds one chunk of draws, never every decode.
3. `distill_stored`: the Dirichlet-process mixture fitted on at most `max_points` stored
   latents, the same seeded subsample as `jfail.defuse.distill` reads (only those rows are
   read), then every latent assigned to its scenario chunk by chunk.

Each step equals its in-memory function on the same data: `identify_to_store(...).read()`
equals `identify(...)` and `distill_stored(stored.latents, ...)` equals
`distill(stored.latents[...], ...)`.

Layout of an `identify_to_store` folder::

  failures.json   num_images, num_failures, num_draws, noise, misclassified_draws, ...
  latents/        [F, Z] float32      images/   [F, H, W, C] float32 (keep_images) or [F, 0]
  predictions/    [F] int32           labels/   [F] int32
  sources/        [F] int64           per_image/ [N] int64
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jfail import jsonfile
from jfail.defuse.distill import Scenarios, _check_settings, _fit_mixture, _scenarios
from jfail.defuse.identify import (
    Failures,
    identification_chunks,
)
from jfail.defuse.identify import (
    _check_settings as _check_identify_settings,
)
from jfail.keys import as_key
from jfail.models.adapter import call_shape, in_trace, traced_model

__all__ = [
    "StoredFailures",
    "distill_stored",
    "encode_to_store",
    "identify_to_store",
    "open_failures",
]

FORMAT = "jfail-defuse-failures-v1"
METADATA_FILE = "failures.json"
_ARRAYS = ("latents", "images", "predictions", "labels", "sources")


@dataclasses.dataclass(frozen=True)
class StoredFailures:
    """The failures found by `identify_to_store`, on disk (the fields of
    `jfail.defuse.Failures`, arrays read lazily).

    Attributes:
        out_dir: where they are.
        latents: [F, Z] `jfail.engine.LazyArray`.
        images: [F, H, W, C] decodes, or [F, 0] without `keep_images`.
        predictions: [F] the classifier's class.
        labels: [F] the source image's label.
        sources: [F] the source image's index.
        per_image: [N] kept draws per image (in memory).
        num_draws, noise, misclassified_draws: as in `Failures`.
    """

    out_dir: str
    latents: object
    images: object
    predictions: object
    labels: object
    sources: object
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

    def read(self) -> Failures:
        """Everything in memory, as the `Failures` that `identify` returns.

        Returns:
            `Failures` with every array read into a NumPy array.
        """
        return Failures(
            latents=self.latents[...], images=self.images[...],
            predictions=self.predictions[...], labels=self.labels[...],
            sources=self.sources[...], per_image=self.per_image.copy(),
            num_draws=self.num_draws, noise=self.noise,
            misclassified_draws=self.misclassified_draws,
        )


def encode_to_store(
    encoder: Callable,
    source,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 256,
    split: str = "train",
    progress: bool | None = None,
):
    """The encoder's means and log-variances of every image of a source, stored on disk.

    Args:
        encoder: any JAX callable `encoder(x [B, H, W, C]) -> (mu [B, Z], logvar [B, Z])`; its
            weights are read now.
        source: a `jfail.data.ImageSource` or a name for `jfail.data.open_source`.
        out_dir: a new or empty folder, or that of an interrupted run of the same call.
        batch_size: images per global batch, a multiple of the device count.
        split: the split, when `source` is a name.
        progress: show a progress bar (None: when stderr is a terminal).

    Returns:
        `jfail.engine.MappedOutputs` with `"mu"` and `"logvar"`, [N, Z] each (the same values
        as `jfail.defuse.encode` on the images).

    Raises:
        ValueError: the encoder does not return a pair of [B, Z] arrays; the engine's errors.
        ModelCallError: the encoder cannot take the source's images.
    """
    from jfail.data.sources import open_source
    from jfail.engine import map_dataset

    if not callable(encoder):
        raise TypeError(f"encoder must be a callable JAX model, got {type(encoder).__name__}.")
    if isinstance(source, str):
        source = open_source(source, split)
    example = jax.ShapeDtypeStruct((1, *source.image_shape), jnp.float32)
    out = call_shape(traced_model(encoder, example), example)
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(getattr(a, "ndim", None) == 2 and a.shape[0] == 1 for a in out)
            and out[0].shape == out[1].shape):
        got = jax.tree_util.tree_map(lambda a: tuple(a.shape), out)
        raise ValueError(
            f"encoder(x [n, H, W, C]) must return (mu [n, Z], logvar [n, Z]), got shapes {got} "
            "for n = 1.")

    def encode(images):
        mu, logvar = encoder(images)
        return {"mu": mu, "logvar": logvar}

    return map_dataset(encode, source, out_dir, batch_size=batch_size, progress=progress)


def identify_to_store(
    decoder: Callable,
    classifier: Callable,
    mu,
    labels,
    out_dir: str | os.PathLike,
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
) -> StoredFailures:
    """Algorithm 1 on every image, the failures written to disk as they are found.

    The same draws, cap and order as `jfail.defuse.identify` with the same arguments
    (`identify_to_store(...).read()` equals `identify(...)`), but `mu` is read and the
    failures are written one chunk of `draws_per_chunk` decodes at a time. It runs in this
    process, on its devices (as `identify`); a killed run is started again in a new folder
    (the encoding, the long pass over the images, is the resumable step).

    Args:
        decoder: `decoder(z [n, Z]) -> images [n, H, W, C]`, any JAX callable.
        classifier: `classifier(images [n, H, W, C]) -> logits [n, K]`, any JAX callable.
        mu: [N, Z] encoder means: an array or a `jfail.engine.LazyArray` (e.g.
            `encode_to_store(...)["mu"]`), read one chunk at a time.
        labels: [N] int in `[0, K)` (e.g. `source.labels()`).
        out_dir: a new or empty folder (layout in the module doc).
        key, num_draws, a, b, max_per_image, noise, draws_per_chunk, keep_images, progress: as
            for `identify`.

    Returns:
        `StoredFailures`.

    Raises:
        ValueError: as `identify`; an `out_dir` that is not empty; `mu` not [N, Z] or of another
            length than `labels`.
        ModelCallError: the decoder cannot take [n, Z] latents, or the classifier its images.
        TypeError: called inside `jax.jit`/`vmap`/`grad`.
    """
    from jfail.engine import create_array

    if in_trace(decoder, classifier, mu, labels, key):
        raise TypeError("identify_to_store writes files and cannot run inside jax.jit, vmap or "
                        "grad; call jfail.defuse.identify_batch there.")
    labels = np.asarray(labels)
    if len(getattr(mu, "shape", ())) != 2 or not mu.shape[0]:
        raise ValueError(f"mu must be [N, Z] encoder means with N >= 1, got shape "
                         f"{getattr(mu, 'shape', None)}.")
    if labels.shape != (mu.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be [N] = [{mu.shape[0]}] integers, got shape "
                         f"{labels.shape} of dtype {labels.dtype}.")
    _check_identify_settings(num_draws, a, b, max_per_image, noise)
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty; give a new or empty folder for the failures.")
    os.makedirs(out_dir, exist_ok=True)
    labels = labels.astype(np.int32)
    num_images, latent_dim = int(mu.shape[0]), int(mu.shape[1])
    keep = min(max_per_image, num_draws)
    capacity = num_images * keep
    stores, per_image, misclassified, written = None, np.zeros(num_images, np.int64), 0, 0
    chunks = identification_chunks(decoder, classifier, lambda start, stop: mu[start:stop],
                                   labels, latent_dim, key=key, num_draws=num_draws, a=a, b=b,
                                   max_per_image=max_per_image, noise=noise,
                                   draws_per_chunk=draws_per_chunk, keep_images=keep_images,
                                   progress=progress)
    for start, stop, z, x, pred, valid, count in chunks:
        rows, cols = np.nonzero(valid)
        found = {
            "latents": z[rows, cols],
            "images": x[rows, cols] if keep_images else np.zeros((len(rows), 0), np.float32),
            "predictions": pred[rows, cols].astype(np.int32),
            "labels": labels[start:stop][rows],
            "sources": (rows + start).astype(np.int64),
        }
        if stores is None:
            chunk_rows = max(1, (stop - start) * keep)
            stores = {name: create_array(os.path.join(out_dir, name),
                                         (capacity, *value.shape[1:]), value.dtype,
                                         chunk_rows=chunk_rows)
                      for name, value in found.items()}
        if len(rows):
            writes = [stores[name][written:written + len(rows)].write(value)
                      for name, value in found.items()]
            for write in writes:
                write.result()
        written += len(rows)
        per_image[start:stop] = valid.sum(1)
        misclassified += int(count.sum())
    for store in stores.values():
        store.resize(exclusive_max=[written, *store.shape[1:]],
                     resize_metadata_only=True).result()
    _write_per_image(out_dir, per_image)
    jsonfile.write(os.path.join(out_dir, METADATA_FILE), {
        "format": FORMAT, "num_images": num_images, "num_failures": written,
        "num_draws": num_draws, "noise": noise, "misclassified_draws": misclassified,
        "max_per_image": max_per_image, "a": float(a), "b": float(b),
        "keep_images": bool(keep_images)})
    return open_failures(out_dir)


def open_failures(out_dir: str | os.PathLike) -> StoredFailures:
    """Opens the failures written by `identify_to_store`.

    Args:
        out_dir: the folder of a finished `identify_to_store` run.

    Returns:
        `StoredFailures` whose arrays are read lazily.

    Raises:
        FileNotFoundError: `out_dir` holds no finished `identify_to_store` run.
    """
    import json

    from jfail.engine import open_array

    out_dir = os.fspath(out_dir)
    try:
        with open(os.path.join(out_dir, METADATA_FILE)) as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{out_dir} holds no finished identify_to_store run (no {METADATA_FILE}).") from None
    if meta.get("format") != FORMAT:
        raise FileNotFoundError(f"{out_dir}/{METADATA_FILE} is not a {FORMAT} file.")
    arrays = {name: open_array(os.path.join(out_dir, name), name) for name in _ARRAYS}
    return StoredFailures(out_dir, **arrays,
                          per_image=open_array(os.path.join(out_dir, "per_image"))[...],
                          num_draws=meta["num_draws"], noise=meta["noise"],
                          misclassified_draws=meta["misclassified_draws"])


def distill_stored(
    latents,
    *,
    key,
    max_components: int = 100,
    min_weight: float = 0.01,
    max_points: int = 50_000,
    max_iter: int = 100,
    chunk_rows: int = 65_536,
) -> Scenarios:
    """`jfail.defuse.distill` on latents that stay on disk.

    The mixture is fitted on the same seeded subsample of at most `max_points` latents that
    `distill` draws (only those rows are read), with the paper's settings otherwise; every
    latent is then assigned to its scenario `chunk_rows` rows at a time. The result equals
    `distill(np.asarray(latents), ...)`.

    Args:
        latents: [F, Z]: a `jfail.engine.LazyArray` (`StoredFailures.latents`) or an array.
        key, max_components, min_weight, max_points, max_iter: as for `distill`.
        chunk_rows: latents read at once for the assignments.

    Returns:
        `jfail.defuse.Scenarios` (`assignments`: [F], in memory).

    Raises:
        ValueError: as `distill` (no latents, non-finite latents, bad settings, fewer points
            than components, no component above `min_weight`), or `latents` not [F, Z].
    """
    shape = tuple(getattr(latents, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"latents must be [F, Z], got shape {shape}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
            or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    num_latents = shape[0]
    _check_settings(num_latents, max_components, min_weight, max_points)
    fit_key, mixture_seed = jax.random.split(as_key(key))
    if num_latents > max_points:
        chosen = np.sort(np.asarray(
            jax.random.choice(fit_key, num_latents, (max_points,), replace=False)))
        points = np.asarray(latents[chosen])  # only these rows are read
    else:
        points = np.asarray(latents[0:num_latents])
    points = _finite(points.astype(np.float64), 0)
    mixture, kept = _fit_mixture(points, mixture_seed, max_components, min_weight, max_iter)
    assignments = np.concatenate([
        mixture.predict(_finite(np.asarray(latents[lo:hi], np.float64), lo))
        for lo, hi in _spans(num_latents, chunk_rows)])
    return _scenarios(mixture, kept, assignments, max_components)


def _spans(length: int, step: int):
    return [(lo, min(lo + step, length)) for lo in range(0, length, step)]


def _finite(latents: np.ndarray, start: int) -> np.ndarray:
    if not np.all(np.isfinite(latents)):
        bad = int(np.sum(~np.all(np.isfinite(latents), axis=1)))
        raise ValueError(f"{bad} latents (from row {start}) hold NaN or infinite values; check "
                         "the encoder output")
    return latents


def _write_per_image(out_dir: str, per_image: np.ndarray) -> None:
    from jfail.engine import create_array

    store = create_array(os.path.join(out_dir, "per_image"), per_image.shape, per_image.dtype,
                         chunk_rows=max(1, min(len(per_image), 1 << 20)))
    store[...].write(per_image).result()
