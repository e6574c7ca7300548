"""Every method over a source through the engine equals its in-memory function on the same data."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jfail import barlow
from jfail.data import ArraySource, ImageSource, open_source, read_all
from jfail.engine import map_dataset

LEVELS = (0.15, 0.5, 0.85)  # the brightness of classes a, b, c


class Counting(ImageSource):
    """A source that records every index read from it."""

    def __init__(self, parent):
        self.parent, self.reads = parent, []
        self.name, self.class_names = parent.name, parent.class_names
        self.image_shape = parent.image_shape

    def __len__(self):
        return len(self.parent)

    def __getitem__(self, index):
        self.reads.append(int(index))
        return self.parent[index]

    def labels(self):
        return self.parent.labels()


def _image_folder(root, per_class=10, size=8):
    rng = np.random.default_rng(0)
    for name, level in zip("abc", LEVELS):
        os.makedirs(root / name)
        for i in range(per_class):
            pixels = np.clip(level + rng.uniform(-0.05, 0.05, (size, size)), 0, 1)
            Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return f"imagefolder:{root}"


def feature_map(images):
    """[B, 8, 8, 4]: four monotone functions of the pixels."""
    return jnp.concatenate([images, images**2, 1 - images, jnp.sqrt(images)], axis=-1)


def features(images):
    return feature_map(images).mean(axis=(1, 2))


def wrong_on_b(images):
    """Right on classes a and c; every image of class b (mid brightness) is called c."""
    mean = images.mean(axis=(1, 2, 3))
    return jnp.stack([-(mean - LEVELS[0]) ** 2, jnp.full_like(mean, -10.0),
                      -jnp.minimum((mean - LEVELS[1]) ** 2, (mean - LEVELS[2]) ** 2)], axis=-1)


def test_with_labels_passes_labels_and_positions_and_folded_keys_ignore_the_batch_size(tmp_path):
    images = np.random.default_rng(1).random((11, 4, 4, 1), dtype=np.float32)
    source = ArraySource(images, np.arange(11) % 3, ("a", "b", "c"), "toy")
    key = jax.random.key(5)

    def fn(x, labels, indices):
        noise = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (2,)))(indices)
        return {"labels": labels, "indices": indices, "noise": noise, "sum": x.sum((1, 2, 3))}

    by_4 = map_dataset(fn, source, tmp_path / "4", batch_size=4, with_labels=True).read()
    by_8 = map_dataset(fn, source, tmp_path / "8", batch_size=8, with_labels=True).read()
    np.testing.assert_array_equal(by_4["labels"], source.labels())
    np.testing.assert_array_equal(by_4["indices"], np.arange(11))
    np.testing.assert_allclose(by_4["sum"], images.sum((1, 2, 3)), rtol=1e-6)
    assert by_4["noise"].tobytes() == by_8["noise"].tobytes()
    with pytest.raises(ValueError, match="other arguments"):  # a run without labels is another run
        map_dataset(lambda x: {"sum": x.sum((1, 2, 3))}, source, tmp_path / "4", batch_size=4)


def test_barlow_on_a_source_recovers_a_planted_failure_reading_only_the_panel_images(tmp_path):
    name = _image_folder(tmp_path / "images")
    source = Counting(open_source(name, "all"))  # a flat folder: every image
    found = barlow.analyze_source(wrong_on_b, features, source, tmp_path / "run",
                                  feature_map_fn=feature_map, grouping="prediction",
                                  batch_size=8, panel_images=4, steps=3, key=0, progress=False)
    labels = source.labels()
    np.testing.assert_array_equal(found.errors, labels == 1)
    tree = found.trees[2]  # predicted c: all of c (right) and all of b (wrong)
    assert tree.top_leaf.valid
    np.testing.assert_array_equal(np.sort(tree.top_leaf.indices), np.flatnonzero(labels == 1))
    assert list(found.panels) == [2]

    # The map read each example once (the last batch of 8 is padded with two copies of the
    # last example; the first and last are read for the run's fingerprint); the panel read only
    # the images it shows.
    map_reads, panel_reads = source.reads[: 32 + 2], source.reads[32 + 2:]
    assert sorted(map_reads) == sorted([0, 29, *range(30), 29, 29])
    panel = found.panels[2]
    assert panel_reads == [*panel.top_indices, *panel.failure_indices]
    assert len(panel.top_indices) == 4
    assert set(panel.failure_indices) <= set(np.flatnonzero(labels == 1))

    # Every stage equals the in-memory functions on the same images.
    data = read_all(open_source(name, "all"))
    memory_features = barlow.features(features, data.images, progress=False)
    predictions = np.asarray(jnp.argmax(wrong_on_b(data.images), -1))
    np.testing.assert_allclose(found.outputs["features"][...], memory_features, rtol=1e-6)
    np.testing.assert_array_equal(found.predictions, predictions)
    trees = barlow.failure_trees(found.outputs["features"][...], predictions != data.labels,
                                 predictions, key=0)
    assert list(trees) == list(found.trees)
    for group, expected in trees.items():
        assert found.trees[group].top_leaf.rule == expected.top_leaf.rule
        np.testing.assert_array_equal(found.trees[group].top_leaf.indices,
                                      expected.top_leaf.indices)
    images = data.images[panel.top_indices]
    np.testing.assert_array_equal(panel.images, images)
    np.testing.assert_array_equal(panel.heatmaps,
                                  barlow.heatmap(feature_map, images, panel.feature))
    np.testing.assert_array_equal(
        panel.attacked, barlow.feature_attack(features, images, panel.feature, steps=3))
    np.testing.assert_array_equal(panel.failures, data.images[panel.failure_indices])


def _defuse_models():
    rng = np.random.default_rng(2)
    w_enc = jnp.asarray(rng.normal(size=(64, 3)) / 8, jnp.float32)
    w_dec = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    w_cls = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)

    def encoder(x):
        mu = x.reshape(len(x), -1) @ w_enc
        return mu, jnp.zeros_like(mu)

    def decoder(z):
        return jax.nn.sigmoid(z @ w_dec).reshape(len(z), 8, 8, 1)

    def classifier(x):
        return x.reshape(len(x), -1) @ w_cls

    return encoder, decoder, classifier


class CountingRows:
    """An [N, Z] array that records the rows of every read."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index):
        self.reads.append((index.start, index.stop))
        return self.array[index]


