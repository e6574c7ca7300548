"""Held-out evidence for Barlow's leaves: hand-counted evidence, a planted rule found significant,
no significant leaf when errors ignore the features, and clear refusals of bad input."""

import inspect
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jfail.barlow import (
    Condition,
    failure_tree,
    failure_trees,
    leaf_evidence,
    rank_features,
)


def _counting_tree():
    """The hand-computed tree of test_barlow: feature 0 counts 0..159, errors are the 30 largest
    values and 10 scattered ones, so the depth-1 split is `feature 0 > 129.5`."""
    x = np.ones((160, 4), np.float32)
    x[:, 0] = np.arange(160)
    errors = np.zeros(160, bool)
    errors[130:] = True
    errors[6:130:13] = True
    return failure_tree(x, errors, num_features=1)


def _wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_held_out_evidence_equals_counts_by_hand():
    tree = _counting_tree()
    assert [leaf.rule for leaf in tree.leaves] == ["feature 0 > 129.5", "feature 0 <= 129.5"]
    # Held out: 100 rows, 20 of them above 129.5 with 15 errors, 80 below with 10 errors.
    x = np.zeros((100, 4), np.float32)
    x[:20, 0] = 200.0
    x[20:, 0] = 50.0
    x[19, 0] = 129.6  # just above the threshold: in the high leaf
    x[20, 0] = 129.5  # on the threshold: `<=` puts it in the low leaf
    errors = np.zeros(100, bool)
    errors[:15] = True
    errors[20:30] = True
    found = leaf_evidence(tree, x, errors)

    assert found.num_candidates == 2 and found.groups == (None, None)
    e = found.evidence
    np.testing.assert_array_equal(e.heldout_size, [20, 80])
    np.testing.assert_array_equal(e.heldout_errors, [15, 10])
    np.testing.assert_allclose(e.heldout_error_rate, [0.75, 0.125])
    np.testing.assert_allclose(e.baseline_error_rate, [0.25, 0.25])  # 25 errors in 100 rows
    np.testing.assert_array_equal(found.group_sizes, [100, 100])
    np.testing.assert_array_equal(found.indices[0], np.arange(20))
    np.testing.assert_array_equal(found.indices[1], np.arange(20, 100))
    for i, (k, n) in enumerate([(15, 20), (10, 80)]):
        low, high = _wilson(k, n)
        assert e.interval_low[i] == pytest.approx(low) and e.interval_high[i] == pytest.approx(high)
    # P(X >= 15), X ~ Bin(20, 0.25), summed term by term; and P(X >= 10), X ~ Bin(80, 0.25)
    p_high = sum(scipy_stats.binom.pmf(j, 20, 0.25) for j in range(15, 21))
    p_low = sum(scipy_stats.binom.pmf(j, 80, 0.25) for j in range(10, 81))
    np.testing.assert_allclose(e.p_value, [p_high, p_low], rtol=1e-9)
    # Benjamini-Yekutieli with m = 2: c(2) = 1.5; q_(1) = min(p_(1) * 2 * 1.5, q_(2)),
    # q_(2) = min(1, p_(2) * 1.5)
    q_second = min(1.0, p_low * 1.5)
    np.testing.assert_allclose(e.q_value, [min(p_high * 3.0, q_second), q_second], rtol=1e-9)
    np.testing.assert_array_equal(e.significant, [True, False])
    assert e.method == "by" and e.alpha == 0.05

    bh = leaf_evidence(tree, x, errors, method="bh", alpha=1e-9)
    np.testing.assert_allclose(bh.evidence.q_value, [min(p_high * 2, p_low), p_low], rtol=1e-9)
    assert bh.num_significant == 0  # alpha below every q-value

    row = found.rows()[0]
    assert row["rule"] == "feature 0 > 129.5" and row["group"] is None
    assert row["conditions"] == [{"feature": 0, "op": ">", "threshold": 129.5}]
    assert row["fit"]["size"] == 30 and row["fit"]["errors"] == 30 and row["fit"]["valid"]
    assert (row["heldout_size"], row["heldout_errors"], row["group_heldout_size"]) == (20, 15, 100)
    assert row["significant"] and row["q_value"] == pytest.approx(e.q_value[0])
    assert len(found.rows(significant_only=True)) == 1 and len(found.rows()) == 2
    json.dumps(found.rows(), allow_nan=False)
    assert found.rows(feature_names=["width", "b", "c", "d"])[0]["rule"] == "width > 129.5"
    table = found.table(significant_only=False)
    assert table.count("\n") == 3 and "| feature 0 > 129.5 |" in table


def _planted(rng, rows, num_features=4, feature=2, quantile=0.7, rate_in=0.8, rate_out=0.1):
    x = rng.normal(size=(rows, num_features)).astype(np.float32)
    holds = x[:, feature] > np.quantile(x[:, feature], quantile)
    errors = rng.random(rows) < np.where(holds, rate_in, rate_out)
    return x, errors


