"""Every API family on every model style, each with a weight update between two calls.

The models are written in the tests (`tests/model_styles.py`): a closure over a dict, a
`jax.tree_util.Partial`, a Flax NNX module, an Equinox module and a Flax linen module with
BatchNorm. Each cell runs the family's public function, changes the weights the way that style's
users do, runs it again, and checks that the second result differs from the first and equals the
result on a freshly built model holding the new weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail import attribution, barlow
from tests.model_styles import STYLES, network

X = jnp.asarray(np.random.RandomState(0).rand(6, 8, 8, 1), jnp.float32)
LABELS = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)


def _assert_updated(before, after, reference, *, rtol=1e-5, atol=1e-6):
    before, after, reference = (np.asarray(a) for a in (before, after, reference))
    assert not np.allclose(before, after, rtol=rtol, atol=atol), "the update was not seen"
    np.testing.assert_allclose(after, reference, rtol=rtol, atol=atol)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", ["smoothgrad", "lrp_epsilon", "lime"])  # one per code path
def test_attribution(style, method):
    net = network(style)
    fn = getattr(attribution, method)
    kwargs = {"key": 0}
    if method == "lime":
        quadrants = (np.arange(8)[:, None] // 4) * 2 + np.arange(8)[None, :] // 4  # [8, 8]
        kwargs.update(num_samples=64, sample_batch_size=64, segments=quadrants)
    before = fn(net.model, X, LABELS, **kwargs)
    after = fn(net.update(3.0), X, LABELS, **kwargs)
    _assert_updated(before, after, fn(net.reference(), X, LABELS, **kwargs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_barlow_features_and_trees(style):
    images = jnp.asarray(np.random.RandomState(3).rand(80, 8, 8, 1), jnp.float32)
    wrong = np.asarray(images[:, :4].mean(axis=(1, 2, 3)) > 0.52)  # a planted region of input

    def run(model):
        features = barlow.features(model, images, progress=False)
        tree = barlow.failure_tree(features, wrong, num_features=4, max_depth=1, key=0)
        return features, tree.mutual_information

    net = network(style, (64, 16, 8))
    before, after, reference = run(net.model), run(net.update(0.5)), run(net.reference())
    _assert_updated(before[0], after[0], reference[0])
    np.testing.assert_allclose(after[1], reference[1], rtol=1e-5, atol=1e-6)


def _decoder_transform(out):
    return jax.nn.sigmoid(out).reshape(out.shape[0], 8, 8, 1)


def _encoder_transform(out):
    return out[:, :2], out[:, 2:]


@pytest.mark.parametrize("style", STYLES)
def test_defuse_identify_encode_sample(style):
    from jfail import defuse

    classifier = network(style, (64, 16, 3), key=1)
    decoder = network(style, (2, 16, 64), key=2, transform=_decoder_transform)
    encoder = network(style, (64, 16, 4), key=3, transform=_encoder_transform)
    mu = np.asarray(jax.random.normal(jax.random.key(4), (6, 2)))

    def run(clf, dec, enc):
        found = defuse.identify(dec, clf, mu, np.asarray(LABELS), key=0, num_draws=16,
                                progress=False)
        means, _ = defuse.encode(enc, X)
        scenarios = defuse.distill(np.asarray(jax.random.normal(jax.random.key(5), (60, 2))),
                                   key=1, max_components=3)
        _, samples = defuse.sample_scenarios(dec, scenarios, key=2, num_samples=3)
        return [found.predictions, found.latents, means, samples]

    before = run(classifier.model, decoder.model, encoder.model)
    after = run(classifier.update(-1.0), decoder.update(3.0), encoder.update(2.0))
    reference = run(classifier.reference(), decoder.reference(), encoder.reference())
    assert not all(np.shape(b) == np.shape(a) and np.allclose(b, a) for b, a in zip(before, after))
    for a, r in zip(after, reference):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", STYLES)
def test_prime_on_the_models_errors(style):
    from jfail import prime
    from jfail.train import errors

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(90, 8, 8, 1)), jnp.float32)
    labels = np.zeros(90, np.int32)
    tags = rng.uniform(size=(90, 4)) < 0.5
    net = network(style, (64, 16, 3), key=6)

    def modes(model):
        wrong = errors(model, (images, labels))
        found = prime.find_failure_modes(tags, errors=wrong, labels=labels, min_size=5,
                                         min_drop=0.0, min_gain=(0.0, 0.0, 0.0), max_tags=2,
                                         progress=False)
        return wrong, sorted((m.tags, m.size, m.accuracy) for m in found)

    before = modes(net.model)
    after = modes(net.update(-1.0))
    reference = modes(net.reference())
    assert not np.array_equal(before[0], after[0])
    np.testing.assert_array_equal(after[0], reference[0])
    assert after[1] == reference[1] and after[1]


@pytest.mark.parametrize("style", STYLES)
def test_debugging_tests_concept_derivatives(style):
    from jfail.debugtests import directional_derivatives

    features = network(style, (64, 16, 8), key=7)
    head = jax.tree_util.Partial(lambda w, h: jnp.tanh(h) @ w, jnp.asarray(
        np.random.default_rng(1).normal(size=(8, 3)), jnp.float32))
    cav = jnp.ones(8) / np.sqrt(8)

    def derivatives(model):
        return directional_derivatives(model, head, X, 1, cav)

    before = derivatives(features.model)
    after = derivatives(features.update(2.0))
    _assert_updated(before, after, derivatives(features.reference()))


@pytest.mark.parametrize("style", STYLES)
def test_fit_and_correct(style):
    import optax

    from jfail import defuse
    from jfail.train import TrainConfig, evaluate, fit

    model = network(style, (64, 16, 3), key=8).trainable()
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(96, 8, 8, 1)).astype(np.float32)
    labels = (images[:, :, :4].mean(axis=(1, 2, 3)) > images[:, :, 4:].mean(axis=(1, 2, 3)))
    data = (images, labels.astype(np.int32))
    config = TrainConfig(optimizer=optax.adam(1e-2), batch_size=32, epochs=3)
    result = fit(model, data, data, config, progress=False)
    losses = [record["train_loss"] for record in result.history]
    assert losses[-1] < losses[0]
    assert evaluate(result.model, data)["accuracy"] == result.history[result.best_epoch][
        "val_accuracy"]
    sweep = defuse.correct(result.model, data, (images[:8], data[1][:8]), data, [1.0],
                           defuse.CorrectionConfig(epochs=1, batch_size=32), progress=False)
    assert sweep.per_lambda and 0 <= sweep.per_lambda[0]["val_accuracy"] <= 1

