"""PyTorch ports of `jfail.models.DefuseCNN` and `jfail.models.VAEDecoder`, weights from Flax.

Used by `benchmarks/identify.py` (the PyTorch side of the identification benchmark) and by
`tests/test_defuse_torch_port.py` (which checks the port against jfail). The networks take and
return NCHW tensors. Weight layouts:

- `nn.Conv` kernel `[kh, kw, in, out]` -> `Conv2d` weight `[out, in, kh, kw]`; Flax padding
  `((1, 1), (1, 1))` is `Conv2d(padding=1)`.
- `nn.ConvTranspose` kernel `[kh, kw, in, out]` -> `ConvTranspose2d` weight `[in, out, kh, kw]`,
  spatially flipped: Flax's transposed convolution (`transpose_kernel=False`) correlates the
  dilated input with the kernel as stored, PyTorch's with the kernel flipped. Flax's padding of
  `k - 1 - p = 2` on the dilated input is `ConvTranspose2d(padding=1)`.
- `nn.Dense` kernel `[in, out]` -> `Linear` weight `[out, in]`. Flax flattens feature maps and
  reshapes the decoder's grid in NHWC order; the port works in NCHW, so the rows of the dense
  layer after the last convolution, and the columns and bias of the decoder's `to_grid` layer,
  are reordered from `(h, w, c)` to `(c, h, w)` once, at copy time.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from jfail.models import DefuseCNN, VAEDecoder

__all__ = [
    "TorchDefuseCNN",
    "TorchVAEDecoder",
    "random_variables",
    "torch_classifier",
    "torch_decoder",
]


_RANDOM_BLOCK = 1 << 16


@jax.jit
def _normal_block(key, index):
    return jax.random.normal(jax.random.fold_in(key, index), (_RANDOM_BLOCK,), jnp.float32)


def random_variables(module, key, *init_args, **init_kwargs) -> dict:
    """Random Flax variables for `module` without running its initializers.

    `module.init(key, *init_args)` traces and compiles every initializer, which takes seconds on
    a small CPU; here only the shapes are traced (`jax.eval_shape`) and all values come from one
    `jax.random.normal(key, ...)` draw: kernels `N(0, 1 / fan_in)` (LeCun normal, Flax's default
    scale, fan-in = every axis but the last), biases `N(0, 0.1^2)` (non-zero, so that copying
    them is checked too). `init_kwargs` go to `module.init` (e.g. `method=`). Returns numpy
    arrays in Flax's `{'params': ...}` layout.
    """
    shapes = jax.eval_shape(lambda k: module.init(k, *init_args, **init_kwargs), key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [leaf.size for _, leaf in leaves]
    # fixed-size blocks, so that every call reuses one compiled sampler
    blocks = -(-sum(sizes) // _RANDOM_BLOCK)
    flat = np.concatenate([np.asarray(_normal_block(key, i)) for i in range(blocks)])
    values, start = [], 0
    for (path, leaf), size in zip(leaves, sizes):
        value = flat[start : start + size].reshape(leaf.shape)
        start += size
        if getattr(path[-1], "key", None) == "kernel":
            value = value / np.sqrt(math.prod(leaf.shape[:-1]))
        else:
            value = 0.1 * value
        values.append(value.astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, values)


class TorchDefuseCNN(nn.Module):
    """`DefuseCNN`: 4x4/2 convolutions with padding 1, dense layers, a linear classifier."""

    def __init__(
        self,
        image_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        conv_features: Sequence[int] = (64, 64, 64, 64),
        hidden: Sequence[int] = (256, 256),
    ):
        super().__init__()
        height, width, channels = image_shape
        convs = []
        for features in conv_features:
            convs.append(nn.Conv2d(channels, features, 4, stride=2, padding=1))
            channels, height, width = features, _conv_out(height), _conv_out(width)
        self.convs = nn.ModuleList(convs)
        self.flat_shape = (channels, height, width)
        sizes = [channels * height * width, *hidden]
        self.dense = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [B, C, H, W]` -> logits `[B, K]`."""
        for conv in self.convs:
            x = torch.relu(conv(x))
        h = torch.flatten(x, 1)
        for layer in self.dense:
            h = torch.relu(layer(h))
        return self.classifier(h)

    @torch.no_grad()
    def load_flax(self, params: Mapping[str, Any]) -> "TorchDefuseCNN":
        """Copy `DefuseCNN` parameters (`variables['params']`) into this module."""
        for i, conv in enumerate(self.convs):
            _copy_conv(conv, params[f"conv{i}"])
        for i, layer in enumerate(self.dense):
            kernel = _array(params[f"dense{i}"]["kernel"])
            if i == 0:
                kernel = _hwc_rows_to_chw(kernel, self.flat_shape)
            _copy_dense(layer, kernel, params[f"dense{i}"]["bias"])
        _copy_dense(self.classifier, _array(params["classifier"]["kernel"]),
                    params["classifier"]["bias"])
        return self