def test_defuse_stored_encoding_identification_and_distillation_equal_the_in_memory_ones(tmp_path):
    from jfail import defuse

    encoder, decoder, classifier = _defuse_models()
    images = np.random.default_rng(3).random((24, 8, 8, 1), dtype=np.float32)
    source = ArraySource(images, np.arange(24) % 3, ("a", "b", "c"), "toy")
    stored_mu = defuse.encode_to_store(encoder, source, tmp_path / "encoded", batch_size=8)
    mu, _ = defuse.encode(encoder, images)
    np.testing.assert_allclose(stored_mu["mu"][...], mu, rtol=1e-6, atol=1e-7)

    settings = {"key": 4, "num_draws": 20, "max_per_image": 5, "draws_per_chunk": 60}
    expected = defuse.identify(decoder, classifier, stored_mu["mu"][...], source.labels(),
                               **settings)
    counted = CountingRows(stored_mu["mu"])
    stored = defuse.identify_to_store(decoder, classifier, counted, source.labels(),
                                      tmp_path / "failures", **settings)
    assert counted.reads == [(0, 3), *((s, s + 3) for s in range(3, 24, 3))]  # one chunk a time
    found = defuse.open_failures(tmp_path / "failures").read()
    assert 10 < len(found) < 24 * 5  # failures found and the cap applies
    for field in ("latents", "images", "predictions", "labels", "sources", "per_image"):
        np.testing.assert_array_equal(getattr(found, field), getattr(expected, field), field)
    assert found.misclassified_draws == expected.misclassified_draws
    assert stored.failure_rate == expected.failure_rate

    scenarios = defuse.distill_stored(stored.latents, key=1, max_components=3, max_points=40,
                                      max_iter=20, chunk_rows=16)
    reference = defuse.distill(found.latents, key=1, max_components=3, max_points=40,
                               max_iter=20)
    np.testing.assert_array_equal(scenarios.assignments, reference.assignments)
    np.testing.assert_allclose(scenarios.means, reference.means, rtol=1e-6)
    np.testing.assert_allclose(scenarios.weights, reference.weights, rtol=1e-6)
    with pytest.raises(ValueError, match="not empty"):
        defuse.identify_to_store(decoder, classifier, mu, source.labels(), tmp_path / "failures",
                                 **settings)


