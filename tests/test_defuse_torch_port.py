"""The PyTorch twins of Defuse's networks (`jfail.testing.torch_reference`) compute what jfail does.

Random Flax weights are copied into the torch modules; on random inputs the decoder's pixels and
logits and the classifier's logits must agree with jfail's to 1e-5. The identification benchmark
compares jfail against this port, so a wrong weight copy would make it compare different networks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail.models import BetaVAE, DefuseCNN, decoder_fn, logits_fn

torch = pytest.importorskip("torch")

from jfail.testing.torch_reference import (  # noqa: E402 (needs torch)
    torch_classifier,
    torch_decoder,
)
from jfail.testing.variables import random_variables  # noqa: E402

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """Full-precision float32 on both sides (no TF32 or reduced-precision dot products)."""
    with jax.default_matmul_precision("highest"):
        yield


@jax.jit
def _call(fn, x):
    """`fn(x)` as one compiled program (much faster to compile than to run op by op)."""
    return fn(x)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_decoder_matches_jfail():
    """28 px: a 2x2 grid (checks the NHWC -> NCHW reorder of `to_grid`), 32 px crop to 28."""
    vae = BetaVAE(image_shape=(28, 28, 1), latent_dim=10)
    variables = random_variables(vae, jax.random.key(0), jnp.zeros((1, 10)), method="decode")
    z = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    z[8:] += 0.5  # the paper's noise shifts latents by Beta(50, 50)'s mean
    decode = jax.jit(lambda v, z: (decoder_fn(vae, v)(z), vae.apply(v, z, method=BetaVAE.decode)))
    want_pixels, want_logits = (np.asarray(out) for out in decode(variables, z))

    decoder = torch_decoder(vae, variables)
    with torch.no_grad():
        got_pixels = decoder(torch.from_numpy(z)).numpy().transpose(0, 2, 3, 1)
        got_logits = decoder.logits(torch.from_numpy(z)).numpy().transpose(0, 2, 3, 1)
    assert got_pixels.shape == want_pixels.shape == (16, 28, 28, 1)
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got_pixels, want_pixels, rtol=0, atol=ATOL)
    assert np.std(want_logits) > 1e-3  # not a degenerate, constant output


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_classifier_matches_jfail(image_shape):
    """28 px flattens a 1x1 map; 32 px a 2x2 one, which checks the flatten order."""
    module = DefuseCNN(num_classes=10)
    variables = random_variables(module, jax.random.key(2), jnp.zeros((1, *image_shape)))
    x = np.random.default_rng(1).uniform(size=(16, *image_shape)).astype(np.float32)
    want = np.asarray(_call(logits_fn(module, variables), x))

    classifier = torch_classifier(module, variables, image_shape)
    with torch.no_grad():
        got = classifier(_nchw(x)).numpy()
    assert got.shape == want.shape == (16, 10)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert np.std(want) > 1e-3


def test_decode_then_classify_agrees():
    """The composition Algorithm 1 evaluates: same predicted classes on shifted latents."""
    vae = BetaVAE(image_shape=(28, 28, 1), latent_dim=10)
    vae_variables = random_variables(vae, jax.random.key(3), jnp.zeros((1, 10)), method="decode")
    module = DefuseCNN(num_classes=10)
    cnn_variables = random_variables(module, jax.random.key(5), jnp.zeros((1, 28, 28, 1)))
    z = np.random.default_rng(2).normal(size=(16, 10)).astype(np.float32) + 0.5
    decoder, classifier = decoder_fn(vae, vae_variables), logits_fn(module, cnn_variables)
    want = np.asarray(_call(classifier, _call(decoder, z)))

    torch_dec = torch_decoder(vae, vae_variables)
    torch_cls = torch_classifier(module, cnn_variables, (28, 28, 1))
    with torch.no_grad():
        got = torch_cls(torch_dec(torch.from_numpy(z))).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # argmax agrees unless two logits are within the tolerance of each other
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * ATOL
    assert np.array_equal(got.argmax(1)[clear], want.argmax(1)[clear])
