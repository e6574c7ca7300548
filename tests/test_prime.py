"""Tests for jfail.prime: tags, the exhaustive and greedy search, evaluation, synthetic problems."""

import dataclasses
import itertools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail import prime
from jfail.config import load_config
from jfail.prime import (
    FailureMode,
    TagMatrix,
    find_failure_modes,
    planted_problem,
)

GAINS = (0.10, 0.05, 0.025)


# ---------------------------------------------------------------- an independent brute force


def brute_force_counts(tags, correct, min_size, max_tags):
    """{tag tuple: (size, correct)} for every set with >= min_size images, by plain enumeration."""
    counts = {}
    columns = [t for t in range(tags.shape[1]) if tags[:, t].sum() >= min_size]
    for k in range(1, max_tags + 1):
        for subset in itertools.combinations(columns, k):
            mask = tags[:, list(subset)].all(axis=1)
            if mask.sum() >= min_size:
                counts[subset] = (int(mask.sum()), int(correct[mask].sum()))
    return counts


def brute_force_modes(tags, correct, labels, *, min_size, min_drop, min_gain=GAINS, max_tags=4,
                      min_tag_count=0):
    found = []
    for label in np.unique(labels):
        members = labels == label
        class_tags = tags[members] & (tags[members].sum(0) >= min_tag_count)[None, :]
        class_correct = correct[members]
        class_accuracy = class_correct.mean()
        counts = brute_force_counts(class_tags, class_correct, min_size, max_tags)
        for subset, (size, hits) in counts.items():
            accuracy = hits / size
            if accuracy > class_accuracy - min_drop + 1e-9:
                continue
            if len(subset) > 1 and not all(
                counts[tuple(x for x in subset if x != t)][1]
                / counts[tuple(x for x in subset if x != t)][0]
                >= accuracy + min_gain[len(subset) - 2] - 1e-9
                for t in subset
            ):
                continue
            found.append((int(label), subset))
    return sorted(found)


def correlated_problem(seed=0, n=2400, num_tags=10, num_classes=3):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 2))
    loadings = rng.uniform(-1, 1, size=(2, num_tags))
    tags = latent @ loadings + rng.normal(size=(n, num_tags)) > rng.uniform(0.0, 1.2, num_tags)
    labels = rng.integers(0, num_classes, n)
    risk = 0.1 + 0.5 * (tags[:, 0] & tags[:, 1]) + 0.4 * (tags[:, 2] & tags[:, 3] & tags[:, 4])
    correct = rng.random(n) > risk
    return tags, correct, labels


def check_mode_conditions(mode, tags, correct, labels, min_size, min_drop, gains):
    members = labels == mode.label
    class_accuracy = correct[members].mean()
    mask = members & tags[:, list(mode.tag_indices)].all(axis=1)
    assert mask.sum() == mode.size >= min_size
    accuracy = correct[mask].mean()
    assert accuracy == pytest.approx(mode.accuracy)
    assert accuracy <= class_accuracy - min_drop + 1e-9
    for t in mode.tag_indices:
        rest = [x for x in mode.tag_indices if x != t]
        if rest:
            sub = members & tags[:, rest].all(axis=1)
            assert correct[sub].mean() >= accuracy + gains[len(mode.tag_indices) - 2] - 1e-9


# ---------------------------------------------------------------- search


def test_pack_bits_round_trips_and_pads_with_zeros():
    rng = np.random.default_rng(0)
    mask = rng.random((3, 70)) < 0.5
    words = prime.pack_bits(mask, 4)
    assert words.shape == (3, 4) and words.dtype == np.uint32
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little").astype(bool)
    np.testing.assert_array_equal(bits[:, :70], mask)
    assert not bits[:, 70:].any()