def test_a_planted_rule_is_significant_on_held_out_rows_of_its_group():
    rng = np.random.default_rng(0)
    x, errors = _planted(rng, 600)
    labels = np.arange(600) % 2  # the rule holds in both groups; group 1 also has no rows below
    fit, held = slice(0, 300), slice(300, 600)
    trees = failure_trees(x[fit], errors[fit], labels[fit], num_features=4, progress=False)
    found = leaf_evidence(trees, x[held], errors[held], labels[held])
    assert found.num_candidates == 4  # two depth-1 leaves in each of two groups
    significant = found.rows(significant_only=True)
    assert {r["group"] for r in significant} == {0, 1}
    for r in significant:
        assert [(c["feature"], c["op"]) for c in r["conditions"]] == [(2, ">")]
        assert r["heldout_error_rate"] > r["baseline_error_rate"] + 0.3
        assert r["group_heldout_size"] == 150
    # the mapping form of the groups gives the same evidence
    same = leaf_evidence(
        trees, x[held], errors[held], {g: np.flatnonzero(labels[held] == g) for g in (0, 1)}
    )
    np.testing.assert_array_equal(same.evidence.q_value, found.evidence.q_value)
    # a group without held-out rows: its candidates have size 0, p-value 1, and null rates
    lonely = leaf_evidence(trees, x[held], errors[held], {0: np.arange(10), 1: np.arange(10, 20)})
    assert lonely.num_candidates == 4
    absent = leaf_evidence(trees, x[held], errors[held], {0: np.flatnonzero(labels[held] == 0)})
    rows = [absent.row(i) for i in range(4) if absent.groups[i] == 1]
    assert all(r["heldout_size"] == 0 and r["p_value"] == 1.0 for r in rows)
    assert all(r["heldout_error_rate"] is None and r["baseline_error_rate"] is None for r in rows)
    json.dumps(absent.rows(), allow_nan=False)


def test_errors_that_ignore_the_features_give_no_significant_leaf():
    rows, seeds, hits = 200, 100, 0
    labels = np.arange(2 * rows) % 2
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(2 * rows, 3)).astype(np.float32)
        errors = rng.random(2 * rows) < 0.3  # independent of x
        trees = failure_trees(
            x[:rows], errors[:rows], labels[:rows], num_features=3, max_depth=2,
            key=seed, progress=False,
        )
        found = leaf_evidence(trees, x[rows:], errors[rows:], labels[rows:])
        assert found.num_candidates >= 2
        hits += found.num_significant > 0
    assert hits <= 5, f"{hits} of {seeds} null seeds had a significant leaf"


def test_failure_trees_screen_only_when_asked():
    assert inspect.signature(failure_trees).parameters["screen"].default is None
    assert inspect.signature(rank_features).parameters["screen"].default is None


def test_bad_inputs_are_refused_with_a_reason():
    tree = _counting_tree()
    x = np.zeros((10, 4), np.float32)
    errors = np.zeros(10, bool)
    with pytest.raises(ValueError, match="10 rows but errors has 9"):
        leaf_evidence(tree, x, errors[:9])
    with pytest.raises(ValueError, match="boolean.*int64"):
        leaf_evidence(tree, x, errors.astype(np.int64))
    with pytest.raises(ValueError, match="non-integer floats"):
        leaf_evidence({0: tree, 1: tree}, x, errors, np.arange(10) / 4)
    with pytest.raises(ValueError, match="one group id per held-out row"):
        leaf_evidence({0: tree}, x, errors, np.zeros(9, int))
    with pytest.raises(ValueError, match="2 trees were given without groups"):
        leaf_evidence({0: tree, 1: tree}, x, errors)
    with pytest.raises(ValueError, match="outside"):
        leaf_evidence({0: tree}, x, errors, {0: np.arange(20)})
    with pytest.raises(ValueError, match="FailureTree"):
        leaf_evidence([tree], x, errors)
    with pytest.raises(ValueError, match="no trees"):
        leaf_evidence({}, x, errors)
    with pytest.raises(ValueError, match="method"):
        leaf_evidence(tree, x, errors, method="holm")
    with pytest.raises(ValueError, match="alpha"):
        leaf_evidence(tree, x, errors, alpha=0.0)
    nan = x.copy()
    nan[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        leaf_evidence(tree, nan, errors)
    # a rule on a column beyond the held-out features, found before any work
    deep = failure_tree(np.c_[np.ones((160, 5), np.float32), np.arange(160)],
                        np.arange(160) > 120, num_features=1)
    assert deep.top_leaf.conditions[0] == Condition(5, ">", 120.5)
    with pytest.raises(ValueError, match="tests feature 5"):
        leaf_evidence(deep, x, errors)


def test_the_pipeline_config_refuses_evidence_on_the_images_the_trees_are_fitted_to():
    from jfail.config import BarlowConfig, ConfigError, validate_config

    validate_config(BarlowConfig())  # the default: fit on the validation images, measure on test
    assert (BarlowConfig().split, BarlowConfig().evidence_split) == ("val", "test")
    for split, evidence_split in (("train", "val"), ("val", "train"), ("test", "test")):
        with pytest.raises(ConfigError, match="shares images"):
            validate_config(BarlowConfig(split=split, evidence_split=evidence_split))
    with pytest.raises(ConfigError, match="fdr_method"):
        validate_config(BarlowConfig(fdr_method="holm"))
