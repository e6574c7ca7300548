"""Evidence for a reported failure: intervals, exact tests and false-discovery control.

A failure (a Barlow leaf, a PRIME mode, a Defuse scenario) is a set of examples chosen on one
split. Its evidence is measured on another split: how many held-out examples it holds, their error
rate with a 95 % interval, the exact one-sided binomial p-value of "the error rate is above the
group's", and a q-value over every candidate the search tested, so that `significant` (q <= 0.05)
controls the expected share of false discoveries among the failures reported.

All functions are vectorised over candidates (NumPy in, NumPy out) and lean on scipy's exact
distributions and `scipy.stats.false_discovery_control`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special, stats

__all__ = [
    "FDR_METHODS",
    "Evidence",
    "binomial_p_value",
    "check_options",
    "clopper_pearson_interval",
    "evidence",
    "evidence_from_counts",
    "fisher_p_value",
    "q_values",
    "wilson_interval",
]

FDR_METHODS = ("bh", "by")
"""Benjamini-Hochberg (independent or positively dependent tests) and Benjamini-Yekutieli (any
dependence, at a cost of a factor sum(1/i) in power)."""


def check_options(*, method: str = "by", alpha: float = 0.05, confidence: float = 0.95) -> None:
    """Raise a ValueError for a false-discovery `method` not in `FDR_METHODS`, or an `alpha` or
    interval `confidence` outside (0, 1): the options every evidence function takes.

    Args:
      method: the false-discovery control, one of `FDR_METHODS`.
      alpha: the q-value level at which a candidate is significant.
      confidence: the two-sided level of the intervals.

    Returns:
      None; it only checks.

    Raises:
      ValueError: `method` is not in `FDR_METHODS`, or `alpha` or `confidence` is outside (0, 1).
    """
    if method not in FDR_METHODS:
        raise ValueError(f"method must be one of {FDR_METHODS}, got {method!r}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")


def wilson_interval(errors, size, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion, vectorised.

    Args:
      errors: `[M]` counts (or a scalar).
      size: `[M]` trials, broadcastable with `errors`; where it is 0 the interval is [0, 1].
      confidence: two-sided level.

    Returns:
      `(low, high)`, each shaped like the broadcast of `errors` and `size`.

    Raises:
      ValueError: negative counts, `errors > size`, or a confidence outside (0, 1).

    Example:
      >>> low, high = wilson_interval(3, 10)
      >>> round(float(low), 4), round(float(high), 4)
      (0.1078, 0.6032)
    """
    errors, size = _counts(errors, size, confidence)
    z = special.ndtri(0.5 + confidence / 2)
    n = np.maximum(size, 1)
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    empty = size == 0
    return np.where(empty, 0.0, centre - half), np.where(empty, 1.0, centre + half)


