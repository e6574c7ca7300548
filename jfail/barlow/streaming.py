"""Barlow over a data set that is never loaded whole: a source, the engine's store, random access.

:func:`analyze_source` is Barlow at research scale, composed of three steps that can also be
called one at a time:

1. :func:`predictions_to_store` runs the classifier and the robust feature extractor over the
   source through :func:`jfail.engine.map_dataset` (sharded over every device and host,
   resumable) and stores ``features`` [N, D], ``logits`` [N, K], ``predictions`` [N] and
   ``errors`` [N] (``predictions != labels``).
2. :func:`jfail.barlow.failure_trees` is fitted on the stored features and errors. Features
   [N, D] float32 and the [N] vectors are read into memory (1.2 GB for ImageNet's 1.28 M images
   with D = 2048 float32 is fine; fit on a subset of rows otherwise); images never are.
3. :func:`feature_panels` builds the visual panel of each group whose leaf of highest importance
   is valid: the most activating images of the leaf's feature among the group (ranked by the
   stored features), their heatmaps and feature attacks, and random failures in the leaf. Only
   those images are read from the source, by index. Draw one with
   ``plot_feature_panel(p.images, p.heatmaps, p.attacked, p.failures, title, path)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jfail.barlow.extraction import feature_attack, heatmap
from jfail.barlow.trees import FailureTree, failure_trees
from jfail.models.adapter import call_shape, traced_model

__all__ = [
    "FeaturePanel",
    "SourceAnalysis",
    "analyze_source",
    "feature_panels",
    "predictions_to_store",
    "read_images",
]

GROUPINGS = ("label", "prediction")


@dataclasses.dataclass(frozen=True)
class FeaturePanel:
    """The visual evidence for one group's leaf of highest importance.

    Attributes:
      group: the group (a class id).
      feature: the leaf's first feature index, the one shown.
      rule: the leaf's rule.
      top_indices: [k] source positions of the most activating images in the group, by
        decreasing activation.
      images: [k, H, W, C] those images.
      heatmaps: [k, H, W] where the feature fires (zeros without a feature map).
      attacked: [k, H, W, C] the images pushed to maximise the feature.
      failure_indices: [m] source positions of random failures in the leaf.
      failures: [m, H, W, C] those images.
    """

    group: Hashable
    feature: int
    rule: str
    top_indices: np.ndarray
    images: np.ndarray
    heatmaps: np.ndarray
    attacked: np.ndarray
    failure_indices: np.ndarray
    failures: np.ndarray


@dataclasses.dataclass(frozen=True)
class SourceAnalysis:
    """What :func:`analyze_source` found.

    Attributes:
      trees: {group: FailureTree}, as :func:`jfail.barlow.failure_trees` returns; leaf and group
        ``indices`` are source positions.
      outputs: the stored ``features`` [N, D], ``logits`` [N, K], ``predictions`` [N] and
        ``errors`` [N] (:class:`jfail.engine.MappedOutputs`, read lazily).
      labels: [N] int32, the source's labels.
      predictions: [N] int32.
      errors: [N] bool, True where the prediction is not the label.
      panels: {group: FeaturePanel} for every group whose top leaf is valid and has a rule.
    """

    trees: dict[Hashable, FailureTree]
    outputs: object
    labels: np.ndarray
    predictions: np.ndarray
    errors: np.ndarray
    panels: dict[Hashable, FeaturePanel]


def predictions_to_store(
    model: Callable,
    feature_fn: Callable,
    source,
    out_dir,
    *,
    batch_size: int = 256,
    split: str = "train",
    progress: bool | None = None,
):
    """The classifier's logits and predictions and the robust features of every image, stored.

    One pass of :func:`jfail.engine.map_dataset` computes both models on each batch.

    Args:
      model: the classifier, any JAX callable `[B, H, W, C] -> logits [B, K]`.
      feature_fn: the feature extractor, any JAX callable `[B, H, W, C] -> [B, D]`.
      source: a `jfail.data.ImageSource` or a name for `jfail.data.open_source`.
      out_dir: a new or empty folder, or that of an interrupted run of the same call.
      batch_size: images per global batch, a multiple of the device count.
      split: the split, when `source` is a name.
      progress: show a progress bar (None: when stderr is a terminal).

    Returns:
      `jfail.engine.MappedOutputs` with ``"features"`` [N, D] float, ``"logits"`` [N, K] float,
      ``"predictions"`` [N] int32 and ``"errors"`` [N] bool (True where the prediction is not
      the source's label).

    Raises:
      ValueError: `feature_fn` does not return [B, D] or `model` does not return [B, K]; the
        engine's errors (batch size, out_dir).
      ModelCallError: a model cannot be called on the source's images.
    """
    from jfail.data.sources import open_source
    from jfail.engine import map_dataset

    if isinstance(source, str):
        source = open_source(source, split)
    example = jax.ShapeDtypeStruct((1, *source.image_shape), jnp.float32)
    for fn, what, shape in ((feature_fn, "feature_fn", "features [B, D]"),
                            (model, "model", "logits [B, K]")):
        probe = call_shape(traced_model(fn, example), example)
        if len(getattr(probe, "shape", ())) != 2:
            raise ValueError(
                f"{what} must return {shape}, got "
                f"{getattr(probe, 'shape', jax.tree_util.tree_structure(probe))} for one image.")

    def observe(images, labels, indices):
        logits = model(images)
        predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return {"features": feature_fn(images), "logits": logits, "predictions": predictions,
                "errors": predictions != labels}

    return map_dataset(observe, source, out_dir, batch_size=batch_size, progress=progress,
                       with_labels=True)


def read_images(source, indices) -> np.ndarray:
    """The images at `indices` of a source, read one by one: [len(indices), H, W, C] float32."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    images = np.empty((len(indices), *source.image_shape), np.float32)
    for row, index in enumerate(indices):
        images[row] = source[int(index)]["image"]
    return images


def feature_panels(
    trees: Mapping[Hashable, FailureTree],
    features,
    source,
    feature_fn: Callable,
    *,
    feature_map_fn: Callable | None = None,
    panel_images: int = 8,
    epsilon: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    key=0,
    batch_size: int = 64,
) -> dict[Hashable, FeaturePanel]:
    """The panel of every group whose leaf of highest importance is valid and has a rule.

    For the leaf's first feature: the `panel_images` images of the group with the largest
    stored activation, their heatmaps (:func:`jfail.barlow.heatmap` of `feature_map_fn`) and
    feature attacks (:func:`jfail.barlow.feature_attack`), and up to `panel_images` failures of
    the leaf drawn at random (a NumPy generator seeded from ``fold_in(key, group)``, or from the
    group's position among `trees` when it is not an integer). Only these images are read from
    `source`.

    Args:
      trees: {group: FailureTree} fitted on `features` (row i = source position i).
      features: [N, D] the stored features (an array or a `jfail.engine.LazyArray`; only the
        columns of the shown features are read).
      source: the `jfail.data.ImageSource` the features were computed on.
      feature_fn: `[B, H, W, C] -> [B, D]`, for the attacks.
      feature_map_fn: `[B, H, W, C] -> [B, h, w, D]`, the map pooled into the features, for the
        heatmaps; None (or a map with other than D channels) gives zero heatmaps.
      panel_images: images per row of a panel.
      epsilon, step_size, steps: the attack (default: `jfail.barlow.attack_settings`).
      key: an int seed or a PRNG key.
      batch_size: images per jitted call of the heatmaps and attacks.

    Returns:
      {group: FeaturePanel}, in the trees' order.

    Raises:
      ValueError: `features` and `source` differ in length, `panel_images` < 1.
    """
    from jfail.keys import as_key

    if len(features) != len(source):
        raise ValueError(
            f"features has {len(features)} rows but the source {source.name!r} has "
            f"{len(source)} examples; pass the features computed on that source.")
    if isinstance(panel_images, bool) or not isinstance(panel_images, int) or panel_images < 1:
        raise ValueError(f"panel_images must be a positive integer, got {panel_images!r}.")
    key = as_key(key)
    num_features = features.shape[1]
    show_heatmaps = False
    if feature_map_fn is not None:
        example = jax.ShapeDtypeStruct((1, *source.image_shape), jnp.float32)
        shape = getattr(call_shape(traced_model(feature_map_fn, example), example), "shape", ())
        show_heatmaps = len(shape) == 4 and shape[-1] == num_features
    panels = {}
    for position, (group, tree) in enumerate(trees.items()):
        leaf = tree.top_leaf
        if not leaf.valid or not leaf.conditions:
            continue
        feature = int(leaf.conditions[0].feature)
        members = np.asarray(tree.indices, np.int64)
        column = np.asarray(features[:, feature])
        top = members[np.argsort(-column[members], kind="stable")[:panel_images]]
        images = read_images(source, top)
        heatmaps = np.zeros(images.shape[:3], np.float32)
        if show_heatmaps:
            heatmaps = np.asarray(heatmap(feature_map_fn, images, feature,
                                          batch_size=batch_size, progress=False))
        attacked = np.asarray(feature_attack(feature_fn, images, feature, epsilon=epsilon,
                                             step_size=step_size, steps=steps,
                                             batch_size=batch_size, progress=False))
        group_id = int(group) if isinstance(group, (int, np.integer)) else position
        group_seed = jax.random.randint(jax.random.fold_in(key, group_id), (), 0, 2**31 - 1)
        rng = np.random.default_rng(int(group_seed))
        failure_indices = np.asarray(leaf.error_indices, np.int64)
        failure_indices = rng.choice(failure_indices, min(panel_images, len(failure_indices)),
                                     replace=False)
        panels[group] = FeaturePanel(group, feature, leaf.rule, top, images, heatmaps, attacked,
                                     failure_indices, read_images(source, failure_indices))
    return panels


def analyze_source(
    model: Callable,
    feature_fn: Callable,
    source,
    out_dir: str | os.PathLike,
    *,
    feature_map_fn: Callable | None = None,
    grouping: str = "label",
    split: str = "train",
    batch_size: int = 256,
    num_features: int = 50,
    max_depth: int = 1,
    delta: float = 0.1,
    tau: float = 0.2,
    screen: int | None = None,
    panels: bool = True,
    panel_images: int = 8,
    epsilon: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    key=0,
    progress: bool | None = None,
) -> SourceAnalysis:
    """Barlow on a whole source: stored predictions and features, failure trees, panels.

    The composition of :func:`predictions_to_store` (into `out_dir`, resumable),
    :func:`jfail.barlow.failure_trees` on the stored features and errors, and
    :func:`feature_panels` (module doc). Host memory holds the features [N, D], the [N] labels,
    predictions and errors, a few batches of images while the models run, and the panels'
    images; never the whole data set.

    Args:
      model: the classifier analysed, `[B, H, W, C] -> logits [B, K]`.
      feature_fn: the robust feature extractor, `[B, H, W, C] -> [B, D]`.
      source: a `jfail.data.ImageSource` or a name for `jfail.data.open_source`.
      out_dir: the engine's folder (a new or empty one, or an interrupted run's).
      feature_map_fn: `[B, H, W, C] -> [B, h, w, D]` for the heatmaps (None: zero heatmaps).
      grouping: ``"label"`` (the source's labels) or ``"prediction"`` (the model's).
      split: the split, when `source` is a name.
      batch_size: images per global batch of the engine.
      num_features, max_depth, delta, tau, screen: as for `jfail.barlow.failure_trees`.
      panels: build the panels (False: trees only).
      panel_images, epsilon, step_size, steps: as for :func:`feature_panels`.
      key: an int seed or a PRNG key, for the trees and the panels' random failures.
      progress: show progress bars (None: when stderr is a terminal).

    Returns:
      :class:`SourceAnalysis`.

    Raises:
      ValueError: an unknown `grouping`, models with the wrong output shapes, the engine's and
        `failure_trees`' errors.
      ModelCallError: a model cannot be called on the source's images.
    """
    from jfail.data.sources import open_source

    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}.")
    if isinstance(source, str):
        source = open_source(source, split)
    outputs = predictions_to_store(model, feature_fn, source, out_dir, batch_size=batch_size,
                                   progress=progress)
    labels = source.labels()
    predictions = np.asarray(outputs["predictions"])
    errors = np.asarray(outputs["errors"])
    features = np.asarray(outputs["features"])
    groups = labels if grouping == "label" else predictions
    trees = failure_trees(features, errors, groups, num_features=num_features,
                          max_depth=max_depth, delta=delta, tau=tau, screen=screen, key=key,
                          progress=progress)
    found = {}
    if panels:
        found = feature_panels(trees, features, source, feature_fn,
                               feature_map_fn=feature_map_fn, panel_images=panel_images,
                               epsilon=epsilon, step_size=step_size, steps=steps, key=key)
    return SourceAnalysis(trees, outputs, labels, predictions, errors, found)
