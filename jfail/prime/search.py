"""Failure modes as minimal tag combinations (seed 004, section 3.2 and appendix A.6).

For each class c with accuracy A_c, a tag set S (|S| <= l) is a failure mode when its images
I_S (the images of class c that show every tag of S) satisfy

1. |I_S| >= s                                  (enough images),
2. A_S <= A_c - a                              (accuracy drops by at least a),
3. A_{S \\ t} >= A_S + b_|S| for every t in S   (every tag is needed; only for |S| >= 2).

The exhaustive search counts every tag set with at least s images, level by level (Apriori: all
sets of one tag, then of two, ...), and never a superset of a set with fewer than s images: adding
a tag can only remove images, so a set of k tags is a candidate only if all its subsets of k - 1
tags are frequent. Image sets are bit-packed (32 images a word); one jitted JAX kernel counts a
block of candidate sets at once, ANDing their tag rows and popcounting the result alone and
with the correct-prediction row. The greedy search (A.6) extends only the
`beam_width` hardest sets of each level and so visits far fewer sets, at the price of missing
some modes; every mode it reports passes the same three tests on exact counts, so its modes are
a subset of the exhaustive search's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfail.logs import progress_disabled
from jfail.prime.tags import TagMatrix, as_tag_array, frequent_tags
from jfail.xla import jit

__all__ = [
    "ACCURACY_TOLERANCE",
    "SEARCH_METHODS",
    "FailureMode",
    "TagSetCounts",
    "count_frequent_tag_sets",
    "count_tag_sets",
    "find_failure_modes",
    "pack_bits",
]

SEARCH_METHODS = ("exhaustive", "greedy")

ACCURACY_TOLERANCE = 1e-9
"""Slack for the accuracy comparisons, so that e.g. 0.6 <= 0.9 - 0.3 holds in floating point."""

_WORD_PAD = 8
"""Packed rows are padded to a multiple of this many 32-bit words, so classes of similar size
share one compiled kernel."""


class FailureMode(NamedTuple):
    """One failure mode: the images of class `label` that show all of `tags`.

    tags: the tag names, in the order of the tag matrix's columns; tag_indices: their columns.
    size: |I_S|; num_correct: correctly classified images in I_S; accuracy = num_correct / size.
    class_accuracy: A_c over all `class_size` images of the class in the searched data.
    """

    label: int
    tags: tuple[str, ...]
    size: int
    accuracy: float
    class_accuracy: float
    tag_indices: tuple[int, ...]
    num_correct: int
    class_size: int

    @property
    def drop(self) -> float:
        """A_c - A_S.

        Returns:
          The accuracy drop of the mode below its class's, a float.
        """
        return self.class_accuracy - self.accuracy

    def describe(self, class_names: Sequence[str] | None = None) -> str:
        """The paper's description: the class name and all tags of the mode.

        Args:
          class_names: a name per class index; None writes `class <label>`.

        Returns:
          `"<class>: <tag> + <tag> + ..."`.

        Raises:
          IndexError: `class_names` has no entry for `label`.
        """
        name = class_names[self.label] if class_names is not None else f"class {self.label}"
        return f"{name}: {' + '.join(self.tags)}"


class TagSetCounts(NamedTuple):
    """Every tag set with at least `min_size` images, of one group of images, by size.

    sets[k - 1]: [M_k, k] int32 tag indices, ascending within a row, rows in lexicographic order.
    sizes[k - 1], num_correct[k - 1]: [M_k] int64 image and correct-image counts.
    """

    sets: tuple[np.ndarray, ...]
    sizes: tuple[np.ndarray, ...]
    num_correct: tuple[np.ndarray, ...]


def find_failure_modes(
    tags,
    *,
    errors,
    labels,
    tag_names: Sequence[str] | None = None,
    min_size: int = 30,
    min_drop: float = 0.30,
    min_gain: Sequence[float] = (0.10, 0.05, 0.025),
    max_tags: int = 4,
    min_tag_count: int = 0,
    method: str = "exhaustive",
    beam_width: int = 20,
    classes: Sequence[int] | None = None,
    num_classes: int | None = None,
    block_size: int = 4096,
    progress: bool | None = None,
) -> list[FailureMode]:
    """All failure modes of every class (section 3.2), sorted by class, number of tags, accuracy.

    Args:
      tags: `[N, T]` bool (or 0/1, or a TagMatrix, whose names are then used).
      errors: `[N]` bool, True where the classifier is wrong.
      labels: `[N]` int, the true classes.
      tag_names: T names of the tag columns; None uses the TagMatrix's names or `tag<i>`.
      min_size: the paper's s, the fewest images of a mode.
      min_drop: the paper's a, the least accuracy drop below the class's.
      min_gain: the paper's (b2, b3, b4, ...); min_gain[k - 2] applies to sets of k tags, so it
        needs at least max_tags - 1 entries.
      max_tags: the paper's l, the most tags of a mode.
      min_tag_count: per class, tags on fewer images are dropped before the search
        (section 3.1).
      method: "exhaustive" (exact) or "greedy" (A.6: only the `beam_width` lowest-accuracy sets
        of each size are extended).
      beam_width: the sets of each size the greedy search extends.
      classes: the classes to search (default: every label that occurs, or range(num_classes)).
      num_classes: the number of classes; None uses the labels that occur.
      block_size: candidate tag sets counted per kernel call.
      progress: show a progress bar over the classes (None: only when stderr is a terminal).

    Returns:
      A list of `FailureMode`s, sorted by class, number of tags and accuracy (possibly empty).

    Raises:
      ValueError: before any search, for inputs whose lengths disagree, bad tags, errors or
        labels, tag names that do not match the columns, hyperparameters out of range, an
        unknown `method`, `beam_width < 1`, a searched class without images, a class with fewer
        than `min_size` images, or more tags than the set keys can hold.
    """
    if isinstance(tags, TagMatrix) and tag_names is None:
        tag_names = tags.names
    tags = as_tag_array(tags)
    correct = ~_as_bool_vector(errors, "errors")
    labels = _as_label_vector(labels)
    num_images, num_tags = tags.shape
    if len(correct) != num_images or len(labels) != num_images:
        raise ValueError(
            f"tags has {num_images} rows but errors has {len(correct)} entries and labels "
            f"{len(labels)}: they must describe the same images"
        )
    tag_names = _check_tag_names(tag_names, num_tags)
    gains = _check_hyperparameters(min_size, min_drop, min_gain, max_tags, min_tag_count)
    if method not in SEARCH_METHODS:
        raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
    if method == "greedy" and beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    classes = _check_classes(labels, classes, num_classes, min_size)
    _key_base(num_tags, max_tags)  # fail early if the set keys would overflow
    keep = frequent_tags(
        tags, labels, max(min_tag_count, min_size), num_classes=max(int(labels.max()), *classes) + 1
    )

    modes: list[FailureMode] = []
    bar = tqdm(classes, desc="PRIME search", unit="class", disable=progress_disabled(progress))
    for label in bar:
        members = labels == label
        columns = np.flatnonzero(keep[label])
        class_correct = correct[members]
        packed = _PackedClass.build(tags[members][:, columns], class_correct)
        search = (_exhaustive if method == "exhaustive"
                  else functools.partial(_greedy, beam_width=beam_width))
        found = search(packed, min_size=min_size, min_drop=min_drop, gains=gains,
                       max_tags=max_tags, block_size=block_size)
        class_accuracy = float(class_correct.mean())
        for local_set, size, hits in found:
            indices = tuple(int(columns[i]) for i in local_set)
            modes.append(FailureMode(
                label=int(label),
                tags=tuple(tag_names[i] for i in indices),
                size=int(size),
                accuracy=float(hits / size),
                class_accuracy=class_accuracy,
                tag_indices=indices,
                num_correct=int(hits),
                class_size=int(members.sum()),
            ))
    modes.sort(key=lambda m: (m.label, len(m.tags), m.accuracy, m.tag_indices))
    return modes


def count_frequent_tag_sets(
    tags, *, errors, min_size: int, max_tags: int, block_size: int = 4096
) -> TagSetCounts:
    """Image and correct-image counts of every tag set of <= max_tags tags with >= min_size images.

    This is the exhaustive search's enumeration, without the failure-mode tests.

    Args:
      tags: `[n, T]` bool (or 0/1, or a TagMatrix) for one group of images (e.g. one class).
      errors: `[n]` bool, True where the classifier is wrong.
      min_size: the fewest images of a counted set.
      max_tags: the most tags of a counted set.
      block_size: candidate tag sets counted per kernel call.

    Returns:
      A `TagSetCounts` of the sets of 1 to `max_tags` tags with at least `min_size` images.

    Raises:
      ValueError: bad tags or errors, lengths that disagree, or `min_size` or `max_tags` below 1.
    """
    tags = as_tag_array(tags)
    correct = ~_as_bool_vector(errors, "errors")
    if len(correct) != tags.shape[0]:
        raise ValueError(f"tags has {tags.shape[0]} rows but errors has {len(correct)} entries")
    _check_hyperparameters(min_size, 0.0, (0.0,) * max(0, max_tags - 1), max_tags, 0)
    packed = _PackedClass.build(tags, correct)
    return _enumerate(packed, min_size=min_size, max_tags=max_tags, block_size=block_size)


def pack_bits(mask: np.ndarray, num_words: int | None = None) -> np.ndarray:
    """Pack booleans along the last axis into little-endian 32-bit words.

    Bit j of word w is mask[..., 32 * w + j]; the padding bits are 0.

    Args:
      mask: `[..., n]` bool.
      num_words: W, the words per row; None uses `max(1, ceil(n / 32))`.

    Returns:
      `[..., W]` uint32.

    Raises:
      ValueError: `num_words` words cannot hold n bits.
    """
    mask = np.asarray(mask, dtype=bool)
    n = mask.shape[-1]
    num_words = max(1, -(-n // 32)) if num_words is None else num_words
    if num_words * 32 < n:
        raise ValueError(f"{num_words} words cannot hold {n} bits")
    padded = np.zeros(mask.shape[:-1] + (num_words * 32,), dtype=bool)
    padded[..., :n] = mask
    as_bytes = np.packbits(padded, axis=-1, bitorder="little")
    return np.ascontiguousarray(as_bytes).view("<u4").astype(np.uint32)


# ----------------------------------------------------------------------------- search strategies


class _PackedClass(NamedTuple):
    """The images of one class, bit-packed: rows 0..T-1 are tags, row T is "every image"."""

    tag_bits: jax.Array  # [T + 1, W] uint32
    correct_bits: jax.Array  # [W] uint32
    num_tags: int
    num_images: int
    num_correct: int

    @staticmethod
    def build(tags: np.ndarray, correct: np.ndarray) -> _PackedClass:
        num_images, num_tags = tags.shape
        words = max(1, -(-num_images // 32))
        words = -(-words // _WORD_PAD) * _WORD_PAD
        rows = np.concatenate([tags.T, np.ones((1, num_images), bool)], axis=0)
        return _PackedClass(
            jnp.asarray(pack_bits(rows, words)),
            jnp.asarray(pack_bits(correct, words)),
            num_tags, num_images, int(correct.sum()),
        )

    @property
    def everything(self) -> int:
        """The row index whose bits are all images: the neutral element of AND."""
        return self.num_tags


def _exhaustive(packed, *, min_size, min_drop, gains, max_tags, block_size):
    counts = _enumerate(packed, min_size=min_size, max_tags=max_tags, block_size=block_size)
    return _select_modes(packed, counts, counts, min_drop=min_drop, gains=gains)


def _greedy(packed, *, min_size, min_drop, gains, max_tags, block_size, beam_width):
    """A.6: per level, extend only the `beam_width` lowest-accuracy sets by every other tag."""
    sets, sizes, hits = [], [], []
    beam = np.zeros((1, 0), np.int32)
    for _level in range(1, max_tags + 1):
        if packed.num_tags == 0 or len(beam) == 0:
            break
        rows, cols = np.nonzero(~_membership(beam, packed.num_tags))
        candidates = np.sort(
            np.concatenate([beam[rows], cols[:, None].astype(np.int32)], axis=1), axis=1
        )
        candidates = np.unique(candidates, axis=0)
        level_sizes, level_hits = _count_sets(packed, candidates, block_size)
        frequent = level_sizes >= min_size
        new = candidates[frequent]
        level_sizes, level_hits = level_sizes[frequent], level_hits[frequent]
        if len(new) == 0:
            break
        sets.append(new)
        sizes.append(level_sizes)
        hits.append(level_hits)
        order = np.lexsort((-level_sizes, level_hits / level_sizes))
        beam = new[order[:beam_width]]
    visited = TagSetCounts(tuple(sets), tuple(sizes), tuple(hits))
    subsets = _subset_counts(packed, visited, block_size)
    return _select_modes(packed, visited, subsets, min_drop=min_drop, gains=gains)


def _enumerate(packed: _PackedClass, *, min_size, max_tags, block_size) -> TagSetCounts:
    """Every set with >= min_size images, level by level (Apriori).

    Candidates of k tags join two frequent (k-1)-sets that share their first k-2 tags and are
    kept only if all their (k-1)-subsets are frequent; only candidates are counted.
    """
    sets, sizes, hits = [], [], []
    candidates = np.arange(packed.num_tags, dtype=np.int32)[:, None]
    for level in range(1, max_tags + 1):
        if len(candidates) == 0:
            break
        level_sizes, level_hits = _count_sets(packed, candidates, block_size)
        frequent = level_sizes >= min_size
        if not frequent.any():
            break
        sets.append(candidates[frequent])
        sizes.append(level_sizes[frequent])
        hits.append(level_hits[frequent])
        if level < max_tags:
            candidates = _apriori_candidates(sets[-1], packed.num_tags)
    return TagSetCounts(tuple(sets), tuple(sizes), tuple(hits))


def _apriori_candidates(frequent: np.ndarray, num_tags: int) -> np.ndarray:
    """(k+1)-sets all of whose k-subsets are in `frequent` ([M, k], rows ascending and in
    lexicographic order); returned in lexicographic order."""
    count, k = frequent.shape
    prefix_keys = _set_keys(frequent[:, :-1], num_tags)
    group_end = np.searchsorted(prefix_keys, prefix_keys, side="right")
    partners = group_end - np.arange(count) - 1
    first = np.repeat(np.arange(count), partners)
    offsets = np.cumsum(partners) - partners
    second = first + 1 + (np.arange(len(first)) - offsets[first])
    candidates = np.concatenate([frequent[first], frequent[second, -1:]], axis=1)
    if k >= 2 and len(candidates):
        known = _set_keys(frequent, num_tags)
        keep = np.ones(len(candidates), bool)
        for position in range(k - 1):  # the subsets without the last two tags are the parents
            keys = _set_keys(np.delete(candidates, position, axis=1), num_tags)
            where = np.minimum(np.searchsorted(known, keys), len(known) - 1)
            keep &= known[where] == keys
        candidates = candidates[keep]
    return candidates.astype(np.int32)


def _select_modes(packed, candidates: TagSetCounts, lookup: TagSetCounts, *, min_drop, gains):
    """The failure-mode tests on `candidates`; subsets' counts are looked up in `lookup`."""
    class_accuracy = packed.num_correct / packed.num_images
    found = []
    for level, (sets, sizes, hits) in enumerate(zip(*candidates), start=1):
        accuracy = hits / sizes
        chosen = np.flatnonzero(accuracy <= class_accuracy - min_drop + ACCURACY_TOLERANCE)
        if level > 1 and len(chosen):
            sub_keys = _set_keys(lookup.sets[level - 2], packed.num_tags)
            order = np.argsort(sub_keys)
            sub_keys = sub_keys[order]
            sub_accuracy = (lookup.num_correct[level - 2] / lookup.sizes[level - 2])[order]
            necessary = np.ones(len(chosen), bool)
            for position in range(level):
                keys = _set_keys(np.delete(sets[chosen], position, axis=1), packed.num_tags)
                where = np.minimum(np.searchsorted(sub_keys, keys), len(sub_keys) - 1)
                if np.any(sub_keys[where] != keys):
                    raise AssertionError("a subset of a counted tag set was not counted")
                gain = gains[level - 2]
                necessary &= sub_accuracy[where] >= accuracy[chosen] + gain - ACCURACY_TOLERANCE
            chosen = chosen[necessary]
        found.extend((tuple(int(t) for t in sets[i]), sizes[i], hits[i]) for i in chosen)
    return found


