"""Planted bugs of the debugging tests (seed 002, Table 1): spurious backgrounds, flipped labels.

- `spurious_backgrounds`: objects (e.g. Fashion-MNIST items, black background) composited onto
  class-correlated backgrounds cut from scikit-image's bundled textures and photos, with the exact
  object masks; `background_only` gives the backgrounds alone, to test whether a model learned
  the shortcut; `ground_truth_background` is the paper's GT-1 mask (all relevance belongs on the
  background when the model uses the shortcut).
- `flip_labels`: a stated fraction of labels, exactly, moved to another class.
- `ground_truth_weighted`: the paper's GT-2, GT-1 weighted by the attribution of the background
  alone.
- `frozen_layer_mask`, `freeze` (Table 4, frozen layers): an optax transformation that keeps the
  named layers at their initialization while the others train.
- `preprocessing_mismatch` (Table 4, test-time pre-processing mismatch) and `ood_pairs`
  (out-of-distribution inputs, §5): contaminated test inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfail.keys import as_key

__all__ = [
    "BACKGROUNDS",
    "SpuriousData",
    "load_backgrounds",
    "spurious_backgrounds",
    "background_only",
    "ground_truth_background",
    "flip_labels",
    "ground_truth_weighted",
    "frozen_layer_mask",
    "freeze",
    "PREPROCESSING_KINDS",
    "preprocessing_mismatch",
    "ood_pairs",
]

BACKGROUNDS = ("brick", "grass", "gravel", "moon", "camera", "cell", "coins", "text")
PREPROCESSING_KINDS = ("inverted", "unnormalized", "standardized")


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
    """Grey-scale float images in [0, 1] from `skimage.data`, one per name.

    Args:
        names: names from BACKGROUNDS (functions of `skimage.data`).

    Returns:
        One `[H, W]` float32 image in [0, 1] per name (sizes differ between names).

    Raises:
        ValueError: a name that is not in BACKGROUNDS.
    """
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
    images, labels, backgrounds: Sequence[np.ndarray], *, key,
    correlation: float = 1.0, threshold: float = 0.0,
) -> SpuriousData:
    """Composite each object onto a random crop of the background of its class.

    With probability `correlation` an image gets its class's background, else another class's.
    The object mask is `image > threshold`: object pixels are kept exactly, the rest is
    background.

    Args:
        images: `[N, H, W, 1]` in [0, 1] with a black (0) background.
        labels: `[N]` in [0, len(backgrounds)).
        backgrounds: one grey `[h, w]` image per class, at least H x W.
        key: PRNG key (or int seed) for the background swaps and crop offsets.
        correlation: the probability that an image gets its own class's background, in [0, 1].
        threshold: pixels above it are the object.

    Returns:
        `SpuriousData`: images `[N, H, W, 1]` float32, labels `[N]`, object_masks `[N, H, W]`
        bool, background_ids `[N]` and crop_offsets `[N, 2]` (top, left).

    Raises:
        ValueError: images not `[N, H, W, 1]`, labels not `[N]` in [0, len(backgrounds)), a
            correlation outside [0, 1], or a background smaller than H x W.
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
    key_swap, key_other, key_crop = jax.random.split(as_key(key), 3)
    swap = np.asarray(jax.random.uniform(key_swap, labels.shape) >= correlation)
    shift = np.asarray(jax.random.randint(key_other, labels.shape, 1, max(classes, 2)))
    background_ids = np.where(swap & (classes > 1), (labels + shift) % classes, labels)
    crops, offsets = _random_crops(backgrounds, background_ids, (height, width), key_crop)
    masks = images[..., 0] > threshold
    composite = np.where(masks[..., None], images, crops[..., None])
    return SpuriousData(composite.astype(np.float32), labels, masks, background_ids, offsets)