def test_exhaustive_search_equals_brute_force():
    tags, correct, labels = correlated_problem()
    kwargs = dict(min_size=25, min_drop=0.15, max_tags=4)
    modes = find_failure_modes(tags, errors=~correct, labels=labels, **kwargs)
    expected = brute_force_modes(tags, correct, labels, **kwargs)
    assert len(expected) >= 5
    assert sorted((m.label, m.tag_indices) for m in modes) == expected
    for mode in modes:
        check_mode_conditions(mode, tags, correct, labels, 25, 0.15, GAINS)
    # min_tag_count drops rare tags per class before the search
    filtered = find_failure_modes(tags, errors=~correct, labels=labels, min_tag_count=400, **kwargs)
    assert sorted((m.label, m.tag_indices) for m in filtered) == brute_force_modes(
        tags, correct, labels, min_tag_count=400, **kwargs)


def test_count_frequent_tag_sets_equals_brute_force():
    tags, correct, _ = correlated_problem(seed=1, n=900, num_tags=9)
    counts = prime.count_frequent_tag_sets(tags, errors=~correct, min_size=20, max_tags=4)
    got = {tuple(int(t) for t in row): (int(s), int(h))
           for sets, sizes, hits in zip(*counts) for row, s, h in zip(sets, sizes, hits)}
    assert got == brute_force_counts(tags, correct, 20, 4)
    for sets in counts.sets:  # rows ascending and in lexicographic order
        assert (np.diff(sets, axis=1) > 0).all()
        assert [tuple(r) for r in sets] == sorted(tuple(r) for r in sets)


def test_greedy_finds_a_subset_and_everything_with_a_wide_beam():
    tags, correct, labels = correlated_problem(seed=2)
    kwargs = dict(min_size=25, min_drop=0.15)
    exhaustive = {(m.label, m.tag_indices)
                  for m in find_failure_modes(tags, errors=~correct, labels=labels, **kwargs)}
    narrow = find_failure_modes(tags, errors=~correct, labels=labels, method="greedy",
                                beam_width=2, **kwargs)
    wide = find_failure_modes(tags, errors=~correct, labels=labels, method="greedy",
                              beam_width=10_000, **kwargs)
    assert {(m.label, m.tag_indices) for m in narrow} <= exhaustive
    assert len(narrow) < len(exhaustive)
    assert {(m.label, m.tag_indices) for m in wide} == exhaustive
    for mode in narrow:
        check_mode_conditions(mode, tags, correct, labels, 25, 0.15, GAINS)


def test_planted_modes_of_one_to_four_tags_are_recovered_exactly():
    prevalence = np.array([0.15] * 4 + [0.3] * 8)
    planted = [(0, (0,)), (1, (0, 1)), (2, (0, 1, 2)), (3, (0, 1, 2, 3))]
    problem = planted_problem(key=jax.random.key(0), num_classes=5, images_per_class=100_000,
                              tag_prevalence=prevalence, planted=planted, base_accuracy=0.95)
    modes = find_failure_modes(problem.tags, errors=problem.errors, labels=problem.labels,
                               tag_names=problem.tag_names, min_size=30, min_drop=0.30)
    scores = prime.recovery_scores(modes, problem.planted)
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0, scores
    for mode in modes:  # class 4 has no planted mode and yields none
        check_mode_conditions(mode, problem.tags, problem.correct, problem.labels, 30, 0.30, GAINS)
        assert mode.accuracy == 0.0 and mode.describe(None).startswith(f"class {mode.label}: tag0")


def test_boundary_cases_of_the_three_conditions():
    # class of 10: tag0 on 5 images, 2 of them correct (A_S = 0.4); class accuracy 0.7
    tags = np.zeros((10, 2), bool)
    tags[:5, 0] = True
    tags[:, 1] = True  # a tag on every image: A = A_c, never a mode, and {0, 1} not minimal
    correct = np.array([1, 1, 0, 0, 0, 1, 1, 1, 1, 1], bool)
    labels = np.zeros(10, np.int64)
    modes = find_failure_modes(tags, errors=~correct, labels=labels, min_size=5, min_drop=0.3)
    assert [(m.tags, m.size, m.accuracy) for m in modes] == [(("tag0",), 5, 0.4)]
    assert modes[0].class_accuracy == pytest.approx(0.7) and modes[0].drop == pytest.approx(0.3)
    assert find_failure_modes(tags, errors=~correct, labels=labels, min_size=6, min_drop=0.3) == []
    assert find_failure_modes(tags, errors=~correct, labels=labels, min_size=5, min_drop=0.31) == []