def _subset_counts(packed, visited: TagSetCounts, block_size) -> TagSetCounts:
    """Counts of every (k-1)-subset of the visited k-sets (the greedy search skips some)."""
    sets, sizes, hits = [], [], []
    for level in range(1, len(visited.sets)):
        larger = visited.sets[level]
        subsets = np.unique(
            np.concatenate([np.delete(larger, i, axis=1) for i in range(level + 1)]), axis=0
        )
        subset_sizes, subset_hits = _count_sets(packed, subsets, block_size)
        sets.append(subsets)
        sizes.append(subset_sizes)
        hits.append(subset_hits)
    return TagSetCounts(tuple(sets), tuple(sizes), tuple(hits))


def _membership(sets: np.ndarray, num_tags: int) -> np.ndarray:
    """[M, k] tag indices -> [M, T] bool."""
    member = np.zeros((len(sets), num_tags), bool)
    if sets.shape[1]:
        np.put_along_axis(member, sets.astype(np.int64), True, axis=1)
    return member


# ----------------------------------------------------------------------------- counting core


def _count_sets(packed: _PackedClass, sets: np.ndarray, block_size: int):
    """|I_S| and the number of correct images in I_S for each row S of `sets` ([Q, k] tag
    indices): two [Q] int64 arrays. Runs the jitted kernel on fixed-size blocks."""
    if len(sets) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    block_size = min(block_size, max(256, _next_power_of_two(len(sets))))
    size_parts, hit_parts = [], []
    for start in range(0, len(sets), block_size):
        block = sets[start : start + block_size]
        padded = np.full((block_size, sets.shape[1]), packed.everything, np.int32)
        padded[: len(block)] = block
        sizes, hits = _count_kernel(packed.tag_bits, packed.correct_bits, jnp.asarray(padded))
        size_parts.append(np.asarray(sizes)[: len(block)])
        hit_parts.append(np.asarray(hits)[: len(block)])
    return np.concatenate(size_parts).astype(np.int64), np.concatenate(hit_parts).astype(np.int64)


