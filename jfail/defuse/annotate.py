"""Annotation (seed 001, section 3.2): reviewers label the samples of each failure scenario.

Every scenario is shown to annotators as `Q` decoded samples; they give each sample its correct
class, or "none of the above" (`NONE_OF_THE_ABOVE`) when it shows no class. The scenario's label
is the most common sample label, and the scenario is a model failure when more than a fraction
`ρ` (0.5 in the paper) of its samples disagree with the classifier.

The paper's annotators are crowd workers, five per image, combined by majority vote;
`MajorityVote` simulates them with independently trained classifiers, and `FileAnnotator`
writes the samples out as PNG files with a CSV for a person to fill in and reads it back.
`reviews_from_labels` turns sample labels from either source into `Review`s.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jfail.data.checks import check_images
from jfail.models.adapter import call_shape, in_trace, split_model
from jfail.xla import jit

__all__ = [
    "NONE_OF_THE_ABOVE",
    "Annotator",
    "Review",
    "review_scenarios",
    "reviews_from_labels",
    "majority_label",
    "annotator_agreement",
    "MajorityVote",
    "FileAnnotator",
]

NONE_OF_THE_ABOVE = -1
"""The label of a sample that shows none of the classes (also: no majority among voters)."""

LABELS_FILE = "labels.csv"
_COLUMNS = ("scenario", "sample", "file", "prediction", "label")


@runtime_checkable
class Annotator(Protocol):
    """Anything that labels images: `label(images [N, H, W, C]) -> [N]` int.

    Each label is a class index or `NONE_OF_THE_ABOVE`. An annotator that combines several
    workers may also provide `votes(images) -> [N, V]`, the individual workers' labels, from
    which `review_scenarios` reports their agreement.
    """

    def label(self, images: np.ndarray) -> np.ndarray:
        """The annotator's label of every image.

        Args:
            images: `[N, H, W, C]` in [0, 1].

        Returns:
            `[N]` int, each a class index or `NONE_OF_THE_ABOVE`.
        """
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class Review:
    """The annotators' verdict on one scenario of `Q` reviewed samples.

    sample_labels: [Q] the annotators' label per sample (`NONE_OF_THE_ABOVE` = none);
    predictions: [Q] the classifier's class per sample; label: the most common sample label other
    than `NONE_OF_THE_ABOVE` (ties go to the smaller class), or `NONE_OF_THE_ABOVE` if there is
    none; disagreement: the fraction of samples whose label differs from the prediction (a
    "none" label always differs); is_failure: `disagreement > rho` and the scenario has a label;
    agreement: the mean over samples of the fraction of workers agreeing with the sample's
    most common vote, NaN when the annotator gave no per-worker votes.
    """

    sample_labels: np.ndarray
    predictions: np.ndarray
    label: int
    disagreement: float
    is_failure: bool
    agreement: float = math.nan


def review_scenarios(
    annotator: Annotator,
    classifier: Callable,
    samples,
    *,
    rho: float = 0.5,
    batch_size: int = 1024,
) -> list[Review]:
    """Have `annotator` label the samples of every scenario and compare with `classifier`.

    Args:
        annotator: an `Annotator`; if it has `votes(images) -> [N, V]`, each review's `agreement`
            is computed from them.
        classifier: any JAX callable `classifier(x [B, H, W, C]) -> logits [B, K]` (a closure,
            `functools.partial`, `jax.tree_util.Partial`, a Flax NNX or Equinox module, ...); the
            weights it holds now make the predictions.
        samples: `[S, Q, H, W, C]` the decoded images of `S` scenarios, `Q` each.
        rho: see `reviews_from_labels`.
        batch_size: images per jitted classifier call.

    Returns:
        One `Review` per scenario.

    Raises:
        ValueError: `samples` is not `[S, Q, H, W, C]` or empty, the classifier does not return
            `[B, K]` logits or returns NaN, or the annotator's labels are malformed.
        ModelCallError: the classifier cannot take images of this size or channels.
    """
    samples = np.asarray(samples, np.float32)
    if samples.ndim != 5:
        raise ValueError(
            f"samples must be [K, Q, H, W, C] (scenarios, samples, image), got shape "
            f"{samples.shape}."
        )
    num_scenarios, per_scenario = samples.shape[:2]
    if num_scenarios == 0 or per_scenario == 0:
        raise ValueError(f"samples has no scenarios or no samples: shape {samples.shape}.")
    images = samples.reshape(-1, *samples.shape[2:])
    predictions = _map_batches("predict", (_check_callable(classifier),), images, batch_size)
    labels = _check_annotations(annotator.label(images), len(images))
    agreement = None
    votes_fn = getattr(annotator, "votes", None)
    if callable(votes_fn):
        votes = np.asarray(votes_fn(images))
        if votes.ndim != 2 or len(votes) != len(images):
            raise ValueError(
                f"annotator.votes must return [N, V] with N={len(images)}, got shape "
                f"{votes.shape}."
            )
        votes = votes.reshape(num_scenarios, per_scenario, -1)
        agreement = np.array([annotator_agreement(v) for v in votes])
    return reviews_from_labels(
        labels.reshape(num_scenarios, per_scenario),
        predictions.reshape(num_scenarios, per_scenario),
        rho=rho,
        agreement=agreement,
    )


def reviews_from_labels(
    sample_labels, predictions, *, rho: float = 0.5, agreement=None
) -> list[Review]:
    """One `Review` per scenario from given sample labels (e.g. `FileAnnotator.load`).

    Args:
        sample_labels: `[K, Q]` int, class indices or `NONE_OF_THE_ABOVE`.
        predictions: `[K, Q]` int, the classifier's classes.
        rho: in [0, 1], a scenario is a failure when strictly more than this fraction of its
            samples disagree with the classifier (exactly `rho` is not a failure).
        agreement: optional `[K]` per-scenario annotator agreement, else NaN.

    Returns:
        One `Review` per scenario, in order.

    Raises:
        ValueError: `sample_labels` not `[K, Q]` integers of class indices or
            `NONE_OF_THE_ABOVE`, `predictions` of another shape or not non-negative integers,
            `rho` outside [0, 1], or `agreement` not `[K]`.
    """
    sample_labels = _check_annotations(sample_labels, None, name="sample_labels")
    predictions = np.asarray(predictions)
    if sample_labels.ndim != 2:
        raise ValueError(f"sample_labels must be [K, Q], got shape {sample_labels.shape}.")
    if predictions.shape != sample_labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} and sample_labels {sample_labels.shape} must both "
            "be [K, Q]."
        )
    if not np.issubdtype(predictions.dtype, np.integer) or (predictions < 0).any():
        raise ValueError("predictions must be non-negative integer class indices.")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}.")
    num_scenarios = len(sample_labels)
    if agreement is None:
        agreement = np.full(num_scenarios, math.nan)
    agreement = np.asarray(agreement, np.float64)
    if agreement.shape != (num_scenarios,):
        raise ValueError(f"agreement must be [K] with K={num_scenarios}, got {agreement.shape}.")

    reviews = []
    for labels, predicted, agree in zip(sample_labels, predictions, agreement):
        disagreement = float(np.mean(labels != predicted))
        label = _scenario_label(labels)
        reviews.append(
            Review(
                sample_labels=labels.copy(),
                predictions=predicted.astype(np.int64),
                label=label,
                disagreement=disagreement,
                is_failure=bool(disagreement > rho and label != NONE_OF_THE_ABOVE),
                agreement=float(agree),
            )
        )
    return reviews


def majority_label(votes) -> np.ndarray:
    """The label a strict majority of voters gave, per sample.

    Args:
        votes: `[N, V]` int, one label per voter (N, V >= 1).

    Returns:
        `[N]` int: the label more than `V / 2` voters agree on, else `NONE_OF_THE_ABOVE` (e.g. 3
        of 5 -> that label; 2-2-1 -> none).

    Raises:
        ValueError: `votes` is not a non-empty `[N, V]` integer array.
    """
    votes = _check_votes(votes)
    return np.asarray(_majority(jnp.asarray(votes))).astype(np.int64)


def annotator_agreement(votes) -> float:
    """Mean over samples of the fraction of voters that gave the sample's most common label.

    Args:
        votes: `[N, V]` int, one label per voter (N, V >= 1).

    Returns:
        A float: 1.0 when all voters agree on every sample; `1 / V` at the least.

    Raises:
        ValueError: `votes` is not a non-empty `[N, V]` integer array.
    """
    votes = _check_votes(votes)
    counts = (votes[:, :, None] == votes[:, None, :]).sum(-1)
    return float(np.mean(counts.max(-1) / votes.shape[1]))


class MajorityVote:
    """Simulated crowd workers: each classifier votes its argmax, a strict majority decides.

    classifiers: a sequence of JAX callables `model(x [B, H, W, C]) -> logits [B, K]` in any
    style (closures, `jax.tree_util.Partial`, Flax NNX or Equinox modules, e.g.
    `jfail.models.logits_fn` of differently seeded MLPs); each vote uses the weights the
    classifier holds at that call. batch_size: images per jitted call.
    `label(images)` gives `majority_label(votes(images))`.
    """

    def __init__(self, classifiers: Sequence[Callable], *, batch_size: int = 1024):
        if callable(classifiers):
            raise ValueError("MajorityVote takes a list of classifiers, got a single callable.")
        classifiers = tuple(classifiers)
        if not classifiers:
            raise ValueError("MajorityVote needs at least one classifier to vote.")
        for i, model in enumerate(classifiers):
            if not callable(model):
                raise TypeError(f"classifier {i} is not callable: {type(model).__name__}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.classifiers = classifiers
        self.batch_size = batch_size

    @property
    def num_voters(self) -> int:
        """The number of classifiers that vote, V."""
        return len(self.classifiers)

    def votes(self, images) -> np.ndarray:
        """Each classifier's argmax: images [N, H, W, C] -> [N, num_voters] int.

        Args:
            images: `[N, H, W, C]`, a non-empty batch.

        Returns:
            `[N, num_voters]` int64, classifier v's predicted class in column v.

        Raises:
            ValueError: `images` is not a non-empty 4-D batch, a classifier does not return `[B, K]`
                logits or returns NaN or infinite ones.
            TypeError: called inside `jax.jit`, `vmap` or `grad` (annotation runs on the host).
            ModelCallError: a classifier cannot take images of this size or channels.
        """
        images = _check_batch(images)
        return _map_batches("votes", self.classifiers, images, self.batch_size)

    def label(self, images) -> np.ndarray:
        """The strict-majority class per image, else `NONE_OF_THE_ABOVE`: [N, H, W, C] -> [N].

        Args:
            images: `[N, H, W, C]`, a non-empty batch.

        Returns:
            `[N]` int64 labels, `majority_label(votes(images))`.

        Raises:
            ValueError, TypeError, ModelCallError: as for `votes`.
        """
        images = _check_batch(images)
        return _map_batches("label", self.classifiers, images, self.batch_size)


class FileAnnotator:
    """Review by a person: samples go out as PNG files with a CSV to fill in, labels come back.

    `export` writes `scenario_{k:03d}/sample_{q:02d}.png` for every sample and `labels.csv` with
    columns `scenario, sample, file, prediction, label`; the person fills `label` of every row
    with a class name, a class index or `none`. `load` reads the labels back as `[K, Q]`, ready
    for `reviews_from_labels`.
    """

    @staticmethod
    def export(
        directory,
        samples,
        predictions,
        class_names: Sequence[str],
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write the samples and an unfilled `labels.csv`; returns the CSV's path.

        An existing `labels.csv` (perhaps already filled in) is only replaced with `overwrite=True`.

        Args:
            directory: the folder to write (created if missing).
            samples: `[K, Q, H, W, C]` in [0, 1], C = 1 (grey) or 3 (RGB).
            predictions: `[K, Q]` int, the classifier's classes, written by name.
            class_names: one name per class (see `check_class_names`).
            overwrite: replace an existing `labels.csv`.

        Returns:
            The path of `labels.csv`.

        Raises:
            ValueError: `samples` not `[K, Q, H, W, C]` floats in [0, 1] with C = 1 or 3,
                `predictions` not `[K, Q]` class indices, or bad `class_names`.
            FileExistsError: `labels.csv` exists and `overwrite` is False.
        """
        from PIL import Image

        samples = np.asarray(samples)
        if samples.ndim != 5 or samples.shape[-1] not in (1, 3):
            raise ValueError(
                f"samples must be [K, Q, H, W, C] with C = 1 or 3, got shape {samples.shape}."
            )
        check_images(samples.reshape(-1, *samples.shape[2:]), name="samples")
        predictions = np.asarray(predictions)
        if predictions.shape != samples.shape[:2]:
            raise ValueError(
                f"predictions must be [K, Q] = {samples.shape[:2]}, got {predictions.shape}."
            )
        class_names = check_class_names(class_names)
        if not np.issubdtype(predictions.dtype, np.integer) or not (
            (predictions >= 0) & (predictions < len(class_names))
        ).all():
            raise ValueError(
                f"predictions must be class indices in [0, {len(class_names)})."
            )
        directory = Path(directory)
        csv_path = directory / LABELS_FILE
        if csv_path.exists() and not overwrite:
            raise FileExistsError(
                f"{csv_path} exists (it may hold filled-in labels); pass overwrite=True to "
                "replace it."
            )
        directory.mkdir(parents=True, exist_ok=True)
        pixels = np.round(samples * 255).astype(np.uint8)
        rows = []
        for k in range(samples.shape[0]):
            (directory / f"scenario_{k:03d}").mkdir(exist_ok=True)
            for q in range(samples.shape[1]):
                name = f"scenario_{k:03d}/sample_{q:02d}.png"
                image = pixels[k, q]
                image = image[..., 0] if image.shape[-1] == 1 else image
                Image.fromarray(image).save(directory / name)
                rows.append((k, q, name, class_names[predictions[k, q]], ""))
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(_COLUMNS)
            writer.writerows(rows)
        return csv_path

    @staticmethod
    def load(directory, class_names: Sequence[str]) -> np.ndarray:
        """The filled-in labels of `directory/labels.csv` as [K, Q] int.

        A label is a class name (case and surrounding spaces ignored), a class index, or `none`
        (`NONE_OF_THE_ABOVE`).

        Args:
            directory: the folder `export` wrote.
            class_names: the class names given to `export`.

        Returns:
            `[K, Q]` int64 labels, ready for `reviews_from_labels`.

        Raises:
            FileNotFoundError: there is no `labels.csv` in `directory`.
            ValueError: bad `class_names`, missing columns, no rows, empty labels, unknown names
                or indices, and missing or repeated (scenario, sample) rows; the message names
                the rows.
        """
        class_names = check_class_names(class_names)
        csv_path = Path(directory) / LABELS_FILE
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in ("scenario", "sample", "label") if c not in columns]
            if missing:
                raise ValueError(f"{csv_path} lacks the column(s) {missing}.")
            rows = list(reader)
        if not rows:
            raise ValueError(f"{csv_path} has no rows.")

        entries, unfilled = {}, []
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            where = f"{csv_path.name} line {line}"
            try:
                key = (int(row["scenario"]), int(row["sample"]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where}: scenario and sample must be integers, got "
                    f"{row['scenario']!r}, {row['sample']!r}."
                ) from None
            if min(key) < 0:
                raise ValueError(f"{where}: scenario and sample must be >= 0, got {key}.")
            if key in entries:
                raise ValueError(f"{where}: scenario {key[0]} sample {key[1]} appears twice.")
            value = (row["label"] or "").strip()
            if not value:
                unfilled.append(f"line {line} (scenario {key[0]}, sample {key[1]})")
                entries[key] = NONE_OF_THE_ABOVE
                continue
            entries[key] = _parse_label(value, class_names, where)
        if unfilled:
            shown = ", ".join(unfilled[:10]) + (" ..." if len(unfilled) > 10 else "")
            raise ValueError(
                f"{len(unfilled)} unfilled label(s) in {csv_path}: {shown}. Fill each with a "
                "class name, a class index or 'none'."
            )

        num_scenarios = max(k for k, _ in entries) + 1
        per_scenario = max(q for _, q in entries) + 1
        absent = [
            f"(scenario {k}, sample {q})"
            for k in range(num_scenarios)
            for q in range(per_scenario)
            if (k, q) not in entries
        ]
        if absent:
            shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
            raise ValueError(
                f"{csv_path} must have one row per scenario and sample; missing {shown}."
            )
        labels = np.empty((num_scenarios, per_scenario), np.int64)
        for (k, q), value in entries.items():
            labels[k, q] = value
        return labels