def test_tag_matrix_names_and_records():
    tags, correct, labels = correlated_problem(seed=3)
    names = tuple(f"t{i}" for i in range(tags.shape[1]))
    modes = find_failure_modes(TagMatrix(tags, names), errors=~correct, labels=labels,
                               min_size=25, min_drop=0.15)
    assert modes and all(isinstance(m, FailureMode) for m in modes)
    assert all(m.tags == tuple(names[i] for i in m.tag_indices) for m in modes)
    keys = [(m.label, len(m.tags), m.accuracy) for m in modes]
    assert keys == sorted(keys)
    assert json.loads(json.dumps(modes[0]._asdict()))["label"] == modes[0].label


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(labels=np.zeros(5, np.int64)), "same images"),
        (dict(errors=np.zeros(7, bool)), "same images"),
        (dict(tags=np.full((6, 3), 2)), "0/1"),
        (dict(tags=np.ones(6, bool)), "2-D"),
        (dict(labels=np.array([0, 0, 0, 1, 1, 1.0])), "integer"),
        (dict(kwargs=dict(num_classes=3)), r"class\(es\) \[2\] have no images"),
        (dict(kwargs=dict(classes=[0, 4])), r"class\(es\) \[4\] have no images"),
        (dict(kwargs=dict(min_size=4)), "larger than class"),
        (dict(kwargs=dict(min_gain=(0.1,))), "min_gain needs"),
        (dict(kwargs=dict(tag_names=("a", "b"))), "tag_names"),
        (dict(kwargs=dict(method="random")), "method"),
        (dict(kwargs=dict(min_drop=1.5)), "min_drop"),
        (dict(kwargs=dict(max_tags=0)), "max_tags"),
    ],
)
def test_bad_input_raises_clear_errors(change, message):
    args = dict(tags=np.ones((6, 3), bool), errors=np.zeros(6, bool),
                labels=np.array([0, 0, 0, 1, 1, 1]))
    args.update({k: v for k, v in change.items() if k != "kwargs"})
    kwargs = {"min_size": 2, **change.get("kwargs", {})}
    with pytest.raises(ValueError, match=message):
        find_failure_modes(args["tags"], errors=args["errors"], labels=args["labels"], **kwargs)


# ---------------------------------------------------------------- tags


