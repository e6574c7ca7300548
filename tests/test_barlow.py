"""Barlow: planted failure rules are found, metrics match hand computation, the JAX estimator of
mutual information agrees with scikit-learn, and heatmaps and feature attacks keep their promises.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr
from sklearn.feature_selection import mutual_info_classif

from jfail.barlow import (
    PAPER_ATTACK,
    Condition,
    attack_settings,
    failure_table,
    failure_tree,
    failure_trees,
    feature_attack,
    features,
    group_indices,
    heatmap,
    most_activating,
    mutual_information,
    planted_failures,
    plot_feature_panel,
    rank_features,
    rule_recovered,
    valid_leaf_fraction,
)

NUM_ROWS, NUM_FEATURES = 160, 48  # one shape for most tests: each new shape compiles anew


def _planted(seed, feature, op, quantile, rate_in=0.9, rate_out=0.05):
    """Noise features, errors driven by `feature <op> its quantile` with label noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_ROWS, NUM_FEATURES)).astype(np.float32)
    threshold = float(np.quantile(x[:, feature], quantile))
    holds = x[:, feature] > threshold if op == ">" else x[:, feature] <= threshold
    errors = rng.random(NUM_ROWS) < np.where(holds, rate_in, rate_out)
    return x, errors, Condition(feature, op, threshold)


# ------------------------------------------------------------------------------------------
# Algorithm 1


@pytest.mark.parametrize("feature, op, quantile", [(17, ">", 0.7), (5, "<=", 0.35)])
def test_a_planted_rule_is_the_top_valid_leaf(feature, op, quantile):
    x, errors, rule = _planted(0, feature, op, quantile)
    tree = failure_tree(x, errors, num_features=10)
    leaf = tree.top_leaf
    assert tree.reason is None and leaf.valid
    assert tree.selected_features[0] == feature  # the original index, not one among the top-k
    assert [(c.feature, c.op) for c in leaf.conditions] == [(feature, op)]
    # the entropy split sits within a few order statistics of the planted threshold
    assert abs(np.mean(x[:, feature] <= leaf.conditions[0].threshold) - quantile) <= 0.05
    assert leaf.rule == f"feature {feature} {op} {leaf.conditions[0].threshold:.4g}"
    assert rule_recovered(tree, rule, x)
    # the leaf's members are exactly the rows its rule selects
    assert set(leaf.indices) == set(np.flatnonzero(leaf.conditions[0].holds(x)))
    assert set(leaf.error_indices) == set(leaf.indices[errors[leaf.indices]])


def test_metrics_on_a_hand_computed_tree():
    # Feature 0 counts 0..159, the others are constant: the errors are the 30 largest values and
    # 10 scattered ones. With errors weighted 120/40 = 3 the entropy split is at 129.5.
    x = np.ones((NUM_ROWS, NUM_FEATURES), np.float32)
    x[:, 0] = np.arange(NUM_ROWS)
    errors = np.zeros(NUM_ROWS, bool)
    errors[130:] = True
    errors[6:130:13] = True
    assert errors.sum() == 40
    tree = failure_tree(x, errors, num_features=1)
    assert list(tree.selected_features) == [0]
    high, low = tree.leaves  # by decreasing importance
    assert high.conditions == (Condition(0, ">", 129.5),) and high.rule == "feature 0 > 129.5"
    assert low.conditions == (Condition(0, "<=", 129.5),)
    assert (high.size, high.num_errors, low.size, low.num_errors) == (30, 30, 130, 10)
    assert tree.base_error_rate == pytest.approx(40 / 160)
    assert high.error_rate == pytest.approx(1.0) and low.error_rate == pytest.approx(10 / 130)
    assert high.error_coverage == pytest.approx(30 / 40) and low.error_coverage == pytest.approx(
        10 / 40
    )
    assert high.importance == pytest.approx(0.75) and low.importance == pytest.approx(10 / 520)
    assert tree.aler == pytest.approx(0.75 * 1.0 + 0.25 * 10 / 130)
    assert tree.aler_gain == pytest.approx(0.75 + 10 / 520 - 0.25)
    assert high.valid and not low.valid  # 1 > 0.25 + 0.1 and 0.75 > 0.2; 0.077 < 0.35
    assert tree.valid_leaves == (high,) and tree.reason is None
    assert tree.num_errors == 40 and tree.num_examples == NUM_ROWS
    assert "error rate increases to 1.0000 (+75.00%)" in tree.summary("toy")


