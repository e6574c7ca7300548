"""Defuse: identification, distillation, sampling, β-VAE training and correction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail.data import Dataset
from jfail.defuse import (
    CorrectionConfig,
    Scenarios,
    VAEConfig,
    correct,
    distill,
    finetune,
    identify,
    sample_latents,
    sample_scenarios,
    train_vae,
)
from jfail.models import BetaVAE
from jfail.train.summaries import epoch_summaries
from tests.tensorboard_events import tensorboard_scalars


def _decode(weights, z):
    return (z @ weights)[:, None, None, :]  # [B, Z] -> [B, 1, 1, Z] "images"


def _classify(weights, x):
    return x[:, 0, 0, :] @ weights


def _toy_models(dim=2):
    eye = jnp.eye(dim)
    return jax.tree_util.Partial(_decode, eye), jax.tree_util.Partial(_classify, eye)


def test_identify_keeps_exactly_the_first_misclassified_draws():
    decoder, classifier = _toy_models()
    mu = np.array([[0.0, 0.0], [0.0, 1.0], [0.1, 0.0], [-0.05, 0.05]], np.float32)
    labels = np.array([0, 1, 0, 1])
    key = jax.random.key(3)
    cap, draws = 7, 40
    found = identify(decoder, classifier, mu, labels, key=key, num_draws=draws, max_per_image=cap,
                     draws_per_chunk=64, progress=False)
    expected_total = 0
    for i in range(len(mu)):
        eps = np.asarray(jax.random.beta(jax.random.fold_in(key, i), 50.0, 50.0, (draws, 2)))
        z = mu[i] + eps
        wrong = np.argmax(z, axis=1) != labels[i]
        expected_total += wrong.sum()
        kept = z[wrong][:cap]
        np.testing.assert_allclose(found.latents[found.sources == i], kept, rtol=1e-6)
        assert found.per_image[i] == min(wrong.sum(), cap)
    assert found.misclassified_draws == expected_total
    assert np.all(found.predictions != found.labels)
    assert np.array_equal(found.labels, labels[found.sources])
    np.testing.assert_allclose(found.images[:, 0, 0, :], found.latents, rtol=1e-6)
    assert found.per_image.max() == cap  # the cap binds for image 0 (a coin flip per draw)


def test_identify_does_not_depend_on_chunk_size():
    decoder, classifier = _toy_models()
    mu = np.random.default_rng(0).normal(size=(9, 2)).astype(np.float32) * 0.1
    labels = np.arange(9) % 2
    runs = [identify(decoder, classifier, mu, labels, key=jax.random.key(0), num_draws=20,
                     max_per_image=5, draws_per_chunk=chunk, progress=False)
            for chunk in (60, 10_000)]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0].latents, other.latents)
        np.testing.assert_array_equal(runs[0].sources, other.sources)


@pytest.mark.parametrize("noise, mean_shift", [("paper", 0.5), ("centred", 0.0)])
def test_identify_noise_is_beta_as_written_or_centred(noise, mean_shift):
    decoder = jax.tree_util.Partial(_decode, jnp.eye(3))
    always_class_2 = jax.tree_util.Partial(lambda w, x: jnp.tile(w, (len(x), 1)),
                                           jnp.array([0.0, 0.0, 1.0]))
    mu = np.array([[1.0, -2.0, 0.5]], np.float32)
    found = identify(decoder, always_class_2, mu, np.array([0]), key=jax.random.key(1),
                     num_draws=4000, max_per_image=4000, noise=noise, progress=False)
    eps = found.latents - mu
    assert len(found) == 4000 and found.failure_rate == 1.0
    np.testing.assert_allclose(eps.mean(0), mean_shift, atol=0.005)
    beta_std = np.sqrt(50 * 50 / (100**2 * 101))  # Beta(50, 50)
    np.testing.assert_allclose(eps.std(0), beta_std, rtol=0.05)


def test_identify_rejects_bad_input():
    decoder, classifier = _toy_models()
    with pytest.raises(ValueError, match="non-finite"):
        identify(decoder, classifier, np.array([[np.nan, 0.0]]), np.array([0]),
                 key=jax.random.key(0))
    with pytest.raises(ValueError, match="labels must be"):
        identify(decoder, classifier, np.zeros((2, 2)), np.array([0]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="Beta parameter a"):
        identify(decoder, classifier, np.zeros((1, 2)), np.array([0]), key=jax.random.key(0),
                 a=0.0)


def _planted_mixture(rng):
    means = np.array([[0.0, 0.0], [8.0, 8.0], [-8.0, 6.0]])
    scales = np.array([[0.5, 1.0], [1.0, 0.3], [0.6, 0.6]])
    counts = np.array([900, 600, 300])
    points = np.concatenate([rng.normal(m, s, (n, 2)) for m, s, n in zip(means, scales, counts)])
    truth = np.repeat(np.arange(3), counts)
    return points, truth, means, counts / counts.sum()


def test_distill_recovers_a_planted_gaussian_mixture():
    points, truth, means, weights = _planted_mixture(np.random.default_rng(0))
    scenarios = distill(points, key=jax.random.key(0), max_components=10)
    assert np.all(np.diff(scenarios.weights) <= 0)  # heaviest first
    # every kept component holds points of one planted cluster only
    for s in range(len(scenarios)):
        members = truth[scenarios.assignments == s]
        assert len(members) and np.all(members == members[0])
    for k in range(3):
        parts = [s for s in range(len(scenarios))
                 if np.all(truth[scenarios.assignments == s] == k)
                 and np.any(scenarios.assignments == s)]
        assert parts, f"planted cluster {k} was not recovered"
        part_weights = scenarios.weights[parts]
        np.testing.assert_allclose(part_weights.sum(), weights[k], atol=0.03)
        centre = (scenarios.means[parts] * part_weights[:, None]).sum(0) / part_weights.sum()
        np.testing.assert_allclose(centre, means[k], atol=0.15)


def test_distill_down_samples_and_drops_light_components():
    points, truth, _, _ = _planted_mixture(np.random.default_rng(1))
    scenarios = distill(points, key=jax.random.key(0), max_components=10, max_points=600,
                        min_weight=0.05)
    assert len(scenarios.assignments) == len(points)
    assert np.all(scenarios.weights > 0.05)
    assert set(np.unique(scenarios.assignments)) <= set(range(-1, len(scenarios)))


def test_distill_gives_clear_errors():
    with pytest.raises(ValueError, match="no failures to distil"):
        distill(np.zeros((0, 10)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="fewer than max_components"):
        distill(np.zeros((50, 10)), key=jax.random.key(0), max_components=100)
    bad = np.random.default_rng(0).normal(size=(200, 3))
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        distill(bad, key=jax.random.key(0), max_components=5)


def test_sampling_follows_the_scaled_component_covariance():
    cov = np.array([[[2.0, 0.6], [0.6, 0.5]], [[0.2, -0.1], [-0.1, 1.5]]], np.float32)
    scenarios = Scenarios(means=np.array([[1.0, -1.0], [4.0, 2.0]], np.float32), covariances=cov,
                          weights=np.array([0.6, 0.4], np.float32), components=np.arange(2),
                          assignments=np.zeros(0, np.int64), num_fitted=2, converged=True)
    z = np.asarray(sample_latents(scenarios, key=jax.random.key(0), num_samples=40_000, tau=0.5))
    for s in range(2):
        np.testing.assert_allclose(z[s].mean(0), scenarios.means[s], atol=0.02)
        np.testing.assert_allclose(np.cov(z[s].T), 0.5 * cov[s], atol=0.02)
    decoder, _ = _toy_models()
    z_small, images = sample_scenarios(decoder, scenarios, key=jax.random.key(1), num_samples=8)
    assert images.shape == (2, 8, 1, 1, 2)
    np.testing.assert_allclose(images[:, :, 0, 0, :], z_small, rtol=1e-6)
    with pytest.raises(ValueError, match="tau"):
        sample_latents(scenarios, key=jax.random.key(0), num_samples=4, tau=0.0)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        sample_latents(scenarios, key=jax.random.key(0), num_samples=0)


def _tiny_vae():
    return BetaVAE(image_shape=(8, 8, 1), latent_dim=2, encoder_features=(4,),
                   decoder_features=(4, 4), hidden=(16,))


def _blobs(n=96):
    rng = np.random.default_rng(0)
    images = np.zeros((n, 8, 8, 1), np.float32)
    for i in range(n):
        r, c = rng.integers(0, 5, 2)
        images[i, r : r + 3, c : c + 3] = 1.0
    return images


def test_vae_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    images = _blobs()
    config = VAEConfig(epochs=2, batch_size=16, anneal_steps=6, learning_rate=3e-3)
    straight = train_vae(_tiny_vae(), images, config, progress=False)
    assert straight.history[-1]["loss"] < straight.history[0]["loss"]
    # an interrupted run (1 epoch) continued to 2 ends with the same weights
    with epoch_summaries(tmp_path / "tensorboard", prefix="vae/") as write_summaries:
        train_vae(_tiny_vae(), images, VAEConfig(**{**config.__dict__, "epochs": 1}),
                  checkpoint_dir=tmp_path, progress=False, on_epoch_end=write_summaries)
    with epoch_summaries(tmp_path / "tensorboard", prefix="vae/") as write_summaries:
        resumed = train_vae(_tiny_vae(), images, config, checkpoint_dir=tmp_path,
                            progress=False, on_epoch_end=write_summaries)
    assert [r["epoch"] for r in resumed.history] == [0, 1]
    # the TensorBoard curves of the two runs together are the history (as float32)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"vae/loss", "vae/reconstruction", "vae/kl"}
    for tag, values in scalars.items():
        assert values == [(r["epoch"], np.float32(r[tag[4:]])) for r in resumed.history], tag
    # np.testing.assert_allclose's rtol, as before
    chex.assert_trees_all_close(straight.variables, resumed.variables, rtol=1e-7, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_vae(_tiny_vae(), images * 255, config, progress=False)


def _linear_apply(params, state, x, train):
    del train
    return x.reshape(len(x), -1) @ params["w"], state


def _bulk(rng, n):
    """Class = sign of feature 0; feature 2 (a 'style' the bulk never shows) is 0."""
    x = np.zeros((n, 1, 1, 3), np.float32)
    x[:, 0, 0, :2] = rng.normal(size=(n, 2))
    return Dataset(x, (x[:, 0, 0, 0] > 0).astype(np.int32), ("neg", "pos"))


def _failure_region(rng, n):
    """A planted failure: feature 0 says class 0, yet these images (style 1) are class 1."""
    x = np.ones((n, 1, 1, 3), np.float32)
    x[:, 0, 0, 0] = rng.normal(-1.5, 0.5, n)
    x[:, 0, 0, 1] = rng.normal(size=n)
    return Dataset(x, np.ones(n, np.int32), ("neg", "pos"))


def test_correction_fixes_a_planted_failure_and_the_sweep_selects_by_validation():
    rng = np.random.default_rng(0)
    train, val = _bulk(rng, 2048), _bulk(rng, 512)
    fail_train, fail_test = _failure_region(rng, 256), _failure_region(rng, 256)
    params = {"w": jnp.array([[-3.0, 3.0], [0.0, 0.0], [0.0, 0.0]])}
    config = CorrectionConfig(learning_rate=0.05, batch_size=128, epochs=3)

    def accuracy(p, data):
        logits, _ = _linear_apply(p, {}, jnp.asarray(data.images), False)
        return float(np.mean(np.argmax(logits, -1) == data.labels))

    assert accuracy(params, fail_test) < 0.05 and accuracy(params, val) == 1.0
    fixed = finetune(_linear_apply, params, {}, train, fail_train, val, 5.0, config, progress=False)
    assert accuracy(fixed.params, fail_test) > 0.9
    assert accuracy(fixed.params, val) > 0.95  # the bulk stays right
    sweep = correct(_linear_apply, params, {}, train, fail_train, val, [0.0, 5.0], config,
                    evaluate_on={"scenario": fail_test}, progress=False)
    by_lambda = {r["lambda"]: r for r in sweep.per_lambda}
    assert by_lambda[0.0]["scenario_accuracy"] < 0.1 < 0.9 < by_lambda[5.0]["scenario_accuracy"]
    best = max(sweep.per_lambda, key=lambda r: r["val_accuracy"])
    assert sweep.best_lambda == best["lambda"]
    empty = Dataset(fail_train.images[:0], fail_train.labels[:0], ("neg", "pos"))
    with pytest.raises(ValueError, match="failure set is empty"):
        finetune(_linear_apply, params, {}, train, empty, val, 1.0, config)


def test_settings_out_of_range_are_refused_with_the_setting_named():
    decoder, classifier = _toy_models()
    mu, labels, key = np.zeros((1, 2)), np.array([0]), jax.random.key(0)
    with pytest.raises(ValueError, match="noise must be one of"):
        identify(decoder, classifier, mu, labels, key=key, noise="uniform")
    with pytest.raises(ValueError, match="num_draws must be a positive integer"):
        identify(decoder, classifier, mu, labels, key=key, num_draws=0)
    with pytest.raises(ValueError, match="max_per_image must be a positive integer"):
        identify(decoder, classifier, mu, labels, key=key, max_per_image=-1)
    with pytest.raises(ValueError, match="min_weight must be in"):
        distill(np.zeros((20, 2)), key=key, max_components=2, min_weight=1.0)
    with pytest.raises(ValueError, match="beta must be positive"):
        VAEConfig(beta=0.0)
    with pytest.raises(ValueError, match="anneal_steps must be >= 0"):
        VAEConfig(anneal_steps=-1)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        CorrectionConfig(batch_size=0)
    rng = np.random.default_rng(0)
    train, val, fail = _bulk(rng, 8), _bulk(rng, 8), _failure_region(rng, 4)
    params = {"w": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match="λ must be a finite non-negative number"):
        finetune(_linear_apply, params, {}, train, fail, val, -1.0)
    with pytest.raises(ValueError, match="lambdas is empty"):
        correct(_linear_apply, params, {}, train, fail, val, [])
    shifted = Dataset(np.zeros((4, 2, 2, 1), np.float32), fail.labels, fail.class_names)
    with pytest.raises(ValueError, match="differ in shape from train images"):
        finetune(_linear_apply, params, {}, train, shifted, val, 1.0)