def test_frequent_tags_tables_backgrounds_and_concat(tmp_path):
    tags = np.array([[1, 0], [1, 1], [0, 1], [1, 1]], bool)
    np.testing.assert_array_equal(prime.frequent_tags(tags, np.array([0, 0, 1, 1]), 2),
                                  [[True, False], [False, True]])
    csv = tmp_path / "attributes.csv"
    csv.write_text("image_id,Smiling,Eyeglasses\n1.jpg,1,-1\n2.jpg,-1,-1\n3.jpg,1,1\n")
    table = prime.tags_from_table(csv, drop_columns=["image_id"])
    assert table.names == ("Smiling", "Eyeglasses")
    np.testing.assert_array_equal(table.tags, [[1, 0], [0, 0], [1, 1]])
    picked = prime.tags_from_table(np.array([[0, 1, 1], [1, 0, 1]]), names=["a", "b", "c"],
                                   columns=["c", "a"])
    assert picked.names == ("c", "a") and picked.tags.tolist() == [[True, False], [True, True]]
    backgrounds = prime.background_tags(np.array([0, 1, 1]), ["land", "water"])
    assert backgrounds.tags.tolist() == [[True, False], [False, True], [False, True]]
    both = prime.concat_tags(table, backgrounds)
    assert both.names == ("Smiling", "Eyeglasses", "land", "water") and both.tags.shape == (3, 4)
    assert both.select(["water", "Smiling"]).tags[:, 0].tolist() == [False, True, True]
    with pytest.raises(ValueError, match="distinct"):
        prime.concat_tags(table, table)
    with pytest.raises(KeyError, match="not in the table"):
        prime.tags_from_table(csv, columns=["Bald"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,yes\n")
    with pytest.raises(ValueError, match="numbers"):
        prime.tags_from_table(bad)
    with pytest.raises(ValueError, match=r"background indices"):
        prime.background_tags(np.array([0, 2]), ["land", "water"])


def _shape_images():
    """Bright shapes on black: thin / thick bars, a ring, slanted strokes, an off-centre blob."""
    images = np.zeros((7, 28, 28, 1), np.float32)
    images[0, 4:24, 13:15] = 1.0  # thin vertical bar
    images[1, 4:24, 9:19] = 1.0  # thick vertical bar
    yy, xx = np.mgrid[0:28, 0:28]
    radius = np.hypot(yy - 13.5, xx - 13.5)
    images[2, ..., 0] = (radius > 5) & (radius < 9)  # a ring: hollow
    for i, y in enumerate(range(4, 24)):
        images[3, y, 20 - i // 2 : 22 - i // 2] = 1.0  # top leans right
        images[4, y, 6 + i // 2 : 8 + i // 2] = 1.0  # top leans left
    images[5, 1:7, 1:7] = 1.0  # off-centre
    images[6, 8:20, 8:20] = 0.35  # a dark, plain square
    return images


def test_shape_measurements_read_like_their_names():
    names = [m.name for m in prime.SHAPE_MEASURES]
    values = prime.shape_measurements(_shape_images(), batch_size=4)
    column = {name: values[:, names.index(name)] for name in names}
    assert values.shape == (7, len(names))
    assert column["stroke"][1] > 3 * column["stroke"][0]
    assert column["width"][1] > column["width"][0] and column["area"][1] > column["area"][0]
    assert column["holes"][2] > 0.3 and column["holes"][[0, 1, 5, 6]].max() == 0
    assert column["slant"][3] > 0.3 > -0.3 > column["slant"][4]
    assert column["offset"][5] > 10 > column["offset"][1]
    # float32 means: rounding differs with the vector width XLA compiles for (AVX2 or AVX-512)
    assert column["brightness"][6] == pytest.approx(0.35, rel=1e-5)
    assert column["texture"][6] == pytest.approx(0.0, abs=1e-6)
    no_ink = np.zeros((2, 28, 28, 1), np.float32)
    assert prime.shape_measurements(no_ink, batch_size=4).max() == 0


def test_shape_tagger_uses_per_class_thresholds_fitted_once():
    rng = np.random.default_rng(0)
    measurements = rng.normal(size=(200, len(prime.SHAPE_MEASURES)))
    labels = np.repeat([0, 1], 100)
    measurements[labels == 1] += 5.0  # class 1 is "large" everywhere; its thresholds move with it
    tagger = prime.fit_shape_tagger(None, labels, measurements=measurements, quantiles=(0.2, 0.8))
    tags = tagger.tag_measurements(measurements, labels)
    assert tags.names == tagger.names and len(tags.names) == 19 and "hollow" in tags.names
    small, large = tags.names.index("small"), tags.names.index("large")
    for label in (0, 1):
        assert tags.tags[labels == label, small].mean() == pytest.approx(0.2, abs=0.01)
        assert tags.tags[labels == label, large].mean() == pytest.approx(0.2, abs=0.01)
    tagged = dataclasses.replace(tagger, batch_size=4).tag(_shape_images()[:2], np.array([0, 0]))
    assert tagged.tags.shape == (2, 19)
    with pytest.raises(ValueError, match="absent when the tagger was fitted"):
        tagger = prime.fit_shape_tagger(None, np.array([1, 1]), measurements=measurements[:2])
        tagger.tag_measurements(measurements[:1], np.array([0]))
    with pytest.raises(ValueError, match="pass labels"):
        tagger.tag(_shape_images()[:1])
    assert isinstance(tagger, prime.Tagger)


# ---------------------------------------------------------------- evaluation


def test_heldout_evaluation_and_subset_tables():
    tags = np.array([[1, 1, 1]] * 4 + [[1, 1, 0]] * 4 + [[1, 0, 0]] * 4 + [[0, 0, 0]] * 4, bool)
    correct = np.array([0, 0, 0, 1] + [1, 1, 0, 1] + [1] * 4 + [1] * 4, bool)
    labels = np.zeros(16, np.int64)
    names = ("a", "b", "c")
    mode = FailureMode(0, ("a", "b", "c"), 4, 0.25, 0.8, (0, 1, 2), 1, 16)
    (held,) = prime.evaluate_on_heldout([mode], TagMatrix(tags, names), errors=~correct,
                                         labels=labels)
    assert (held.size, held.accuracy, held.class_accuracy) == (4, 0.25, 0.75)
    assert held.drop == pytest.approx(0.5)
    rows = prime.subset_accuracies(mode, tags, errors=~correct, labels=labels, tag_names=names)
    assert [r.tags for r in rows] == [("a", "b", "c"), ("a", "b"), ("a", "c"), ("b", "c"),
                                      ("a",), ("b",), ("c",)]
    assert {r.tags: r.accuracy for r in rows}[("a", "b")] == pytest.approx(4 / 8)
    table = prime.subset_drop_table([mode], tags, errors=~correct, labels=labels, tag_names=names)
    assert table[3]["modes"] == 1
    assert table[3]["drop"][3] == pytest.approx(0.5)
    assert table[3]["drop"][1] == pytest.approx(np.mean([0.75 - 8 / 12, 0.75 - 0.5, 0.75 - 0.25]))
    summary = prime.generalization_summary([held])
    assert summary["share_heldout_drop_at_least_0.25"] == 1.0
    with pytest.raises(KeyError, match="not among"):
        prime.evaluate_on_heldout([mode], TagMatrix(tags[:, :2], ("a", "b")), errors=~correct,
                                  labels=labels)


def test_auroc_counts_pairs_and_ties():
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 30).astype(float)
    pairs = positive[:, None] - negative[None, :]
    expected = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert prime.auroc(positive, negative) == pytest.approx(expected)
    assert prime.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and np.isnan(prime.auroc([], [1.0]))


def test_description_quality_against_planted_ground_truth():
    problem = planted_problem(key=jax.random.key(1), num_classes=2, images_per_class=4000,
                              num_tags=8, tag_prevalence=0.3, planted=[(0, (1, 2)), (1, (4,))])
    truth = TagMatrix(problem.tags, problem.tag_names)
    modes = find_failure_modes(truth, errors=problem.errors, labels=problem.labels, min_size=30,
                               min_drop=0.3)
    assert prime.recovery_scores(modes, problem.planted)["recall"] == 1.0
    embedder = prime.TagSpaceEmbedder(truth)
    assert isinstance(embedder, prime.ImageTextEmbedder)
    images = embedder.embed_images(np.arange(len(problem.labels)))
    members = np.stack([prime.mode_members(m, truth, problem.labels, truth.names) for m in modes])
    names = ("cat", "dog")

    def quality(texts):
        return prime.description_quality(images, embedder.embed_texts(texts), members,
                                         problem.labels, [m.label for m in modes],
                                         key=jax.random.key(0))

    full = quality([prime.describe(m, names) for m in modes])
    assert prime.describe(modes[0], names) == "a photo of a cat, tag1, tag2"
    class_only = quality([f"a photo of a {names[m.label]}" for m in modes])
    assert full.auroc > 0.9 and full.similarity > 0.4
    assert class_only.auroc == 0.5 and class_only.similarity == 0.0
    assert len(full.per_mode) == len(modes) and full.per_mode[0]["num_outside"] == modes[0].size
    # "tag1" must not match inside "tag10": whole words only
    vocabulary = TagMatrix(np.zeros((1, 2), bool), ("tag1", "tag10"))
    np.testing.assert_allclose(prime.TagSpaceEmbedder(vocabulary).embed_texts(["x, tag10"]),
                               [[0, 1]])


def test_flip_tags_and_living17_shape():
    tags = np.zeros((2000, 5), bool)
    flipped = prime.flip_tags(tags, 0.1, key=jax.random.key(0))
    assert 0.08 < flipped.mean() < 0.12
    problem = prime.living17_shaped_problem(key=jax.random.key(0), num_classes=3,
                                            images_per_class=600, vocabulary_size=50,
                                            tags_per_class=20)
    chex.assert_shape([problem.tags, problem.labels, problem.correct],
                      [(1800, 50), (1800,), (1800,)])
    assert (problem.tags[problem.labels == 0].sum(0) > 0).sum() <= 20
    assert len(problem.planted) == 9


# ---------------------------------------------------------------- vision-language tagger


def test_callable_embedder_and_zero_shot_tagger():
    vocabulary = ("bright", "dark")
    text_vectors = {"a photo of something bright.": [1.0, 0.0],
                    "a photo of something dark.": [0.0, 1.0],
                    "a photo of something.": [0.6, 0.6]}
    embedder = prime.CallableEmbedder(
        image_fn=lambda x: jnp.stack([x.mean(axis=(1, 2, 3)), 1 - x.mean(axis=(1, 2, 3))], axis=1),
        text_fn=lambda texts: np.array([text_vectors[t] for t in texts]),
    )
    images = np.stack([np.full((4, 4, 1), 0.9), np.full((4, 4, 1), 0.1)]).astype(np.float32)
    tags = prime.ZeroShotTagger(embedder, vocabulary).tag(images)
    assert tags.names == vocabulary
    assert tags.tags.tolist() == [[True, False], [False, True]]


def _tiny_clip_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    characters = "abcdefghijklmnopqrstuvwxyz,.-'"
    vocab = {c: i for i, c in enumerate(characters)}
    vocab.update({c + "</w>": len(characters) + i for i, c in enumerate(characters)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"),
                                           str(tmp_path / "merges.txt"))
    return tokenizer, vocab


def test_transformers_clip_embedder_with_a_tiny_random_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer, vocab = _tiny_clip_tokenizer(tmp_path)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    embedder = prime.TransformersClipEmbedder(model, tokenizer, batch_size=3)
    images = np.random.default_rng(0).random((5, 28, 28, 1)).astype(np.float32)
    image_embeddings = embedder.embed_images(images)
    text_embeddings = embedder.embed_texts(["a photo of a coat", "thin"])
    assert image_embeddings.shape == (5, 16) and text_embeddings.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(image_embeddings, axis=1), 1, atol=1e-5)
    # the same numbers as calling the model directly
    with torch.no_grad():
        encoded = tokenizer(["thin"], padding=True, return_tensors="pt")
        direct = model.get_text_features(input_ids=encoded["input_ids"],
                                         attention_mask=encoded["attention_mask"])
        direct = getattr(direct, "pooler_output", direct).numpy()
    np.testing.assert_allclose(text_embeddings[1], direct[0] / np.linalg.norm(direct[0]), atol=1e-5)
    tagger = prime.ZeroShotTagger(embedder, ("thin strokes", "hollow"))
    tags = tagger.tag(images)
    assert isinstance(tagger, prime.Tagger)
    assert tags.tags.shape == (5, 2) and tags.tags.dtype == bool
    np.testing.assert_array_equal(tags.tags, tagger.scores(images) > 0)


# ---------------------------------------------------------------- config


def test_prime_config_file_and_overrides():
    config = load_config("configs/prime_fmnist.py", ["min_size=100", "min_gain=(0.2, 0.1, 0.05)"])
    assert isinstance(config, prime.PrimeConfig)
    assert (config.min_size, config.min_drop, config.max_tags) == (100, 0.30, 4)
    assert config.min_gain == (0.2, 0.1, 0.05)
    assert config.classifier_run == "runs/classifiers/defuse_cnn_fmnist"
    with pytest.raises(KeyError, match="unknown config key"):
        load_config("configs/prime_fmnist.py", ["min_sizes=3"])