def clopper_pearson_interval(
    errors, size, *, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) interval of a binomial proportion, vectorised; as `wilson_interval`.

    Args:
      errors: `[M]` counts (or a scalar).
      size: `[M]` trials, broadcastable with `errors`; where it is 0 the interval is [0, 1].
      confidence: two-sided level.

    Returns:
      `(low, high)`, each shaped like the broadcast of `errors` and `size`.

    Raises:
      ValueError: negative counts, `errors > size`, or a confidence outside (0, 1).

    Example:
      >>> low, high = clopper_pearson_interval(3, 10)
      >>> round(float(low), 4), round(float(high), 4)
      (0.0667, 0.6525)
    """
    errors, size = _counts(errors, size, confidence)
    tail = (1 - confidence) / 2
    with np.errstate(invalid="ignore"):
        low = np.where(errors > 0, stats.beta.ppf(tail, errors, size - errors + 1), 0.0)
        high = np.where(errors < size, stats.beta.ppf(1 - tail, errors + 1, size - errors), 1.0)
    return np.nan_to_num(low, nan=0.0), np.nan_to_num(high, nan=1.0)


def binomial_p_value(errors, size, rate) -> np.ndarray:
    """Exact one-sided p-value of "error rate above `rate`": P(X >= errors), X ~ Bin(size, rate).

    Args:
      errors, size: `[M]` counts; rate: `[M]` or scalar baseline error rates in [0, 1].

    Returns:
      `[M]` p-values in [0, 1] (1 where `size` is 0).

    Raises:
      ValueError: negative counts, `errors > size`, or a rate outside [0, 1].

    Example:
      >>> round(float(binomial_p_value(8, 10, 0.5)), 4)
      0.0547
    """
    errors, size = _counts(errors, size, 0.95)
    rate = np.asarray(rate, np.float64)
    if np.any((rate < 0) | (rate > 1)):
        raise ValueError("rate must lie in [0, 1].")
    return np.where(errors > 0, stats.binom.sf(errors - 1, size, rate), 1.0)


def q_values(p_values, *, method: str = "by") -> np.ndarray:
    """Adjusted p-values (q-values) controlling the false discovery rate over all `p_values`.

    Args:
      p_values: `[M]` p-values of every candidate tested (not only the reported ones).
      method: "bh" (Benjamini-Hochberg) or "by" (Benjamini-Yekutieli, valid under any
        dependence: the candidates of a slice search share examples).

    Returns:
      `[M]` q-values; a candidate is a discovery at level alpha where q <= alpha.

    Raises:
      ValueError: `method` is not in `FDR_METHODS`, or a p-value is not finite or outside [0, 1].
    """
    if method not in FDR_METHODS:
        raise ValueError(f"method must be one of {FDR_METHODS}, got {method!r}.")
    p_values = np.asarray(p_values, np.float64).reshape(-1)
    if p_values.size == 0:
        return p_values
    if np.any(~np.isfinite(p_values) | (p_values < 0) | (p_values > 1)):
        raise ValueError("p_values must be finite and lie in [0, 1].")
    return stats.false_discovery_control(p_values, method=method)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Held-out evidence for `M` candidate failures (each field `[M]`)."""

    heldout_size: np.ndarray
    heldout_errors: np.ndarray
    heldout_error_rate: np.ndarray
    interval_low: np.ndarray
    interval_high: np.ndarray
    baseline_error_rate: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    significant: np.ndarray
    method: str
    alpha: float

    def row(self, index: int) -> dict:
        """One candidate's evidence as plain Python numbers (strict-JSON ready: no NaN).

        Args:
          index: the candidate, in `[0, M)`.

        Returns:
          A dict with `heldout_size`, `heldout_errors`, `heldout_error_rate` (None where the
          candidate holds no held-out example), `interval` `[low, high]`,
          `baseline_error_rate`, `p_value`, `q_value` and `significant`.

        Raises:
          IndexError: `index` is out of range.
        """
        rate = float(self.heldout_error_rate[index])
        return {
            "heldout_size": int(self.heldout_size[index]),
            "heldout_errors": int(self.heldout_errors[index]),
            "heldout_error_rate": rate if self.heldout_size[index] else None,
            "interval": [float(self.interval_low[index]), float(self.interval_high[index])],
            "baseline_error_rate": float(self.baseline_error_rate[index]),
            "p_value": float(self.p_value[index]),
            "q_value": float(self.q_value[index]),
            "significant": bool(self.significant[index]),
        }


