"""Planted bugs of the debugging tests (seed 002, Table 1): spurious backgrounds, flipped labels.

- `spurious_backgrounds`: objects (e.g. Fashion-MNIST items, black background) composited onto
  class-correlated backgrounds cut from scikit-image's bundled textures and photos, with the exact
  object masks; `background_only` gives the backgrounds alone, to test whether a model learned
  the shortcut; `ground_truth_background` is the paper's GT-1 mask (all relevance belongs on the
  background when the model uses the shortcut).
- `flip_labels`: a stated fraction of labels, exactly, moved to another class.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BACKGROUNDS",
    "SpuriousData",
    "load_backgrounds",
    "spurious_backgrounds",
    "background_only",
    "ground_truth_background",
    "flip_labels",
]

BACKGROUNDS = ("brick", "grass", "gravel", "moon", "camera", "cell", "coins", "text")


@dataclasses.dataclass(frozen=True)
class SpuriousData:
    """Composited images `[N, H, W, 1]` in [0, 1], their labels `[N]`, object masks
    `[N, H, W]` (True on the object), the index of the background each image got `[N]` and the
    (top, left) corner of its crop in that background `[N, 2]`."""

    images: np.ndarray
    labels: np.ndarray
    object_masks: np.ndarray
    background_ids: np.ndarray
    crop_offsets: np.ndarray


def load_backgrounds(names: Sequence[str] = BACKGROUNDS[:2]) -> list[np.ndarray]:
    """Grey-scale float images in [0, 1] from `skimage.data`, one per name."""
    import skimage.data
    from skimage.color import rgb2gray

    images = []
    for name in names:
        if name not in BACKGROUNDS:
            raise ValueError(f"unknown background {name!r}; bundled: {BACKGROUNDS}")
        image = np.asarray(getattr(skimage.data, name)(), np.float32)
        if image.ndim == 3:
            image = rgb2gray(image / 255.0).astype(np.float32)
        else:
            image = image / 255.0
        images.append(image)
    return images


def spurious_backgrounds(
    images, labels, backgrounds: Sequence[np.ndarray], key: jax.Array, *,
    correlation: float = 1.0, threshold: float = 0.0,
) -> SpuriousData:
    """Composite each object onto a random crop of the background of its class.

    images: `[N, H, W, 1]` in [0, 1] with a black (0) background; labels: `[N]` in
    [0, len(backgrounds)); backgrounds: one grey image per class, larger than H x W. With
    probability `correlation` an image gets its class's background, else another class's. The
    object mask is `image > threshold`: object pixels are kept exactly, the rest is background.
    """
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images must be grey [N, H, W, 1], got shape {images.shape}.")
    classes = len(backgrounds)
    if labels.shape != images.shape[:1] or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be [N] in [0, {classes}): one background per class.")
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [0, 1], got {correlation}.")
    height, width = images.shape[1:3]
    key_swap, key_other, key_crop = jax.random.split(key, 3)
    swap = np.asarray(jax.random.uniform(key_swap, labels.shape) >= correlation)
    shift = np.asarray(jax.random.randint(key_other, labels.shape, 1, max(classes, 2)))
    background_ids = np.where(swap & (classes > 1), (labels + shift) % classes, labels)
    crops, offsets = _random_crops(backgrounds, background_ids, (height, width), key_crop)
    masks = images[..., 0] > threshold
    composite = np.where(masks[..., None], images, crops[..., None])
    return SpuriousData(composite.astype(np.float32), labels, masks, background_ids, offsets)


def background_only(
    backgrounds: Sequence[np.ndarray], count: int, size: tuple[int, int], key: jax.Array,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` background crops `[count, H, W, 1]` and the class each background stands for."""
    ids = np.asarray(jax.random.randint(jax.random.fold_in(key, 0), (count,), 0, len(backgrounds)))
    crops, _ = _random_crops(backgrounds, ids, size, jax.random.fold_in(key, 1))
    return crops[..., None].astype(np.float32), ids


def ground_truth_background(object_masks) -> np.ndarray:
    """GT-1 of §3.1: 1 on the background, 0 on the object, `[N, H, W]` float32."""
    return (~np.asarray(object_masks, bool)).astype(np.float32)


def flip_labels(labels, fraction: float, num_classes: int, key: jax.Array):
    """Move exactly round(fraction · N) labels, chosen uniformly, to a different class.

    Returns `(new_labels [N], flipped_indices [k])`; every flipped label differs from the original.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}.")
    if num_classes < 2:
        raise ValueError("flipping labels needs at least 2 classes.")
    count = int(round(fraction * len(labels)))
    key_pick, key_shift = jax.random.split(key)
    flipped = np.sort(np.asarray(jax.random.permutation(key_pick, len(labels))[:count]))
    shift = np.asarray(jax.random.randint(key_shift, (count,), 1, num_classes))
    new_labels = labels.copy()
    new_labels[flipped] = (labels[flipped] + shift) % num_classes
    return new_labels, flipped


def _random_crops(backgrounds, ids, size, key):
    """`[N, H, W]` crops, crop i from `backgrounds[ids[i]]` at a uniformly random offset, and
    the offsets `[N, 2]`."""
    height, width = size
    shapes = np.array([np.shape(b)[:2] for b in backgrounds])
    if np.any(shapes[:, 0] < height) or np.any(shapes[:, 1] < width):
        raise ValueError(f"every background must be at least {size}, got {shapes.tolist()}.")
    ids = np.asarray(ids, np.int64)
    room = shapes[ids] - np.array([height, width]) + 1  # [N, 2] number of valid offsets
    offsets = np.asarray(jax.random.randint(key, room.shape, 0, jnp.asarray(room)))
    crops = np.empty((len(ids), height, width), np.float32)
    for index, (background_id, (top, left)) in enumerate(zip(ids, offsets)):
        crops[index] = backgrounds[background_id][top:top + height, left:left + width]
    return crops, offsets