# --------------------------------------------------------------------------------------------
# Private helpers.


def _scenario_label(labels: np.ndarray) -> int:
    """The most common label other than none (smallest on ties), or none."""
    named = labels[labels != NONE_OF_THE_ABOVE]
    if named.size == 0:
        return NONE_OF_THE_ABOVE
    return int(np.bincount(named).argmax())


def _majority(votes: jax.Array) -> jax.Array:
    """[N, V] -> [N]: the label more than half the voters gave, else none."""
    counts = (votes[:, :, None] == votes[:, None, :]).sum(-1)
    best = jnp.argmax(counts, axis=-1)
    label = jnp.take_along_axis(votes, best[:, None], axis=-1)[:, 0]
    strict = 2 * jnp.max(counts, axis=-1) > votes.shape[1]
    return jnp.where(strict, label, NONE_OF_THE_ABOVE)


@functools.partial(jit, static_argnums=(0, 1))
def _chunk(kind, rests, weights, x):
    """`(output, [models] whether each model's logits are finite)` of one chunk; `kind`:
    `"votes"` [b, models] argmaxes, `"label"` [b] their strict majority, `"predict"` [b] the one
    model's argmax."""
    logits = [rest.rebuild(w)(x) for rest, w in zip(rests, weights)]
    finite = jnp.stack([jnp.all(jnp.isfinite(value)) for value in logits])
    votes = jnp.stack([jnp.argmax(value, axis=-1) for value in logits], axis=-1)
    if kind == "label":
        return _majority(votes), finite
    return (votes[:, 0] if kind == "predict" else votes), finite


