"""Annotation of failure scenarios: majority votes, the ρ rule, the CSV round trip, the MLP."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jfail.config import load_config
from jfail.defuse import (
    NONE_OF_THE_ABOVE,
    Annotator,
    FileAnnotator,
    MajorityVote,
    annotator_agreement,
    majority_label,
    review_scenarios,
    reviews_from_labels,
)
from jfail.models import MLP, MODEL_NAMES, build_classifier, init_classifier, linen_apply
from jfail.train import TrainConfig, TrainState, make_optimizer, make_train_step

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 4
SIDE = 4  # images are [SIDE, SIDE, 1]
CLASS_NAMES = ("T-shirt", "Coat", "Bag", "Sandal")


def _linear(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _constant(label: int) -> jax.tree_util.Partial:
    """A classifier that predicts `label` for every image."""
    w = jnp.zeros((SIDE * SIDE, NUM_CLASSES))
    return jax.tree_util.Partial(_linear, {"w": w, "b": jax.nn.one_hot(label, NUM_CLASSES)})


def _reader() -> jax.tree_util.Partial:
    """A classifier that predicts the class `c` of an image whose flat pixel `c` is lit."""
    w = jnp.eye(SIDE * SIDE, NUM_CLASSES)
    return jax.tree_util.Partial(_linear, {"w": w, "b": jnp.zeros(NUM_CLASSES)})


def _images_of(classes) -> np.ndarray:
    """[N, SIDE, SIDE, 1] images that `_reader` classifies as `classes`."""
    classes = np.asarray(classes)
    flat = np.zeros((classes.size, SIDE * SIDE), np.float32)
    flat[np.arange(classes.size), classes.reshape(-1)] = 1.0
    return flat.reshape(*classes.shape, SIDE, SIDE, 1)


# --------------------------------------------------------------------------------------------
# Majority vote and agreement.


def test_a_strict_majority_decides_and_a_split_vote_is_none_of_the_above():
    images = _images_of([0, 1, 2])
    three_of_five = MajorityVote([_constant(c) for c in (1, 2, 1, 3, 1)])
    np.testing.assert_array_equal(three_of_five.label(images), [1, 1, 1])
    np.testing.assert_array_equal(three_of_five.votes(images), [[1, 2, 1, 3, 1]] * 3)
    split = MajorityVote([_constant(c) for c in (1, 1, 2, 2, 3)])
    np.testing.assert_array_equal(split.label(images), [NONE_OF_THE_ABOVE] * 3)
    assert isinstance(split, Annotator) and split.num_voters == 5

    votes = [[0, 0, 0, 1, 2], [0, 0, 1, 1, 2], [3, 3, 3, 3, 3], [2, 1, 0, 3, 2]]
    np.testing.assert_array_equal(majority_label(votes), [0, -1, 3, -1])
    np.testing.assert_array_equal(majority_label([[1, 1, 2, 2], [1, 1, 1, 2]]), [-1, 1])


def test_voters_that_read_the_image_outvote_a_constant_one_batch_by_batch():
    classes = np.array([0, 1, 2, 3, 2, 1, 0, 3, 3])
    annotator = MajorityVote([_reader(), _constant(1), _reader()], batch_size=4)
    np.testing.assert_array_equal(annotator.label(_images_of(classes)), classes)
    votes = annotator.votes(_images_of(classes))
    np.testing.assert_array_equal(votes, np.stack([classes, np.ones_like(classes), classes], 1))


def test_agreement_is_the_mean_fraction_of_voters_with_the_most_common_label():
    assert annotator_agreement([[1, 1, 1, 1, 1]]) == 1.0
    assert annotator_agreement([[1, 1, 1, 2, 3]]) == pytest.approx(0.6)
    assert annotator_agreement([[1, 1, 2, 2, 3]]) == pytest.approx(0.4)
    assert annotator_agreement([[1, 1, 1, 2, 3], [1, 1, 2, 2, 3]]) == pytest.approx(0.5)
    assert annotator_agreement([[0, 1, 2]]) == pytest.approx(1 / 3)
    assert annotator_agreement([[-1, -1, 4]]) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# Reviews and the ρ rule.


def test_a_scenario_fails_only_when_strictly_more_than_rho_of_its_samples_disagree():
    predictions = np.zeros((4, 10), np.int64)
    labels = np.array(
        [
            [2] * 5 + [0] * 5,  # disagreement exactly 0.5: not a failure
            [2] * 6 + [0] * 4,  # 0.6: a failure labelled 2
            [NONE_OF_THE_ABOVE] * 10,  # all disagree, but no label: not a failure
            [NONE_OF_THE_ABOVE] * 4 + [3] * 2 + [1] * 2 + [0] * 2,  # 0.8, ties go to class 0
        ]
    )
    reviews = reviews_from_labels(labels, predictions)
    assert [r.disagreement for r in reviews] == [0.5, 0.6, 1.0, 0.8]
    assert [r.is_failure for r in reviews] == [False, True, False, True]
    assert [r.label for r in reviews] == [0, 2, NONE_OF_THE_ABOVE, 0]
    assert all(math.isnan(r.agreement) for r in reviews)
    np.testing.assert_array_equal(reviews[1].sample_labels, labels[1])

    stricter = reviews_from_labels(labels, predictions, rho=0.6)
    assert [r.is_failure for r in stricter] == [False, False, False, True]
    quarter = reviews_from_labels([[1, 0, 0, 0], [1, 1, 0, 0]], np.zeros((2, 4), int), rho=0.25)
    assert [r.is_failure for r in quarter] == [False, True]


def test_review_scenarios_compares_the_voters_with_the_classifier():
    # Scenario 0: 5 of 10 samples show class 2 (disagreement 0.5); scenario 1: 6 show class 3.
    samples = _images_of([[2] * 5 + [0] * 5, [3] * 6 + [0] * 4])
    annotator = MajorityVote([_reader(), _reader(), _constant(1)], batch_size=7)
    reviews = review_scenarios(annotator, _constant(0), samples, batch_size=7)
    assert [r.is_failure for r in reviews] == [False, True]
    assert [r.disagreement for r in reviews] == [0.5, 0.6]
    assert [r.label for r in reviews] == [0, 3]
    np.testing.assert_array_equal(reviews[1].predictions, np.zeros(10))
    assert [r.agreement for r in reviews] == pytest.approx([2 / 3, 2 / 3])

    class Oracle:  # an annotator with no per-worker votes
        def label(self, images):
            return np.full(len(images), 3)

    reviews = review_scenarios(Oracle(), _constant(0), samples)
    assert [r.is_failure for r in reviews] == [True, True]
    assert all(math.isnan(r.agreement) for r in reviews)


def test_bad_annotation_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least one classifier"):
        MajorityVote([])
    with pytest.raises(ValueError, match="4-D"):
        MajorityVote([_reader()]).label(np.zeros((SIDE, SIDE, 1), np.float32))
    with pytest.raises(ValueError, match=r"\[K, Q, H, W, C\]"):
        review_scenarios(MajorityVote([_reader()]), _constant(0), _images_of([0, 1]))
    with pytest.raises(ValueError, match="must both be"):
        reviews_from_labels([[0, 1]], [[0, 1, 2]])
    with pytest.raises(ValueError, match=r"rho must be in \[0, 1\]"):
        reviews_from_labels([[0, 1]], [[0, 1]], rho=1.5)

    class Short:
        def label(self, images):
            return np.zeros(len(images) - 1, int)

    with pytest.raises(ValueError, match="annotator labels must be"):
        review_scenarios(Short(), _constant(0), _images_of([[0, 1]]))


# --------------------------------------------------------------------------------------------
# The file round trip.


def _read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(csv_path: Path, rows: list[dict]) -> None:
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_exported_samples_come_back_with_the_labels_filled_in(tmp_path, channels, mode):
    rng = np.random.default_rng(0)
    samples = rng.uniform(size=(2, 3, 5, 6, channels)).astype(np.float32)
    predictions = np.array([[0, 1, 2], [3, 0, 0]])
    csv_path = FileAnnotator.export(tmp_path, samples, predictions, CLASS_NAMES)

    rows = _read_rows(csv_path)
    assert list(rows[0]) == ["scenario", "sample", "file", "prediction", "label"]
    assert [(r["scenario"], r["sample"]) for r in rows] == [
        (str(k), str(q)) for k in range(2) for q in range(3)
    ]
    assert [r["prediction"] for r in rows] == [CLASS_NAMES[p] for p in predictions.ravel()]
    assert all(r["label"] == "" for r in rows)
    png = Image.open(tmp_path / rows[4]["file"])
    assert rows[4]["file"] == "scenario_001/sample_01.png" and png.mode == mode
    pixels = np.asarray(png).reshape(5, 6, channels)
    np.testing.assert_array_equal(pixels, np.round(samples[1, 1] * 255).astype(np.uint8))

    filled = ["Bag", " coat ", "none", "3", "0", "NONE"]
    for row, value in zip(rows, filled):
        row["label"] = value
    _write_rows(csv_path, rows[::-1])  # the row order does not matter
    labels = FileAnnotator.load(tmp_path, CLASS_NAMES)
    np.testing.assert_array_equal(labels, [[2, 1, -1], [3, 0, -1]])

    reviews = reviews_from_labels(labels, predictions)
    assert [r.disagreement for r in reviews] == pytest.approx([2 / 3, 1 / 3])
    assert [r.is_failure for r in reviews] == [True, False]


def test_unfilled_unknown_and_overwritten_labels_are_errors(tmp_path):
    samples = np.full((1, 4, SIDE, SIDE, 1), 0.5, np.float32)
    csv_path = FileAnnotator.export(tmp_path, samples, np.zeros((1, 4), int), CLASS_NAMES)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        FileAnnotator.export(tmp_path, samples, np.zeros((1, 4), int), CLASS_NAMES)

    rows = _read_rows(csv_path)
    for row, value in zip(rows, ["Bag", "", "1", ""]):
        row["label"] = value
    _write_rows(csv_path, rows)
    with pytest.raises(ValueError, match=r"2 unfilled label\(s\).*line 3 \(scenario 0, sample 1\)"):
        FileAnnotator.load(tmp_path, CLASS_NAMES)

    for row, value in zip(rows, ["Bag", "banana", "1", "none"]):
        row["label"] = value
    _write_rows(csv_path, rows)
    with pytest.raises(ValueError, match="line 3: unknown label 'banana'.*T-shirt, Coat"):
        FileAnnotator.load(tmp_path, CLASS_NAMES)

    rows[1]["label"] = str(NUM_CLASSES)  # an index out of range
    _write_rows(csv_path, rows)
    with pytest.raises(ValueError, match=r"line 3: unknown label '4'.*\[0, 4\)"):
        FileAnnotator.load(tmp_path, CLASS_NAMES)

    _write_rows(csv_path, rows[:1] + rows[2:])
    with pytest.raises(ValueError, match=r"missing \(scenario 0, sample 1\)"):
        FileAnnotator.load(tmp_path, CLASS_NAMES)

    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        FileAnnotator.export(tmp_path / "bright", samples * 3, np.zeros((1, 4), int), CLASS_NAMES)


# --------------------------------------------------------------------------------------------
# The annotators' MLP.


@pytest.fixture(scope="module")
def small_mlp():
    module = build_classifier("mlp", 3, hidden=(32, 16))
    params, state = init_classifier(module, (8, 8, 1), jax.random.key(0))
    return module, params, state


def test_mlp_is_registered_and_has_logits_and_features_taps(small_mlp):
    assert "mlp" in MODEL_NAMES
    default = build_classifier("mlp", 10)
    assert isinstance(default, MLP) and tuple(default.hidden) == (512, 256)
    module, params, state = small_mlp
    assert state == {}
    x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
    variables = {"params": params}
    taps = module.apply(variables, x, output="taps")
    assert set(taps) == {"logits", "features"}
    assert taps["logits"].shape == (5, 3) and taps["features"].shape == (5, 16)
    np.testing.assert_allclose(module.apply(variables, x), taps["logits"], rtol=1e-6)
    classifier = params["classifier"]
    np.testing.assert_allclose(
        taps["logits"], taps["features"] @ classifier["kernel"] + classifier["bias"],
        rtol=1e-5, atol=1e-5,
    )
    with pytest.raises(ValueError, match="feature_map"):
        module.apply(variables, x, output="feature_map")


def test_mlp_training_steps_lower_the_loss(small_mlp):
    module, params, state = small_mlp
    config = TrainConfig(optimizer="adam", learning_rate=1e-2, batch_size=64, epochs=1)
    tx = make_optimizer(config, steps_per_epoch=1)
    step = make_train_step(linen_apply(module), tx)
    train_state = TrainState(params, state, tx.init(params), jnp.zeros((), jnp.int32))
    x = jax.random.uniform(jax.random.key(1), (64, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 3)
    losses = []
    for _ in range(30):
        train_state, metrics = step(train_state, x, y, jnp.ones(64))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name, dataset, epochs", [("fmnist", "fashion_mnist", 5),
                                                    ("mnist5k", "mnist5k", 20)])
def test_annotator_configs_train_an_adam_mlp(name, dataset, epochs):
    config = load_config(REPO / "configs" / f"annotator_mlp_{name}.py")
    assert config.model == "mlp" and config.dataset == dataset
    assert config.train.optimizer == "adam" and config.train.learning_rate == 1e-3
    assert config.train.batch_size == 128 and config.train.epochs == epochs
