"""Barlow's views of one robust feature: activations, heatmaps and feature attacks (appendix A-C).

All three take the model as any JAX callable (`features(x) -> [B, D]` or
`feature_map(x) -> [B, h, w, C]`: a closure, `Partial`, NNX or Equinox module), run it jitted on
chunks of `batch_size` images split over the devices of a `DataParallel` mesh, and return numpy
arrays. The model's weights are traced arguments of the compiled program (found by
`jfail.models.adapter.traced_model`), so a call after a weight update uses the new weights.
Their per-batch computations are the pure kernels `heatmap_batch` and `attack_batch` (and the
model itself for `features`), usable inside the caller's own `jax.jit`, `vmap` and `grad`.

Feature attack at other resolutions. The paper attacks 224 x 224 x 3 ImageNet images with
normalised-gradient ascent, step 1 and epsilon 500 in l2 (pixels in [0, 1]), for 500 steps. In
d = 150,528 dimensions that epsilon exceeds the diameter of the pixel box, sqrt(d) = 388, so the
ball never binds and only [0, 1] does, and each step moves a pixel by 1 / sqrt(d) = 0.0026 (root
mean square). `attack_settings(image_shape)` keeps both per-pixel quantities for an image of d
pixels: epsilon = 500 sqrt(d / 150,528), step = sqrt(d / 150,528), 500 steps. For 28 x 28 x 1 that
is epsilon = 36.08 and step 0.0722 (the box's diameter is 28); for 32 x 32 x 3, 71.4 and 0.143.
Scaling epsilon and the step by sqrt(d) rather than d is what keeps the per-pixel change the same
under the l2 norm; the number of steps, and hence the total path (500 x step = epsilon), stay.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfail.data.batching import pad_rows_repeating_last
from jfail.data.checks import check_images
from jfail.logs import progress_disabled
from jfail.models.adapter import call_shape, in_trace, traced_model
from jfail.train.parallel import DataParallel
from jfail.xla import cpu_friendly_gradients, jit

__all__ = [
    "AttackSettings",
    "PAPER_ATTACK",
    "attack_batch",
    "attack_settings",
    "feature_attack",
    "features",
    "features_to_store",
    "heatmap",
    "heatmap_batch",
    "most_activating",
]


class AttackSettings(NamedTuple):
    """Normalised-gradient ascent in l2: `steps` steps of length `step_size`, radius `epsilon`."""

    epsilon: float
    step_size: float
    steps: int


PAPER_ATTACK = AttackSettings(epsilon=500.0, step_size=1.0, steps=500)
"""Appendix C's settings, for 224 x 224 x 3 images."""

_PAPER_DIMENSION = 224 * 224 * 3


def attack_settings(image_shape) -> AttackSettings:
    """The paper's attack rescaled to `image_shape` (H, W, C): same per-pixel budget and step.

    Args:
      image_shape: the shape of one image, `(H, W, C)`.

    Returns:
      An `AttackSettings` whose `epsilon` and `step_size` are `PAPER_ATTACK`'s times
      `sqrt(H * W * C / (224 * 224 * 3))`, with the same number of steps.
    """
    dimension = int(np.prod(image_shape))
    scale = math.sqrt(dimension / _PAPER_DIMENSION)
    return AttackSettings(
        PAPER_ATTACK.epsilon * scale, PAPER_ATTACK.step_size * scale, PAPER_ATTACK.steps
    )