def background_only(
    backgrounds: Sequence[np.ndarray], count: int, size: tuple[int, int], *, key,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` background crops `[count, H, W, 1]` and the class each background stands for.

    Args:
        backgrounds: one grey `[h, w]` image per class, at least `size`.
        count: how many crops.
        size: `(H, W)` of each crop.
        key: PRNG key (or int seed) for the classes and crop offsets.

    Returns:
        `(crops [count, H, W, 1] float32, class ids [count])`.

    Raises:
        ValueError: a background smaller than `size`.
    """
    key = as_key(key)
    ids = np.asarray(jax.random.randint(jax.random.fold_in(key, 0), (count,), 0, len(backgrounds)))
    crops, _ = _random_crops(backgrounds, ids, size, jax.random.fold_in(key, 1))
    return crops[..., None].astype(np.float32), ids


def ground_truth_background(object_masks) -> np.ndarray:
    """GT-1 of §3.1: 1 on the background, 0 on the object, `[N, H, W]` float32.

    Args:
        object_masks: `[N, H, W]`, True on the object.

    Returns:
        `[N, H, W]` float32, 1 where the mask is False.
    """
    return (~np.asarray(object_masks, bool)).astype(np.float32)


def flip_labels(labels, fraction: float, num_classes: int, *, key):
    """Move exactly round(fraction · N) labels, chosen uniformly, to a different class.

    Every flipped label differs from the original.

    Args:
        labels: `[N]` ints in [0, num_classes).
        fraction: the share of labels to flip, in [0, 1].
        num_classes: the number of classes, at least 2.
        key: PRNG key (or int seed) for which labels flip and to what.

    Returns:
        `(new_labels [N], flipped_indices [k])`, the indices sorted.

    Raises:
        ValueError: a fraction outside [0, 1], or fewer than 2 classes.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}.")
    if num_classes < 2:
        raise ValueError("flipping labels needs at least 2 classes.")
    count = int(round(fraction * len(labels)))
    key_pick, key_shift = jax.random.split(as_key(key))
    flipped = np.sort(np.asarray(jax.random.permutation(key_pick, len(labels))[:count]))
    shift = np.asarray(jax.random.randint(key_shift, (count,), 1, num_classes))
    new_labels = labels.copy()
    new_labels[flipped] = (labels[flipped] + shift) % num_classes
    return new_labels, flipped


def ground_truth_weighted(background_attributions, object_masks) -> np.ndarray:
    """GT-2 of §3.1: GT-1 weighted by the attribution of the spurious background alone.

    The attribution is made a grey map `|a|` (summed over channels), multiplied by GT-1 (so the
    object gets 0) and, as the paper scales every map it compares by SSIM, brought to [0, 1] per
    example: divided by its largest value, which equals min-max scaling since the object pixels
    are 0. A map with no attribution on the background stays 0.

    Args:
        background_attributions: `[B, H, W]` or `[B, H, W, C]`, the method's attribution for the
            background-only input (the same crop without the object).
        object_masks: `[B, H, W]`, True on the object.

    Returns:
        `[B, H, W]` float32 in [0, 1].

    Raises:
        ValueError: attributions of another rank, or masks of another shape than the maps.
    """
    attributions = np.abs(np.asarray(background_attributions, np.float32))
    masks = np.asarray(object_masks)
    if attributions.ndim == 4:
        attributions = attributions.sum(axis=-1)
    if attributions.ndim != 3:
        raise ValueError(
            f"background attributions must be [B, H, W] or [B, H, W, C], got {attributions.shape}.")
    if masks.shape != attributions.shape:
        raise ValueError(f"object masks must be [B, H, W] like the attributions "
                         f"{attributions.shape}, got {masks.shape}.")
    weighted = ground_truth_background(masks) * attributions
    scale = weighted.max(axis=(1, 2), keepdims=True)
    return np.where(scale > 0, weighted / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)


def frozen_layer_mask(params: Mapping[str, Any], layer_names: Sequence[str]):
    """A pytree of bools shaped like `params`: True on every parameter of the named layers
    (top-level keys of a Flax `params` dict, e.g. 'conv0'), False elsewhere.

    Args:
        params: a Flax `params` dict, layer name -> that layer's parameters.
        layer_names: the layers to freeze (a single name is accepted too).

    Returns:
        A pytree of bools with the structure of `params`.

    Raises:
        ValueError: `params` is not a mapping, or a layer name is not one of its keys.
    """
    frozen = _checked_layer_names(params, layer_names)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key in frozen, params)


def freeze(
    tx: optax.GradientTransformation, params: Mapping[str, Any], layer_names: Sequence[str],
) -> optax.GradientTransformation:
    """Table 4's frozen-layer bug: `tx` on every layer but the named ones, whose updates are zero,
    so they keep their initial values (bit for bit) however long the model trains.

    Args:
        tx: the optimizer of the other layers.
        params: a Flax `params` dict, layer name -> that layer's parameters.
        layer_names: the layers to freeze (a single name is accepted too).

    Returns:
        An `optax.GradientTransformation` over `params`.

    Raises:
        ValueError: `params` is not a mapping, or a layer name is not one of its keys.
    """
    mask = frozen_layer_mask(params, layer_names)
    labels = jax.tree_util.tree_map(lambda is_frozen: "frozen" if is_frozen else "trained", mask)
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def preprocessing_mismatch(images, kind: str) -> np.ndarray:
    """Test inputs pre-processed unlike the training data (Table 4, PM).

    Args:
        images: `[N, H, W, C]` in [0, 1], as the model was trained on.
        kind: "inverted" (1 - x), "unnormalized" (x * 255, the raw pixel values) or
            "standardized" ((x - mean) / std over each image's pixels and channels; a constant
            image becomes 0).

    Returns:
        `[N, H, W, C]` float32, the same shape.

    Raises:
        ValueError: images not 4-D or outside [0, 1], or an unknown `kind`.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    if kind not in PREPROCESSING_KINDS:
        raise ValueError(f"unknown pre-processing {kind!r}; kinds: {PREPROCESSING_KINDS}")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError(f"images must lie in [0, 1], got [{images.min()}, {images.max()}].")
    if kind == "inverted":
        return 1.0 - images
    if kind == "unnormalized":
        return images * np.float32(255.0)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    std = images.std(axis=(1, 2, 3), keepdims=True)
    return np.where(std > 0, (images - mean) / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)


def ood_pairs(in_images, ood_images, num: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """`num` in-distribution and `num` out-of-distribution inputs, each drawn uniformly without
    replacement, to attribute through the same model (§5).

    Args:
        in_images: `[N, H, W, C]` in-distribution inputs.
        ood_images: `[M, H, W, C]` out-of-distribution inputs, the same `[H, W, C]`.
        num: how many of each, in [1, min(N, M)].
        key: PRNG key for the two draws.

    Returns:
        `(in_subset [num, ...], ood_subset [num, ...])`, pair i at index i.

    Raises:
        ValueError: the two sets have different input shapes, or `num` is out of range.
    """
    in_images, ood_images = np.asarray(in_images), np.asarray(ood_images)
    if in_images.shape[1:] != ood_images.shape[1:]:
        raise ValueError(
            f"in-distribution and OOD inputs must share one input shape for one model, got "
            f"{in_images.shape[1:]} and {ood_images.shape[1:]}.")
    largest = min(len(in_images), len(ood_images))
    if not 1 <= num <= largest:
        raise ValueError(f"num must lie in [1, {largest}] (the smaller set), got {num}.")
    key_in, key_ood = jax.random.split(key)
    in_index = np.asarray(jax.random.permutation(key_in, len(in_images))[:num])
    ood_index = np.asarray(jax.random.permutation(key_ood, len(ood_images))[:num])
    return in_images[in_index], ood_images[ood_index]


def _checked_layer_names(params, layer_names):
    if not isinstance(params, Mapping):
        raise ValueError(f"params must map layer names to parameters, got {type(params).__name__}.")
    if isinstance(layer_names, str):
        layer_names = [layer_names]
    unknown = [name for name in layer_names if name not in params]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; layers: {list(params)}")
    return set(layer_names)

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
