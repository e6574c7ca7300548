"""fit / evaluate / predict / errors / correct / pgd_attack on every model style.

The toy task: 8x8 grey images of noise; class 1 has a brighter left half. Any of the models below
learns it in a few dozen steps, so accuracy far above chance (0.5) shows training happened.
"""

import dataclasses

import chex
import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jfail.data import Dataset
from jfail.defuse import CorrectionConfig, correct
from jfail.models import linen_apply, stateless_apply
from jfail.models.adapter import ModelCallError
from jfail.train import (
    Attack,
    TrainableModel,
    TrainConfig,
    errors,
    evaluate,
    fit,
    pgd_attack,
    predict,
    robust_accuracy,
    trainable,
)


def _toy(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int32)
    images = rng.uniform(0.0, 0.5, (n, 8, 8, 1)).astype(np.float32)
    images[labels == 1, :, :4] += 0.4
    return images, labels


TRAIN, VAL = _toy(256, 0), _toy(128, 1)
CONFIG = TrainConfig(optimizer=optax.adam(1e-2), batch_size=32, epochs=3)


def _accuracy(logits, labels):
    return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.norm(self.hidden(x.reshape(x.shape[0], -1)))))


class EqxNet(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, key):
        self.mlp = eqx.nn.MLP(64, 2, 16, 1, key=key)

    def __call__(self, x):  # takes a batch
        return jax.vmap(self.mlp)(x.reshape(x.shape[0], -1))


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x, train=False):
        h = linen.Dense(16)(x.reshape(x.shape[0], -1))
        h = linen.BatchNorm(use_running_average=not train, momentum=0.5)(h)
        return linen.Dense(2)(jax.nn.relu(h))


def _dense_params(key):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"w": 0.1 * jax.random.normal(k1, (64, 2)), "b": jnp.zeros(2)}


