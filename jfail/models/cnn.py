"""The Defuse classifier and β-VAE (seed 001, appendix B, figures 7-13).

Every convolution is 4x4 with stride 2 and symmetric padding 1, as in the PyTorch models the
paper used: a 28 px input goes 28 -> 14 -> 7 -> 3 -> 1 through the classifier's four layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["DefuseCNN", "VAEEncoder", "VAEDecoder", "BetaVAE"]


class DefuseCNN(nn.Module):
    """Figure 7: four 4x4/2 convolutions, two dense layers of 256, a linear classifier.

    `__call__(x: [B, H, W, C], train=False, output='logits')`: `output` is `logits` `[B, K]`,
    `features` (the last hidden layer, `[B, 256]`), `feature_map` (last convolution,
    `[B, h, w, 64]`) or `taps` (a dict of all three).

    The network is also a sequence of layers (`jfail.models.layers`): `layer_names` in order
    (`conv0`..., `dense0`..., `classifier`) and `layer(name, x)`, one layer with its ReLU (none
    after `classifier`); `__call__` is their composition.
    """

    num_classes: int = 10
    conv_features: Sequence[int] = (64, 64, 64, 64)
    hidden: Sequence[int] = (256, 256)

    def setup(self):
        # attributes named as the params tree (conv0, dense0, classifier), as compact modules were
        for i, width in enumerate(self.conv_features):
            setattr(self, f"conv{i}", _conv4x4(width))
        for i, width in enumerate(self.hidden):
            setattr(self, f"dense{i}", nn.Dense(width))
        self.classifier = nn.Dense(self.num_classes)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The layers in the order they apply: `conv0`..., `dense0`..., `classifier`."""
        return (tuple(f"conv{i}" for i in range(len(self.conv_features)))
                + tuple(f"dense{i}" for i in range(len(self.hidden))) + ("classifier",))

    def layer(self, name: str, x):
        """Layer `name` on its input: a convolution `[B, H, W, C] -> [B, h, w, C']` or a dense
        layer (flattening its input to `[B, D]`), with its ReLU except for `classifier`."""
        if name not in self.layer_names:
            raise ValueError(f"DefuseCNN has no layer {name!r}; its layers are "
                             f"{list(self.layer_names)}")
        if not name.startswith("conv"):
            x = x.reshape(x.shape[0], -1)
        y = getattr(self, name)(x)
        return y if name == "classifier" else nn.relu(y)

    def __call__(self, x, train: bool = False, output: str = "logits"):
        del train  # no dropout or normalization in the paper's architecture
        names = self.layer_names
        convs = len(self.conv_features)
        for name in names[:convs]:
            x = self.layer(name, x)
        feature_map = x
        h = x.reshape(x.shape[0], -1)
        for name in names[convs:-1]:
            h = self.layer(name, h)
        logits = self.layer("classifier", h)
        return select_output(output, logits=logits, features=h, feature_map=feature_map)


class VAEEncoder(nn.Module):
    """Figures 8, 10, 12: 4x4/2 convolutions, two dense layers of 256, then mean and log-variance.

    `x: [B, H, W, C]` -> `(mu, logvar)`, each `[B, latent_dim]`.
    """

    latent_dim: int = 10
    conv_features: Sequence[int] = (32, 32, 32)
    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.conv_features):
            x = nn.relu(_conv4x4(width, f"conv{i}")(x))
        h = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"dense{i}")(h))
        stats = nn.Dense(2 * self.latent_dim, name="latent")(h)
        mu, logvar = jnp.split(stats, 2, axis=-1)
        return mu, logvar


class VAEDecoder(nn.Module):
    """Figures 9, 11, 13: three dense layers, then 4x4/2 transposed convolutions.

    The third dense layer produces a `[s, s, channels]` grid with `s = ceil(H / 2**n)` for `n`
    transposed convolutions; the last transposed convolution outputs the image channels and the
    result is centre-cropped to `image_shape` (28 px: 2 -> 4 -> 8 -> 16 -> 32, cropped to 28).
    `z: [B, latent_dim]` -> Bernoulli logits `[B, H, W, C]` (apply `sigmoid` for pixel means).
    """

    image_shape: Sequence[int] = (28, 28, 1)
    conv_features: Sequence[int] = (32, 32, 32, 32)
    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, z):
        height, width, channels = self.image_shape
        num_up = len(self.conv_features)
        grid_h, grid_w = math.ceil(height / 2**num_up), math.ceil(width / 2**num_up)
        h = z
        for i, units in enumerate(self.hidden):
            h = nn.relu(nn.Dense(units, name=f"dense{i}")(h))
        grid_channels = self.conv_features[0]
        h = nn.relu(nn.Dense(grid_h * grid_w * grid_channels, name="to_grid")(h))
        x = h.reshape(h.shape[0], grid_h, grid_w, grid_channels)
        for i, width_i in enumerate(self.conv_features[1:]):
            x = nn.relu(_deconv4x4(width_i, f"deconv{i}")(x))
        x = _deconv4x4(channels, f"deconv{num_up - 1}")(x)
        top = (x.shape[1] - height) // 2
        left = (x.shape[2] - width) // 2
        return x[:, top : top + height, left : left + width, :]


class BetaVAE(nn.Module):
    """β-VAE with the paper's encoder and decoder.

    `__call__(x: [B, H, W, C], key)` -> `(logits [B, H, W, C], mu [B, Z], logvar [B, Z])`;
    methods `encode(x)` -> `(mu, logvar)` and `decode(z)` -> logits.
    """

    image_shape: Sequence[int] = (28, 28, 1)
    latent_dim: int = 10
    encoder_features: Sequence[int] = (32, 32, 32)
    decoder_features: Sequence[int] = (32, 32, 32, 32)
    hidden: Sequence[int] = (256, 256)

    def setup(self):
        self.encoder = VAEEncoder(self.latent_dim, self.encoder_features, self.hidden)
        self.decoder = VAEDecoder(tuple(self.image_shape), self.decoder_features, self.hidden)

    def __call__(self, x, key):
        mu, logvar = self.encoder(x)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
        return self.decoder(z), mu, logvar

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


def select_output(output: str, **taps):
    """Return `taps[output]`, or the dict of all taps for `output='taps'`."""
    if output == "taps":
        return taps
    if output not in taps:
        raise ValueError(f"output={output!r} is not one of {sorted(taps) + ['taps']}")
    return taps[output]


def _conv4x4(features: int, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), name=name)


def _deconv4x4(features: int, name: str) -> nn.ConvTranspose:
    # PyTorch ConvTranspose2d(k=4, s=2, p=1) doubles the size; in lax terms that pads the
    # dilated input by k - 1 - p = 2 on each side.
    return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), name=name)