def count_tag_sets(tag_bits: jax.Array, correct_bits: jax.Array, sets: jax.Array):
    """PRIME's counting kernel, a pure function usable inside `jax.jit` and `jax.vmap`.

    Args:
      tag_bits: [T, W] uint32, row t the images showing tag t packed 32 per word (`pack_bits`).
      correct_bits: [W] uint32, the correctly classified images packed the same way.
      sets: [Q, k] int32 rows of `tag_bits` (repeat an index, or point at an all-ones row, for
        sets of fewer than k tags).

    Returns:
      (sizes, hits): [Q] int32 each, the number of images showing every tag of each set, and how
      many of those are correctly classified (popcounts of the AND of the set's rows).
    """
    image_bits = tag_bits[sets[:, 0]]
    for position in range(1, sets.shape[1]):
        image_bits = image_bits & tag_bits[sets[:, position]]
    sizes = jax.lax.population_count(image_bits).astype(jnp.int32).sum(-1)
    hits = jax.lax.population_count(image_bits & correct_bits).astype(jnp.int32).sum(-1)
    return sizes, hits


_count_kernel = jit(count_tag_sets)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


# ----------------------------------------------------------------------------- checks and keys


def _set_keys(sets: np.ndarray, num_tags: int) -> np.ndarray:
    """One int64 per row of ascending tag indices, ordered like the rows lexicographically."""
    base = num_tags + 1
    keys = np.zeros(len(sets), np.int64)
    for column in range(sets.shape[1]):
        keys = keys * base + sets[:, column].astype(np.int64) + 1
    return keys