def test_aler_is_the_coverage_weighted_error_rate_of_a_deep_tree():
    x, errors, _ = _planted(1, 3, ">", 0.6, rate_in=0.7, rate_out=0.2)
    tree = failure_tree(x, errors, max_depth=3, num_features=8)
    assert len(tree.leaves) > 2
    leaves = tree.leaves
    assert tree.aler == pytest.approx(sum(leaf.error_coverage * leaf.error_rate for leaf in leaves))
    assert tree.aler >= tree.base_error_rate - 1e-12  # Cauchy-Schwarz: ALER >= BER
    assert sum(leaf.error_coverage for leaf in leaves) == pytest.approx(1.0)
    assert sum(leaf.size for leaf in leaves) == NUM_ROWS
    assert sorted(np.concatenate([leaf.indices for leaf in leaves])) == list(range(NUM_ROWS))
    assert [leaf.importance for leaf in leaves] == sorted(
        (leaf.importance for leaf in leaves), reverse=True
    )
    for leaf in tree.leaves:  # the simplified rule selects exactly the leaf's rows
        selected = np.logical_and.reduce([c.holds(x) for c in leaf.conditions])
        assert set(np.flatnonzero(selected)) == set(leaf.indices)
        assert leaf.valid == (
            leaf.error_rate > tree.base_error_rate + 0.1 and leaf.error_coverage > 0.2
        )
        assert len({(c.feature, c.op) for c in leaf.conditions}) == len(leaf.conditions)


def test_every_way_of_having_no_valid_leaf_says_why():
    x, errors, _ = _planted(0, 17, ">", 0.7)
    few = np.zeros(NUM_ROWS, bool)
    few[3] = True
    tree = failure_tree(x, few)
    assert tree.reason.startswith("too few errors: 1 of 160")
    assert tree.valid_leaves == () and tree.aler == pytest.approx(tree.base_error_rate)
    assert tree.leaves[0].rule == "all examples" and len(tree.selected_features) == 0

    assert failure_tree(x, np.ones(NUM_ROWS, bool)).reason.startswith(
        "no leaf can pass: BER + delta"
    )
    strict = failure_tree(x, errors, num_features=10, delta=0.6)
    assert strict.reason.startswith("no leaf passes both thresholds")
    assert "<= BER + delta" in strict.reason and "EC" not in strict.reason

    # two planted causes: the depth-1 tree takes one and covers about half of the errors
    either = (x[:, 17] > 1.0) | (x[:, 5] < -1.0)
    halves = failure_tree(x, either, num_features=10, tau=0.8)
    assert halves.top_leaf.error_coverage < 0.8
    assert halves.reason.startswith("no leaf passes") and "<= tau = 0.8000" in halves.reason

    constant = failure_tree(np.ones((NUM_ROWS, NUM_FEATURES), np.float32), errors)
    assert constant.reason.startswith("no informative feature: every selected feature has zero")

    # errors unrelated to the features: with this draw the best MI is below chance level (with
    # others a leaf can pass by luck, as Algorithm 1 scores leaves on the data it fits them to)
    noise_errors = np.random.default_rng(10).random(NUM_ROWS) < 0.3
    noise = failure_tree(x, noise_errors, num_features=10)
    assert noise.reason.startswith("no informative feature: the largest mutual information")
    assert "randomly permuted errors" in noise.reason


