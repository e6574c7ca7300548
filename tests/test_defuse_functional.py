"""Defuse on the one model convention: any JAX callable as decoder, classifier or encoder, the
weights it holds at the call, the pure identification kernel, keys, and clear errors.

The models are defined here. The decoder maps a latent `z [n, 2]` to an 8x8x1 image whose left
half shows `z[0]` and right half `z[1]` (or swapped); the classifier's class-1 logit is
`sign * sum(left half)`, its class-0 logit 0. Every image is labelled 0, so a draw is a failure
exactly where `sign * z_left > 0`: half the latent space, a planted truth.
"""

from __future__ import annotations

import functools

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jfail.defuse import (
    MajorityVote,
    Scenarios,
    distill,
    encode,
    identify,
    identify_batch,
    review_scenarios,
    sample_latents,
    sample_scenarios,
)
from jfail.models.adapter import ModelCallError, as_model

SIDE, LATENT, DRAWS = 8, 2, 12
LEFT = (np.arange(SIDE * SIDE) % SIDE) < SIDE // 2  # pixels of the image's left half
MU = np.array([[0.02, -0.03], [-0.04, 0.01], [0.0, 0.05], [0.03, 0.0], [-0.01, -0.02]],
              np.float32)
LABELS = np.zeros(len(MU), np.int64)


def _decoder_weights(swap: bool = False) -> jax.Array:
    w = np.zeros((LATENT, SIDE * SIDE), np.float32)
    w[0, LEFT], w[1, ~LEFT] = 1.0, 1.0
    return jnp.asarray(w[::-1].copy() if swap else w)


def _classifier_weights(sign: float = 1.0) -> jax.Array:
    w = np.zeros((SIDE * SIDE, 2), np.float32)
    w[LEFT, 1] = sign
    return jnp.asarray(w)


def _decode(params, z):
    return (z @ params["w"]).reshape(len(z), SIDE, SIDE, 1)


def _classify(params, x):
    return x.reshape(len(x), -1) @ params["w"]


def _expected_failures(key, sign=1.0, swap=False, mu=MU, draws=DRAWS):
    """(latents, sources) of every failing draw, computed in NumPy from the centred Beta noise."""
    latents, sources = [], []
    for i, m in enumerate(mu):
        eps = np.asarray(jax.random.beta(jax.random.fold_in(key, i), 50.0, 50.0, (draws, LATENT)))
        z = m + (eps - np.float32(0.5))
        wrong = sign * z[:, 1 if swap else 0] > 0
        latents.append(z[wrong])
        sources.append(np.full(wrong.sum(), i))
    return np.concatenate(latents), np.concatenate(sources)


# --------------------------------------------------------------------------------------------
# The model styles. Each holds the decoder and classifier with `sign` and `swap` settable; the
# mutable styles change the weights in place, Equinox builds updated modules with tree_at.


class _Closure:
    def __init__(self):
        self.dec, self.cls = {"w": _decoder_weights()}, {"w": _classifier_weights()}
        dec, cls = self.dec, self.cls
        self._models = (lambda z: _decode(dec, z)), (lambda x: _classify(cls, x))

    def models(self):
        return self._models

    def set(self, sign, swap):
        self.dec["w"], self.cls["w"] = _decoder_weights(swap), _classifier_weights(sign)


class _FunctoolsPartial(_Closure):
    def __init__(self):
        super().__init__()
        self._models = functools.partial(_decode, self.dec), functools.partial(_classify, self.cls)


class _TreePartial(_Closure):
    def __init__(self):
        super().__init__()
        self._models = (jax.tree_util.Partial(_decode, self.dec),
                        jax.tree_util.Partial(_classify, self.cls))


class _NnxDecoder(nnx.Module):
    def __init__(self, w):
        self.w = nnx.Param(w)

    def __call__(self, z):
        return (z @ self.w[...]).reshape(len(z), SIDE, SIDE, 1)


class _NnxClassifier(nnx.Module):
    def __init__(self, w):
        self.w = nnx.Param(w)

    def __call__(self, x):
        return x.reshape(len(x), -1) @ self.w[...]


class _Nnx:
    def __init__(self):
        self.dec, self.cls = _NnxDecoder(_decoder_weights()), _NnxClassifier(_classifier_weights())

    def models(self):
        return self.dec, self.cls

    def set(self, sign, swap):
        self.dec.w[...] = _decoder_weights(swap)
        self.cls.w[...] = _classifier_weights(sign)


class _EqxDecoder(eqx.Module):
    w: jax.Array

    def __call__(self, z):
        return (z @ self.w).reshape(len(z), SIDE, SIDE, 1)