def _map_batches(kind: str, models, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The kernel `kind` of `models` over fixed-size chunks (the last padded), concatenated.

    Each model is checked on one chunk's shape (a clear error if it cannot take the images or
    does not return `[B, K]` logits) and split into its current weights, traced arguments of one
    compiled program per model structure."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if in_trace(models, images):
        raise TypeError("annotation runs on the host; it cannot run inside jax.jit, vmap or grad.")
    chunk = min(batch_size, len(images))
    spec = jax.ShapeDtypeStruct((chunk, *images.shape[1:]), jnp.float32)
    for i, model in enumerate(models):
        logits = call_shape(model, spec)
        if getattr(logits, "ndim", None) != 2 or logits.shape[0] != chunk:
            raise ValueError(
                f"classifier {i} must return logits [B, K] for images [B, H, W, C], got "
                f"{getattr(logits, 'shape', type(logits).__name__)} for B = {chunk}."
            )
    split = [split_model(model, spec) for model in models]
    weights = tuple(w for w, _ in split)
    rests = tuple(rest for _, rest in split)
    outputs, finite = [], []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        size = len(part)
        if size < chunk:  # repeat the last image so every call has the compiled shape
            part = np.concatenate([part, np.repeat(part[-1:], chunk - size, axis=0)])
        out, ok = _chunk(kind, rests, weights, jnp.asarray(part, jnp.float32))
        outputs.append((out, size))
        finite.append(ok)
    finite = np.stack(jax.device_get(finite)).all(axis=0)
    if not finite.all():
        bad = [i for i, ok in enumerate(finite) if not ok]
        raise ValueError(
            f"classifier(s) {bad} returned NaN or infinite logits; check their weights and the "
            "images."
        )
    return np.concatenate([np.asarray(out)[:size] for out, size in outputs]).astype(np.int64)