def test_many_groups_by_label_match_one_group_at_a_time():
    data = planted_failures(  # 130-190 rows per group: the same padded size as NUM_ROWS
        key=jax.random.key(3), num_groups=6, group_size=(130, 190), num_features=NUM_FEATURES
    )
    groups = group_indices(data.groups)
    assert list(groups) == list(range(6)) and sum(map(len, groups.values())) == len(data.errors)
    exact = failure_trees(data.features, data.errors, data.groups, screen=None, num_features=10)
    screened = failure_trees(data.features, data.errors, groups, screen=16, num_features=10)
    recovered = [rule_recovered(exact[g], data.rules[g], data.features) for g in groups]
    assert np.mean(recovered) >= 5 / 6
    for g in (0, 3):
        alone = failure_tree(data.features[groups[g]], data.errors[groups[g]], num_features=10)
        assert exact[g].top_leaf.rule == alone.top_leaf.rule
        np.testing.assert_array_equal(groups[g][alone.top_leaf.indices], exact[g].top_leaf.indices)
        np.testing.assert_allclose(exact[g].mutual_information, alone.mutual_information, rtol=1e-6)
    for g in groups:  # screening keeps the planted feature, so the same rule comes out
        assert screened[g].selected_features[0] == exact[g].selected_features[0]
        assert screened[g].top_leaf.rule == exact[g].top_leaf.rule
    assert valid_leaf_fraction(exact) == np.mean([t.top_leaf.valid for t in exact.values()])
    table = failure_table(exact, {g: f"class {g}" for g in groups})
    assert table.count("\n") == 7 and "| class 0 |" in table


# ------------------------------------------------------------------------------------------
# Mutual information


def test_jax_mutual_information_ranks_features_as_scikit_learn_does():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(NUM_ROWS, NUM_FEATURES)).astype(np.float32)
    errors = rng.random(NUM_ROWS) < 0.3
    for feature, strength in zip((11, 30, 2, 44), (2.0, 1.4, 1.0, 0.8)):  # graded signal
        x[:, feature] += strength * errors
    x[:, 7] = np.maximum(x[:, 7], 0.0)  # half exact zeros: ties broken by the jitter
    ours = mutual_information(x, errors, key=jax.random.key(0))
    reference = mutual_info_classif(x, errors, random_state=0)
    assert ours.shape == (NUM_FEATURES,) and ours.dtype == np.float32
    assert np.argmax(ours) == np.argmax(reference) == 11
    assert set(np.argsort(-ours)[:4]) == set(np.argsort(-reference)[:4]) == {11, 30, 2, 44}
    assert spearmanr(ours, reference)[0] > 0.95
    # the same estimator, not just the same order (float32 against float64); where half the
    # values tie at 0 both draw their own tie-breaking noise and agree only that MI is small
    continuous = np.arange(NUM_FEATURES) != 7
    np.testing.assert_allclose(ours[continuous], reference[continuous], atol=1e-4)
    assert max(ours[7], reference[7]) < 0.05

    ranking = rank_features(
        x, errors, [np.arange(NUM_ROWS)], num_features=4, screen=None, key=jax.random.key(0)
    )
    np.testing.assert_array_equal(ranking.indices[0], np.argsort(-ours)[:4])
    np.testing.assert_allclose(ranking.mutual_information[0], np.sort(ours)[::-1][:4], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Features, heatmaps, feature attacks


def _pixels(w, x):
    return x.reshape(x.shape[0], -1) @ w


def _tiny_features(seed, shape=(8, 8, 1), dim=4):
    """A linear-softplus feature extractor whose weights travel in a Partial."""
    rng = np.random.default_rng(seed)  # numpy draws: no compilation in the tests
    weights = rng.normal(size=(int(np.prod(shape)), dim)).astype(np.float32)
    weights /= np.sqrt(np.prod(shape))
    return jax.tree_util.Partial(lambda w, x: jax.nn.softplus(_pixels(w, x)), weights)


def _tiny_feature_map(scale):
    """[B, 8, 8, 1] -> [B, 4, 4, 2]: channel 0 the 2x2-pooled image, channel 1 a constant."""

    def feature_map(s, x):
        pooled = x.reshape(x.shape[0], 4, 2, 4, 2).mean(axis=(2, 4)) * s
        return jnp.stack([pooled, jnp.ones_like(pooled)], axis=-1)

    return jax.tree_util.Partial(feature_map, jnp.asarray(scale))


def test_features_are_batched_and_match_a_direct_call():
    fn = _tiny_features(0)
    images = np.random.default_rng(1).random((11, 8, 8, 1), np.float32)
    out = features(fn, images, batch_size=4)
    assert out.shape == (11, 4) and isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, np.asarray(fn(images)), rtol=1e-5, atol=1e-6)
    top = most_activating(out, 2, 3)
    assert list(top) == list(np.argsort(-out[:, 2])[:3])
    assert set(most_activating(out, 2, 2, among=[0, 1, 5])) <= {0, 1, 5}


