"""The planted data bugs do exactly what they say, and a planted shortcut is learned."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jfail.debugtests import (
    background_only,
    flip_labels,
    ground_truth_background,
    load_backgrounds,
    spurious_backgrounds,
)


def _objects(count=40, seed=0):
    """Bright squares of random size and place on black: the object mask is known exactly."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 16, 16, 1), np.float32)
    masks = np.zeros((count, 16, 16), bool)
    for i in range(count):
        size = rng.integers(3, 8)
        top, left = rng.integers(0, 16 - size, 2)
        masks[i, top:top + size, left:left + size] = True
        images[i, top:top + size, left:left + size, 0] = rng.uniform(0.2, 1.0)
    return images, masks, rng.integers(0, 2, count)


def test_spurious_backgrounds_keep_objects_exactly_and_follow_the_class():
    images, masks, labels = _objects()
    backgrounds = load_backgrounds(("brick", "grass"))
    data = spurious_backgrounds(images, labels, backgrounds, key=jax.random.key(0))
    np.testing.assert_array_equal(data.object_masks, masks)
    np.testing.assert_array_equal(data.images[masks], images[masks])
    np.testing.assert_array_equal(data.background_ids, labels)
    # Every background pixel is the class's texture at the recorded crop offset.
    for i, (top, left) in enumerate(data.crop_offsets):
        crop = backgrounds[labels[i]][top:top + 16, left:left + 16]
        np.testing.assert_array_equal(data.images[i, ..., 0][~masks[i]], crop[~masks[i]])
    assert len({tuple(o) for o in data.crop_offsets}) > 30  # crops are cut at random places
    np.testing.assert_array_equal(ground_truth_background(data.object_masks),
                                  (~masks).astype(np.float32))
    mixed = spurious_backgrounds(images, labels, backgrounds, key=jax.random.key(1),
                                 correlation=0.5)
    swapped = mixed.background_ids != labels
    assert 0.25 < swapped.mean() < 0.75
    with pytest.raises(ValueError, match="one background per class"):
        spurious_backgrounds(images, labels + 1, backgrounds, key=jax.random.key(0))


def test_flip_labels_flips_exactly_the_stated_fraction():
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    new, flipped = flip_labels(labels, 0.1, 10, key=jax.random.key(0))
    assert len(flipped) == 100 and len(np.unique(flipped)) == 100
    assert np.all(new[flipped] != labels[flipped])
    untouched = np.setdiff1d(np.arange(1000), flipped)
    np.testing.assert_array_equal(new[untouched], labels[untouched])
    assert set(np.unique(new)) <= set(range(10))


def test_a_planted_background_shortcut_is_learned():
    """Logistic regression on textures alone: background-only accuracy shows the shortcut."""
    images, _, labels = _objects(200, seed=3)
    backgrounds = load_backgrounds(("brick", "grass"))
    data = spurious_backgrounds(images, labels, backgrounds, key=jax.random.key(2))
    from sklearn.linear_model import LogisticRegression

    def texture_features(x):  # the intensity histogram: blind to where the texture was cut
        return np.stack([np.histogram(image, bins=16, range=(0, 1))[0] for image in x]) / x[0].size

    model = LogisticRegression().fit(texture_features(data.images), labels)
    test, test_labels = background_only(backgrounds, 200, (16, 16), key=jax.random.key(5))
    accuracy = (model.predict(texture_features(test)) == test_labels).mean()
    assert accuracy > 0.9


def test_bad_bug_parameters_are_refused():
    images, _, labels = _objects(4)
    backgrounds = load_backgrounds(("brick", "grass"))
    with pytest.raises(ValueError, match="fraction must lie in"):
        flip_labels(labels, 1.5, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least 2 classes"):
        flip_labels(labels, 0.1, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="correlation must lie in"):
        spurious_backgrounds(images, labels, backgrounds, key=jax.random.key(0), correlation=2.0)
    with pytest.raises(ValueError, match=r"grey \[N, H, W, 1\]"):
        spurious_backgrounds(images[..., 0], labels, backgrounds, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown background"):
        load_backgrounds(("marble",))
    with pytest.raises(ValueError, match="at least"):
        background_only([np.zeros((8, 8))], 2, (16, 16), key=jax.random.key(0))
