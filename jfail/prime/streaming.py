"""PRIME's shape tags over a data set that is never loaded whole.

:func:`tag_source` streams the source through :func:`jfail.engine.map_dataset` once, computing
the shape measurements of every image (and, given a classifier, its predictions) into the
engine's store; the per-class thresholds are fitted on the stored measurements [N, M] (or a
given tagger is used), and the tag matrix [N, T] bool is written next to them. Measurements,
tags, labels and errors are small (N x 11 floats, N x T bits) and stay in memory; the search is
then :func:`jfail.prime.find_failure_modes` on them::

    tagged = tag_source("imagefolder:/data/shoes@28", "runs/tags", classifier=model)
    modes = find_failure_modes(tagged.tags, errors=tagged.errors, labels=tagged.labels)

To tag held-out data with the same thresholds, pass ``tagger=tagged.tagger``.

Layout of `out_dir`::

  measurements/   the engine's run: arrays/measurements [N, M] (and arrays/predictions [N])
  tags/           [N, T] bool zarr array
  tags.json       the tag names, in column order
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jfail import jsonfile
from jfail.prime.shape import (
    SHAPE_MEASURES,
    ShapeMeasure,
    ShapeTagger,
    _measure,
    fit_shape_tagger,
)
from jfail.prime.tags import TagMatrix

__all__ = ["TaggedSource", "open_tags", "tag_source"]

TAG_NAMES_FILE = "tags.json"


@dataclasses.dataclass(frozen=True)
class TaggedSource:
    """What :func:`tag_source` computed.

    Attributes:
      tags: the TagMatrix, [N, T] bool and the T names.
      tagger: the ShapeTagger that made them (fitted here, or the one given).
      labels: [N] int32, the source's labels.
      measurements: [N, M] float32, the shape measurements.
      predictions: [N] int32 the classifier's classes, or None without a classifier.
      errors: [N] bool, True where the prediction is not the label, or None.
      outputs: the engine's `jfail.engine.MappedOutputs`.
    """

    tags: TagMatrix
    tagger: ShapeTagger
    labels: np.ndarray
    measurements: np.ndarray
    predictions: np.ndarray | None
    errors: np.ndarray | None
    outputs: object


def tag_source(
    source,
    out_dir: str | os.PathLike,
    *,
    classifier: Callable | None = None,
    tagger: ShapeTagger | None = None,
    quantiles: tuple[float, float] = (0.2, 0.8),
    ink_threshold: float = 0.2,
    invert: bool = False,
    measures: tuple[ShapeMeasure, ...] = SHAPE_MEASURES,
    batch_size: int = 512,
    split: str = "train",
    progress: bool | None = None,
) -> TaggedSource:
    """Shape tags (and the classifier's errors) of every image of a source, stored on disk.

    The measurements equal :func:`jfail.prime.shape_measurements` of the images; the tags equal
    ``fit_shape_tagger(...).tag(images, labels)`` (or ``tagger.tag``) on them.

    Args:
      source: a `jfail.data.ImageSource` or a name for `jfail.data.open_source`.
      out_dir: a new or empty folder, or that of an interrupted run of the same call (layout
        in the module doc).
      classifier: any JAX callable `[B, H, W, C] -> logits [B, K]`, for the errors (None:
        tags only).
      tagger: thresholds to apply (None: fitted on this source's measurements with `quantiles`
        and `measures`; `ink_threshold` and `invert` then come from the arguments, otherwise
        from the tagger).
      quantiles, measures: as for `jfail.prime.fit_shape_tagger`.
      ink_threshold, invert: as for `jfail.prime.shape_measurements`.
      batch_size: images per global batch of the engine.
      split: the split, when `source` is a name.
      progress: show a progress bar (None: when stderr is a terminal).

    Returns:
      :class:`TaggedSource`.

    Raises:
      ValueError: a bad `ink_threshold`, a classifier that does not return [B, K], labels the
        tagger has no thresholds for, the engine's errors.
      ModelCallError: the classifier cannot take the source's images.
    """
    from jfail.data.sources import open_source
    from jfail.engine import create_array, map_dataset

    if isinstance(source, str):
        source = open_source(source, split)
    if tagger is not None:
        ink_threshold, invert = tagger.ink_threshold, tagger.invert
    if not 0 <= ink_threshold < 1:
        raise ValueError(f"ink_threshold must be in [0, 1), got {ink_threshold}")
    threshold = np.float32(ink_threshold)
    if classifier is not None:
        from jfail.models.adapter import call_shape, traced_model

        example = jax.ShapeDtypeStruct((1, *source.image_shape), jnp.float32)
        probe = call_shape(traced_model(classifier, example), example)
        if len(getattr(probe, "shape", ())) != 2:
            raise ValueError(
                f"classifier must return logits [B, K], got "
                f"{getattr(probe, 'shape', jax.tree_util.tree_structure(probe))} for one image.")

    def observe(images):
        gray = images.mean(axis=-1)
        if invert:
            gray = 1.0 - gray
        outputs = {"measurements": jax.vmap(lambda image: _measure(image, threshold))(gray)}
        if classifier is not None:
            logits = classifier(images)
            outputs["predictions"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return outputs

    out_dir = os.fspath(out_dir)
    outputs = map_dataset(observe, source, os.path.join(out_dir, "measurements"),
                          batch_size=batch_size, progress=progress)
    labels = source.labels()
    measurements = np.asarray(outputs["measurements"])
    if tagger is None:
        tagger = fit_shape_tagger(None, labels, quantiles=quantiles, ink_threshold=ink_threshold,
                                  invert=invert, measures=measures, measurements=measurements)
    tags = tagger.tag_measurements(measurements, labels)
    store = create_array(os.path.join(out_dir, "tags"), tags.tags.shape, bool,
                         chunk_rows=max(1, min(len(labels), 1 << 20)))
    store[...].write(tags.tags).result()
    jsonfile.write(os.path.join(out_dir, TAG_NAMES_FILE), {"names": list(tags.names)})
    predictions = errors = None
    if classifier is not None:
        predictions = np.asarray(outputs["predictions"])
        errors = predictions != labels
    return TaggedSource(tags, tagger, labels, measurements, predictions, errors, outputs)


def open_tags(out_dir: str | os.PathLike) -> TagMatrix:
    """The tag matrix a :func:`tag_source` run stored in `out_dir`.

    Args:
      out_dir: the folder `tag_source` wrote.

    Returns:
      A `TagMatrix` with the stored `[N, T]` tags and their names, read into memory.

    Raises:
      FileNotFoundError: `out_dir` holds no tags.
    """
    import json

    from jfail.engine import open_array

    out_dir = os.fspath(out_dir)
    try:
        with open(os.path.join(out_dir, TAG_NAMES_FILE)) as handle:
            names = tuple(json.load(handle)["names"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{out_dir} holds no tags (no {TAG_NAMES_FILE}).") from None
    return TagMatrix(open_array(os.path.join(out_dir, "tags"))[...].astype(bool), names)