def features(
    feature_fn: Callable,
    images,
    *,
    batch_size: int = 256,
    data_parallel: DataParallel | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Penultimate activations of a robust model, in chunks (host driver).

    The per-batch computation is the model itself: inside your own `jax.jit`/`vmap`/`grad` call
    `feature_fn(x)` directly.

    Args:
      feature_fn: any JAX callable `[B, H, W, C] -> [B, D]` (closure, `Partial`, NNX or
        Equinox module); its weights are read at the moment of the call.
      images: [N, H, W, C] in [0, 1].
      batch_size: images per jitted call.

    Returns:
      [N, D] float numpy array.

    Raises:
      ValueError: bad images, or `feature_fn` does not return `[B, D]`.
      ModelCallError: `feature_fn` cannot be called on these images.
    """
    if in_trace(feature_fn, images):
        return feature_fn(images)
    check_images(images)
    model, probe = _prepare(feature_fn, images)
    if len(probe.shape) != 2:
        raise ValueError(
            f"feature_fn must return pooled features [B, D], got {probe.shape} for one image; "
            "for a feature map [B, h, w, C] use heatmap()."
        )
    return _map_chunks(
        _apply_features, model, images, (), batch_size, data_parallel, progress, "features"
    )


def features_to_store(
    feature_fn: Callable,
    source,
    out_dir,
    *,
    batch_size: int = 256,
    split: str = "train",
    progress: bool | None = None,
):
    """Penultimate activations of every image of a source, into a resumable on-disk store.

    The same features as :func:`features`, for data sets that do not fit in memory or that
    are spread over many hosts: the model runs through :func:`jfail.engine.map_dataset`
    (batches sharded over every device of every process, a killed run continues where it
    stopped). Read them back with ``outputs["features"][i:j]`` or ``np.asarray(...)``.

    Args:
      feature_fn: any JAX callable `[B, H, W, C] -> [B, D]`; its weights are read now.
      source: a `jfail.data.ImageSource` or a name for `jfail.data.open_source`
        (``"imagefolder:/data/pets@224"``, ``"tfds:imagenet2012"``, ``"mnist[:10%]"``).
      out_dir: a new or empty folder, or that of an interrupted run of the same call.
      batch_size: images per global batch, a multiple of the device count.
      split: the split, when `source` is a name.
      progress: show a progress bar (None: when stderr is a terminal).

    Returns:
      `jfail.engine.MappedOutputs` with one array, ``"features"``: [N, D] float.

    Raises:
      ValueError: `feature_fn` does not return `[B, D]`; the engine's errors (batch size,
        out_dir).
      ModelCallError: `feature_fn` cannot be called on the source's images.
    """
    from jfail.data.sources import open_source
    from jfail.engine import map_dataset

    if isinstance(source, str):
        source = open_source(source, split)
    example = jax.ShapeDtypeStruct((1, *source.image_shape), jnp.float32)
    probe = call_shape(traced_model(feature_fn, example), example)
    if len(getattr(probe, "shape", ())) != 2:
        raise ValueError(
            f"feature_fn must return pooled features [B, D], got "
            f"{getattr(probe, 'shape', jax.tree_util.tree_structure(probe))} for one image; "
            "for a feature map [B, h, w, C] pool it first (e.g. mean over h and w)."
        )
    return map_dataset(lambda x: {"features": feature_fn(x)}, source, out_dir,
                       batch_size=batch_size, progress=progress)


def heatmap(
    feature_map_fn: Callable,
    images,
    feature_index,
    *,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 256,
    data_parallel: DataParallel | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Where a feature fires: images [N, H, W, C] -> [N, H', W'] in [0, 1] (appendix B).

    The host driver of `heatmap_batch`: chunks, shards and checks values.

    Args:
      feature_map_fn: any JAX callable `[B, H, W, C] -> [B, h, w, C']`, the feature map before
        global pooling.
      images: [N, H, W, C] in [0, 1].
      feature_index: an int, or [N] ints (one feature per image), in [0, C').
      image_size: (H', W') of the heatmaps (default: the images' own H, W).

    Returns:
      [N, H', W'] float numpy array: the channel normalised to [0, 1] per image (a constant map
      gives zeros), resized bilinearly.

    Raises:
      ValueError: bad images, sizes or indices, or `feature_map_fn` does not return a feature
        map `[B, h, w, C]`.
      ModelCallError: `feature_map_fn` cannot be called on these images.
    """
    size = tuple(image_size) if image_size is not None else tuple(images.shape[1:3])
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width), got {image_size}.")
    if in_trace(feature_map_fn, images, feature_index):
        return heatmap_batch(feature_map_fn, images, feature_index, size=size)
    check_images(images)
    index = _feature_indices(feature_index, len(images))
    model, probe = _prepare(feature_map_fn, images)
    _check_feature_map(probe.shape)
    _check_index_range(index, probe.shape[-1])
    return _map_chunks(
        functools.partial(_apply_heatmap, size=size),
        model,
        images,
        (index,),
        batch_size,
        data_parallel,
        progress,
        "heatmaps",
    )