class TorchVAEDecoder(nn.Module):
    """`VAEDecoder`: three dense layers, 4x4/2 transposed convolutions, a centre crop.

    `forward(z)` returns pixel means (the sigmoid of the Bernoulli logits), as
    `jfail.models.decoder_fn` does; `logits(z)` returns the logits.
    """

    def __init__(
        self,
        latent_dim: int = 10,
        image_shape: Sequence[int] = (28, 28, 1),
        conv_features: Sequence[int] = (32, 32, 32, 32),
        hidden: Sequence[int] = (256, 256),
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        height, width, channels = image_shape
        num_up = len(conv_features)
        self.grid_shape = (
            conv_features[0], math.ceil(height / 2**num_up), math.ceil(width / 2**num_up)
        )
        sizes = [latent_dim, *hidden]
        self.dense = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.to_grid = nn.Linear(sizes[-1], math.prod(self.grid_shape))
        widths = [*conv_features, channels]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(i, o, 4, stride=2, padding=1)
            for i, o in zip(widths[:-1], widths[1:])
        )

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """`z: [B, Z]` -> Bernoulli logits `[B, C, H, W]`."""
        h = z
        for layer in self.dense:
            h = torch.relu(layer(h))
        x = torch.relu(self.to_grid(h)).reshape(-1, *self.grid_shape)
        for deconv in self.deconvs[:-1]:
            x = torch.relu(deconv(x))
        x = self.deconvs[-1](x)
        height, width, _ = self.image_shape
        top, left = (x.shape[2] - height) // 2, (x.shape[3] - width) // 2
        return x[:, :, top : top + height, left : left + width]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """`z: [B, Z]` -> pixel means `[B, C, H, W]` in [0, 1]."""
        return torch.sigmoid(self.logits(z))

    @torch.no_grad()
    def load_flax(self, params: Mapping[str, Any]) -> "TorchVAEDecoder":
        """Copy `VAEDecoder` parameters (`variables['params']['decoder']` of a `BetaVAE`)."""
        for i, layer in enumerate(self.dense):
            _copy_dense(layer, _array(params[f"dense{i}"]["kernel"]), params[f"dense{i}"]["bias"])
        kernel = _array(params["to_grid"]["kernel"])  # [in, h * w * c], columns in (h, w, c)
        channels, height, width = self.grid_shape
        kernel = kernel.reshape(-1, height, width, channels).transpose(0, 3, 1, 2)
        bias = _array(params["to_grid"]["bias"]).reshape(height, width, channels)
        _copy_dense(self.to_grid, kernel.reshape(len(kernel), -1), bias.transpose(2, 0, 1).ravel())
        for i, deconv in enumerate(self.deconvs):
            kernel = _array(params[f"deconv{i}"]["kernel"])  # [kh, kw, in, out]
            weight = kernel[::-1, ::-1].transpose(2, 3, 0, 1)  # flipped, [in, out, kh, kw]
            deconv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            deconv.bias.copy_(torch.from_numpy(_array(params[f"deconv{i}"]["bias"])))
        return self


def torch_classifier(module: DefuseCNN, variables: Mapping[str, Any],
                     image_shape: Sequence[int]) -> TorchDefuseCNN:
    """The torch twin of `logits_fn(module, variables)` (eval mode, no gradients)."""
    model = TorchDefuseCNN(image_shape, module.num_classes, module.conv_features, module.hidden)
    return _frozen(model.load_flax(variables["params"]))


def torch_decoder(vae, variables: Mapping[str, Any]) -> TorchVAEDecoder:
    """The torch twin of `decoder_fn(vae, variables)` for a `BetaVAE` (or a bare `VAEDecoder`
    with its own variables)."""
    if isinstance(vae, VAEDecoder):
        params = variables["params"]
        latent_dim = _array(params["dense0"]["kernel"]).shape[0]
        model = TorchVAEDecoder(latent_dim, vae.image_shape, vae.conv_features, vae.hidden)
    else:
        params = variables["params"]["decoder"]
        model = TorchVAEDecoder(vae.latent_dim, vae.image_shape, vae.decoder_features, vae.hidden)
    return _frozen(model.load_flax(params))


def _conv_out(size: int) -> int:
    return (size + 2 - 4) // 2 + 1


def _array(value) -> np.ndarray:
    return np.array(value, dtype=np.float32)  # a writable copy, as torch.from_numpy wants


def _hwc_rows_to_chw(kernel: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    channels, height, width = chw
    rows = kernel.reshape(height, width, channels, -1).transpose(2, 0, 1, 3)
    return rows.reshape(channels * height * width, -1)


def _copy_conv(conv: nn.Conv2d, params: Mapping[str, Any]) -> None:
    weight = _array(params["kernel"]).transpose(3, 2, 0, 1)  # [out, in, kh, kw]
    conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
    conv.bias.copy_(torch.from_numpy(_array(params["bias"])))


def _copy_dense(layer: nn.Linear, kernel: np.ndarray, bias) -> None:
    layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
    layer.bias.copy_(torch.from_numpy(_array(bias)))


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