def test_prime_tags_of_a_source_equal_the_in_memory_tagger_and_find_a_planted_mode(tmp_path):
    from jfail import prime

    # Class 0 and 1: centred squares of side 2 to 7 in 12x12 images; the classifier calls every
    # class-0 square larger than 5x5 a class 1 (the planted mode: class 0, "large").
    rng = np.random.default_rng(4)
    images, labels = [], []
    for label in (0, 1):
        for side in rng.integers(2, 8, 24):
            image = np.zeros((12, 12, 1), np.float32)
            lo = (12 - side) // 2
            image[lo:lo + side, lo:lo + side] = rng.uniform(0.6, 1.0)
            images.append(image)
            labels.append(label)
    images, labels = np.stack(images), np.asarray(labels)
    images[labels == 1, 0, 0] = 0.5  # class 1 is marked by one corner pixel

    def classifier(x):
        area = (x[..., 0] > 0.2).mean(axis=(1, 2))
        corner = x[:, 0, 0, 0]
        to_one = (corner > 0.2) | (area > 26 / 144)
        return jnp.stack([jnp.where(to_one, 0.0, 1.0), jnp.where(to_one, 1.0, 0.0)], axis=-1)

    source = ArraySource(images, labels, ("a", "b"), "squares")
    tagged = prime.tag_source(source, tmp_path / "run", classifier=classifier, batch_size=16)
    np.testing.assert_array_equal(tagged.measurements, prime.shape_measurements(images))
    measurements = prime.shape_measurements(images)
    expected = prime.fit_shape_tagger(None, labels, measurements=measurements).tag_measurements(
        measurements, labels)
    assert tagged.tags.names == expected.names
    np.testing.assert_array_equal(tagged.tags.tags, expected.tags)
    stored = prime.open_tags(tmp_path / "run")
    np.testing.assert_array_equal(stored.tags, expected.tags)
    large = (images[..., 0] > 0.2).sum((1, 2)) > 26
    np.testing.assert_array_equal(tagged.errors, (labels == 0) & large)

    modes = prime.find_failure_modes(tagged.tags, errors=tagged.errors, labels=tagged.labels,
                                     min_size=4, max_tags=1)
    assert any(mode.label == 0 and mode.tags == ("large",) and mode.accuracy == 0 for mode in modes)


def _mlp(seed):
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.normal(size=(144, 8)) / 12, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    return lambda x: jnp.tanh(x.reshape(len(x), -1) @ w1) @ w2


def _squares_source(count=12):
    images = np.random.default_rng(5).random((count, 12, 12, 1), dtype=np.float32)
    return ArraySource(images, np.arange(count) % 3, ("a", "b", "c"), "noise")


