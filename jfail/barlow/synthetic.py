"""Synthetic groups with planted failure rules, for tests and benchmarks of failure trees.

Each group g has its own feature distribution (pooled-ReLU-like: non-negative, with a mass of exact
zeros) and one planted rule `feature j_g > t_g` or `feature j_g <= t_g` that holds for a
`leaf_fraction` of the group; the model errs with probability `error_rate_in` where the rule
holds and `error_rate_out` elsewhere. Algorithm 1 should recover the rule as its top valid leaf.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jfail.barlow.trees import Condition, FailureTree
from jfail.keys import as_key

__all__ = ["PlantedFailures", "planted_failures", "rule_recovered"]


@dataclasses.dataclass(frozen=True, eq=False)
class PlantedFailures:
    """features: [N, D] float32; errors: [N] bool; groups: [N] int32 group ids 0..G-1;
    rules: the planted rule of each group, on the original feature indices."""

    features: np.ndarray
    errors: np.ndarray
    groups: np.ndarray
    rules: tuple[Condition, ...]


def planted_failures(
    *,
    key,
    num_groups: int = 1000,
    group_size: int | tuple[int, int] = (40, 88),
    num_features: int = 2048,
    leaf_fraction: float = 0.3,
    error_rate_in: float | tuple[float, float] = (0.6, 0.9),
    error_rate_out: float = 0.1,
) -> PlantedFailures:
    """Draws G groups of `group_size` examples (an int, or an inclusive (min, max) range).

    Features: max(0, z) with z ~ N(mu_f + s_gf, 1), mu_f ~ U(0, 1), s_gf ~ N(0, 0.5^2): each group
    shifts each feature, and between 16 % and 50 % of the values are exact zeros. Half of the
    groups get `feature > t` with t the group's (1 - leaf_fraction) quantile of that feature, the
    other half `feature <= t` with t its leaf_fraction quantile; `error_rate_in` is drawn per
    group when it is a range.

    Args:
      key: an int seed or a PRNG key; the same key gives the same data.
      num_groups: G, the number of groups.
      group_size: the examples per group, an int or an inclusive (min, max) range.
      num_features: D, the feature columns.
      leaf_fraction: the share of a group's examples the planted rule selects.
      error_rate_in: the error rate inside the planted leaf, a float or a (low, high) range.
      error_rate_out: the error rate in the rest of the group.

    Returns:
      A `PlantedFailures`: features `[N, D]` float32 (N the sum of the group sizes), errors
      `[N]` bool, groups `[N]` int32 group ids and the G planted rules.

    Raises:
      ValueError: `leaf_fraction` outside (0, 1), a group size below 2 or a range with
        min > max, or `key` is None.
      TypeError: `key` is not a seed or a PRNG key.
    """
    if not 0 < leaf_fraction < 1:
        raise ValueError(f"leaf_fraction must be in (0, 1), got {leaf_fraction}.")
    low, high = (group_size, group_size) if np.isscalar(group_size) else group_size
    if not 2 <= low <= high:
        raise ValueError(f"group_size must be >= 2 (or a range (min, max)), got {group_size}.")
    # One numpy generator seeded from the key: the same key gives the same data, and drawing
    # millions of values needs no compilation.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(as_key(key))).ravel().tolist())
    sizes = rng.integers(low, high + 1, num_groups)
    groups = np.repeat(np.arange(num_groups, dtype=np.int32), sizes)
    base = rng.uniform(size=num_features).astype(np.float32)
    shift = (0.5 * rng.standard_normal((num_groups, num_features))).astype(np.float32)
    features = rng.standard_normal((len(groups), num_features), dtype=np.float32)
    features += base
    features += shift[groups]
    np.maximum(features, 0.0, out=features)

    planted = rng.integers(0, num_features, num_groups)
    above = np.arange(num_groups) % 2 == 0
    if np.isscalar(error_rate_in):
        rate_in = np.full(num_groups, float(error_rate_in))
    else:
        rate_in = rng.uniform(error_rate_in[0], error_rate_in[1], num_groups)
    # The planted feature is drawn with a mean of 1.5 so that its rule does not fall on the zeros.
    strong = np.maximum(rng.standard_normal(len(groups)) + 1.5, 0.0)
    features[np.arange(len(groups)), planted[groups]] = strong
    uniform = rng.uniform(size=len(groups))

    errors = np.zeros(len(groups), bool)
    rules = []
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for g in range(num_groups):
        rows = slice(starts[g], starts[g] + sizes[g])
        values = features[rows, planted[g]]
        if above[g]:
            threshold = float(np.quantile(values, 1 - leaf_fraction))
            holds = values > threshold
        else:
            threshold = float(np.quantile(values, leaf_fraction))
            holds = values <= threshold
        errors[rows] = uniform[rows] < np.where(holds, rate_in[g], error_rate_out)
        rules.append(Condition(int(planted[g]), ">" if above[g] else "<=", threshold))
    return PlantedFailures(features, errors, groups, tuple(rules))


def rule_recovered(
    tree: FailureTree, rule: Condition, features, *, quantile_tolerance: float = 0.1
) -> bool:
    """Whether the tree's leaf of highest importance is valid and tests `rule`'s feature on the
    same side with a threshold within `quantile_tolerance` of the planted one, measured on the
    group's own distribution of that feature (its empirical CDF).

    Args:
      tree: the `FailureTree` fitted to the group, with its `indices`.
      rule: the group's planted `Condition`.
      features: `[N, D]`, the features the tree was fitted on.
      quantile_tolerance: the largest gap allowed between the two thresholds' quantiles.

    Returns:
      True where the planted rule is recovered.
    """
    leaf = tree.top_leaf
    if not leaf.valid:
        return False
    values = np.asarray(features)[tree.indices, rule.feature]
    for condition in leaf.conditions:
        if condition.feature == rule.feature and condition.op == rule.op:
            gap = abs(np.mean(values <= condition.threshold) - np.mean(values <= rule.threshold))
            return bool(gap <= quantile_tolerance)
    return False
