"""PGD attacks stay in their ball and hurt; adversarial training buys robustness."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfail.data import load, train_val_split
from jfail.models import DefuseCNN, init_classifier, linen_apply
from jfail.train import Attack, TrainConfig, fit, pgd_attack, robust_accuracy


def _linear_model(key, shape=(8, 8, 1), classes=4):
    weights = jax.random.normal(key, (int(np.prod(shape)), classes))
    return jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, weights)


@pytest.mark.parametrize("norm, epsilon", [("l2", 0.5), ("linf", 0.05)])
def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss(norm, epsilon):
    model = _linear_model(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
    y = jnp.argmax(model(x), -1)
    attack = Attack(norm=norm, epsilon=epsilon, steps=10)
    x_adv = jax.jit(pgd_attack, static_argnums=3)(model, x, y, attack, key=jax.random.key(2))
    delta = (x_adv - x).reshape(16, -1)
    size = jnp.abs(delta).max(-1) if norm == "linf" else jnp.linalg.norm(delta, axis=-1)
    assert float(size.max()) <= epsilon * (1 + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    ce = lambda images: optax.softmax_cross_entropy_with_integer_labels(model(images), y)  # noqa
    assert float(ce(x_adv).mean()) > float(ce(x).mean()) + 0.1


def test_bad_attacks_are_refused():
    with pytest.raises(ValueError, match="norm"):
        Attack(norm="l1")
    with pytest.raises(ValueError, match="epsilon"):
        Attack(epsilon=0.0)
    assert Attack(epsilon=1.0, steps=5).alpha == pytest.approx(0.5)


def test_adversarial_training_buys_robustness_on_digits():
    data = load("digits", "train")
    train, val = train_val_split(data, 0.2, key=0)
    module = DefuseCNN(num_classes=10, conv_features=(16, 16), hidden=(64,))
    params, state = init_classifier(module, train.images.shape[1:], jax.random.key(0))
    apply_fn = linen_apply(module)
    attack = Attack(norm="linf", epsilon=0.1, steps=5)
    base = TrainConfig(optimizer="adam", learning_rate=3e-3, batch_size=32, epochs=8)
    scores = {}
    configs = {"standard": base, "robust": dataclasses.replace(base, attack=attack)}
    for name, config in configs.items():
        result = fit(apply_fn, params, state, train, val, config, progress=False)
        scores[name] = robust_accuracy(
            apply_fn, result.params, result.state, val, attack, key=jax.random.key(3)
        )
    assert scores["standard"]["clean"] > 0.85
    for score in scores.values():
        assert score["robust"] <= score["clean"]
    assert scores["robust"]["robust"] > scores["standard"]["robust"] + 0.15
