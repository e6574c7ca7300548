"""Intervals, exact tests and q-values against scipy, and a null search that finds nothing."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jfail import stats

CASES = [(0, 10), (3, 10), (10, 10), (1, 1), (17, 240), (55, 60), (0, 1)]


@pytest.mark.parametrize("errors, size", CASES)
def test_wilson_interval_matches_scipy(errors, size):
    expected = scipy_stats.binomtest(errors, size).proportion_ci(0.95, method="wilson")
    low, high = stats.wilson_interval(errors, size)
    np.testing.assert_allclose([low, high], [expected.low, expected.high], atol=1e-12)


@pytest.mark.parametrize("errors, size", CASES)
def test_clopper_pearson_interval_matches_scipy(errors, size):
    expected = scipy_stats.binomtest(errors, size).proportion_ci(0.95, method="exact")
    low, high = stats.clopper_pearson_interval(errors, size)
    np.testing.assert_allclose([low, high], [expected.low, expected.high], atol=1e-10)


@pytest.mark.parametrize("errors, size, rate", [(8, 10, 0.5), (0, 10, 0.2), (30, 200, 0.1),
                                                (5, 5, 0.99), (1, 50, 0.0)])
def test_binomial_p_value_matches_scipy_one_sided_test(errors, size, rate):
    expected = scipy_stats.binomtest(errors, size, rate, alternative="greater").pvalue
    np.testing.assert_allclose(stats.binomial_p_value(errors, size, rate), expected, rtol=1e-10)


@pytest.mark.parametrize("method", stats.FDR_METHODS)
def test_q_values_match_scipy_and_the_step_up_rule(method):
    p = np.random.default_rng(0).uniform(size=40) ** 3
    q = stats.q_values(p, method=method)
    np.testing.assert_allclose(q, scipy_stats.false_discovery_control(p, method=method))
    # The step-up rule by hand: reject the k smallest, k the largest with p_(k) <= k alpha / (m c).
    m = len(p)
    c = 1.0 if method == "bh" else np.sum(1 / np.arange(1, m + 1))
    order = np.sort(p)
    passing = np.nonzero(order <= np.arange(1, m + 1) * 0.05 / (m * c))[0]
    assert (q <= 0.05).sum() == (passing[-1] + 1 if passing.size else 0)


def test_empty_candidate_set_gives_empty_q_values():
    assert stats.q_values([]).shape == (0,)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="0 <= errors <= size"):
        stats.wilson_interval(5, 3)
    with pytest.raises(ValueError, match="method"):
        stats.q_values([0.1], method="bonferroni")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.q_values([float("nan")])
    with pytest.raises(ValueError, match="boolean"):
        stats.evidence(np.ones((2, 3)), np.zeros(3, bool), 0.1)
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        stats.evidence(np.ones((2, 3), bool), np.zeros(4, bool), 0.1)


def test_evidence_recovers_a_planted_failure_and_rows_are_strict_json():
    rng = np.random.default_rng(1)
    n = 2000
    planted = rng.uniform(size=n) < 0.1
    errors = np.where(planted, rng.uniform(size=n) < 0.6, rng.uniform(size=n) < 0.05)
    decoys = rng.uniform(size=(30, n)) < 0.1
    members = np.vstack([planted, decoys])
    result = stats.evidence(members, errors, errors.mean())
    assert result.significant[0]
    assert result.significant[1:].sum() == 0
    row = result.row(0)
    assert row["heldout_size"] == planted.sum()
    assert row["interval"][0] < row["heldout_error_rate"] < row["interval"][1]
    empty = stats.evidence(np.zeros((1, n), bool), errors, 0.1).row(0)
    assert empty["heldout_error_rate"] is None and empty["p_value"] == 1.0
    # the same evidence from counts alone (row indices instead of masks), and none for none
    counted = stats.evidence_from_counts((members & errors).sum(1), members.sum(1), errors.mean())
    assert [counted.row(i) for i in range(31)] == [result.row(i) for i in range(31)]
    assert stats.evidence_from_counts([], [], 0.1).heldout_size.shape == (0,)


def test_null_search_reports_nothing_in_at_least_95_of_100_seeds():
    """Candidate sets independent of the errors: FDR control keeps every run quiet, nearly."""
    quiet = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        errors = rng.uniform(size=1000) < 0.1
        members = rng.uniform(size=(200, 1000)) < rng.uniform(0.02, 0.3, size=(200, 1))
        quiet += not stats.evidence(members, errors, errors.mean()).significant.any()
    assert quiet >= 95