def test_heatmaps_are_in_the_unit_interval_and_point_at_the_feature():
    images = np.zeros((3, 8, 8, 1), np.float32)
    images[0, :2, :2] = 1.0  # bright top-left corner
    images[1, 6:, 6:] = 1.0  # bright bottom-right corner
    images[2] = 0.5
    maps = heatmap(_tiny_feature_map(2.0), images, 0)
    assert maps.shape == (3, 8, 8) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert maps[0, 0, 0] == pytest.approx(1.0) and maps[0, 7, 7] == pytest.approx(0.0)
    assert maps[1, 7, 7] == pytest.approx(1.0) and maps[1, 0, 0] == pytest.approx(0.0)
    np.testing.assert_array_equal(maps[2], 0.0)  # a constant map has nothing to show
    assert heatmap(_tiny_feature_map(1.0), images, [0, 1, 0], image_size=(16, 12)).shape == (
        3,
        16,
        12,
    )


def test_feature_attack_raises_its_feature_inside_the_ball_and_the_box():
    fn = _tiny_features(4)
    images = np.random.default_rng(5).random((6, 8, 8, 1), np.float32)
    epsilon = 0.8
    attacked = feature_attack(fn, images, 1, epsilon=epsilon, step_size=0.2, steps=12)
    assert attacked.shape == images.shape
    before, after = np.asarray(fn(images))[:, 1], np.asarray(fn(attacked))[:, 1]
    assert np.all(after > before + 0.05)
    distance = np.linalg.norm((attacked - images).reshape(6, -1), axis=1)
    assert distance.max() <= epsilon * (1 + 1e-5)
    assert distance.min() > 0.5 * epsilon  # it used the budget
    assert attacked.min() >= 0.0 and attacked.max() <= 1.0
    other = feature_attack(fn, images, [0, 1, 2, 3, 0, 1], epsilon=epsilon, step_size=0.2, steps=12)
    np.testing.assert_allclose(other[1], attacked[1], atol=1e-6)


def test_attack_settings_keep_the_papers_per_pixel_budget():
    assert attack_settings((224, 224, 3)) == pytest.approx(PAPER_ATTACK)
    epsilon, step, steps = attack_settings((28, 28, 1))
    assert epsilon == pytest.approx(500 * 28 / np.sqrt(224 * 224 * 3))
    assert step == pytest.approx(28 / np.sqrt(224 * 224 * 3)) and steps == 500
    assert epsilon / np.sqrt(784) == pytest.approx(500 / np.sqrt(224 * 224 * 3))


def test_the_feature_panel_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    top = rng.random((4, 8, 8, 3)).astype(np.float32)
    path = plot_feature_panel(
        top,
        rng.random((4, 8, 8)),
        rng.random((3, 8, 8, 3)),
        np.zeros((0, 8, 8, 3)),
        "feature 3: when feature 3 > 0.5",
        tmp_path / "panel.png",
    )
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] / 2