class _EqxClassifier(eqx.Module):
    """Equinox's convention: one example, channels first, `[C, H, W] -> [K]`."""

    w: jax.Array

    def __call__(self, x):
        return jnp.moveaxis(x, 0, -1).reshape(-1) @ self.w


class _Eqx:
    def __init__(self):
        self.dec, self.cls = _EqxDecoder(_decoder_weights()), _EqxClassifier(_classifier_weights())

    def models(self):
        return self.dec, as_model(self.cls, per_example=True, channels_first=True)

    def set(self, sign, swap):
        self.dec = eqx.tree_at(lambda m: m.w, self.dec, _decoder_weights(swap))
        self.cls = eqx.tree_at(lambda m: m.w, self.cls, _classifier_weights(sign))


class _LinenClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True)(x.reshape(len(x), -1))
        return nn.Dense(2, use_bias=False)(x)


class _LinenBatchNorm(_Closure):
    """A linen classifier with BatchNorm in inference mode, as a Partial over `module.apply`."""

    def __init__(self):
        super().__init__()
        ones, zeros = jnp.ones(SIDE * SIDE), jnp.zeros(SIDE * SIDE)
        self.variables = {
            "params": {"BatchNorm_0": {"scale": ones, "bias": zeros},
                       "Dense_0": {"kernel": _classifier_weights()}},
            "batch_stats": {"BatchNorm_0": {"mean": zeros, "var": ones}},
        }
        self._models = self._models[0], jax.tree_util.Partial(_LinenClassifier().apply,
                                                              self.variables)

    def set(self, sign, swap):
        super().set(sign, swap)
        self.variables["params"]["Dense_0"]["kernel"] = _classifier_weights(sign)


STYLES = {"closure": _Closure, "functools_partial": _FunctoolsPartial,
          "tree_partial": _TreePartial, "nnx": _Nnx, "equinox": _Eqx,
          "linen_batchnorm": _LinenBatchNorm}


def _identify(decoder, classifier, key=3, **kwargs):
    settings = dict(num_draws=DRAWS, max_per_image=DRAWS, noise="centred", progress=False)
    return identify(decoder, classifier, MU, LABELS, key=key, **{**settings, **kwargs})


# --------------------------------------------------------------------------------------------
# Identification.


@pytest.mark.parametrize("style", STYLES)
def test_identify_finds_the_planted_failures_in_every_style_and_follows_weight_updates(style):
    models = STYLES[style]()
    key = jax.random.key(3)
    for sign, swap in ((1.0, False), (-1.0, False), (-1.0, True)):
        models.set(sign, swap)
        found = _identify(*models.models(), key=key)
        latents, sources = _expected_failures(key, sign, swap)
        assert 0 < len(latents) < len(MU) * DRAWS  # both halves of the latent space are drawn
        np.testing.assert_array_equal(found.sources, sources)
        np.testing.assert_allclose(found.latents, latents, rtol=1e-6, atol=1e-7)
        assert found.misclassified_draws == len(latents)
        assert np.all(found.predictions == 1)
        side = found.latents[:, 1 if swap else 0] * sign
        assert np.all(side > 0)  # failures only in the planted half
        np.testing.assert_allclose(found.images[:, 0, 0, 0], found.latents[:, 1 if swap else 0],
                                   rtol=1e-6)


def test_identify_does_not_depend_on_chunk_size_and_matches_the_kernel():
    decoder, classifier = _TreePartial().models()
    runs = [_identify(decoder, classifier, draws_per_chunk=chunk) for chunk in (DRAWS, 10_000)]
    np.testing.assert_array_equal(runs[0].latents, runs[1].latents)
    np.testing.assert_array_equal(runs[0].sources, runs[1].sources)
    draws = identify_batch(decoder, classifier, MU, LABELS, key=3, num_draws=DRAWS,
                           noise="centred")
    np.testing.assert_array_equal(np.asarray(draws.latents)[np.asarray(draws.errors)],
                                  runs[0].latents)