def _dense(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def test_fit_nnx_module_with_an_optax_transformation_updates_batch_stats():
    module = NnxNet(nnx.Rngs(0))
    before = jax.tree_util.tree_map(np.asarray, nnx.state(module))
    result = fit(module, TRAIN, VAL, CONFIG, progress=False)
    fitted = result.model
    assert isinstance(fitted, NnxNet)
    assert result.history[result.best_epoch]["val_accuracy"] > 0.9
    assert np.abs(np.asarray(fitted.norm.mean[...])).max() > 1e-3  # running stats moved
    # the module passed in is untouched
    after = jax.tree_util.tree_map(np.asarray, nnx.state(module))
    chex.assert_trees_all_equal(before, after)
    fitted.eval()
    direct = _accuracy(fitted(jnp.asarray(VAL[0])), VAL[1])
    assert evaluate(fitted, VAL)["accuracy"] == pytest.approx(direct)
    assert direct == pytest.approx(result.history[result.best_epoch]["val_accuracy"])


def test_nnx_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights(tmp_path):
    config = dataclasses.replace(CONFIG, epochs=2)
    fit(NnxNet(nnx.Rngs(0)), TRAIN, VAL, dataclasses.replace(config, epochs=1), progress=False,
        checkpoint_dir=tmp_path)
    resumed = fit(NnxNet(nnx.Rngs(0)), TRAIN, VAL, config, progress=False,
                  checkpoint_dir=tmp_path)
    straight = fit(NnxNet(nnx.Rngs(0)), TRAIN, VAL, config, progress=False)
    chex.assert_trees_all_equal((resumed.params, resumed.state),
                                (straight.params, straight.state))
    assert [h["val_accuracy"] for h in resumed.history] == \
        [h["val_accuracy"] for h in straight.history]


def test_fit_equinox_module_with_adamw():
    config = dataclasses.replace(CONFIG, optimizer=optax.adamw(1e-2, weight_decay=1e-4))
    result = fit(EqxNet(jax.random.key(0)), TRAIN, VAL, config, progress=False)
    assert isinstance(result.model, EqxNet)
    accuracy = _accuracy(result.model(jnp.asarray(VAL[0])), VAL[1])
    assert accuracy > 0.9
    assert evaluate(result.model, Dataset(*VAL, ()))["accuracy"] == pytest.approx(accuracy)


def test_fit_stateless_apply_matches_the_apply_fn_convention_bitwise():
    params = _dense_params(0)
    config = dataclasses.replace(CONFIG, optimizer=optax.sgd(0.5))
    new = fit(trainable(_dense, params), TRAIN, VAL, config, progress=False)
    old = fit(stateless_apply(_dense), params, None,
              Dataset(*TRAIN, ()), Dataset(*VAL, ()), config, progress=False)
    chex.assert_trees_all_equal(new.params, old.params)
    assert isinstance(new.model, TrainableModel)
    assert _accuracy(new.model(jnp.asarray(VAL[0])), VAL[1]) > 0.9
    assert new.history == [{**h, "seconds": n["seconds"]} for h, n in zip(old.history, new.history)]


def test_fit_linen_with_batchnorm_both_ways():
    module = LinenNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    apply_fn = linen_apply(module)
    old = fit(apply_fn, params, state, Dataset(*TRAIN, ()), Dataset(*VAL, ()), CONFIG,
              progress=False)
    new = fit(trainable(apply_fn, params, state), TRAIN, VAL, CONFIG, progress=False)
    chex.assert_trees_all_equal((new.params, new.state), (old.params, old.state))
    assert np.abs(np.asarray(new.state["batch_stats"]["BatchNorm_0"]["mean"])).max() > 1e-3
    logits = module.apply({"params": new.params, **new.state}, VAL[0])
    assert _accuracy(logits, VAL[1]) > 0.9
    assert evaluate(new.model, VAL)["accuracy"] == pytest.approx(_accuracy(logits, VAL[1]))
    assert evaluate(apply_fn, new.params, new.state, Dataset(*VAL, ()))["accuracy"] == \
        pytest.approx(_accuracy(logits, VAL[1]))


def test_a_weight_update_between_two_evaluate_calls_changes_the_result():
    images, labels = VAL
    share_of_ones = float(np.mean(labels == 1))
    # closure over a dict of weights
    weights = {"w": jnp.zeros((64, 2)), "b": jnp.array([1.0, 0.0])}
    model = lambda x: _dense(weights, x)  # noqa: E731
    assert evaluate(model, VAL)["accuracy"] == pytest.approx(1 - share_of_ones)
    weights["b"] = jnp.array([0.0, 1.0])
    assert evaluate(model, VAL)["accuracy"] == pytest.approx(share_of_ones)
    # NNX module, updated in place
    net = NnxNet(nnx.Rngs(1))
    net.eval()
    first = predict(net, images)
    np.testing.assert_allclose(first, net(jnp.asarray(images)), rtol=1e-5, atol=1e-6)
    net.out.kernel[...] = jnp.zeros((16, 2))
    net.out.bias[...] = jnp.array([0.0, 1.0])
    assert evaluate(net, VAL)["accuracy"] == pytest.approx(share_of_ones)
    np.testing.assert_array_equal(errors(net, VAL), labels != 1)


@pytest.mark.parametrize("style", ["closure", "partial", "nnx", "eqx", "trainable"])
def test_errors_is_argmax_not_equal_labels(style):
    images, labels = VAL
    params = _dense_params(3)
    model = {
        "closure": lambda x: _dense(params, x),
        "partial": jax.tree_util.Partial(_dense, params),
        "nnx": NnxNet(nnx.Rngs(2)),
        "eqx": EqxNet(jax.random.key(2)),
        "trainable": trainable(_dense, params),
    }[style]
    if style == "nnx":
        model.eval()
    expected = np.argmax(np.asarray(model(jnp.asarray(images))), -1) != labels
    wrong = errors(model, (images, labels), batch_size=50)
    assert wrong.dtype == bool and wrong.shape == (len(labels),)
    np.testing.assert_array_equal(wrong, expected)
    assert 0 < wrong.sum() < len(labels)


def test_correct_with_tuples_matches_datasets_and_fixes_the_failures():
    params = _dense_params(4)
    train, val = TRAIN, VAL
    fail_images, _ = _toy(32, 5)
    fail_labels = np.zeros(32, np.int32)  # a planted rule the training data contradicts
    failures = (fail_images, fail_labels)
    config = CorrectionConfig(batch_size=32, epochs=2, optimizer=optax.adam(1e-2))
    sweep = correct(trainable(_dense, params), train, failures, val, [0.0, 4.0], config,
                    evaluate_on={"failures": failures}, progress=False)
    legacy = correct(stateless_apply(_dense), params, None, Dataset(*train, ()),
                     Dataset(*failures, ()), Dataset(*val, ()), [0.0, 4.0], config,
                     evaluate_on={"failures": Dataset(*failures, ())}, progress=False)
    chex.assert_trees_all_equal(sweep.params, legacy.params)
    assert sweep.per_lambda == legacy.per_lambda
    by_lambda = {r["lambda"]: r["failures_accuracy"] for r in sweep.per_lambda}
    assert by_lambda[4.0] > by_lambda[0.0] + 0.2
    # NNX module through the same entry point
    result = correct(NnxNet(nnx.Rngs(0)), train, failures, val, [1.0],
                     dataclasses.replace(config, epochs=1), progress=False)
    assert isinstance(result.model, NnxNet)


def test_pgd_attack_is_a_pure_kernel_with_a_keyword_key():
    model = jax.tree_util.Partial(_dense, _dense_params(6))
    x, y = jnp.asarray(VAL[0][:8]), jnp.asarray(VAL[1][:8])
    attack = Attack(norm="linf", epsilon=0.05, steps=3)
    eager = pgd_attack(model, x, y, attack, key=3)
    np.testing.assert_array_equal(eager, pgd_attack(model, x, y, attack, key=jax.random.key(3)))
    jitted = jax.jit(lambda m, x, k: pgd_attack(m, x, y, attack, key=k))(model, x, 3)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    keys = jnp.arange(3)
    batched = jax.vmap(lambda k: pgd_attack(model, x, y, attack, key=k))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], pgd_attack(model, x, y, attack, key=i), atol=1e-6)
    grad = jax.grad(lambda w: pgd_attack(jax.tree_util.Partial(_dense, w), x, y, attack,
                                         key=0).sum())(model.args[0])
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(model.args[0])
    with pytest.raises(TypeError):
        pgd_attack(model, x, y, attack, 3)  # key is keyword-only
    scores = robust_accuracy(model, VAL, attack, key=0, batch_size=50)
    assert scores["clean"] == pytest.approx(evaluate(model, VAL)["accuracy"])
    assert scores["robust"] < scores["clean"]