def feature_attack(
    features_fn: Callable,
    images,
    feature_index,
    *,
    epsilon: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    data_parallel: DataParallel | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Images changed to maximise one feature (appendix C): [N, H, W, C] -> [N, H, W, C].

    The host driver of `attack_batch`. Unset settings come from
    `attack_settings(images.shape[1:])`, the paper's step 1, epsilon 500, 500 steps at
    224 x 224 x 3 scaled to the image (module doc).

    Args:
      features_fn: any JAX callable `[B, H, W, C] -> [B, D]`.
      images: [N, H, W, C] in [0, 1].
      feature_index: an int or [N] ints in [0, D).
      epsilon, step_size, steps: the l2 radius, step length and number of steps.

    Returns:
      [N, H, W, C] float numpy array in [0, 1].

    Raises:
      ValueError: bad images, settings or indices, or `features_fn` does not return `[B, D]`.
      ModelCallError: `features_fn` cannot be called on these images.
    """
    default = attack_settings(images.shape[1:])
    epsilon = default.epsilon if epsilon is None else float(epsilon)
    step_size = default.step_size if step_size is None else float(step_size)
    steps = default.steps if steps is None else int(steps)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}.")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    if in_trace(features_fn, images, feature_index):
        return attack_batch(features_fn, images, feature_index, epsilon, step_size, steps=steps)
    check_images(images)
    index = _feature_indices(feature_index, len(images))
    model, probe = _prepare(features_fn, images)
    if len(probe.shape) != 2:
        raise ValueError(f"features_fn must return [B, D], got {probe.shape} for one image.")
    _check_index_range(index, probe.shape[-1])
    attack = functools.partial(_apply_attack, steps=steps)
    settings = (
        np.full(len(images), epsilon, np.float32),
        np.full(len(images), step_size, np.float32),
    )
    return _map_chunks(
        attack,
        model,
        images,
        (index, *settings),
        batch_size,
        data_parallel,
        progress,
        "feature attack",
    )


def most_activating(activations, feature_index: int, k: int, *, among=None) -> np.ndarray:
    """Rows of the `k` largest values of one feature, largest first.

    Args:
      activations: `[N, D]`.
      feature_index: the feature (column), in `[0, D)`.
      k: the most rows returned.
      among: optional row indices to choose from; None chooses from every row.

    Returns:
      Up to `k` int row indices of `activations`, largest value first (ties in row order).

    Raises:
      ValueError: `activations` is not 2-D or `feature_index` is outside `[0, D)`.
    """
    activations = np.asarray(activations)
    if activations.ndim != 2:
        raise ValueError(f"activations must be [N, D], got shape {activations.shape}.")
    _check_index_range(np.asarray([feature_index]), activations.shape[1])
    rows = np.arange(len(activations)) if among is None else np.asarray(among, np.int64)
    values = activations[rows, feature_index]
    order = np.argsort(-values, kind="stable")[:k]
    return rows[order]


# --------------------------------------------------------------------------------------------
# Pure per-batch kernels: usable inside the caller's jax.jit, jax.vmap and jax.grad.


def heatmap_batch(feature_map_fn: Callable, x, index, *, size: tuple[int, int]) -> jax.Array:
    """Heatmaps of one batch, a pure function (no host checks).

    Args:
      feature_map_fn: `[B, H, W, C] -> [B, h, w, C']`.
      x: [B, H, W, C] images.
      index: [B] int feature (channel) per image.
      size: (H', W') of the output.

    Returns:
      [B, H', W'] in [0, 1]: the channel, min-max normalised per image, resized bilinearly.

    Raises:
      ValueError: at trace time, when `feature_map_fn` does not return `[B, h, w, C']`.
    """
    feature_map = feature_map_fn(x)
    _check_feature_map(jnp.shape(feature_map))
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (x.shape[0],))
    channel = jnp.take_along_axis(feature_map, index[:, None, None, None], axis=-1)[..., 0]
    low = channel.min(axis=(1, 2), keepdims=True)
    high = channel.max(axis=(1, 2), keepdims=True)
    span = high - low
    normalised = jnp.where(span > 0, (channel - low) / jnp.where(span > 0, span, 1.0), 0.0)
    resized = jax.image.resize(normalised, (x.shape[0], *tuple(size)), method="bilinear")
    return jnp.clip(resized, 0.0, 1.0)


def attack_batch(features_fn: Callable, x, index, epsilon, step_size, *, steps: int) -> jax.Array:
    """The feature attack on one batch, a pure function (no host checks).

    Args:
      features_fn: `[B, H, W, C] -> [B, D]`.
      x: [B, H, W, C] images in [0, 1].
      index: [B] int feature to maximise per image (or a scalar).
      epsilon, step_size: [B] or scalar l2 radius and step length.
      steps: number of normalised-gradient steps (static).

    Returns:
      [B, H, W, C]: each step moves along the l2-normalised gradient of the feature, then
      projects onto the epsilon ball around `x` and onto [0, 1].
    """
    batch = x.shape[0]
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (batch,))
    epsilon = jnp.broadcast_to(jnp.asarray(epsilon, x.dtype), (batch,))
    step_size = jnp.broadcast_to(jnp.asarray(step_size, x.dtype), (batch,))
    features_fn = cpu_friendly_gradients(features_fn)  # fast strided-conv gradients on CPU

    def activation(image, feature):
        return features_fn(image[None])[0, feature]

    gradient = jax.vmap(jax.grad(activation))
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    per_image = lambda v: v[:, None, None, None]  # noqa: E731

    def step(_, current):
        g = gradient(current, index)
        norm = jnp.linalg.norm(flat(g), axis=-1)
        direction = g / per_image(jnp.where(norm > 0, norm, 1.0))
        moved = current + per_image(step_size) * direction
        delta = moved - x
        length = jnp.linalg.norm(flat(delta), axis=-1)
        shrink = jnp.minimum(1.0, epsilon / jnp.where(length > 0, length, 1.0))
        return jnp.clip(x + delta * per_image(shrink), 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, step, x)


# Jitted forms for the host drivers; the model is an argument, so its weights are traced.


@jit
def _apply_features(feature_fn, x):
    return feature_fn(x)


_apply_heatmap = jit(heatmap_batch, static_argnames=("size",))
_apply_attack = jit(attack_batch, static_argnames=("steps",))


# --------------------------------------------------------------------------------------------
# Host-side functions.


def _map_chunks(kernel, model_fn, images, per_image, batch_size, data_parallel, progress, desc):
    """Runs `kernel(model_fn, x, *per_image_args)` on sharded chunks; concatenates on the host."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    data_parallel = data_parallel or DataParallel()
    devices = data_parallel.num_devices
    chunk = -(-min(batch_size, len(images)) // devices) * devices
    images = np.asarray(images, np.float32)
    model_fn = _replicate(model_fn, data_parallel)
    outputs = []
    starts = range(0, len(images), chunk)
    for start in tqdm(
        starts, desc=desc, unit="batch", disable=progress_disabled(progress), leave=False
    ):
        stop = min(start + chunk, len(images))
        arrays = [pad_rows_repeating_last(a[start:stop], chunk) for a in (images, *per_image)]
        sharded, _ = data_parallel.shard_batch(*arrays)
        outputs.append(np.asarray(kernel(model_fn, *sharded))[: stop - start])
    return np.concatenate(outputs)


def _prepare(model_fn, images):
    """`model_fn` as a pytree whose weights are every array it reads now, and the shape of its
    output for one image (a `ModelCallError` when it cannot be called on these images)."""
    example = jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)
    model = traced_model(model_fn, example)
    probe = call_shape(model, example)
    if not hasattr(probe, "shape"):
        raise ValueError(
            f"the model must return one array, got {jax.tree_util.tree_structure(probe)}."
        )
    return model, probe


def _check_feature_map(shape) -> None:
    if len(shape) != 4:
        raise ValueError(
            f"heatmap needs a feature map [B, h, w, C] (a conv layer's output before global "
            f"pooling), but feature_map_fn returns shape {tuple(shape)}; pooled features [B, D] "
            "have no spatial extent to show."
        )


def _replicate(model_fn, data_parallel: DataParallel):
    """The model's arrays replicated over the devices of `data_parallel`."""
    place = lambda leaf: (  # noqa: E731
        jax.device_put(leaf, data_parallel.replicated)
        if isinstance(leaf, (jax.Array, np.ndarray))
        else leaf
    )
    return jax.tree_util.tree_map(place, model_fn)


def _feature_indices(feature_index, num_images: int) -> np.ndarray:
    index = np.asarray(feature_index)
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"feature_index must be an int or [N] ints, got dtype {index.dtype}.")
    if index.ndim == 0:
        return np.full(num_images, int(index), np.int32)
    if index.shape != (num_images,):
        raise ValueError(
            f"feature_index must be an int or one index per image, shape ({num_images},); "
            f"got shape {index.shape}."
        )
    return index.astype(np.int32)


def _check_index_range(index: np.ndarray, num_features: int) -> None:
    if index.size and (index.min() < 0 or index.max() >= num_features):
        raise ValueError(
            f"feature_index must be in [0, {num_features}) for this model, got "
            f"{int(index.min())}..{int(index.max())}."
        )