def test_identify_batch_under_jit_and_vmap_equals_eager():
    decoder, classifier = _Nnx().models()
    eager = identify_batch(decoder, classifier, MU, LABELS, key=5, num_draws=DRAWS, noise="centred")
    chex.assert_shape([eager.latents, eager.images, eager.predictions, eager.errors],
                      [(len(MU), DRAWS, LATENT), (len(MU), DRAWS, SIDE, SIDE, 1),
                       (len(MU), DRAWS), (len(MU), DRAWS)])
    assert eager.errors.dtype == jnp.bool_

    @jax.jit
    def run(decoder, classifier, mu, labels, key):
        return identify_batch(decoder, classifier, mu, labels, key=key, num_draws=DRAWS,
                              noise="centred")

    jitted = run(decoder, classifier, MU, LABELS, jax.random.key(5))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(eager.errors, eager.latents[..., 0] > 0)  # planted truth
    # a slice with its global index draws what the whole batch draws for those images
    part = jax.jit(lambda mu, labels: identify_batch(
        decoder, classifier, mu, labels, key=5, num_draws=DRAWS, noise="centred",
        index=jnp.arange(2, 4)))(MU[2:4], LABELS[2:4])
    np.testing.assert_allclose(part.latents, eager.latents[2:4], rtol=1e-6, atol=1e-7)

    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.jit(jax.vmap(lambda k: run(decoder, classifier, MU, LABELS, k)))(keys)
    assert batched.latents.shape == (3, len(MU), DRAWS, LATENT)
    for i in range(3):
        one = identify_batch(decoder, classifier, MU, LABELS, key=keys[i], num_draws=DRAWS,
                             noise="centred")
        np.testing.assert_allclose(batched.latents[i], one.latents, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(batched.errors[i], one.errors)
    with pytest.raises(TypeError, match="identify_batch"):
        jax.jit(lambda mu: identify(decoder, classifier, mu, LABELS, key=0).latents)(MU)


def test_a_key_is_keyword_only_and_an_int_seed_equals_its_key():
    decoder, classifier = _TreePartial().models()
    runs = [_identify(decoder, classifier, key=k)
            for k in (0, jax.random.key(0), jax.random.PRNGKey(0), np.int64(0))]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0].latents, other.latents)
    with pytest.raises(TypeError):
        identify(decoder, classifier, MU, LABELS, 0)  # the key is keyword-only
    with pytest.raises(ValueError, match="key is required"):
        identify(decoder, classifier, MU, LABELS, key=None)
    scenarios = Scenarios(means=np.zeros((2, LATENT), np.float32),
                          covariances=np.stack([np.eye(LATENT, dtype=np.float32)] * 2),
                          weights=np.full(2, 0.5, np.float32), components=np.arange(2),
                          assignments=np.zeros(0, np.int64), num_fitted=2, converged=True)
    np.testing.assert_array_equal(sample_latents(scenarios, key=1, num_samples=4),
                                  sample_latents(scenarios, key=jax.random.key(1), num_samples=4))
    points = np.random.default_rng(0).normal(size=(60, 2))
    np.testing.assert_array_equal(distill(points, key=2, max_components=3).means,
                                  distill(points, key=jax.random.key(2), max_components=3).means)


