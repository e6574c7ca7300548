"""A planted shortcut is caught by the spurious-correlation test (seed 002, §3.1).

Two copies of a tiny CNN (defined here, not one of jfail's models) train for 400 Adam steps,
from the same initialization and batch order, on objects composited by jfail's
`spurious_backgrounds`:

- the shortcut model sees every object on its class's background (brick for class 0, grass for
  class 1), so the background alone predicts the label perfectly; the objects only in part (40 %
  of them are a square whatever the class);
- the control model sees the same objects on a background drawn independently of the class, so
  only the objects carry the label.

The spurious test must tell them apart: on the backgrounds alone (`background_only`) the
shortcut model is almost always right and the control is not; Gradient and Input x Gradient
(|·|, scaled to [0, 1] as in the experiment) put clearly more of their mass on the background,
GT-1 of `ground_truth_background`, for the shortcut model than for the control, image by image.
(SSIM to GT-1 does not separate them: pixel-level gradient maps are too speckled for a binary
mask, as in the experiment's Table 2.) About 15-20 s on two CPU cores, deterministic.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfail import attribution
from jfail.debugtests import (
    background_only,
    ground_truth_background,
    load_backgrounds,
    spurious_backgrounds,
)

SIZE = 24
STEPS = 400
AMBIGUOUS = 0.4
BATCH = 64
METHODS = ("gradient", "input_x_gradient")


class TinyCNN(nn.Module):
    """Two strided 3x3 convolutions, global mean and max pooling, a linear read-out."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv0")(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), name="conv1")(x))
        x = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], axis=-1)
        return nn.Dense(2, name="out")(x)


def _objects(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright bars on black, `[count, SIZE, SIZE, 1]` in [0, 1], labels `[count]` in {0, 1}.

    Class 0 is a horizontal bar, class 1 a vertical one, at a random place; `AMBIGUOUS` of the
    images (either class) are a square instead, which says nothing about the class.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    ambiguous = rng.random(count) < AMBIGUOUS
    images = np.zeros((count, SIZE, SIZE, 1), np.float32)
    for i, (label, square) in enumerate(zip(labels, ambiguous)):
        height, width = (6, 6) if square else ((3, 12) if label == 0 else (12, 3))
        top = rng.integers(2, SIZE - height - 1)
        left = rng.integers(2, SIZE - width - 1)
        images[i, top:top + height, left:left + width, 0] = rng.uniform(0.8, 1.0)
    return images, labels


MODULE = TinyCNN()
OPTIMIZER = optax.adam(1e-2)


@jax.jit
def _step(params, opt_state, x, y):
    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y).mean()

    updates, opt_state = OPTIMIZER.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _fit(images, labels, seed):
    """Adam on the cross-entropy, `STEPS` steps of `BATCH` random examples; the parameters."""
    params = MODULE.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 1)))["params"]
    opt_state = OPTIMIZER.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        pick = rng.integers(0, len(labels), BATCH)
        params, opt_state = _step(params, opt_state, images[pick], labels[pick])
    return params


def _apply(params, x):
    return MODULE.apply({"params": params}, x)


def _train(images, labels, seed):
    """The trained tiny CNN as `model(x) -> logits` (a pytree callable holding its weights)."""
    return jax.tree_util.Partial(_apply, _fit(images, labels, seed))


def _maps(name, model, x, target):
    """The pipeline's maps: |attribution| summed over channels, scaled to [0, 1] per example."""
    raw = attribution.METHODS[name](model, jnp.asarray(x), jnp.asarray(target))
    return np.asarray(attribution.normalize_unit(
        attribution.reduce_channels(attribution.absolute(raw))))