def test_bad_inputs_raise_clear_errors_before_training():
    params = _dense_params(0)
    model = trainable(_dense, params)
    empty = (np.zeros((0, 8, 8, 1), np.float32), np.zeros((0,), np.int32))
    with pytest.raises(ValueError, match="empty"):
        fit(model, empty, None, CONFIG, progress=False)
    with pytest.raises(ValueError, match="empty"):
        errors(model, empty)
    small = (TRAIN[0][:, :7, :7], TRAIN[1])
    with pytest.raises(ModelCallError, match="7, 7"):
        fit(model, small, None, CONFIG, progress=False)
    with pytest.raises(ModelCallError):
        evaluate(model, small)
    with pytest.raises(ModelCallError):
        pgd_attack(model, jnp.asarray(small[0][:4]), jnp.asarray(small[1][:4]), key=0)
    bad_labels = (TRAIN[0], np.where(TRAIN[1] == 1, 2, 0).astype(np.int32))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        fit(model, bad_labels, None, CONFIG, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        errors(model, bad_labels)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        pgd_attack(model, jnp.asarray(TRAIN[0][:4]), jnp.asarray([0, 1, 2, 0]), key=0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        correct(model, TRAIN, (TRAIN[0][:4], np.array([0, 1, 5, 0], np.int32)), VAL, [1.0],
                progress=False)
    with pytest.raises(ValueError, match="empty"):
        pgd_attack(model, jnp.zeros((0, 8, 8, 1)), jnp.zeros((0,), jnp.int32), key=0)
    with pytest.raises(TypeError, match="trainable weights"):
        fit(lambda x: _dense(params, x), TRAIN, None, CONFIG, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