def test_identify_rejects_bad_input_with_clear_errors():
    decoder, classifier = _TreePartial().models()
    with pytest.raises(ValueError, match="empty"):
        identify(decoder, classifier, np.zeros((0, LATENT)), np.zeros(0, int), key=0)
    with pytest.raises(ModelCallError, match=r"\(12, 3\)"):  # 3 latents, the decoder takes 2
        identify(decoder, classifier, np.zeros((1, 3)), np.zeros(1, int), key=0, num_draws=DRAWS)
    flat_decoder = lambda z: z @ _decoder_weights()  # noqa: E731 - [n, 64], not [n, H, W, C]
    with pytest.raises(ValueError, match=r"must return images \[.*H, W, C\]"):
        _identify(flat_decoder, classifier)
    small_images = lambda z: (z @ _decoder_weights()[:, :16]).reshape(len(z), 4, 4, 1)  # noqa
    with pytest.raises(ModelCallError, match="4, 4, 1"):
        _identify(small_images, classifier)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*\[0, 2\]"):
        identify(decoder, classifier, MU[:2], np.array([0, 2]), key=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        identify(decoder, classifier, MU[:2], np.array([-1, 0]), key=0)
    nan_decoder = jax.tree_util.Partial(_decode, {"w": _decoder_weights() * jnp.nan})
    with pytest.raises(ValueError, match="decoder returned NaN"):
        _identify(nan_decoder, classifier)
    nan_classifier = jax.tree_util.Partial(_classify, {"w": _classifier_weights() * jnp.nan})
    with pytest.raises(ValueError, match="classifier returned NaN"):
        _identify(decoder, nan_classifier)
    with pytest.raises(TypeError, match="callable"):
        _identify(decoder, "not a model")
    with pytest.raises(ModelCallError):  # the kernel checks shapes too, also under jit
        jax.jit(lambda mu: identify_batch(decoder, classifier, mu, LABELS, key=0,
                                          num_draws=2).errors)(np.zeros((len(MU), 3)))


# --------------------------------------------------------------------------------------------
# Encoding, sampling and review.


def test_encode_uses_the_encoders_current_weights_in_every_style():
    images = np.random.default_rng(0).uniform(size=(7, SIDE, SIDE, 1)).astype(np.float32)
    flat = images.reshape(len(images), -1)
    weights = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(64, LATENT)), jnp.float32)}

    def encoder(x):
        mu = x.reshape(len(x), -1) @ weights["w"]
        return mu, jnp.zeros_like(mu)

    class NnxEncoder(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(weights["w"])

        def __call__(self, x):
            mu = x.reshape(len(x), -1) @ self.w[...]
            return mu, -mu

    module = NnxEncoder()
    for scale in (1.0, -2.0):
        weights["w"] = weights["w"] * scale
        module.w[...] = weights["w"]
        expected = flat @ np.asarray(weights["w"])
        for model in (encoder, module, functools.partial(lambda w, x: encoder(x), None)):
            mu, logvar = encode(model, images, batch_size=3)
            np.testing.assert_allclose(mu, expected, rtol=1e-5, atol=1e-5)
            assert logvar.shape == mu.shape
    with pytest.raises(ValueError, match="empty"):
        encode(encoder, images[:0])
    with pytest.raises(ModelCallError):
        encode(encoder, images[:, :4, :4])
    with pytest.raises(ValueError, match=r"must return \(mu"):
        encode(lambda x: x.reshape(len(x), -1), images)
    with pytest.raises(ValueError, match="encoder returned NaN"):
        encode(lambda x: encoder(x * jnp.nan), images)


def test_sample_scenarios_decodes_with_the_decoders_current_weights():
    scenarios = Scenarios(means=np.array([[1.0, -1.0], [-2.0, 0.5]], np.float32),
                          covariances=np.stack([np.eye(LATENT, dtype=np.float32)] * 2) * 0.1,
                          weights=np.full(2, 0.5, np.float32), components=np.arange(2),
                          assignments=np.zeros(0, np.int64), num_fitted=2, converged=True)
    closure = _Closure()
    eqx_style = _Eqx()
    for swap in (False, True):
        closure.set(1.0, swap)
        eqx_style.set(1.0, swap)
        for decoder in (closure.models()[0], eqx_style.models()[0]):
            z, images = sample_scenarios(decoder, scenarios, key=4, num_samples=5, batch_size=3)
            assert z.shape == (2, 5, LATENT) and images.shape == (2, 5, SIDE, SIDE, 1)
            left = np.asarray(z)[..., 1 if swap else 0]
            np.testing.assert_allclose(images[..., 0, 0, 0], left, rtol=1e-6)
    with pytest.raises(ModelCallError):
        sample_scenarios(lambda z: _decode({"w": jnp.zeros((3, 64))}, z), scenarios, key=0)
    with pytest.raises(ValueError, match="decoder returned NaN"):
        sample_scenarios(lambda z: _decode(closure.dec, z) * jnp.nan, scenarios, key=0)
    with pytest.raises(ValueError, match=r"must return images \[n, H, W, C\]"):
        sample_scenarios(lambda z: z @ closure.dec["w"], scenarios, key=0)


def test_review_and_majority_vote_use_the_classifiers_current_weights():
    rng = np.random.default_rng(0)
    samples = rng.uniform(-1, 1, size=(3, 4, SIDE, SIDE, 1)).astype(np.float32)
    left_sum = samples.reshape(3, 4, -1)[..., LEFT].sum(-1)
    closure, nnx_style = _Closure(), _Nnx()
    for sign in (1.0, -1.0):
        closure.set(sign, False)
        nnx_style.set(sign, False)
        classifier = closure.models()[1]
        expected = (sign * left_sum > 0).astype(np.int64)

        class Oracle:
            def label(self, images):
                return np.zeros(len(images), np.int64)

        reviews = review_scenarios(Oracle(), classifier, samples, batch_size=5)
        np.testing.assert_array_equal(np.stack([r.predictions for r in reviews]), expected)
        voters = MajorityVote([classifier, nnx_style.models()[1],
                               jax.tree_util.Partial(_classify, {"w": _classifier_weights(sign)})],
                              batch_size=5)
        flat = samples.reshape(-1, SIDE, SIDE, 1)
        np.testing.assert_array_equal(voters.votes(flat), np.repeat(expected.reshape(-1, 1), 3, 1))
        np.testing.assert_array_equal(voters.label(flat), expected.reshape(-1))
    with pytest.raises(ModelCallError):
        review_scenarios(Oracle(), classifier, samples[:, :, :4, :4])
    nan_classifier = lambda x: _classify(closure.cls, x) * jnp.nan  # noqa: E731
    with pytest.raises(ValueError, match="NaN"):
        review_scenarios(Oracle(), nan_classifier, samples)
    with pytest.raises(ValueError, match=r"\[1\] returned NaN"):
        MajorityVote([classifier, nan_classifier]).label(samples[0])
    with pytest.raises(ValueError, match=r"logits \[B, K\]"):
        MajorityVote([lambda x: x]).label(samples[0])