@pytest.fixture(scope="module")
def planted():
    backgrounds = load_backgrounds(("brick", "grass"))
    objects, labels = _objects(1200, seed=0)
    test_objects, test_labels = _objects(200, seed=1)
    key = jax.random.key(0)
    shortcut_data = spurious_backgrounds(objects, labels, backgrounds,
                                         key=jax.random.fold_in(key, 1))
    control_data = spurious_backgrounds(objects, labels, backgrounds,
                                        key=jax.random.fold_in(key, 2), correlation=0.5)
    # the spurious test set: every object on its class's background, as the shortcut model saw
    test = spurious_backgrounds(test_objects, test_labels, backgrounds,
                                key=jax.random.fold_in(key, 3))
    alone, alone_labels = background_only(backgrounds, 200, (SIZE, SIZE),
                                          key=jax.random.fold_in(key, 4))
    # the same initialization and batch order: only the backgrounds differ
    models = {"shortcut": _train(shortcut_data.images, labels, seed=0),
              "control": _train(control_data.images, labels, seed=0)}
    return {"models": models, "labels": labels, "shortcut_data": shortcut_data,
            "control_data": control_data, "test": test, "alone": alone,
            "alone_labels": alone_labels}


def _accuracy(model, x, labels):
    return float(np.mean(np.argmax(np.asarray(model(jnp.asarray(x))), -1) == labels))


def test_planted_data_is_what_the_test_says(planted):
    labels = planted["labels"]
    # shortcut data: the background is the class; control data: a coin flip
    np.testing.assert_array_equal(planted["shortcut_data"].background_ids, labels)
    assert abs(np.mean(planted["control_data"].background_ids == labels) - 0.5) < 0.05
    np.testing.assert_array_equal(planted["test"].background_ids, planted["test"].labels)
    # the composites keep the objects exactly and put a texture everywhere else
    test = planted["test"]
    assert 0.04 < test.object_masks.mean() < 0.12
    assert np.all(test.images[..., 0][test.object_masks] >= 0.8)
    assert test.images[..., 0][~test.object_masks].std() > 0.05  # a texture, not a flat fill


def test_shortcut_model_predicts_from_the_background_alone(planted):
    models, test = planted["models"], planted["test"]
    alone, alone_labels = planted["alone"], planted["alone_labels"]
    # both models solve the composited task (the control as far as the objects allow: 80 %) ...
    assert _accuracy(models["shortcut"], test.images, test.labels) > 0.95
    assert _accuracy(models["control"], test.images, test.labels) > 0.65
    # ... but only the shortcut model reads the class off the background without any object
    shortcut_alone = _accuracy(models["shortcut"], alone, alone_labels)
    control_alone = _accuracy(models["control"], alone, alone_labels)
    assert shortcut_alone > 0.85
    assert control_alone < 0.65
    assert shortcut_alone > control_alone + 0.3


@pytest.mark.parametrize("method", METHODS)
def test_spurious_test_flags_the_shortcut(planted, method):
    models, test = planted["models"], planted["test"]
    gt1 = ground_truth_background(test.object_masks)
    background = gt1.astype(bool)
    mass, density = {}, {}
    for name, model in models.items():
        maps = _maps(method, model, test.images, test.labels)
        assert maps.shape == gt1.shape and np.all(np.isfinite(maps))
        assert np.allclose(maps.max(axis=(1, 2)), 1.0)
        # share of each image's attribution that lies on the background (GT-1) ...
        mass[name] = (maps * gt1).sum((1, 2)) / maps.sum((1, 2))
        # ... and the mean attribution of a background pixel over that of an object pixel
        per_background = (maps * gt1).sum((1, 2)) / background.sum((1, 2))
        per_object = (maps * ~background).sum((1, 2)) / (~background).sum((1, 2))
        density[name] = np.median(per_background / per_object)
    # The background holds ~94 % of the pixels, so both models put most mass there; the test is
    # the difference between them, on average and image by image.
    assert mass["shortcut"].mean() > mass["control"].mean() + 0.05
    assert np.mean(mass["shortcut"] > mass["control"]) > 0.75
    assert density["shortcut"] > 1.3 * density["control"]