def evidence(
    members, errors, baseline_rate, *, method: str = "by", alpha: float = 0.05,
    confidence: float = 0.95,
) -> Evidence:
    """Evidence for candidate failures measured on a held-out split.

    Args:
      members: `[M, N]` bool, candidate m's held-out examples.
      errors: `[N]` bool, True where the model is wrong on held-out example n.
      baseline_rate: `[M]` or scalar, the error rate each candidate is compared with (its
        class's or group's held-out error rate).
      method: the false-discovery control over all M candidates (`q_values`).
      alpha: the q-value at or below which a candidate is `significant`.
      confidence: the level of the Wilson interval.

    Returns:
      An `Evidence` over the M candidates.

    Raises:
      ValueError: shapes that disagree, or non-boolean masks.
    """
    members = np.asarray(members)
    errors = np.asarray(errors)
    if members.ndim != 2 or errors.ndim != 1 or members.shape[1] != errors.shape[0]:
        raise ValueError(
            f"members must be [M, N] and errors [N], got {members.shape} and {errors.shape}."
        )
    if members.dtype != bool or errors.dtype != bool:
        raise ValueError("members and errors must be boolean arrays (errors: True = wrong).")
    return evidence_from_counts(
        (members & errors[None, :]).sum(axis=1), members.sum(axis=1), baseline_rate,
        method=method, alpha=alpha, confidence=confidence)


def evidence_from_counts(
    errors, size, baseline_rate, *, method: str = "by", alpha: float = 0.05,
    confidence: float = 0.95,
) -> Evidence:
    """`evidence` from each candidate's held-out counts, for callers that hold row indices
    rather than `[M, N]` masks.

    Args:
      errors: `[M]` held-out examples of each candidate the model gets wrong.
      size: `[M]` held-out examples of each candidate.
      baseline_rate, method, alpha, confidence: as for `evidence`.

    Returns:
      An `Evidence` over the M candidates (M may be 0).

    Raises:
      ValueError: negative counts, more errors than examples, or options out of range.
    """
    check_options(method=method, alpha=alpha, confidence=confidence)
    wrong = np.asarray(errors, np.int64).reshape(-1)
    size = np.asarray(size, np.int64).reshape(-1)
    baseline = np.broadcast_to(np.asarray(baseline_rate, np.float64), size.shape)
    low, high = wilson_interval(wrong, size, confidence=confidence)
    p = binomial_p_value(wrong, size, baseline)
    q = q_values(p, method=method)
    return Evidence(
        heldout_size=size, heldout_errors=wrong,
        heldout_error_rate=np.where(size > 0, wrong / np.maximum(size, 1), 0.0),
        interval_low=low, interval_high=high, baseline_error_rate=baseline, p_value=p,
        q_value=q, significant=q <= alpha, method=method, alpha=float(alpha),
    )


def _counts(errors, size, confidence):
    errors = np.asarray(errors)
    size = np.asarray(size)
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    if np.any(errors < 0) or np.any(size < 0) or np.any(errors > size):
        raise ValueError("counts must satisfy 0 <= errors <= size.")
    errors, size = np.broadcast_arrays(errors.astype(np.float64), size.astype(np.float64))
    return errors, size


def fisher_p_value(errors, size, other_errors, other_size) -> np.ndarray:
    """Exact one-sided p-value of "the first group's error rate is above the second's", vectorised.

    Fisher's exact test on the 2 x 2 table (errors, correct) x (first group, second group): given
    the margins, the first group's error count X is hypergeometric under equal rates, and the
    p-value is P(X >= errors). The two groups must be disjoint (a group and a superset of it are
    compared through the superset's examples outside the group).

    Args:
      errors, size: `[M]` counts of the first group.
      other_errors, other_size: `[M]` counts of the second group, broadcastable with the first.

    Returns:
      `[M]` p-values in [0, 1] (1 where either group is empty or no example is wrong).

    Raises:
      ValueError: negative counts or more errors than examples in a group.

    Example:
      >>> round(float(fisher_p_value(8, 10, 2, 10)), 4)
      0.0115
    """
    errors, size = _counts(errors, size, 0.95)
    other_errors, other_size = _counts(other_errors, other_size, 0.95)
    errors, size, other_errors, other_size = np.broadcast_arrays(
        errors, size, other_errors, other_size)
    total, wrong = size + other_size, errors + other_errors
    p = stats.hypergeom.sf(errors - 1, total, wrong, size)
    return np.where((errors > 0) & (size > 0) & (other_size > 0), np.clip(p, 0.0, 1.0), 1.0)