# ------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_are_refused_with_a_reason():
    x, errors, _ = _planted(0, 17, ">", 0.7)
    with pytest.raises(ValueError, match="160 rows but errors has 159"):
        failure_tree(x, errors[:-1])
    nan = x.copy()
    nan[4, 9] = np.nan
    with pytest.raises(ValueError, match="NaN.*row 4, feature 9"):
        failure_tree(nan, errors)
    with pytest.raises(ValueError, match="2-D"):
        failure_tree(x[0], errors[:1])
    with pytest.raises(ValueError, match="empty"):
        failure_tree(x[:0], errors[:0])
    with pytest.raises(ValueError, match="group 1 is empty"):
        failure_trees(x, errors, {"a": np.arange(5), "b": np.arange(0)})
    with pytest.raises(ValueError, match="outside"):
        failure_trees(x, errors, {"a": np.arange(200)})
    with pytest.raises(ValueError, match="booleans"):
        failure_tree(x, errors * 2)
    with pytest.raises(ValueError, match="feature_names has 2"):
        failure_tree(x, errors, feature_names=["a", "b"])
    with pytest.raises(ValueError, match="one group id per example"):
        failure_trees(x, errors, np.zeros(3, int))
    fn = _tiny_features(0)
    images = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        feature_attack(fn, images, 4, steps=1)
    with pytest.raises(ValueError, match="4-D"):
        features(fn, images[..., 0])
    with pytest.raises(ValueError, match="feature map"):
        heatmap(fn, images, 0)
    with pytest.raises(ValueError, match="pooled features"):
        features(_tiny_feature_map(1.0), images)
    with pytest.raises(ValueError, match="NaN"):
        features(fn, np.full((2, 8, 8, 1), np.nan, np.float32))


_EIGHT_DEVICES = f"""
import json, jax, numpy as np
from jfail.barlow import features, rank_features
rng = np.random.default_rng(0)
x = rng.normal(size=({NUM_ROWS}, {NUM_FEATURES})).astype(np.float32)
errors = x[:, 3] + 0.5 * rng.normal(size={NUM_ROWS}) > 0.8
ranking = rank_features(x, errors, [np.arange({NUM_ROWS})], num_features=4, screen=None,
                        key=jax.random.key(0))
w = np.linspace(-1, 1, 64 * 4, dtype=np.float32).reshape(64, 4)
fn = jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)
images = rng.random((11, 8, 8, 1)).astype(np.float32)
print(json.dumps({{
    "devices": jax.device_count(),
    "indices": ranking.indices.tolist(),
    "mi": ranking.mutual_information.tolist(),
    "features": features(fn, images, batch_size=4).tolist(),
}}))
"""


def test_sharding_over_eight_devices_changes_nothing():
    """The same ranking and features on one device (here) and on eight (a subprocess)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    eight = json.loads(done.stdout.strip().splitlines()[-1])
    one = {}
    exec(_EIGHT_DEVICES.replace("print(json.dumps(", "one.update(("), {"one": one})
    assert (one["devices"], eight["devices"]) == (jax.device_count(), 8)
    assert one["indices"] == eight["indices"]
    np.testing.assert_allclose(one["mi"], eight["mi"], atol=2e-6)  # summation order
    # 64-term float32 dot products of values near 1, summed in a shape-dependent order
    np.testing.assert_allclose(one["features"], eight["features"], rtol=1e-5, atol=1e-5)


def test_features_to_store_equal_features_over_a_source(tmp_path):
    from jfail.barlow import features_to_store
    from jfail.data import ArraySource

    fn = _tiny_features(0)
    images = np.random.default_rng(1).random((11, 8, 8, 1), np.float32)
    source = ArraySource(images, np.arange(11) % 2, ("a", "b"), "eleven")
    stored = features_to_store(fn, source, tmp_path / "features", batch_size=4, progress=False)
    assert stored["features"].shape == (11, 4)
    np.testing.assert_allclose(stored["features"][...], features(fn, images, batch_size=4),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"pooled features \[B, D\], got \(1, 4, 4, 2\)"):
        features_to_store(_tiny_feature_map(1.0), source, tmp_path / "maps", batch_size=4)
