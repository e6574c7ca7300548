"""Tests for jfail.prime.mode_evidence: held-out evidence and minimality under one FDR control."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jfail import stats
from jfail.prime import (
    FailureMode,
    TagMatrix,
    find_failure_modes,
    flip_tags,
    mode_evidence,
    planted_problem,
)


def mode(label, tags):
    """A FailureMode as the search would report it; mode_evidence reads only label and tags."""
    return FailureMode(label, tuple(tags), 0, 0.0, 0.0, (), 0, 0)


def reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


# ---------------------------------------------------------------- hand counts


def test_evidence_equals_hand_counts_on_a_tiny_case():
    #            a  b  wrong   (class 0: 10 images; class 1: 2 images, never in a mode)
    rows = [
        (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 0),   # a + b: 4 images, 3 wrong
        (1, 0, 0), (1, 0, 1), (1, 0, 0),              # a without b: 3 images, 1 wrong
        (0, 1, 0), (0, 1, 0),                         # b without a: 2 images, 0 wrong
        (0, 0, 0),                                    # neither
    ]
    tags = np.array([r[:2] for r in rows] + [(1, 1), (1, 1)], bool)
    errors = np.array([r[2] for r in rows] + [1, 1], bool)
    labels = np.array([0] * 10 + [1, 1])
    modes = [mode(0, ("a", "b")), mode(0, ("a",))]
    found = mode_evidence(modes, TagMatrix(tags, ("a", "b")), errors=errors, labels=labels)

    both, single = found
    assert (both.heldout_size, both.heldout_errors, both.heldout_error_rate) == (4, 3, 0.75)
    assert (both.class_size, both.class_error_rate) == (10, 0.4)
    assert both.p_value == pytest.approx(scipy_stats.binom.sf(2, 4, 0.4))
    low, high = stats.wilson_interval(3, 4)
    assert both.interval == (pytest.approx(float(low)), pytest.approx(float(high)))
    # dropping a leaves b's images without a; dropping b leaves a's images without b
    assert [(t.tag, t.size, t.errors) for t in both.minimality] == [("a", 2, 0), ("b", 3, 1)]
    fisher = [scipy_stats.fisher_exact([[3, 1], [e, n - e]], alternative="greater").pvalue
              for n, e in ((2, 0), (3, 1))]
    assert [t.p_value for t in both.minimality] == pytest.approx(fisher)
    # one tag: no minimality test (dropping it leaves the class, the mode's own comparison)
    assert (single.heldout_size, single.heldout_errors, single.minimality) == (7, 4, ())
    # one correction over the 2 mode tests and the 2 minimality tests, in that order
    p = [both.p_value, single.p_value] + [t.p_value for t in both.minimality]
    q = scipy_stats.false_discovery_control(p, method="by")
    assert [both.q_value, single.q_value] + [t.q_value for t in both.minimality] == pytest.approx(q)
    assert not both.significant and not single.significant  # too few images for anything

    bh = mode_evidence(modes, tags, errors=errors, labels=labels, tag_names=("a", "b"),
                       method="bh", alpha=0.9)
    assert bh[0].q_value == pytest.approx(scipy_stats.false_discovery_control(p, method="bh")[0])
    assert bh[0].significant == all(v <= 0.9 for v in
                                    [bh[0].q_value] + [t.q_value for t in bh[0].minimality])
    alone = mode_evidence(modes, tags, errors=errors, labels=labels, tag_names=("a", "b"),
                          minimality=False)
    assert alone[0].minimality == ()
    assert alone[0].q_value == pytest.approx(
        scipy_stats.false_discovery_control(p[:2], method="by")[0])


def test_fisher_p_value_matches_scipy_and_is_one_on_empty_groups():
    for a, n, b, m in ((8, 10, 2, 10), (3, 4, 1, 3), (0, 5, 0, 5), (5, 5, 0, 7)):
        expected = scipy_stats.fisher_exact([[a, n - a], [b, m - b]], alternative="greater").pvalue
        assert stats.fisher_p_value(a, n, b, m) == pytest.approx(expected)
    assert stats.fisher_p_value(3, 3, 0, 0) == 1.0 and stats.fisher_p_value(0, 0, 2, 3) == 1.0
    with pytest.raises(ValueError, match="errors <= size"):
        stats.fisher_p_value(3, 2, 0, 1)


# ---------------------------------------------------------------- planted modes


PLANTED = [(0, (0,)), (1, (1, 2)), (2, (3, 4, 5))]


def _planted(key, images_per_class=6000):
    prevalence = np.full(12, 0.3, np.float32)
    prevalence[:6] = 0.25
    return planted_problem(key=key, num_classes=3, images_per_class=images_per_class,
                           tag_prevalence=prevalence, planted=PLANTED, base_accuracy=0.9)


def test_planted_modes_are_significant_and_their_supersets_are_not():
    search, heldout = _planted(0), _planted(1)
    names = search.tag_names
    search_tags = flip_tags(search.tags, 0.05, key=2)
    heldout_tags = flip_tags(heldout.tags, 0.05, key=3)
    found = find_failure_modes(search_tags, errors=search.errors, labels=search.labels,
                               tag_names=names, min_size=30, progress=False)
    planted = {(label, tuple(names[t] for t in tags)) for label, tags in PLANTED}
    # every planted set plus each other tag, whether or not the search reported it
    supersets = {(label, tuple(sorted(tags + (names[t],), key=names.index)))
                 for label, tags in planted for t in range(12) if names[t] not in tags}
    candidates = {(m.label, m.tags) for m in found} | planted | supersets
    candidates = sorted(candidates)
    evidence = mode_evidence([mode(label, tags) for label, tags in candidates], heldout_tags,
                             errors=heldout.errors, labels=heldout.labels, tag_names=names)
    significant = {(e.mode.label, e.mode.tags) for e in evidence if e.significant}
    assert significant == planted
    assert len({(m.label, m.tags) for m in found}) > len(planted)  # the search alone over-reports
    # the supersets fail on minimality, not on their error rate
    superset_evidence = [e for e in evidence if (e.mode.label, e.mode.tags) in supersets
                         and e.heldout_size >= 30]
    assert superset_evidence and all(e.q_value <= 0.05 for e in superset_evidence)
    assert all(any(t.q_value > 0.05 for t in e.minimality) for e in superset_evidence)


def test_null_problem_has_no_significant_mode_in_95_of_100_seeds():
    with_modes = with_significant = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        tags = rng.random((2, 600, 6)) < 0.3
        labels = np.repeat(np.arange(2), 300)
        errors = rng.random((2, 600)) < 0.2  # independent of the tags
        found = find_failure_modes(tags[0], errors=errors[0], labels=labels, min_size=10,
                                   min_drop=0.1, max_tags=2, progress=False)
        if not found:
            continue
        with_modes += 1
        evidence = mode_evidence(found, tags[1], errors=errors[1], labels=labels)
        with_significant += any(e.significant for e in evidence)
    assert with_modes >= 50  # the search on the first split does report (spurious) modes
    assert with_significant <= 5


# ---------------------------------------------------------------- output and errors


def test_rows_are_strict_json_with_null_for_missing_rates():
    tags = np.array([[1, 0], [1, 0], [0, 0], [0, 1]], bool)
    errors = np.array([1, 0, 0, 1], bool)
    labels = np.array([0, 0, 0, 1])
    modes = [mode(0, ("tag0",)), mode(0, ("tag0", "tag1")), mode(2, ("tag1",))]
    evidence = mode_evidence(modes, tags, errors=errors, labels=labels)
    rows = [e.row(class_names=("x", "y", "z")) for e in evidence]
    text = json.dumps(rows, allow_nan=False)
    back = json.loads(text, parse_constant=reject_constant)
    assert back[1]["heldout_size"] == 0 and back[1]["heldout_error_rate"] is None
    assert back[1]["minimality"][0]["error_rate"] is None and back[1]["minimality"][1]["size"] == 2
    assert back[2]["class"] == "z" and back[2]["class_heldout_error_rate"] is None
    assert back[0]["heldout_error_rate"] == 0.5 and back[0]["significant"] is False
    assert mode_evidence([], tags, errors=errors, labels=labels) == []


@pytest.mark.parametrize("change, message", [
    (dict(errors=np.array([1, 0, 2])), "errors must be booleans"),
    (dict(errors=np.array([True, False])), "3 rows"),
    (dict(labels=np.array([0, 0])), "3 rows"),
    (dict(modes=[mode(0, ("tag0", "missing"))]), "not among the held-out tag names"),
    (dict(method="holm"), "method must be one of"),
    (dict(alpha=0.0), "alpha must lie in"),
    (dict(alpha=1.5), "alpha must lie in"),
    (dict(tag_names=("only",)), "1 tag names for 2 tag columns"),
])
def test_bad_input_raises_a_clear_value_error(change, message):
    arguments = dict(modes=[mode(0, ("tag0",))], tags=np.array([[1, 0], [0, 1], [1, 1]], bool),
                     errors=np.array([True, False, True]), labels=np.array([0, 0, 1]))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        mode_evidence(arguments.pop("modes"), arguments.pop("tags"), **arguments)


@pytest.mark.parametrize("change, message", [
    (dict(search_split="trian"), "search_split must be one of"),
    (dict(search_split="test"), "search_split and heldout_split must differ"),
    (dict(fdr_method="holm"), "fdr_method must be one of"),
    (dict(alpha=1.0), "alpha must lie in"),
])
def test_a_prime_config_with_bad_splits_or_evidence_options_is_refused_before_any_work(
        change, message):
    from jfail.config import ConfigError, validate_config
    from jfail.prime import PrimeConfig

    validate_config(PrimeConfig())
    with pytest.raises(ConfigError, match=message):
        validate_config(PrimeConfig(**change))
