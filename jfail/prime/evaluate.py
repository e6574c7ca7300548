"""Evaluating failure modes: generalization to held-out data (section 4.1, Figure 4, A.5), the
number of tags (section 5.1, Tables 1 and 2), description quality (section 4.3, A.8), held-out
evidence with false-discovery control (`mode_evidence`) and, on synthetic data, recovery of
planted modes.

A found mode is re-evaluated on held-out data by its description alone: I'_S is every held-out
image of the same class that shows all tags of S. Description quality embeds images and the
description "class: tag + tag" in a shared image-text space (any
:class:`~jfail.prime.vlm.ImageTextEmbedder`) and reports the mean and standard deviation of the
similarities of the mode's images to its description, and the AUROC separating them from as many
images of the same class outside the mode.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jfail import stats
from jfail.prime._random import numpy_generator
from jfail.prime.search import FailureMode
from jfail.prime.tags import TagMatrix, as_tag_array

__all__ = [
    "DescriptionQuality",
    "HeldOutMode",
    "ModeEvidence",
    "SubsetAccuracy",
    "TagEvidence",
    "auroc",
    "describe",
    "description_quality",
    "evaluate_on_heldout",
    "generalization_summary",
    "mode_evidence",
    "mode_members",
    "recovery_scores",
    "subset_accuracies",
    "subset_drop_table",
]


class HeldOutMode(NamedTuple):
    """A found mode on held-out data: size = |I'_S|, accuracy = A'_S (NaN when I'_S is empty),
    class_accuracy = A'_c."""

    mode: FailureMode
    size: int
    accuracy: float
    class_accuracy: float

    @property
    def drop(self) -> float:
        """A'_c - A'_S.

        Returns:
          The held-out accuracy drop of the mode below its class's (NaN when I'_S is empty).
        """
        return self.class_accuracy - self.accuracy


class SubsetAccuracy(NamedTuple):
    """Accuracy of the images of a class that show all of `tags` (NaN when there are none)."""

    tags: tuple[str, ...]
    size: int
    accuracy: float


class DescriptionQuality(NamedTuple):
    """Section 4.3 over all modes: similarity (mean of sim(x, T_j) over every mode j and x in
    I_j), similarity_std (their standard deviation: low is coherent), auroc (inside vs outside
    images, pooled over modes) and mean_auroc (the mean of per-mode AUROCs); per_mode: one dict
    per mode with its similarity, similarity_std, auroc, size and num_outside."""

    similarity: float
    similarity_std: float
    auroc: float
    mean_auroc: float
    per_mode: list[dict]


def describe(mode: FailureMode, class_names: Sequence[str] | None = None,
             template: str = "a photo of a {cls}, {tags}") -> str:
    """A mode's description as a text prompt: its class name and all its tags (section 3.2).

    Args:
      mode: the failure mode.
      class_names: a name per class index; None writes `class <label>`.
      template: the prompt, with `{cls}` for the class name and `{tags}` for the tags.

    Returns:
      The prompt, tags joined by ", ".

    Raises:
      IndexError: `class_names` has no entry for the mode's class.
    """
    name = class_names[mode.label] if class_names is not None else f"class {mode.label}"
    return template.format(cls=name, tags=", ".join(mode.tags))


def mode_members(mode: FailureMode, tags, labels, tag_names: Sequence[str]) -> np.ndarray:
    """[N] bool: the images of the mode's class that show all its tags (looked up by name).

    Args:
      mode: the failure mode.
      tags: `[N, T]` bool (or 0/1, or a `TagMatrix`).
      labels: `[N]` int classes.
      tag_names: the T column names of `tags`.

    Returns:
      `[N]` bool.

    Raises:
      ValueError: bad tags (see `jfail.prime.tags.as_tag_array`).
      KeyError: a mode tag is not in `tag_names`.
    """
    tags = as_tag_array(tags)
    columns = _columns(mode.tags, tag_names)
    return (np.asarray(labels) == mode.label) & tags[:, columns].all(axis=1)


def evaluate_on_heldout(
    modes: Sequence[FailureMode], tags, *, errors, labels, tag_names: Sequence[str] | None = None
) -> list[HeldOutMode]:
    """Each mode on other data, by its tags alone (section 4.1).

    Args:
      modes: failure modes found on another split; only `label` and `tags` are used.
      tags: `[N', T']` bool (or 0/1, or a TagMatrix) of the held-out images, whose columns are
        found by the modes' tag names.
      errors: `[N']` bool, True where the classifier is wrong.
      labels: `[N']` int.
      tag_names: the T' column names (default: the TagMatrix's names, else "tag0", ...).

    Returns:
      One `HeldOutMode` per mode, in the order of `modes`.

    Raises:
      ValueError: bad tags, tag names that do not match the columns, errors that are not
        boolean or 0/1, or tags, errors and labels of different lengths.
      KeyError: a mode tag is not among the tag names.
    """
    tags, tag_names, correct, labels = _check_data(tags, errors, labels, tag_names)
    results = []
    for mode in modes:
        in_class = labels == mode.label
        members = in_class & tags[:, _columns(mode.tags, tag_names)].all(axis=1)
        results.append(HeldOutMode(mode, int(members.sum()), _mean(correct[members]),
                                   _mean(correct[in_class])))
    return results


class TagEvidence(NamedTuple):
    """Minimality of one tag t of a mode S, measured on held-out data.

    size, errors: the held-out images of the mode's class that show every tag of S but t and lack
    t (I'_{S \\ t} minus I'_S), and how many of them the model gets wrong; error_rate: errors /
    size (None when size is 0); p_value: Fisher's exact one-sided test that the mode's images
    are wrong more often than these; q_value: its adjusted p-value (`mode_evidence`).
    """

    tag: str
    size: int
    errors: int
    error_rate: float | None
    p_value: float
    q_value: float

    def row(self) -> dict:
        """Plain Python values, strict-JSON ready (None for a missing rate).

        Returns:
          A dict with `tag`, `size`, `errors`, `error_rate`, `p_value` and `q_value`.
        """
        return {"tag": self.tag, "size": self.size, "errors": self.errors,
                "error_rate": self.error_rate, "p_value": self.p_value, "q_value": self.q_value}


class ModeEvidence(NamedTuple):
    """Held-out evidence for one failure mode (`mode_evidence`).

    heldout_size, heldout_errors: |I'_S| and its misclassified images; heldout_error_rate: their
    ratio (None when I'_S is empty); interval: its Wilson interval; class_size,
    class_error_rate: the held-out images of the mode's class and their error rate (None when
    there are none); p_value: the exact one-sided binomial test that the mode's error rate is
    above its class's; q_value: its adjusted p-value; minimality: one `TagEvidence` per tag for
    modes of two or more tags (empty otherwise, or when minimality was not tested);
    significant: the mode's q-value and every tag's are at most alpha.
    """

    mode: FailureMode
    heldout_size: int
    heldout_errors: int
    heldout_error_rate: float | None
    interval: tuple[float, float]
    class_size: int
    class_error_rate: float | None
    p_value: float
    q_value: float
    minimality: tuple[TagEvidence, ...]
    significant: bool

    def row(self, class_names: Sequence[str] | None = None) -> dict:
        """The mode and its evidence as plain Python values, strict-JSON ready (no NaN).

        Args:
          class_names: a name per class index, written as `class`; None writes null.

        Returns:
          A dict of the mode's label, class and tags, its held-out counts, rate, interval,
          class counts, p- and q-value, `minimality` (one `TagEvidence.row` per tag) and
          `significant`.

        Raises:
          IndexError: `class_names` has no entry for the mode's class.
        """
        mode = self.mode
        return {
            "label": int(mode.label),
            "class": class_names[mode.label] if class_names is not None else None,
            "tags": list(mode.tags),
            "heldout_size": self.heldout_size,
            "heldout_errors": self.heldout_errors,
            "heldout_error_rate": self.heldout_error_rate,
            "interval": list(self.interval),
            "class_heldout_size": self.class_size,
            "class_heldout_error_rate": self.class_error_rate,
            "p_value": self.p_value,
            "q_value": self.q_value,
            "minimality": [t.row() for t in self.minimality],
            "significant": self.significant,
        }


def mode_evidence(
    modes: Sequence[FailureMode],
    tags,
    *,
    errors,
    labels,
    tag_names: Sequence[str] | None = None,
    method: str = "by",
    alpha: float = 0.05,
    minimality: bool = True,
    confidence: float = 0.95,
) -> list[ModeEvidence]:
    """Held-out evidence for failure modes: their error rate, and that they are still minimal.

    Each mode S of class c, found on a search split, is re-evaluated on held-out data by its tags
    alone (section 4.1): I'_S is every held-out image of class c that shows all tags of S. Two
    kinds of exact one-sided tests are made there:

    - the mode: the number of errors in I'_S against Bin(|I'_S|, e'_c), e'_c the held-out error
      rate of class c (`jfail.stats.binomial_p_value`); the paper's condition A_S <= A_c - a
      (section 3.2) without its margin a, whose size the error rate and interval show;
    - minimality, for every tag t of a mode of two or more tags (the paper's condition 3,
      A_{S \\ t} >= A_S + b_|S|): the errors in I'_S against those in R_t = I'_{S \\ t} minus
      I'_S, the images that show the other tags but lack t, by Fisher's exact test
      (`jfail.stats.fisher_p_value`). I'_S is a subset of I'_{S \\ t}, so the two overlap and
      cannot be compared as independent samples; but the error rate of I'_{S \\ t} is a weighted
      mean of those of I'_S and R_t, so it lies below the rate of I'_S exactly when the rate of
      R_t does. The test asks whether t is needed at all (margin 0); the margin b_|S| is the
      search's, on the search split. Where R_t or I'_S is empty the p-value is 1: the tag cannot
      be shown to be needed, and the mode is not significant. A mode of one tag has no
      minimality test: removing the tag leaves the whole class, which the mode's own test
      already compares with.

    All p-values (M mode tests and one per tag of every mode of two or more tags) go under one
    false-discovery control. Benjamini-Yekutieli is the default because the tests are dependent
    in ways that are not all positive: a mode and its supersets share images, and the minimality
    test of S compares I'_S with images that other modes' tests count as inside, so the
    Benjamini-Hochberg condition (positive regression dependence) cannot be relied on.
    A mode is `significant` when its own q-value and every tag's are at most alpha: without the
    minimality tests every superset of a real failure mode (the failure plus any frequent tag)
    would be significant too.

    The held-out split must not have been used to choose the modes (search on a validation
    split, evidence on the test split): then the candidates are exactly `modes`. The q-values
    control the false discovery rate among the rejected tests (mode tests and minimality tests
    together), not directly among the significant modes: a mode is significant only when all of
    its tests are rejected, and where many supersets of real failures pass their mode tests the
    share of false modes among the significant ones can exceed alpha. On the planted benchmark
    (`benchmarks/prime_planted.py`) it stayed at or below 1.3 % pooled at alpha = 0.05.

    Args:
      modes: M failure modes (`find_failure_modes` on another split); only `label` and `tags`
        are used.
      tags: `[N, T]` bool (or 0/1, or a `TagMatrix`) tags of the held-out images; the modes'
        tags are found by name.
      errors: `[N]` bool, True where the classifier is wrong on held-out image n.
      labels: `[N]` int, the held-out images' true classes.
      tag_names: the T column names (default: the TagMatrix's names, else "tag0", "tag1", ...).
      method: "by" (Benjamini-Yekutieli) or "bh" (Benjamini-Hochberg), `jfail.stats.q_values`.
      alpha: the false discovery rate; a test is a discovery where its q-value is at most alpha.
      minimality: False leaves the minimality tests out (only the M mode tests are corrected and
        decide `significant`), to measure what they add.
      confidence: the level of the Wilson interval.

    Returns:
      One `ModeEvidence` per mode, in the order of `modes`.

    Raises:
      ValueError: tags, errors and labels of different lengths, errors that are not boolean or
        0/1, a mode tag that is not among the held-out tag names, an unknown `method`, or
        `alpha` or `confidence` outside (0, 1).
    """
    stats.check_options(method=method, alpha=alpha, confidence=confidence)
    tags, tag_names, correct, labels = _check_data(tags, errors, labels, tag_names)
    wrong = ~correct
    known = set(tag_names)
    for mode in modes:
        missing = [name for name in mode.tags if name not in known]
        if missing:
            raise ValueError(f"mode {mode.label}: {' + '.join(mode.tags)} has tags {missing} that "
                             "are not among the held-out tag names; tag both splits with the same "
                             "tagger")
    if not modes:
        return []

    # counts: (size, errors, class size, class errors); tag_counts: per mode [(size, errors)]
    counts, tag_counts = [], []
    for mode in modes:
        in_class = labels == mode.label
        shown = tags[in_class][:, _columns(mode.tags, tag_names)]  # [N_c, k]
        class_wrong = wrong[in_class]
        inside = shown.all(axis=1)
        counts.append((int(inside.sum()), int(class_wrong[inside].sum()), int(in_class.sum()),
                       int(class_wrong.sum())))
        rest = []
        if minimality and len(mode.tags) >= 2:
            for j in range(len(mode.tags)):
                others = np.delete(shown, j, axis=1).all(axis=1) & ~shown[:, j]
                rest.append((int(others.sum()), int(class_wrong[others].sum())))
        tag_counts.append(rest)

    size, num_wrong, class_size, class_wrong = np.array(counts, np.int64).T
    baseline = np.where(class_size > 0, class_wrong / np.maximum(class_size, 1), 0.0)
    mode_p = stats.binomial_p_value(num_wrong, size, baseline)
    low, high = stats.wilson_interval(num_wrong, size, confidence=confidence)
    owner = np.array([i for i, rest in enumerate(tag_counts) for _ in rest], np.int64)
    rest = np.array([c for r in tag_counts for c in r], np.int64).reshape(-1, 2)
    tag_p = stats.fisher_p_value(num_wrong[owner], size[owner], rest[:, 1], rest[:, 0])
    q = stats.q_values(np.concatenate([mode_p, tag_p]), method=method)
    mode_q, tag_q = q[: len(modes)], q[len(modes):]

    results, start = [], 0
    for i, mode in enumerate(modes):
        stop = start + len(tag_counts[i])
        tests = tuple(
            TagEvidence(name, int(rest[j, 0]), int(rest[j, 1]), _rate(rest[j, 1], rest[j, 0]),
                        float(tag_p[j]), float(tag_q[j]))
            for name, j in zip(mode.tags, range(start, stop))
        )
        start = stop
        results.append(ModeEvidence(
            mode=mode,
            heldout_size=int(size[i]),
            heldout_errors=int(num_wrong[i]),
            heldout_error_rate=_rate(num_wrong[i], size[i]),
            interval=(float(low[i]), float(high[i])),
            class_size=int(class_size[i]),
            class_error_rate=_rate(class_wrong[i], class_size[i]),
            p_value=float(mode_p[i]),
            q_value=float(mode_q[i]),
            minimality=tests,
            significant=bool(mode_q[i] <= alpha and all(t.q_value <= alpha for t in tests)),
        ))
    return results


def generalization_summary(
    heldout: Sequence[HeldOutMode], drop_thresholds=(0.2, 0.25, 0.3)
) -> dict:
    """Figure 4's numbers: how many modes keep a drop of at least each threshold on held-out
    data, the correlation of search and held-out accuracy, and the mean drops.

    Args:
      heldout: `evaluate_on_heldout`'s results; modes with no held-out image are left out of
        every statistic but the count `modes`.
      drop_thresholds: the drops whose held-out share is reported.

    Returns:
      A dict of counts, mean drops and accuracies, `accuracy_correlation` (NaN with fewer than
      3 modes or constant accuracies) and one `share_heldout_drop_at_least_<t>` per threshold
      (NaN where no mode has held-out images).
    """
    valid = [h for h in heldout if h.size > 0]
    search_acc = np.array([h.mode.accuracy for h in valid])
    heldout_acc = np.array([h.accuracy for h in valid])
    summary = {
        "modes": len(heldout),
        "modes_with_heldout_images": len(valid),
        "mean_search_drop": _mean([h.mode.drop for h in valid]),
        "mean_heldout_drop": _mean([h.drop for h in valid]),
        "mean_search_accuracy": _mean(search_acc),
        "mean_heldout_accuracy": _mean(heldout_acc),
        "accuracy_correlation": (
            float(np.corrcoef(search_acc, heldout_acc)[0, 1])
            if len(valid) > 2 and search_acc.std() > 0 and heldout_acc.std() > 0
            else float("nan")
        ),
    }
    for threshold in drop_thresholds:
        share = np.mean([h.drop >= threshold for h in valid]) if valid else float("nan")
        summary[f"share_heldout_drop_at_least_{threshold:g}"] = float(share)
    return summary


def subset_accuracies(mode: FailureMode, tags, *, errors, labels,
                      tag_names: Sequence[str] | None = None) -> list[SubsetAccuracy]:
    """Table 1: the accuracy of the mode's class on images showing each non-empty subset of its
    tags, from all tags down to single tags.

    Args:
      mode: the failure mode.
      tags: `[N, T]` bool (or 0/1, or a TagMatrix).
      errors: `[N]` bool, True where the classifier is wrong.
      labels: `[N]` int.
      tag_names: the T column names (default: the TagMatrix's names, else "tag0", ...).

    Returns:
      One `SubsetAccuracy` per non-empty subset of the mode's tags, largest subsets first.

    Raises:
      ValueError: bad tags, tag names that do not match the columns, errors that are not
        boolean or 0/1, or tags, errors and labels of different lengths.
      KeyError: a mode tag is not among the tag names.
    """
    tags, tag_names, correct, labels = _check_data(tags, errors, labels, tag_names)
    in_class = labels == mode.label
    rows = []
    for size in range(len(mode.tags), 0, -1):
        for subset in itertools.combinations(mode.tags, size):
            members = in_class & tags[:, _columns(subset, tag_names)].all(axis=1)
            rows.append(SubsetAccuracy(subset, int(members.sum()), _mean(correct[members])))
    return rows


def subset_drop_table(modes: Sequence[FailureMode], tags, *, errors, labels,
                      tag_names: Sequence[str] | None = None, min_images: int = 1) -> dict:
    """Table 2: for modes of k tags, the mean accuracy drop (A'_c - A') of the full tag set and
    of its subsets of k-1, ..., 1 tags, all on the given (held-out) data.

    A subset (or a mode) with fewer than `min_images` images is left out of the mean.

    Args:
      modes: failure modes; those of one tag are skipped.
      tags: `[N, T]` bool (or 0/1, or a TagMatrix).
      errors: `[N]` bool, True where the classifier is wrong.
      labels: `[N]` int.
      tag_names: the T column names (default: the TagMatrix's names, else "tag0", ...).
      min_images: the fewest images a mode or subset needs to count.

    Returns:
      {k: {"modes": count, "drop": {j: mean drop over the modes' j-subsets}}}, NaN where no
      subset counts.

    Raises:
      ValueError: bad tags, tag names that do not match the columns, errors that are not
        boolean or 0/1, or tags, errors and labels of different lengths.
      KeyError: a mode tag is not among the tag names.
    """
    tags, tag_names, correct, labels = _check_data(tags, errors, labels, tag_names)
    table: dict[int, dict] = {}
    for k in sorted({len(m.tags) for m in modes}):
        if k < 2:
            continue
        drops: dict[int, list[float]] = {j: [] for j in range(k, 0, -1)}
        used = 0
        for mode in (m for m in modes if len(m.tags) == k):
            rows = subset_accuracies(mode, tags, errors=~correct, labels=labels,
                                     tag_names=tag_names)
            if rows[0].size < min_images:
                continue
            used += 1
            class_accuracy = _mean(correct[labels == mode.label])
            per_size: dict[int, list[float]] = {}
            for row in rows:
                if row.size >= min_images:
                    per_size.setdefault(len(row.tags), []).append(class_accuracy - row.accuracy)
            for j, values in per_size.items():
                drops[j].append(float(np.mean(values)))
        table[k] = {"modes": used, "drop": {j: _mean(v) for j, v in drops.items()}}
    return table


def description_quality(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    members: np.ndarray,
    labels: np.ndarray,
    mode_labels: Sequence[int],
    *,
    key,
    num_outside: int | None = None,
) -> DescriptionQuality:
    """Section 4.3's three metrics.

    Outside images are drawn (with `key`) from the mode's class but not the mode:
    `num_outside` of them, by default as many as the mode has images.

    Args:
      image_embeddings: `[N, D]` unit rows.
      text_embeddings: `[M, D]` unit rows, one per mode.
      members: `[M, N]` bool, the images of each mode.
      labels: `[N]` classes.
      mode_labels: `[M]`, each mode's class.
      key: an int seed or a PRNG key for drawing the outside images.
      num_outside: outside images per mode (at most the class's images outside the mode).

    Returns:
      A `DescriptionQuality` (NaN metrics and no per-mode rows when M is 0).

    Raises:
      ValueError: `members` is not `[M, N]`, `mode_labels` is not M long, a mode has no images,
        or `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    image_embeddings = np.asarray(image_embeddings, np.float32)
    text_embeddings = np.asarray(text_embeddings, np.float32)
    members = np.asarray(members, bool)
    labels = np.asarray(labels)
    if members.shape != (len(text_embeddings), len(image_embeddings)):
        raise ValueError(
            f"members must be [M, N] = [{len(text_embeddings)}, {len(image_embeddings)}], "
            f"got {members.shape}"
        )
    if len(mode_labels) != len(text_embeddings):
        raise ValueError(f"{len(mode_labels)} mode labels for {len(text_embeddings)} descriptions")
    similarity = text_embeddings @ image_embeddings.T  # [M, N]
    inside_all, outside_all, per_mode = [], [], []
    rng = numpy_generator(key)
    for j, label in enumerate(mode_labels):
        inside = np.flatnonzero(members[j])
        pool = np.flatnonzero((labels == label) & ~members[j])
        if len(inside) == 0:
            raise ValueError(f"mode {j} has no images")
        count = min(len(pool), num_outside if num_outside is not None else len(inside))
        outside = rng.choice(pool, count, replace=False)
        inside_scores, outside_scores = similarity[j, inside], similarity[j, outside]
        inside_all.append(inside_scores)
        outside_all.append(outside_scores)
        per_mode.append({
            "similarity": float(inside_scores.mean()),
            "similarity_std": float(inside_scores.std()),
            "auroc": auroc(inside_scores, outside_scores),
            "size": int(len(inside)),
            "num_outside": int(count),
        })
    if not per_mode:
        nan = float("nan")
        return DescriptionQuality(nan, nan, nan, nan, [])
    inside_all, outside_all = np.concatenate(inside_all), np.concatenate(outside_all)
    return DescriptionQuality(
        similarity=float(inside_all.mean()),
        similarity_std=float(inside_all.std()),
        auroc=auroc(inside_all, outside_all),
        mean_auroc=_mean([m["auroc"] for m in per_mode]),
        per_mode=per_mode,
    )


def auroc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve: P(positive > negative) + P(tie) / 2 (NaN if a side is empty).

    Args:
      positive_scores: scores of the positives, any shape (flattened).
      negative_scores: scores of the negatives, any shape (flattened).

    Returns:
      The AUROC, a float in [0, 1] or NaN.
    """
    positive = np.asarray(positive_scores, np.float64).ravel()
    negative = np.asarray(negative_scores, np.float64).ravel()
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    negative = np.sort(negative)
    below = np.searchsorted(negative, positive, side="left")
    at_most = np.searchsorted(negative, positive, side="right")
    return float((below + 0.5 * (at_most - below)).sum() / (len(positive) * len(negative)))


def recovery_scores(
    modes: Sequence[FailureMode], planted: Sequence[tuple[int, Sequence[str]]]
) -> dict:
    """Precision and recall of found modes against planted ones, as (label, tag-name set) pairs.

    Args:
      modes: the found failure modes.
      planted: the planted modes as `(label, tag names)` pairs.

    Returns:
      A dict with the counts `found`, `planted`, `recovered`, `precision` and `recall` (NaN when
      nothing was found or planted), and the sorted `(label, tags)` pairs `missed` and
      `spurious`.
    """
    found = {(m.label, frozenset(m.tags)) for m in modes}
    truth = {(int(label), frozenset(tags)) for label, tags in planted}
    hits = found & truth
    return {
        "found": len(found),
        "planted": len(truth),
        "recovered": len(hits),
        "precision": len(hits) / len(found) if found else float("nan"),
        "recall": len(hits) / len(truth) if truth else float("nan"),
        "missed": sorted((label, tuple(sorted(tags))) for label, tags in truth - found),
        "spurious": sorted((label, tuple(sorted(tags))) for label, tags in found - truth),
    }


def _check_data(tags, errors, labels, tag_names):
    """-> tags, tag names, correct (the complement of `errors`), labels."""
    if isinstance(tags, TagMatrix) and tag_names is None:
        tag_names = tags.names
    tags = as_tag_array(tags)
    if tag_names is None:
        tag_names = tuple(f"tag{i}" for i in range(tags.shape[1]))
    tag_names = tuple(tag_names)
    if len(tag_names) != tags.shape[1]:
        raise ValueError(f"{len(tag_names)} tag names for {tags.shape[1]} tag columns")
    errors = np.asarray(errors)
    if errors.dtype != bool:
        if errors.size and not np.isin(errors, (0, 1)).all():
            raise ValueError("errors must be booleans (True where the classifier is wrong) or 0/1, "
                             f"got values {np.unique(errors)[:5]}")
        errors = errors.astype(bool)
    labels = np.asarray(labels)
    if errors.shape != (len(tags),) or labels.shape != (len(tags),):
        raise ValueError(f"tags has {len(tags)} rows but errors has shape {errors.shape} and "
                         f"labels {labels.shape}")
    return tags, tag_names, ~errors, labels


def _columns(names: Sequence[str], tag_names: Sequence[str]) -> list[int]:
    index = {name: i for i, name in enumerate(tag_names)}
    missing = [name for name in names if name not in index]
    if missing:
        raise KeyError(f"tags {missing} are not among the data's tag names")
    return [index[name] for name in names]


def _rate(errors, size) -> float | None:
    return float(errors) / float(size) if size > 0 else None


def _mean(values) -> float:
    values = np.asarray(values, np.float64)
    return float(values.mean()) if values.size else float("nan")