def _key_base(num_tags: int, max_tags: int) -> None:
    if max_tags * math.log2(num_tags + 2) >= 62:
        raise ValueError(
            f"max_tags={max_tags} with {num_tags} tags is too large to index tag sets; "
            "drop rare tags first (min_tag_count) or lower max_tags"
        )


def _check_hyperparameters(
    min_size, min_drop, min_gain, max_tags, min_tag_count
) -> tuple[float, ...]:
    if not isinstance(max_tags, (int, np.integer)) or max_tags < 1:
        raise ValueError(f"max_tags (the paper's l) must be an integer >= 1, got {max_tags!r}")
    if not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size (the paper's s) must be an integer >= 1, got {min_size!r}")
    if not 0 <= min_drop <= 1:
        raise ValueError(f"min_drop (the paper's a) must be in [0, 1], got {min_drop}")
    if min_tag_count < 0:
        raise ValueError(f"min_tag_count must be >= 0, got {min_tag_count}")
    gains = tuple(float(g) for g in min_gain)
    if len(gains) < max_tags - 1:
        raise ValueError(
            f"min_gain needs one value per set size 2..{max_tags} (the paper's b2, b3, ...): "
            f"{max_tags - 1} values for max_tags={max_tags}, got {len(gains)}"
        )
    if any(not 0 <= g <= 1 for g in gains):
        raise ValueError(f"min_gain values must be in [0, 1], got {gains}")
    return gains


def _check_classes(labels, classes, num_classes, min_size) -> list[int]:
    counts = np.bincount(labels, minlength=num_classes or 0)
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise ValueError(f"labels go up to {labels.max()} but num_classes is {num_classes}")
    if classes is None:
        classes = range(num_classes) if num_classes is not None else np.flatnonzero(counts)
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("there are no images to search (labels is empty)")
    counts = np.pad(counts, (0, max(0, max(classes) + 1 - len(counts))))
    empty = [c for c in classes if c < 0 or counts[c] == 0]
    if empty:
        raise ValueError(
            f"class(es) {empty} have no images; pass classes=[...] to search only classes "
            "that have images"
        )
    small = {c: int(counts[c]) for c in classes if counts[c] < min_size}
    if small:
        raise ValueError(
            f"min_size={min_size} is larger than class(es) {small} (class: images), so no "
            "failure mode can exist there; lower min_size or leave them out with classes=[...]"
        )
    return classes


def _check_tag_names(tag_names, num_tags) -> tuple[str, ...]:
    if tag_names is None:
        return tuple(f"tag{i}" for i in range(num_tags))
    tag_names = tuple(str(name) for name in tag_names)
    if len(tag_names) != num_tags:
        raise ValueError(f"{len(tag_names)} tag_names for a tag matrix with {num_tags} columns")
    return tag_names


def _as_bool_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D [N] array, got shape {array.shape}")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.number) or not np.all((array == 0) | (array == 1)):
            raise ValueError(f"{name} must be bool or 0/1, got dtype {array.dtype}")
        array = array.astype(bool)
    return array


def _as_label_vector(labels) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be a 1-D [N] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {array.dtype}")
    if len(array) and array.min() < 0:
        raise ValueError(f"labels must be >= 0, got {array.min()}")
    return array.astype(np.int64)
