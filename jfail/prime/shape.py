"""A tagger that needs no model: readable shape tags for objects on a plain background.

Fashion-MNIST and MNIST show one bright object on a black background, so simple measurements of
the object's pixels already describe it the way a person would: small or large, narrow or wide,
thin or thick strokes, slanted left or right, dark or bright, plain or textured, hollow,
off-centre, asymmetric, top- or bottom-heavy. :func:`shape_measurements` computes them in JAX;
:func:`fit_shape_tagger` turns each into one or two tags with per-class quantile thresholds
(a "thick strokes" shirt is thick for a shirt), fitted on one split and then applied unchanged to
others, so a tag means the same on the search data and on held-out data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jfail.data import check_images
from jfail.prime.tags import TagMatrix
from jfail.xla import jit

__all__ = [
    "SHAPE_MEASURES",
    "ShapeMeasure",
    "ShapeTagger",
    "fit_shape_tagger",
    "shape_measurements",
]


class ShapeMeasure(NamedTuple):
    """One measurement and the tags it yields.

    low_tag: on when the value is at most the class's low quantile (None: no low tag).
    high_tag: on when the value is at least max(the class's high quantile, floor).
    """

    name: str
    low_tag: str | None
    high_tag: str | None
    floor: float = -math.inf


SHAPE_MEASURES = (
    ShapeMeasure("area", "small", "large"),
    ShapeMeasure("width", "narrow", "wide"),
    ShapeMeasure("height", "short", "tall"),
    ShapeMeasure("stroke", "thin strokes", "thick strokes"),
    ShapeMeasure("slant", "slanted left", "slanted right"),
    ShapeMeasure("brightness", "dark", "bright"),
    ShapeMeasure("texture", "plain", "textured"),
    ShapeMeasure("balance", "top-heavy", "bottom-heavy"),
    ShapeMeasure("holes", None, "hollow", floor=0.02),
    ShapeMeasure("offset", None, "off-centre", floor=1.0),
    ShapeMeasure("asymmetry", None, "asymmetric"),
)
"""The measurements of :func:`shape_measurements`, in its column order:

area: fraction of the image covered by ink; width, height: bounding box over image size;
stroke: 2 x ink pixels / boundary pixels, the typical thickness of strokes or outlines in pixels;
slant: -cov(x, y) / var(y) of the intensity (positive: the top leans right);
brightness: mean intensity of the ink; texture: mean gradient magnitude inside the object;
balance: vertical centre of mass relative to the bounding box, in box heights (negative: top-heavy);
holes: enclosed background (not reachable from the border) over the filled object's area;
offset: distance in pixels of the centre of mass from the image centre;
asymmetry: left-right mirror difference of the intensity, centred on the centre of mass.
"""


@dataclasses.dataclass(frozen=True)
class ShapeTagger:
    """Per-class thresholds for the shape tags (build it with :func:`fit_shape_tagger`).

    thresholds: [C, M, 2] float, the low and high threshold of each measure for each class
    (NaN for classes absent from the fitting data).
    """

    thresholds: np.ndarray
    measures: tuple[ShapeMeasure, ...] = SHAPE_MEASURES
    ink_threshold: float = 0.2
    invert: bool = False
    batch_size: int = 512

    @property
    def names(self) -> tuple[str, ...]:
        """Tag names, in column order: for each measure its low tag, then its high tag.

        Returns:
          The names of the measures' tags (a measure without a low or high tag has none).
        """
        return tuple(name for _, _, name in self._columns())

    def tag(self, images: np.ndarray, labels: np.ndarray | None = None) -> TagMatrix:
        """images: [N, H, W, C] in [0, 1]; labels: [N] int (thresholds are per class).

        Args:
          images: `[N, H, W, C]` float in [0, 1].
          labels: `[N]` int classes, each fitted; required despite the default (the protocol's
            signature).

        Returns:
          A `TagMatrix` with `[N, T]` tags, columns as `names`.

        Raises:
          ValueError: `labels` is None, bad images (not `[N, H, W, C]` floats in [0, 1], empty
            or not finite), bad labels, or a class the tagger was not fitted on.
          TypeError: images that are not a numpy or jax array.
        """
        if labels is None:
            raise ValueError("the shape tagger's thresholds are per class: pass labels")
        measurements = shape_measurements(
            images, ink_threshold=self.ink_threshold, invert=self.invert, batch_size=self.batch_size
        )
        return self.tag_measurements(measurements, labels)

    def tag_measurements(self, measurements: np.ndarray, labels: np.ndarray) -> TagMatrix:
        """Tags from precomputed `shape_measurements` ([N, M]) and labels ([N]).

        Args:
          measurements: `[N, M]`, as `shape_measurements` returns.
          labels: `[N]` non-negative int classes, each fitted.

        Returns:
          A `TagMatrix` with `[N, T]` tags, columns as `names`.

        Raises:
          ValueError: measurements that are not `[N, M]`, labels that are not `[N]`
            non-negative ints, or a class the tagger was not fitted on.
        """
        measurements, labels = _check_measurements(measurements, labels, len(self.measures))
        if len(labels) and labels.max() >= len(self.thresholds):
            raise ValueError(f"label {labels.max()} has no thresholds: the tagger was fitted on "
                             f"{len(self.thresholds)} classes")
        fitted = ~np.isnan(self.thresholds[labels, 0, 0]) if len(labels) else np.ones(0, bool)
        if not fitted.all():
            missing = sorted(set(labels[~fitted].tolist()))
            raise ValueError(f"class(es) {missing} were absent when the tagger was fitted")
        per_image = self.thresholds[labels]  # [N, M, 2]
        columns = []
        for measure_index, side, _ in self._columns():
            value = measurements[:, measure_index]
            threshold = per_image[:, measure_index, side]
            columns.append(value <= threshold if side == 0 else value >= threshold)
        tags = np.stack(columns, axis=1) if columns else np.zeros((len(labels), 0), bool)
        return TagMatrix(tags, self.names)

    def _columns(self):
        for index, measure in enumerate(self.measures):
            if measure.low_tag is not None:
                yield index, 0, measure.low_tag
            if measure.high_tag is not None:
                yield index, 1, measure.high_tag


def fit_shape_tagger(
    images: np.ndarray | None,
    labels: np.ndarray,
    *,
    quantiles: tuple[float, float] = (0.2, 0.8),
    ink_threshold: float = 0.2,
    invert: bool = False,
    measures: tuple[ShapeMeasure, ...] = SHAPE_MEASURES,
    measurements: np.ndarray | None = None,
    batch_size: int = 512,
) -> ShapeTagger:
    """Fit per-class thresholds: a low tag marks the lowest `quantiles[0]` of the class, a high
    tag the top 1 - `quantiles[1]` (but never below the measure's floor).

    Args:
      images: `[N, H, W, C]` in [0, 1] (or None when `measurements` are given).
      labels: `[N]` non-negative int classes.
      quantiles: `(low, high)`, the class quantiles of the low and high thresholds.
      ink_threshold: the intensity above which a pixel is the object.
      invert: for dark objects on a light background.
      measures: the tags and floors of the `SHAPE_MEASURES`, in their order.
      measurements: precomputed `[N, M]` `shape_measurements`; None measures `images`.
      batch_size: images per jitted chunk.

    Returns:
      A `ShapeTagger` with `[C, M, 2]` thresholds, C = `labels.max() + 1` (NaN for classes
      that do not occur).

    Raises:
      ValueError: quantiles not `0 < low < high < 1`, `measures` of the wrong length, neither
        images nor measurements, bad images or `ink_threshold`, measurements that are not
        `[N, M]`, or labels that are not `[N]` non-negative ints.
      TypeError: images that are not a numpy or jax array.
    """
    low_q, high_q = quantiles
    if not 0 < low_q < high_q < 1:
        raise ValueError(f"quantiles must satisfy 0 < low < high < 1, got {quantiles}")
    if len(measures) != len(SHAPE_MEASURES):
        raise ValueError(f"measures must describe the {len(SHAPE_MEASURES)} measurements of "
                         "SHAPE_MEASURES (rename tags or change floors, keep the order)")
    if measurements is None:
        if images is None:
            raise ValueError("pass images or measurements")
        measurements = shape_measurements(images, ink_threshold=ink_threshold, invert=invert,
                                          batch_size=batch_size)
    measurements, labels = _check_measurements(measurements, labels, len(measures))
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    thresholds = np.full((num_classes, len(measures), 2), np.nan)
    floors = np.array([m.floor for m in measures])
    for label in np.unique(labels):
        values = measurements[labels == label]
        thresholds[label, :, 0] = np.quantile(values, low_q, axis=0)
        thresholds[label, :, 1] = np.maximum(np.quantile(values, high_q, axis=0), floors)
    return ShapeTagger(thresholds, tuple(measures), ink_threshold, invert, batch_size)


def shape_measurements(
    images: np.ndarray, *, ink_threshold: float = 0.2, invert: bool = False, batch_size: int = 512
) -> np.ndarray:
    """The SHAPE_MEASURES of each image: [N, H, W, C] in [0, 1] -> [N, M] float32.

    Channels are averaged; pixels above `ink_threshold` are the object. Runs jitted, in chunks
    of `batch_size` images.

    Args:
      images: `[N, H, W, C]` float in [0, 1].
      ink_threshold: the intensity above which a pixel is the object, in [0, 1).
      invert: for dark objects on a light background (intensities are flipped first).
      batch_size: images per jitted chunk.

    Returns:
      `[N, M]` float32, columns as `SHAPE_MEASURES` (all 0 for an image without ink).

    Raises:
      ValueError: images that are not `[N, H, W, C]` floats in [0, 1], empty or not finite, or
        `ink_threshold` outside [0, 1).
      TypeError: images that are not a numpy or jax array.
    """
    check_images(images)
    if not 0 <= ink_threshold < 1:
        raise ValueError(f"ink_threshold must be in [0, 1), got {ink_threshold}")
    gray = np.asarray(images, np.float32).mean(axis=-1)
    if invert:
        gray = 1.0 - gray
    num = len(gray)
    padded_num = -(-num // batch_size) * batch_size
    padded = np.zeros((padded_num,) + gray.shape[1:], np.float32)
    padded[:num] = gray
    chunks = jnp.asarray(padded).reshape(-1, batch_size, *gray.shape[1:])
    result = _measure_chunks(chunks, jnp.float32(ink_threshold))
    return np.asarray(result).reshape(padded_num, -1)[:num]


# ----------------------------------------------------------------------------- measurements


@jit
def _measure_chunks(chunks: jax.Array, ink_threshold: jax.Array) -> jax.Array:
    return jax.lax.map(jax.vmap(lambda image: _measure(image, ink_threshold)), chunks)


def _measure(gray: jax.Array, ink_threshold: jax.Array) -> jax.Array:
    """One [H, W] image -> [M] measurements (all 0 for an image without ink)."""
    height, width = gray.shape
    ink = gray > ink_threshold
    ink_f = ink.astype(jnp.float32)
    ink_count = ink_f.sum()
    has_ink = ink_count > 0
    safe_count = jnp.maximum(ink_count, 1.0)

    rows, cols = ink.any(axis=1), ink.any(axis=0)
    top, bottom = _first_last(rows)
    left, right = _first_last(cols)
    box_height = jnp.where(has_ink, bottom - top + 1, 0).astype(jnp.float32)
    box_width = jnp.where(has_ink, right - left + 1, 0).astype(jnp.float32)

    padded = jnp.pad(ink, 1)
    interior = ink & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary_count = (ink & ~interior).sum()
    stroke = 2.0 * ink_count / jnp.maximum(boundary_count, 1)

    mass = gray * ink_f
    total = jnp.maximum(mass.sum(), 1e-6)
    ys, xs = jnp.mgrid[0:height, 0:width].astype(jnp.float32)
    cy, cx = (mass * ys).sum() / total, (mass * xs).sum() / total
    var_y = (mass * (ys - cy) ** 2).sum() / total
    cov_xy = (mass * (xs - cx) * (ys - cy)).sum() / total
    slant = -cov_xy / jnp.maximum(var_y, 1e-6)
    brightness = mass.sum() / safe_count

    gray_padded = jnp.pad(gray, 1, mode="edge")
    dx = (gray_padded[1:-1, 2:] - gray_padded[1:-1, :-2]) / 2
    dy = (gray_padded[2:, 1:-1] - gray_padded[:-2, 1:-1]) / 2
    gradient = jnp.sqrt(dx**2 + dy**2)
    texture = (gradient * interior).sum() / jnp.maximum(interior.sum(), 1)

    balance = (cy - (top + bottom) / 2) / jnp.maximum(box_height, 1.0)

    holes_count = (_enclosed_background(ink)).sum()
    holes = holes_count / jnp.maximum(ink_count + holes_count, 1)
    offset = jnp.sqrt((cx - (width - 1) / 2) ** 2 + (cy - (height - 1) / 2) ** 2)

    shift = jnp.round((width - 1) / 2 - cx).astype(jnp.int32)
    centred = jnp.roll(gray * ink_f, shift, axis=1)
    asymmetry = jnp.abs(centred - centred[:, ::-1]).sum() / (2 * total)

    values = jnp.stack([
        ink_count / (height * width), box_width / width, box_height / height, stroke, slant,
        brightness, texture, balance, holes, offset, asymmetry,
    ])
    return jnp.where(has_ink, values, 0.0).astype(jnp.float32)


def _first_last(any_along: jax.Array) -> tuple[jax.Array, jax.Array]:
    first = jnp.argmax(any_along)
    last = any_along.shape[0] - 1 - jnp.argmax(any_along[::-1])
    return first, last


def _enclosed_background(ink: jax.Array) -> jax.Array:
    """Background pixels that cannot reach the image border through background (4-connected)."""
    background = ~ink
    border = (jnp.zeros_like(ink)
              .at[0, :].set(True).at[-1, :].set(True).at[:, 0].set(True).at[:, -1].set(True))

    def grow(state):
        reached, _ = state
        padded = jnp.pad(reached, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        grown = background & (reached | neighbours)
        return grown, jnp.any(grown != reached)

    reached, _ = jax.lax.while_loop(
        lambda state: state[1], grow, (background & border, jnp.array(True))
    )
    return background & ~reached


def _check_measurements(measurements, labels, num_measures):
    measurements = np.asarray(measurements, np.float64)
    labels = np.asarray(labels)
    if measurements.ndim != 2 or measurements.shape[1] != num_measures:
        raise ValueError(
            f"measurements must be [N, {num_measures}], got shape {measurements.shape}"
        )
    if labels.shape != (measurements.shape[0],):
        raise ValueError(f"labels has shape {labels.shape}, expected ({measurements.shape[0]},) "
                         "like the images")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise ValueError("labels must be non-negative integers")
    return measurements, labels.astype(np.int64)
