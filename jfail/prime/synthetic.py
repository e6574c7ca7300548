"""Synthetic tag problems with known failure modes, for tests, benchmarks and description metrics.

- :func:`planted_problem`: independent tags; every image of a class that shows all tags of a
  planted set is misclassified with probability 1 - mode_accuracy, every other image with
  probability 1 - base_accuracy. With mode_accuracy = 0 and rare planted tags (so that
  |I_S| / |I_{S \\ t}| is well below the drop a), the planted sets are exactly the failure modes.
- :func:`living17_shaped_problem`: the size of the paper's Living17 search (17 classes, 88,400
  images, about 100 tags a class) with correlated tags of skewed frequencies, as an image tagger
  produces them, and some hard tag combinations; for timing the search.
- :func:`flip_tags`: a noisy tagger's view of ground-truth tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.special import ndtri

from jfail.prime._random import numpy_generator

__all__ = ["PlantedProblem", "flip_tags", "living17_shaped_problem", "planted_problem"]


class PlantedProblem(NamedTuple):
    """tags: [N, T] bool; labels: [N] int32; correct: [N] bool; tag_names: T names;
    planted: the planted modes as (label, tag names ascending by column)."""

    tags: np.ndarray
    labels: np.ndarray
    correct: np.ndarray
    tag_names: tuple[str, ...]
    planted: tuple[tuple[int, tuple[str, ...]], ...]

    @property
    def errors(self) -> np.ndarray:
        """[N] bool, True where the classifier is wrong (the complement of `correct`).

        Returns:
          `[N]` bool, a new array.
        """
        return ~self.correct


def planted_problem(
    *,
    key,
    num_classes: int,
    images_per_class: int,
    tag_prevalence: float | Sequence[float],
    planted: Sequence[tuple[int, Sequence[int]]],
    num_tags: int | None = None,
    base_accuracy: float = 1.0,
    mode_accuracy: float = 0.0,
) -> PlantedProblem:
    """Independent Bernoulli tags with planted failure modes.

    Args:
      key: an int seed or a PRNG key; the same key gives the same problem.
      num_classes: C.
      images_per_class: images of each class; N = C * images_per_class.
      tag_prevalence: one probability for all tags or one per tag (`[T]`).
      planted: (label, tag indices) pairs.
      num_tags: T; needed with a single probability, ignored with one per tag.
      base_accuracy: the classifier's accuracy outside the planted modes.
      mode_accuracy: its accuracy on the images of a planted mode.

    Returns:
      A `PlantedProblem` with tags named `tag0`, `tag1`, ... and the planted modes by name.

    Raises:
      ValueError: a single probability without `num_tags`, a planted mode whose label or tags
        are out of range or whose tag set is empty, or `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    prevalence = np.asarray(tag_prevalence, np.float32)
    if prevalence.ndim == 0:
        if num_tags is None:
            raise ValueError("num_tags is needed when tag_prevalence is one number")
        prevalence = np.full(num_tags, float(prevalence), np.float32)
    num_tags = len(prevalence)
    for label, tag_set in planted:
        if (not 0 <= label < num_classes or not tag_set
                or not all(0 <= t < num_tags for t in tag_set)):
            raise ValueError(f"planted mode ({label}, {tuple(tag_set)}) is out of range")
    rng = numpy_generator(key)
    n = num_classes * images_per_class
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), images_per_class)
    tags = rng.random((n, num_tags), dtype=np.float32) < prevalence
    in_mode = np.zeros(n, bool)
    for label, tag_set in planted:
        in_mode |= (labels == label) & tags[:, list(tag_set)].all(axis=1)
    draws = rng.random(n)
    correct = np.where(in_mode, draws < mode_accuracy, draws < base_accuracy)
    names = tuple(f"tag{i}" for i in range(num_tags))
    planted_names = tuple(
        (int(label), tuple(names[t] for t in sorted(tag_set))) for label, tag_set in planted
    )
    return PlantedProblem(tags, labels, correct, names, planted_names)


def living17_shaped_problem(
    *,
    key,
    num_classes: int = 17,
    images_per_class: int = 5200,
    vocabulary_size: int = 400,
    tags_per_class: int = 100,
    prevalence_range: tuple[float, float] = (0.012, 0.4),
    num_factors: int = 6,
    loading_range: tuple[float, float] = (0.3, 0.8),
    hard_sets_per_class: int = 3,
    hard_prevalence_range: tuple[float, float] = (0.03, 0.2),
    base_accuracy: float = 0.9,
    hard_accuracy: float = 0.45,
) -> PlantedProblem:
    """A tag matrix shaped like the paper's Living17 search (section 3.2: 17 classes, 88,400
    images, |T_c| about 100).

    Each class uses `tags_per_class` tags of a shared vocabulary, with prevalences log-uniform in
    `prevalence_range` and correlated through `num_factors` latent scene factors (a Gaussian
    copula: tag t is on when loading * factor + noise exceeds its quantile); the other tags of
    the vocabulary are absent from the class. Each class has `hard_sets_per_class` random sets of
    1 to 4 of its tags (drawn among those with prevalence in `hard_prevalence_range`) on whose
    images the accuracy is `hard_accuracy`; elsewhere it is `base_accuracy`.

    Args:
      key: an int seed or a PRNG key; the same key gives the same problem.
      num_classes: C.
      images_per_class: images of each class; N = C * images_per_class.
      vocabulary_size: T, the tags of the shared vocabulary.
      tags_per_class: the tags each class uses, at most T.
      prevalence_range: `(low, high)` of the log-uniform tag prevalences.
      num_factors: the latent scene factors that correlate the tags.
      loading_range: `(low, high)` of the uniform factor loadings, in (0, 1).
      hard_sets_per_class: the planted hard tag sets of each class.
      hard_prevalence_range: the prevalences among which hard tags are drawn.
      base_accuracy: the classifier's accuracy off the hard sets.
      hard_accuracy: its accuracy on the images of a hard set.

    Returns:
      A `PlantedProblem` with `[N, T]` tags named `tag0`, ... and the hard sets as `planted`.

    Raises:
      ValueError: `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    rng = numpy_generator(key)
    n = num_classes * images_per_class
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), images_per_class)
    shape = (num_classes, tags_per_class)
    active = np.stack([rng.choice(vocabulary_size, tags_per_class, replace=False)
                       for _ in range(num_classes)])
    prevalence = np.exp(
        rng.uniform(np.log(prevalence_range[0]), np.log(prevalence_range[1]), shape)
    )
    factor_of_tag = rng.integers(0, num_factors, shape)
    loading = rng.uniform(loading_range[0], loading_range[1], shape)
    tags = np.zeros((n, vocabulary_size), bool)
    rows = np.arange(n).reshape(num_classes, images_per_class)
    for label in range(num_classes):
        factors = rng.standard_normal((images_per_class, num_factors), dtype=np.float32)
        noise = rng.standard_normal((images_per_class, tags_per_class), dtype=np.float32)
        weight = loading[label][None, :]
        latent = weight * factors[:, factor_of_tag[label]] + np.sqrt(1 - weight**2) * noise
        threshold = ndtri(1 - prevalence[label])[None, :]
        tags[rows[label][:, None], active[label][None, :]] = latent > threshold

    hard = np.zeros(n, bool)
    planted = []
    for label in range(num_classes):
        middle = ((prevalence[label] >= hard_prevalence_range[0])
                  & (prevalence[label] <= hard_prevalence_range[1]))
        common = active[label][middle]
        for _ in range(hard_sets_per_class):
            size = int(rng.integers(1, 5))
            tag_set = sorted(
                int(t) for t in rng.choice(common, min(size, len(common)), replace=False)
            )
            hard[rows[label]] |= tags[rows[label]][:, tag_set].all(axis=1)
            planted.append((label, tuple(f"tag{t}" for t in tag_set)))
    draws = rng.random(n)
    correct = np.where(hard, draws < hard_accuracy, draws < base_accuracy)
    names = tuple(f"tag{i}" for i in range(vocabulary_size))
    return PlantedProblem(tags, labels, correct, names, tuple(planted))


def flip_tags(tags: np.ndarray, flip_probability: float, *, key) -> np.ndarray:
    """`tags` ([N, T] bool) with each entry flipped independently with `flip_probability`.

    Args:
      tags: `[N, T]` bool (any shape works).
      flip_probability: the chance each entry is flipped, in [0, 1].
      key: an int seed or a PRNG key.

    Returns:
      A new bool array shaped like `tags`.

    Raises:
      ValueError: `flip_probability` is outside [0, 1], or `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    if not 0 <= flip_probability <= 1:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
    flips = numpy_generator(key).random(np.shape(tags), dtype=np.float32) < flip_probability
    return np.asarray(tags, bool) ^ flips

