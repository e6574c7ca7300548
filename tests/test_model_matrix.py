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
@pytest.mark.parametrize("method", ["gradient", "smoothgrad", "integrated_gradients",
                                    "guided_backprop", "lrp_epsilon", "lime"])
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
def test_barlow_features(style):
    net = network(style, (64, 16, 8))
    before = barlow.features(net.model, X, progress=False)
    after = barlow.features(net.update(0.5), X, progress=False)
    _assert_updated(before, after, barlow.features(net.reference(), X, progress=False))
