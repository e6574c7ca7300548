"""Barlow's failure trees (Algorithm 1 of seed 000) and their metrics.

For a group of examples (a class by label or by prediction, or any grouping), Algorithm 1 marks
each example as an error or not, keeps the `num_features` features with the largest mutual
information with that error indicator, and fits a shallow decision tree on them (entropy
criterion, errors up-weighted by #correct / #errors, as in the authors' code). Each leaf is a
readable rule over the original feature indices, and is scored by

- BER, the base error rate of the group;
- ER, the error rate in the leaf; EC, the error coverage: leaf errors / group errors;
- IV = ER * EC, the importance value; the tree's ALER = sum over leaves of EC * ER (>= BER);
- valid: ER > BER + delta and EC > tau (delta = 0.1, tau = 0.2 in the paper).

Algorithm 1 returns the valid leaves; the paper's Table 1 reports, over classes, how often the
leaf of highest IV is valid (`valid_leaf_fraction`), and Tables 2-5 list that leaf's rule with
BER, ER, EC and ALER (`failure_table`). When no leaf is valid, `FailureTree.reason` says why.

These metrics are measured on the rows the tree was fitted to, as in the paper; with many groups
some leaves pass by chance. `jfail.barlow.leaf_evidence` measures every leaf by its rule on
held-out rows, with p-values and q-values over all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm.auto import tqdm

from jfail.barlow._checks import check_features_and_errors, check_groups
from jfail.barlow.mutual_info import FeatureRanking, rank_groups
from jfail.keys import as_key, host_seed
from jfail.logs import progress_disabled

if TYPE_CHECKING:  # scikit-learn is imported when a tree is fitted: it is slow to import
    from sklearn.tree import DecisionTreeClassifier

__all__ = [
    "Condition",
    "FailureTree",
    "Leaf",
    "failure_table",
    "failure_tree",
    "failure_trees",
    "group_indices",
    "valid_leaf_fraction",
]


@dataclasses.dataclass(frozen=True)
class Condition:
    """One test on the path to a leaf: `features[:, feature] <op> threshold`, op '<=' or '>'."""

    feature: int
    op: str
    threshold: float

    def holds(self, features) -> np.ndarray:
        """features: [N, D] (the original columns) -> [N] booleans.

        Args:
          features: `[N, D]`, the columns the tree was fitted on (original indices).

        Returns:
          `[N]` bool, True where the row passes this test.

        Raises:
          IndexError: `features` has no column `feature`.
        """
        values = np.asarray(features, np.float32)[:, self.feature]
        return values <= self.threshold if self.op == "<=" else values > self.threshold

    def describe(self, feature_names: Sequence[str] | None = None) -> str:
        """The test as text, e.g. `feature 3 <= 0.5` or `stripes > 1.2`.

        Args:
          feature_names: a name per feature column; None writes `feature <index>`.

        Returns:
          The feature's name, the op and the threshold to 4 significant digits.

        Raises:
          IndexError: `feature_names` has no entry for this feature.
        """
        name = f"feature {self.feature}" if feature_names is None else feature_names[self.feature]
        return f"{name} {self.op} {self.threshold:.4g}"


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
    """A leaf of a failure tree and its metrics on the group it was fitted to.

    indices: [size] rows (into the `features` given) that fall in the leaf;
    error_indices: the errors among them.
    """

    rule: str
    conditions: tuple[Condition, ...]
    size: int
    num_errors: int
    error_rate: float
    error_coverage: float
    importance: float
    valid: bool
    indices: np.ndarray = dataclasses.field(repr=False)
    error_indices: np.ndarray = dataclasses.field(repr=False)
    node: int = dataclasses.field(default=0, repr=False)


@dataclasses.dataclass(frozen=True, eq=False)
class FailureTree:
    """Algorithm 1's result for one group. Leaves are sorted by decreasing importance.

    selected_features: [k] original indices of the features the tree was fitted on, by decreasing
    mutual information (nats, in `mutual_information`). reason: why no leaf is valid (None when
    at least one is). indices: the group's rows into the `features` given.
    """

    base_error_rate: float
    aler: float
    leaves: tuple[Leaf, ...]
    selected_features: np.ndarray
    mutual_information: np.ndarray
    num_errors: int
    num_examples: int
    reason: str | None
    delta: float
    tau: float
    group: Hashable | None = None
    indices: np.ndarray = dataclasses.field(default=None, repr=False)
    estimator: DecisionTreeClassifier | None = dataclasses.field(default=None, repr=False)

    @property
    def valid_leaves(self) -> tuple[Leaf, ...]:
        """Algorithm 1's output L: leaves with ER > BER + delta and EC > tau.

        Returns:
          The valid leaves, by decreasing importance (possibly none).
        """
        return tuple(leaf for leaf in self.leaves if leaf.valid)

    @property
    def top_leaf(self) -> Leaf:
        """The leaf of highest importance value (the one the paper visualises).

        Returns:
          `leaves[0]`, a `Leaf` (the whole group when no tree was fitted).
        """
        return self.leaves[0]

    @property
    def aler_gain(self) -> float:
        """ALER - BER, the paper's score of a tree (Figures 15-20).

        Returns:
          The difference, a float.
        """
        return self.aler - self.base_error_rate

    def summary(self, name: str | None = None) -> str:
        """One line in the style of the paper's figure captions.

        Args:
          name: the group's name in the line; None uses `group`.

        Returns:
          The first valid leaf's rule with its ER, EC, BER and ALER, or `reason` when no leaf is
          valid.
        """
        what = f"group {name if name is not None else self.group}"
        if self.reason is not None:
            return f"{what}: BER {self.base_error_rate:.4f}, no valid leaf ({self.reason})"
        leaf = self.valid_leaves[0]
        return (
            f"{what}: when {leaf.rule}, error rate increases to {leaf.error_rate:.4f} "
            f"({100 * (leaf.error_rate - self.base_error_rate):+.2f}%), covering "
            f"{100 * leaf.error_coverage:.1f}% of the errors (BER {self.base_error_rate:.4f}, "
            f"ALER {self.aler:.4f})"
        )


def failure_tree(
    features,
    errors,
    *,
    num_features: int = 50,
    max_depth: int = 1,
    delta: float = 0.1,
    tau: float = 0.2,
    min_errors: int = 2,
    screen: int | None = None,
    n_neighbors: int = 3,
    feature_names: Sequence[str] | None = None,
    tree_params: Mapping | None = None,
    key=0,
) -> FailureTree:
    """Algorithm 1 on one group. features: [N, D]; errors: [N] booleans (True: misclassified).

    `num_features` (k) features by mutual information (scikit-learn's estimator, computed in JAX
    over all D features unless `screen` is set), then a depth-`max_depth` entropy tree with
    class weights {correct: 1, error: #correct / #errors}; `tree_params` go to
    `DecisionTreeClassifier` (and may replace those defaults). With fewer than `min_errors`
    errors, or no correct example, no tree is fitted: the group is one leaf and `reason` says
    why. `key` (keyword-only: an int seed or a PRNG key) fixes the tree, the tie-breaking noise
    and the permutation behind "no informative feature".

    Args:
      features: `[N, D]` finite numbers.
      errors: `[N]` booleans or 0/1 (True: misclassified).
      num_features: k, the features the tree may split on.
      max_depth: the tree's depth.
      delta: a valid leaf's least error-rate margin over the group's, ER > BER + delta.
      tau: a valid leaf's least error coverage, EC > tau.
      min_errors: the fewest errors for which a tree is fitted.
      screen: candidates per group kept by the Gaussian moment statistic before the exact
        estimator; None (the default) screens nothing.
      n_neighbors: the neighbours of the mutual-information estimator.
      feature_names: a name per feature column, used in the rules; None writes indices.
      tree_params: extra `DecisionTreeClassifier` arguments (not `max_depth`).
      key: an int seed or a PRNG key.

    Returns:
      A `FailureTree` whose `group` is None and whose `indices` are all N rows.

    Raises:
      ValueError: bad features or errors (wrong shapes, NaN/Inf, no rows), parameters out of
        range (`num_features`, `max_depth`, `min_errors` below 1, `delta` or `tau` outside
        [0, 1), `max_depth` in `tree_params`), `feature_names` of the wrong length, or `key`
        is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    features, errors = check_features_and_errors(features, errors)
    trees = _analyse(
        features,
        errors,
        {None: np.arange(len(errors))},
        num_features=num_features,
        max_depth=max_depth,
        delta=delta,
        tau=tau,
        min_errors=min_errors,
        screen=screen,
        n_neighbors=n_neighbors,
        feature_names=feature_names,
        tree_params=tree_params,
        key=key,
        chunk_examples=8192,
        progress=False,
    )
    return trees[None]


def failure_trees(
    features,
    errors,
    groups,
    *,
    num_features: int = 50,
    max_depth: int = 1,
    delta: float = 0.1,
    tau: float = 0.2,
    min_errors: int = 2,
    screen: int | None = None,
    n_neighbors: int = 3,
    feature_names: Sequence[str] | None = None,
    tree_params: Mapping | None = None,
    key=0,
    chunk_examples: int = 8192,
    progress: bool | None = None,
) -> dict[Hashable, FailureTree]:
    """Algorithm 1 on many groups at once: {group: FailureTree}, in the groups' order.

    features: [N, D]; errors: [N]; groups: an [N] integer array (labels or predictions: one
    group per value) or a mapping {name: row indices} (any grouping; groups may overlap).
    The mutual information of all groups x features is one batched JAX computation. By default
    every feature reaches the exact estimator, as in the paper's Algorithm 1 (appendix D), giving
    exactly `failure_tree` per group. Screening is an explicit option: with `screen` = s, only the
    s features with the largest Gaussian moment statistic per group reach the exact estimator
    (faster on thousands of features, but a dependence that moves neither the mean nor the
    variance of a feature can be screened out). Leaf and group `indices` are rows of `features`.
    Other arguments as in `failure_tree`.

    Args:
      features: `[N, D]` finite numbers.
      errors: `[N]` booleans or 0/1 (True: misclassified).
      groups: an `[N]` integer array of group ids or a mapping {name: row indices}.
      num_features, max_depth, delta, tau, min_errors, screen, n_neighbors, feature_names,
        tree_params, key: as for `failure_tree`.
      chunk_examples: about how many rows the mutual information is estimated on per call.
      progress: show a progress bar (None: only when stderr is a terminal).

    Returns:
      {group: FailureTree}, in the groups' order (sorted ids for an array).

    Raises:
      ValueError: mismatched shapes, NaN features, empty or out-of-range groups, or group ids
        that are floats with a fractional part (integer-valued floats are converted); the
        parameter errors of `failure_tree`.
      TypeError: `key` is not a seed or a PRNG key.
    """
    features, errors = check_features_and_errors(features, errors)
    if isinstance(groups, Mapping):
        mapping = dict(groups)
    else:
        assignments = np.asarray(groups)
        if assignments.shape != errors.shape:
            raise ValueError(
                f"groups must be a mapping {{name: row indices}} or an array of one group id per "
                f"example, shape {errors.shape}; got shape {assignments.shape}."
            )
        mapping = group_indices(integer_group_ids(assignments))
    return _analyse(
        features,
        errors,
        mapping,
        num_features=num_features,
        max_depth=max_depth,
        delta=delta,
        tau=tau,
        min_errors=min_errors,
        screen=screen,
        n_neighbors=n_neighbors,
        feature_names=feature_names,
        tree_params=tree_params,
        key=key,
        chunk_examples=chunk_examples,
        progress=progress,
    )


def integer_group_ids(assignments: np.ndarray) -> np.ndarray:
    """Group ids as integers: integer-valued floats (labels stored as float) are converted; other
    floats would make one group per distinct value, so they raise.

    Args:
      assignments: `[N]` group ids.

    Returns:
      `assignments` itself when not floating, else as int64.

    Raises:
      ValueError: float ids that are NaN, infinite or not whole numbers.
    """
    if assignments.dtype == bool or not np.issubdtype(assignments.dtype, np.floating):
        return assignments
    if not np.all(np.isfinite(assignments)):
        raise ValueError("groups contains NaN or Inf; group ids must be integers (labels).")
    if not np.all(assignments == np.round(assignments)):
        raise ValueError(
            "groups holds non-integer floats, which would make one group per distinct value; "
            "pass integer group ids (labels or predictions), e.g. labels.astype(int), or a "
            "mapping {name: row indices}."
        )
    return assignments.astype(np.int64)


def group_indices(assignments, *, min_size: int = 1) -> dict[Hashable, np.ndarray]:
    """Rows per group for an [N] array of group ids (labels, predictions): {id: rows}, by id.

    Groups with fewer than `min_size` rows are left out.

    Args:
      assignments: `[N]` group ids.
      min_size: the fewest rows a group needs to be kept.

    Returns:
      {id: int row indices, increasing}, ids as Python scalars in sorted order.

    Raises:
      ValueError: `assignments` is not 1-D or is empty.
    """
    assignments = np.asarray(assignments)
    if assignments.ndim != 1:
        raise ValueError(f"assignments must be 1-D [N], got shape {assignments.shape}.")
    if assignments.size == 0:
        raise ValueError("assignments is empty: there are no examples to group.")
    order = np.argsort(assignments, kind="stable")
    values, starts, counts = np.unique(assignments[order], return_index=True, return_counts=True)
    return {
        python_scalar(value): order[start : start + count]
        for value, start, count in zip(values, starts, counts)
        if count >= min_size
    }


def valid_leaf_fraction(trees: Mapping[Hashable, FailureTree] | Iterable[FailureTree]) -> float:
    """Table 1's statistic: the fraction of trees whose leaf of highest IV is valid.

    Args:
      trees: `FailureTree`s, or a mapping whose values are.

    Returns:
      The fraction, a float in [0, 1].

    Raises:
      ValueError: no trees are given.
    """
    trees = list(trees.values()) if isinstance(trees, Mapping) else list(trees)
    if not trees:
        raise ValueError("no trees given.")
    return float(np.mean([tree.top_leaf.valid for tree in trees]))


def failure_table(
    trees: Mapping[Hashable, FailureTree],
    names: Mapping[Hashable, str] | Sequence[str] | None = None,
    *,
    valid_only: bool = False,
    feature_names: Sequence[str] | None = None,
) -> str:
    """Tables 2-5 as Markdown: per group, the top leaf's rule with BER, ER, EC and ALER.

    Args:
      trees: {group: FailureTree}, as `failure_trees` returns.
      names: a display name per group key; None writes the keys.
      valid_only: list only the groups whose top leaf is valid.
      feature_names: a name per feature column, used in the rules; None writes indices.

    Returns:
      A Markdown table, header and one line per group listed, no trailing newline.

    Raises:
      KeyError, IndexError: a group has no entry in `names`.
    """
    header = "| Group | Feature index | Decision rule | BER | ER | EC | ALER | valid |"
    lines = [header, "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for key, tree in trees.items():
        leaf = tree.top_leaf
        if valid_only and not leaf.valid:
            continue
        name = key if names is None else names[key]
        features = ", ".join(str(c.feature) for c in leaf.conditions) or "-"
        rule = (
            " and ".join(c.describe(feature_names) for c in leaf.conditions)
            if leaf.conditions
            else "(root)"
        )
        lines.append(
            f"| {name} | {features} | {rule} | {tree.base_error_rate:.4f} | "
            f"{leaf.error_rate:.4f} | {leaf.error_coverage:.4f} | {tree.aler:.4f} | "
            f"{'yes' if leaf.valid else 'no'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Implementation.


def _analyse(
    features: np.ndarray,
    errors: np.ndarray,
    mapping: Mapping[Hashable, np.ndarray],
    *,
    num_features,
    max_depth,
    delta,
    tau,
    min_errors,
    screen,
    n_neighbors,
    feature_names,
    tree_params,
    key,
    chunk_examples,
    progress,
) -> dict[Hashable, FailureTree]:
    _check_parameters(num_features, max_depth, delta, tau, min_errors, tree_params)
    dim = features.shape[1]
    if feature_names is not None and len(feature_names) != dim:
        raise ValueError(
            f"feature_names has {len(feature_names)} entries but features has {dim} columns."
        )
    names = list(mapping)
    groups = check_groups([mapping[name] for name in names], len(features))
    group_errors = [errors[members] for members in groups]
    fit = [
        position
        for position, e in enumerate(group_errors)
        if e.sum() >= min_errors and (~e).sum() >= 1
    ]
    fitted = set(fit)
    seed = host_seed(key)
    key = as_key(key)
    ranking = _rank(
        features,
        groups,
        group_errors,
        fit,
        num_features,
        screen,
        n_neighbors,
        key,
        chunk_examples,
        progress,
    )

    trees: dict[Hashable, FailureTree] = {}
    bar = tqdm(
        total=len(names),
        desc="failure trees",
        unit="group",
        disable=progress_disabled(progress),
        leave=False,
    )
    with bar:
        for position, name in enumerate(names):
            trees[name] = _grow(
                features,
                groups[position],
                group_errors[position],
                ranking.indices[position],
                ranking.mutual_information[position],
                name=name,
                fitted=position in fitted,
                max_depth=max_depth,
                delta=delta,
                tau=tau,
                min_errors=min_errors,
                feature_names=feature_names,
                tree_params=tree_params,
                seed=seed,
            )
            bar.update()

    # "No informative feature": every MI is 0, or the best is no higher than under a random
    # permutation of the group's errors (the same selection run on errors that carry no signal).
    unexplained = [
        position
        for position in fit
        if trees[names[position]].reason is not None
        and trees[names[position]].reason.startswith((_NO_LEAF, _NO_SPLIT))
    ]
    chance = np.zeros(len(groups), np.float32)
    needs_null = [p for p in unexplained if ranking.mutual_information[p][0] > 0]
    if needs_null:
        rng = np.random.default_rng(seed)
        null_set = set(needs_null)
        permuted = [rng.permutation(e) if p in null_set else e for p, e in enumerate(group_errors)]
        null = _rank(
            features,
            groups,
            permuted,
            needs_null,
            1,
            screen,
            n_neighbors,
            jax.random.fold_in(key, 1),
            chunk_examples,
            progress,
        )
        chance = null.mutual_information[:, 0]
    for position in unexplained:
        best = float(ranking.mutual_information[position][0])
        if best > 0 and best > chance[position]:
            continue
        if best == 0:
            why = "every selected feature has zero mutual information with the errors"
        else:
            why = (
                f"the largest mutual information with the errors, {best:.4f} nats, is no higher "
                f"than with randomly permuted errors ({float(chance[position]):.4f} nats)"
            )
        name = names[position]
        trees[name] = dataclasses.replace(trees[name], reason=f"no informative feature: {why}")
    return trees


_NO_LEAF = "no leaf passes"
_NO_SPLIT = "the tree found no split"


def _rank(
    features,
    groups,
    group_errors,
    positions,
    num_features,
    screen,
    n_neighbors,
    key,
    chunk_examples,
    progress,
) -> FeatureRanking:
    """Ranks the groups at `positions`; the other rows of the result are empty."""
    top = min(num_features, features.shape[1])
    indices = np.zeros((len(groups), top), np.int32)
    values = np.zeros((len(groups), top), np.float32)
    if positions:
        ranked = rank_groups(
            features,
            [groups[p] for p in positions],
            [group_errors[p] for p in positions],
            num_features=num_features,
            screen=screen,
            n_neighbors=n_neighbors,
            key=key,
            chunk_examples=chunk_examples,
            progress=progress,
        )
        indices[positions] = ranked.indices
        values[positions] = ranked.mutual_information
    return FeatureRanking(indices, values)


def _grow(
    features,
    members,
    group_errors,
    selected,
    mutual_information,
    *,
    name,
    fitted,
    max_depth,
    delta,
    tau,
    min_errors,
    feature_names,
    tree_params,
    seed,
) -> FailureTree:
    num_examples = len(members)
    num_errors = int(group_errors.sum())
    base = num_errors / num_examples
    if not fitted:
        selected = selected[:0]
        mutual_information = mutual_information[:0]
    estimator = None
    if fitted:
        num_correct = num_examples - num_errors
        params = {
            "criterion": "entropy",
            "class_weight": {0: 1.0, 1: num_correct / num_errors},
            "random_state": seed,
            **dict(tree_params or {}),
        }
        from sklearn.tree import DecisionTreeClassifier

        estimator = DecisionTreeClassifier(max_depth=max_depth, **params)
        # float32 and C-contiguous, the tree's own input format: its input checks can be skipped
        # (they cost more than the fit itself on a group of a few dozen rows)
        columns = np.ascontiguousarray(features[np.ix_(members, selected)], dtype=np.float32)
        estimator.fit(columns, group_errors.astype(np.int64), check_input=False)
        paths = _leaf_paths(estimator, selected)
        node_of_row = estimator.apply(columns, check_input=False)
    else:
        paths = {0: ()}
        node_of_row = np.zeros(num_examples, np.int64)

    leaves = []
    for node, conditions in paths.items():
        in_leaf = node_of_row == node
        size = int(in_leaf.sum())
        leaf_errors = int((in_leaf & group_errors).sum())
        error_rate = leaf_errors / size if size else 0.0
        coverage = leaf_errors / num_errors if num_errors else 0.0
        leaves.append(
            Leaf(
                rule=" and ".join(c.describe(feature_names) for c in conditions) or "all examples",
                conditions=conditions,
                size=size,
                num_errors=leaf_errors,
                error_rate=error_rate,
                error_coverage=coverage,
                importance=error_rate * coverage,
                valid=bool(error_rate > base + delta and coverage > tau),
                indices=members[in_leaf],
                error_indices=members[in_leaf & group_errors],
                node=int(node),
            )
        )
    leaves.sort(key=lambda leaf: (-leaf.importance, -leaf.error_rate, leaf.node))
    aler = float(sum(leaf.error_coverage * leaf.error_rate for leaf in leaves))
    tree = FailureTree(
        base_error_rate=base,
        aler=aler,
        leaves=tuple(leaves),
        selected_features=np.asarray(selected),
        mutual_information=np.asarray(mutual_information),
        num_errors=num_errors,
        num_examples=num_examples,
        reason=None,
        delta=delta,
        tau=tau,
        group=name,
        indices=members,
        estimator=estimator,
    )
    return dataclasses.replace(tree, reason=_reason(tree, fitted, min_errors))


def _reason(tree: FailureTree, fitted: bool, min_errors: int) -> str | None:
    if tree.valid_leaves:
        return None
    ber, delta, tau = tree.base_error_rate, tree.delta, tree.tau
    if tree.num_errors < min_errors:
        return (
            f"too few errors: {tree.num_errors} of {tree.num_examples} examples are errors, "
            f"a tree needs at least min_errors={min_errors}"
        )
    if not fitted or ber + delta >= 1:
        return (
            f"no leaf can pass: BER + delta = {ber:.4f} + {delta:.4f} >= 1, and no error rate "
            "exceeds 1"
        )
    if len(tree.leaves) == 1:
        return f"{_NO_SPLIT}: the selected features do not separate errors from correct examples"
    leaf = tree.top_leaf
    failed = []
    if not leaf.error_rate > ber + delta:
        failed.append(f"ER {leaf.error_rate:.4f} <= BER + delta = {ber + delta:.4f}")
    if not leaf.error_coverage > tau:
        failed.append(f"EC {leaf.error_coverage:.4f} <= tau = {tau:.4f}")
    return f"{_NO_LEAF} both thresholds: the leaf of highest importance has " + " and ".join(failed)


def _leaf_paths(
    estimator: DecisionTreeClassifier, selected: np.ndarray
) -> dict[int, tuple[Condition, ...]]:
    """{leaf node: conditions on the original features}, tightest bound per feature and side."""
    tree = estimator.tree_
    paths: dict[int, tuple[Condition, ...]] = {}
    stack: list[tuple[int, tuple[Condition, ...]]] = [(0, ())]
    while stack:
        node, conditions = stack.pop()
        left, right = tree.children_left[node], tree.children_right[node]
        if left == right:  # a leaf
            paths[node] = _simplify(conditions)
            continue
        feature = int(selected[tree.feature[node]])
        threshold = float(tree.threshold[node])
        stack.append((right, conditions + (Condition(feature, ">", threshold),)))
        stack.append((left, conditions + (Condition(feature, "<=", threshold),)))
    return dict(sorted(paths.items()))


def _simplify(conditions: tuple[Condition, ...]) -> tuple[Condition, ...]:
    tightest: dict[tuple[int, str], Condition] = {}
    for condition in conditions:
        slot = (condition.feature, condition.op)
        previous = tightest.get(slot)
        if previous is None:
            tightest[slot] = condition
        elif condition.op == "<=" and condition.threshold < previous.threshold:
            tightest[slot] = condition
        elif condition.op == ">" and condition.threshold > previous.threshold:
            tightest[slot] = condition
    return tuple(tightest.values())


def _check_parameters(num_features, max_depth, delta, tau, min_errors, tree_params) -> None:
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}.")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}.")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}.")
    if not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1), got {tau}.")
    if min_errors < 1:
        raise ValueError(f"min_errors must be >= 1, got {min_errors}.")
    if "max_depth" in (tree_params or {}):
        raise ValueError("tree_params may not set max_depth; use the max_depth argument.")


def python_scalar(value):
    """A numpy scalar as the Python scalar it holds (`np.int64(3)` -> `3`); anything else as is.

    Args:
      value: any value.

    Returns:
      `value.item()` for a NumPy scalar, otherwise `value` unchanged.
    """
    return value.item() if isinstance(value, np.generic) else value