def test_attributions_through_the_engine_equal_the_method_with_keys_folded_per_example(tmp_path):
    from jfail import attribution
    from jfail.debugtests import attributions_to_store

    model, source = _mlp(0), _squares_source()
    data = read_all(source)
    stored = attributions_to_store("gradient", model, source, tmp_path / "gradient", batch_size=8)
    np.testing.assert_allclose(stored["attributions"][...],
                               attribution.gradient(model, data.images, data.labels),
                               rtol=1e-5, atol=1e-7)

    # Example i's noise comes from fold_in(key, i): batches of 4 give what one example at a time
    # gives (up to float rounding of the batched matrix products).
    noisy = attributions_to_store("smoothgrad", model, source, tmp_path / "smoothgrad", key=3,
                                  target="prediction", batch_size=4, num_samples=4)
    predictions = np.asarray(jnp.argmax(model(data.images), -1))
    for i in (0, 5, 11):  # in the first, second and last batch
        one = attribution.smoothgrad(model, data.images[i:i + 1], predictions[i:i + 1],
                                     key=jax.random.fold_in(jax.random.key(3), i), num_samples=4)
        np.testing.assert_allclose(noisy["attributions"][i], one[0], rtol=1e-5, atol=1e-7)


def test_randomization_similarities_computed_batchwise_equal_those_of_the_whole_maps(tmp_path):
    from jfail import attribution
    from jfail.debugtests import (
        paper_postprocess,
        randomization_similarity_to_store,
        spearman,
        ssim,
    )

    model, source = _mlp(0), _squares_source()
    randomized = [model, _mlp(1)]  # the trained model itself (similarity 1) and fresh weights
    stored = randomization_similarity_to_store("gradient", model, randomized, source,
                                               tmp_path / "run", batch_size=8).read()
    assert stored["ssim"].shape == stored["spearman"].shape == (12, 2)
    np.testing.assert_allclose(stored["ssim"][:, 0], 1.0, rtol=1e-6)
    images = read_all(source).images
    targets = np.asarray(jnp.argmax(model(images), -1))
    reference = paper_postprocess(attribution.gradient(model, images, targets))
    fresh = paper_postprocess(attribution.gradient(randomized[1], images, targets))
    np.testing.assert_allclose(stored["ssim"][:, 1], ssim(reference, fresh), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stored["spearman"][:, 1], spearman(reference, fresh, absolute=True),
                               rtol=1e-4, atol=1e-5)
    assert stored["ssim"][:, 1].mean() < 0.9


def test_bad_arguments_of_the_streamed_methods_are_clear_errors(tmp_path):
    from jfail import debugtests, defuse, prime
    from jfail.engine import open_array

    source = _squares_source()
    model = _mlp(0)
    with pytest.raises(ValueError, match="grouping must be one of"):
        barlow.analyze_source(model, model, source, tmp_path / "a", grouping="cluster")
    with pytest.raises(ValueError, match=r"feature_fn must return features \[B, D\]"):
        barlow.predictions_to_store(model, lambda x: x, source, tmp_path / "b")
    with pytest.raises(ValueError, match="target must be one of"):
        debugtests.attributions_to_store("gradient", model, source, tmp_path / "c", target="x")
    with pytest.raises(KeyError, match="unknown attribution method"):
        debugtests.attributions_to_store("gradcam", model, source, tmp_path / "d")
    with pytest.raises(ValueError, match="at least one model"):
        debugtests.randomization_similarity_to_store("gradient", model, [], source, tmp_path / "e")
    with pytest.raises(ValueError, match=r"classifier must return logits \[B, K\]"):
        prime.tag_source(source, tmp_path / "f", classifier=lambda x: x.sum((1, 2, 3)))
    with pytest.raises(ValueError, match=r"latents must be \[F, Z\]"):
        defuse.distill_stored(np.zeros(5), key=0)
    with pytest.raises(ValueError, match="fewer than max_components"):
        defuse.distill_stored(np.zeros((5, 2)), key=0)
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[3\]"):
        defuse.identify_to_store(model, model, np.zeros((3, 2)), np.zeros(4, int), tmp_path / "g",
                                 key=0)
    with pytest.raises(FileNotFoundError, match="no finished identify_to_store run"):
        defuse.open_failures(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no array"):
        open_array(tmp_path / "nothing")
    assert not any((tmp_path / name).exists() for name in "abcdefg")  # nothing was written
