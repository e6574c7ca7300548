"""Barlow's views of one robust feature: activations, heatmaps and feature attacks (appendix A-C).

All three take the model as a plain callable (`features(x) -> [B, D]` or
`feature_map(x) -> [B, h, w, C]`, e.g. the Partials of `jfail.models.model_fns`), run it jitted
on chunks of `batch_size` images split over the devices of a `DataParallel` mesh, and return
numpy arrays.

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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfail.logs import progress_disabled
from jfail.data.checks import check_images
from jfail.models.cpu_gradients import cpu_friendly_gradients
from jfail.train.parallel import DataParallel
from jfail.xla import jit

__all__ = [
    "AttackSettings",
    "PAPER_ATTACK",
    "attack_settings",
    "feature_attack",
    "features",
    "heatmap",
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
    """The paper's attack rescaled to `image_shape` (H, W, C): same per-pixel budget and step."""
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
    """Penultimate activations `feature_fn(images)`: images [N, H, W, C] in [0, 1] -> [N, D]."""
    check_images(images)
    probe = jax.eval_shape(feature_fn, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
    if len(probe.shape) != 2:
        raise ValueError(
            f"feature_fn must return pooled features [B, D], got {probe.shape} for one image; "
            "for a feature map [B, h, w, C] use heatmap()."
        )
    return _map_chunks(
        _apply_features, feature_fn, images, (), batch_size, data_parallel, progress, "features"
    )


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

    The `feature_index` channel of `feature_map_fn(images)` ([N, h, w, C], before global
    pooling), normalised to [0, 1] per image (a constant map gives zeros) and resized
    bilinearly to `image_size` (default: the images' own H, W). `feature_index`: an int, or [N]
    ints (one feature per image).
    """
    check_images(images)
    size = tuple(image_size) if image_size is not None else tuple(images.shape[1:3])
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width), got {image_size}.")
    index = _feature_indices(feature_index, len(images))
    probe = jax.eval_shape(
        feature_map_fn, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)
    )
    if len(probe.shape) != 4:
        raise ValueError(
            f"feature_map_fn must return a feature map [B, h, w, C], got {probe.shape} for one "
            "image; pooled features [B, D] have no spatial extent to show."
        )
    _check_index_range(index, probe.shape[-1])
    return _map_chunks(
        functools.partial(_apply_heatmap, size=size),
        feature_map_fn,
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

    Gradient ascent on `features_fn(x)[:, feature_index]` with l2-normalised steps of
    `step_size`, each followed by projection onto the l2 ball of radius `epsilon` around the
    image and onto [0, 1]. Unset settings come from `attack_settings(images.shape[1:])`, the
    paper's step 1, epsilon 500, 500 steps at 224 x 224 x 3 scaled to the image (module doc).
    `feature_index`: an int or [N] ints.
    """
    check_images(images)
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
    index = _feature_indices(feature_index, len(images))
    probe = jax.eval_shape(features_fn, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
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
        features_fn,
        images,
        (index, *settings),
        batch_size,
        data_parallel,
        progress,
        "feature attack",
    )


def most_activating(activations, feature_index: int, k: int, *, among=None) -> np.ndarray:
    """Rows of the `k` largest values of one feature, largest first.

    activations: [N, D]; among: optional row indices to choose from. Returns up to k rows of
    `activations`.
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
# Jitted kernels; the model callable is an argument, so its weights are traced, not baked in.


@jit
def _apply_features(feature_fn, x):
    return feature_fn(x)


@jit(static_argnames=("size",))
def _apply_heatmap(feature_map_fn, x, index, *, size):
    feature_map = feature_map_fn(x)  # [B, h, w, C]
    channel = jnp.take_along_axis(feature_map, index[:, None, None, None], axis=-1)[..., 0]
    low = channel.min(axis=(1, 2), keepdims=True)
    high = channel.max(axis=(1, 2), keepdims=True)
    span = high - low
    normalised = jnp.where(span > 0, (channel - low) / jnp.where(span > 0, span, 1.0), 0.0)
    resized = jax.image.resize(normalised, (x.shape[0], *size), method="bilinear")
    return jnp.clip(resized, 0.0, 1.0)


@jit(static_argnames=("steps",))
def _apply_attack(features_fn, x, index, epsilon, step_size, *, steps):
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
    model_fn = _as_argument(model_fn, data_parallel)
    outputs = []
    starts = range(0, len(images), chunk)
    for start in tqdm(
        starts, desc=desc, unit="batch", disable=progress_disabled(progress), leave=False
    ):
        stop = min(start + chunk, len(images))
        arrays = [_pad_to(a[start:stop], chunk) for a in (images, *per_image)]
        sharded, _ = data_parallel.shard_batch(*arrays)
        outputs.append(np.asarray(kernel(model_fn, *sharded))[: stop - start])
    return np.concatenate(outputs)


def _as_argument(model_fn, data_parallel: DataParallel):
    """The callable as a jit argument: a pytree whose arrays are replicated over the devices.

    A plain function (not a pytree) is wrapped in a Partial; whatever it closes over is then a
    compile-time constant, which is fine for tests and small models.
    """
    if not callable(model_fn):
        raise TypeError(f"expected a callable model, got {type(model_fn).__name__}.")
    leaves = jax.tree_util.tree_leaves(model_fn)
    if len(leaves) == 1 and leaves[0] is model_fn:
        model_fn = jax.tree_util.Partial(model_fn)
    place = lambda leaf: (  # noqa: E731
        jax.device_put(leaf, data_parallel.replicated)
        if isinstance(leaf, (jax.Array, np.ndarray))
        else leaf
    )
    return jax.tree_util.tree_map(place, model_fn)


def _pad_to(array: np.ndarray, rows: int) -> np.ndarray:
    """Pads a chunk to `rows` by repeating its last row (a valid image, so no NaN in padding)."""
    if len(array) == rows:
        return array
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


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
