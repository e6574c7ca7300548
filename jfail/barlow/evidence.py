"""Held-out evidence for Barlow's failure leaves.

Algorithm 1 (seed 000, appendix D) scores a leaf (ER, EC, validity) on the very rows its tree was
fitted to, so a leaf can pass ER > BER + delta and EC > tau by chance, and with many groups and
deep trees some will. `leaf_evidence` measures every candidate leaf on held-out rows instead: each
leaf is applied by its rule (the thresholds on the original feature columns, never by refitting)
to the held-out rows of its group, and gets its held-out size and error rate, a 95 % Wilson
interval, the exact one-sided binomial p-value of "the leaf's error rate is above its group's
held-out error rate", and a q-value over every candidate leaf of every group (`jfail.stats`).
`significant` (q <= alpha) is the filtered output; the trees and all their leaves, the paper's
unfiltered output, are left as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from jfail import stats
from jfail.barlow._checks import check_features_and_errors, check_groups
from jfail.barlow.trees import (
    FailureTree,
    Leaf,
    group_indices,
    integer_group_ids,
    python_scalar,
)

__all__ = ["LeafEvidence", "leaf_evidence"]


@dataclasses.dataclass(frozen=True, eq=False)
class LeafEvidence:
    """Held-out evidence for M candidate leaves, in the trees' order (each field has M entries).

    groups: the group of each candidate (the key of its tree); leaves: the `Leaf` as fitted (its
    fit-time metrics: ER, EC, IV, validity); evidence: the held-out `jfail.stats.Evidence`, whose
    `baseline_error_rate` is the group's held-out error rate; group_sizes: [M] held-out rows in
    each candidate's group; indices: the held-out rows each candidate's rule selects.
    """

    groups: tuple
    leaves: tuple[Leaf, ...]
    evidence: stats.Evidence
    group_sizes: np.ndarray
    indices: tuple[np.ndarray, ...] = dataclasses.field(repr=False)

    @property
    def num_candidates(self) -> int:
        """M, every leaf tested (the number the q-values account for).

        Returns:
          The number of candidate leaves, an int.
        """
        return len(self.leaves)

    @property
    def significant(self) -> np.ndarray:
        """[M] bool, q <= alpha.

        Returns:
          `[M]` bool array, True where a candidate's q-value is at most `alpha`.
        """
        return self.evidence.significant

    @property
    def num_significant(self) -> int:
        """How many candidates are significant (q <= alpha).

        Returns:
          The count, an int in `[0, M]`.
        """
        return int(self.evidence.significant.sum())

    def order(self) -> np.ndarray:
        """Candidate positions, significant first, then by q-value, p-value and decreasing
        held-out error rate.

        Returns:
          `[M]` int array, a permutation of `range(M)`; ties keep the trees' order.
        """
        e = self.evidence
        return np.lexsort(
            (np.arange(self.num_candidates), -e.heldout_error_rate, e.p_value, e.q_value,
             ~e.significant)
        )

    def row(self, index: int, feature_names: Sequence[str] | None = None) -> dict:
        """One candidate as plain Python values (strict-JSON ready: no NaN, null for missing).

        Keys: group, rule, conditions, fit (the leaf's metrics on the rows it was fitted to) and
        the held-out evidence (`jfail.stats.Evidence.row`) with `group_heldout_size`;
        `baseline_error_rate` is null where the group has no held-out row.

        Args:
          index: the candidate, in `[0, M)`.
          feature_names: names of the feature columns, used to write the rule; None writes
            `feature <index>`.

        Returns:
          A dict of plain Python values, keyed as above.

        Raises:
          IndexError: `index` is out of range, or a condition's feature has no name in
            `feature_names`.
        """
        leaf = self.leaves[index]
        record = {
            "group": _json_key(self.groups[index]),
            "rule": (
                leaf.rule
                if feature_names is None
                else " and ".join(c.describe(feature_names) for c in leaf.conditions)
            ),
            "conditions": [
                {"feature": c.feature, "op": c.op, "threshold": float(c.threshold)}
                for c in leaf.conditions
            ],
            "fit": {
                "size": leaf.size,
                "errors": leaf.num_errors,
                "error_rate": float(leaf.error_rate),
                "error_coverage": float(leaf.error_coverage),
                "importance": float(leaf.importance),
                "valid": bool(leaf.valid),
            },
            "group_heldout_size": int(self.group_sizes[index]),
        }
        record.update(self.evidence.row(index))
        if not self.group_sizes[index]:
            record["baseline_error_rate"] = None
        return record

    def rows(
        self, *, significant_only: bool = False, feature_names: Sequence[str] | None = None
    ) -> list[dict]:
        """Every candidate's `row`, in `order()` (significant first); `significant_only` keeps
        the filtered output.

        Args:
          significant_only: keep only the candidates with q <= alpha.
          feature_names: names of the feature columns, as for `row`.

        Returns:
          A list of `row` dicts, possibly empty.
        """
        return [
            self.row(int(i), feature_names)
            for i in self.order()
            if self.evidence.significant[i] or not significant_only
        ]

    def table(
        self,
        names: Mapping[Hashable, str] | Sequence[str] | None = None,
        *,
        significant_only: bool = True,
        limit: int | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> str:
        """Markdown: one line per candidate in `order()`, at most `limit` lines.

        Args:
          names: a display name per group, indexed by the group key; None writes the keys.
          significant_only: list only the candidates with q <= alpha.
          limit: the most lines listed; None lists all.
          feature_names: names of the feature columns, as for `row`.

        Returns:
          A Markdown table (header and one line per candidate shown), no trailing newline.

        Raises:
          KeyError, IndexError: a group has no entry in `names`.
        """
        method = self.evidence.method.upper()
        lines = [
            f"| Group | Decision rule | fit ER / EC | held-out size | held-out ER (95 % CI) | "
            f"group held-out ER | p | q ({method}) | significant |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        shown = 0
        for i in self.order():
            if significant_only and not self.evidence.significant[i]:
                continue
            if limit is not None and shown >= limit:
                break
            shown += 1
            r = self.row(int(i), feature_names)
            group = r["group"] if names is None else names[self.groups[i]]
            rate = "-" if r["heldout_error_rate"] is None else f"{r['heldout_error_rate']:.3f}"
            base = "-" if r["baseline_error_rate"] is None else f"{r['baseline_error_rate']:.3f}"
            low, high = r["interval"]
            lines.append(
                f"| {group} | {r['rule']} | {r['fit']['error_rate']:.3f} / "
                f"{r['fit']['error_coverage']:.3f} | {r['heldout_size']} | {rate} "
                f"({low:.3f}-{high:.3f}) | {base} | {r['p_value']:.2g} | {r['q_value']:.2g} | "
                f"{'yes' if r['significant'] else 'no'} |"
            )
        return "\n".join(lines)


def leaf_evidence(
    trees: FailureTree | Mapping[Hashable, FailureTree],
    features,
    errors,
    groups=None,
    *,
    method: str = "by",
    alpha: float = 0.05,
    confidence: float = 0.95,
) -> LeafEvidence:
    """Every candidate leaf of Algorithm 1 (seed 000, appendix D) measured on held-out rows.

    Each leaf is applied to the held-out rows of its group by its rule: the conjunction of its
    `Condition`s (thresholds on the original feature columns), so the leaves of one tree
    partition the group's held-out rows as they partitioned its fitted rows; nothing is refitted.
    A candidate is any leaf with at least one condition; the single leaf of a tree that found no
    split is its whole group, whose error rate cannot exceed the group's, and is not tested.

    The p-value is exact and one-sided: P(X >= e), X ~ Binomial(n, r), for a leaf with n held-out
    rows of which e are errors in a group of held-out error rate r. The q-values control the
    false discovery rate over every candidate of every tree given, by Benjamini-Yekutieli by
    default: the leaves of one tree split the same rows, and trees of overlapping groups (label
    and prediction) over overlapping features test dependent hypotheses, which
    Benjamini-Hochberg's independence (or positive dependence) assumption does not cover.

    Args:
      trees: one `FailureTree` (`failure_tree`) or a mapping {group: FailureTree}
        (`failure_trees`), fitted on other rows than these.
      features: `[N, D]` held-out features, the same columns as the trees were fitted on.
      errors: `[N]` bool, True where the model is wrong on held-out row n.
      groups: the held-out rows of each tree's group: an `[N]` integer array of group ids
        (labels or predictions, as given to `failure_trees`; integer-valued floats are
        converted) or a mapping {group: row indices}. None: every tree is measured on all N rows
        (for one tree, or trees that were each fitted on a whole split). A tree whose group has
        no held-out row gets candidates of held-out size 0 and p-value 1.
      method: "by" (Benjamini-Yekutieli, valid under any dependence) or "bh"
        (Benjamini-Hochberg).
      alpha: a candidate is `significant` where its q-value is <= alpha.
      confidence: the level of the Wilson interval of the held-out error rate.

    Returns:
      A `LeafEvidence` over the M candidates, in the trees' order and each tree's leaf order
      (`order()` and `rows()` put the significant ones first).

    Raises:
      ValueError: `errors` not boolean, features and errors of different lengths, features not
        2-D or not finite, a rule on a column `features` lacks, group ids that are not integers
        (floats with a fractional part) or not one per row, empty or out-of-range row indices,
        several trees without `groups`, no tree, or `method`, `alpha` or `confidence` out of
        range.
    """
    if isinstance(trees, FailureTree):
        trees = {trees.group: trees}
    elif isinstance(trees, Mapping):
        trees = dict(trees)
        if not all(isinstance(tree, FailureTree) for tree in trees.values()):
            raise ValueError("trees must map groups to FailureTree objects (from failure_trees).")
    else:
        raise ValueError(
            "trees must be a FailureTree (failure_tree) or a mapping {group: FailureTree} "
            f"(failure_trees), got {type(trees).__name__}."
        )
    if not trees:
        raise ValueError("there are no trees to measure.")
    stats.check_options(method=method, alpha=alpha, confidence=confidence)
    errors = np.asarray(errors)
    if errors.dtype != bool:
        raise ValueError(
            f"errors must be a boolean array (True where the model is wrong), got dtype "
            f"{errors.dtype}; pass e.g. predictions != labels."
        )
    features, errors = check_features_and_errors(features, errors)
    needed = max(
        (c.feature for tree in trees.values() for leaf in tree.leaves for c in leaf.conditions),
        default=-1,
    )
    if needed >= features.shape[1]:
        raise ValueError(
            f"a leaf's rule tests feature {needed} but the held-out features have "
            f"{features.shape[1]} columns; pass the same columns the trees were fitted on."
        )
    rows_of = _heldout_groups(trees, groups, len(errors))

    names, leaves, indices, group_sizes, group_errors = [], [], [], [], []
    for name, tree in trees.items():
        rows = rows_of.get(name, np.zeros(0, np.int64))
        for leaf in tree.leaves:
            if not leaf.conditions:
                continue
            holds = np.ones(len(rows), bool)
            for condition in leaf.conditions:
                holds &= condition.holds(features[rows])
            names.append(name)
            leaves.append(leaf)
            indices.append(rows[holds])
            group_sizes.append(len(rows))
            group_errors.append(int(errors[rows].sum()))

    size = np.asarray([len(i) for i in indices], np.int64)
    wrong = np.asarray([int(errors[i].sum()) for i in indices], np.int64)
    group_sizes = np.asarray(group_sizes, np.int64)
    baseline = np.asarray(group_errors, np.float64) / np.maximum(group_sizes, 1)
    evidence = stats.evidence_from_counts(wrong, size, baseline, method=method, alpha=alpha,
                                          confidence=confidence)
    return LeafEvidence(
        groups=tuple(names),
        leaves=tuple(leaves),
        evidence=evidence,
        group_sizes=group_sizes,
        indices=tuple(indices),
    )


def _heldout_groups(trees: dict, groups, num_rows: int) -> dict[Hashable, np.ndarray]:
    if groups is None:
        if len(trees) > 1:
            raise ValueError(
                f"{len(trees)} trees were given without groups; pass the held-out group of every "
                "row (an [N] array of group ids or a mapping {group: row indices})."
            )
        return {name: np.arange(num_rows) for name in trees}
    if isinstance(groups, Mapping):
        names = list(groups)
        checked = check_groups([groups[name] for name in names], num_rows)
        return dict(zip(names, checked))
    assignments = np.asarray(groups)
    if assignments.shape != (num_rows,):
        raise ValueError(
            f"groups must be a mapping {{group: row indices}} or an array of one group id per "
            f"held-out row, shape ({num_rows},); got shape {assignments.shape}."
        )
    return group_indices(integer_group_ids(assignments))


def _json_key(name):
    name = python_scalar(name)
    if name is None or isinstance(name, (bool, int, float, str)):
        return name
    return str(name)