def _check_callable(model: Callable):
    if not callable(model):
        raise TypeError(f"expected a callable classifier, got {type(model).__name__}.")
    return model


def _check_batch(images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D [N, H, W, C], got shape {images.shape}.")
    if len(images) == 0:
        raise ValueError(f"images is empty: shape {images.shape}.")
    return images


def _check_votes(votes) -> np.ndarray:
    votes = np.asarray(votes)
    if votes.ndim != 2 or votes.shape[0] == 0 or votes.shape[1] == 0:
        raise ValueError(f"votes must be [N, V] with N, V >= 1, got shape {votes.shape}.")
    if not np.issubdtype(votes.dtype, np.integer):
        raise ValueError(f"votes must be integer labels, got dtype {votes.dtype}.")
    return votes


def _check_annotations(labels, size: int | None, name: str = "annotator labels") -> np.ndarray:
    labels = np.asarray(labels)
    if size is not None and labels.shape != (size,):
        raise ValueError(f"{name} must be [N] with N={size}, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}.")
    if labels.size and labels.min() < NONE_OF_THE_ABOVE:
        raise ValueError(
            f"{name} must be class indices or NONE_OF_THE_ABOVE ({NONE_OF_THE_ABOVE}), got "
            f"{labels.min()}."
        )
    return labels.astype(np.int64)


def check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """`class_names` as a tuple of str, checked: not empty, distinct ignoring case, none of
    them `none` (the annotators' none-of-the-above). Raises ValueError otherwise.

    Args:
        class_names: one name per class.

    Returns:
        The names as a tuple of str.

    Raises:
        ValueError: no names, names equal up to case, or a name `none`.
    """
    names = tuple(str(name) for name in class_names)
    if not names:
        raise ValueError("class_names is empty.")
    folded = [name.strip().lower() for name in names]
    if len(set(folded)) != len(folded):
        raise ValueError(f"class_names must be distinct (ignoring case), got {names}.")
    if "none" in folded:
        raise ValueError("'none' is reserved for none-of-the-above and cannot be a class name.")
    return names


def _parse_label(value: str, class_names: tuple[str, ...], where: str) -> int:
    """A class name (any case), a class index or `none` -> int; else ValueError at `where`."""
    folded = value.strip().lower()
    if folded == "none":
        return NONE_OF_THE_ABOVE
    for i, name in enumerate(class_names):
        if name.strip().lower() == folded:
            return i
    try:
        index = int(folded)
    except ValueError:
        index = None
    if index is not None and 0 <= index < len(class_names):
        return index
    raise ValueError(
        f"{where}: unknown label {value!r}; use a class name ({', '.join(class_names)}), an "
        f"index in [0, {len(class_names)}) or 'none'."
    )
