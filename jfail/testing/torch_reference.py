"""PyTorch twins of jfail's networks and the one weight copy between Flax and PyTorch (needs torch).

    reference = TorchDefuseCNN(1, (28, 28), num_classes=10)
    variables = torch_to_flax(reference)            # torch weights -> DefuseCNN's variables
    load_flax_variables(reference, variables)      # and back: Flax variables -> the torch module

The models are plain `torch.nn` in the layouts the papers' code, torchvision and the robustness
library use (neither library is imported): the Defuse CNN (`TorchDefuseCNN`) and β-VAE decoder
(`TorchVAEDecoder`), torchvision's ResNet (`TorchResNet`, the parameter names of
`torchvision.models.resnet18/50`) and the robustness library's `AttackerModel` wrapper
(`TorchRobustModel`). Every model takes NCHW images; `forward` returns the logits (the decoder:
pixel means), so Captum and a training loop use it as is, and `taps(x)` returns the dict of
`logits`, `features` and `feature_map` that jfail's `model_fns` computes. Every ReLU is its own
`nn.ReLU` module, used once, and flattens are functional, as Captum's GuidedBackprop,
Deconvolution and LRP need to hook them.

Weight-copy convention (`torch_to_flax` and `load_flax_variables`, exact inverses, the same
rules both ways): a torch module that holds weights is named as the Flax module it twins
(`conv0`, `dense1`, `classifier`, `deconv2`, `to_grid`), or, for the ResNet, by torchvision's
name, which maps to jfail's by `layer2.0.conv1` -> `layer2_0/conv1` and `downsample.0/.1` ->
`downsample_conv/downsample_bn`. Per layer:

- `Conv2d` weight `[O, I, kh, kw]` <-> `nn.Conv` kernel `[kh, kw, I, O]`.
- `ConvTranspose2d` weight `[I, O, kh, kw]` <-> `nn.ConvTranspose` kernel `[kh, kw, I, O]`,
  flipped in space: Flax's transposed convolution (`transpose_kernel=False`) correlates the
  dilated input with the kernel as stored, PyTorch's with the kernel flipped.
- `Linear` weight `[out, in]` <-> `nn.Dense` kernel `[in, out]`. Flax flattens and reshapes
  feature maps in NHWC order, PyTorch in NCHW: a model lists in `flattened_inputs` the Linear
  layers fed by a flattened `[C, h, w]` map (their kernel rows are reordered) and in
  `unflattened_outputs` those whose output is reshaped to `[C, h, w]` (kernel columns and bias).
- `BatchNorm2d` weight, bias <-> params `scale`, `bias`; running mean, variance <->
  `batch_stats` `mean`, `var`.

`check_taps` compares jfail's outputs with the torch model's to `RTOL`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

try:
    import torch
    from torch import nn
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jfail.testing.torch_reference needs PyTorch: pip install -e .[torch]"
    ) from error

from jfail.models import DefuseCNN, VAEDecoder, resnet18, resnet50

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RTOL",
    "TorchBasicBlock",
    "TorchBottleneck",
    "TorchDefuseCNN",
    "TorchInputNormalize",
    "TorchResNet",
    "TorchRobustModel",
    "TorchVAEDecoder",
    "check_taps",
    "jfail_taps",
    "load_flax_variables",
    "max_relative_error",
    "randomize_batchnorm",
    "resnet_pair",
    "torch_classifier",
    "torch_decoder",
    "torch_taps",
    "torch_to_flax",
]

RTOL = 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- models ---------------------------------------------------------------------------------


class TorchDefuseCNN(nn.Module):
    """`DefuseCNN`: 4x4/2 convolutions with padding 1 + ReLU, flatten (NCHW order), dense layers
    + ReLU, a linear classifier.

    `forward(x: [B, C, H, W])` -> logits `[B, K]`; `taps(x)` -> dict of `logits [B, K]`,
    `features [B, hidden[-1]]` and `feature_map [B, conv_features[-1], h, w]`.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int = 10,
        conv_features: Sequence[int] = (64, 64, 64, 64),
        hidden: Sequence[int] = (256, 256),
    ):
        super().__init__()
        height, width = image_size
        self.num_convs, self.num_dense = len(conv_features), len(hidden)
        relus = 0
        for i, out_channels in enumerate(conv_features):
            setattr(self, f"conv{i}", nn.Conv2d(in_channels, out_channels, 4, 2, 1))
            setattr(self, f"relu{relus}", nn.ReLU())
            relus += 1
            in_channels = out_channels
            height, width = (height - 2) // 2 + 1, (width - 2) // 2 + 1
        self.flat_shape = (in_channels, height, width)
        self.flattened_inputs = {"dense0": self.flat_shape}
        sizes = [in_channels * height * width, *hidden]
        for i, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            setattr(self, f"dense{i}", nn.Linear(size_in, size_out))
            setattr(self, f"relu{relus}", nn.ReLU())
            relus += 1
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs jfail's `model_fns` computes, in torch's layout.

        Args:
            x: images `[B, C, H, W]`.

        Returns:
            dict of `logits [B, K]`, `features [B, D]` (the last hidden layer) and
            `feature_map [B, C', h, w]` (the last convolution's output).
        """
        for i in range(self.num_convs):
            x = getattr(self, f"relu{i}")(getattr(self, f"conv{i}")(x))
        feature_map, h = x, torch.flatten(x, 1)
        for i in range(self.num_dense):
            h = getattr(self, f"relu{self.num_convs + i}")(getattr(self, f"dense{i}")(h))
        return {"logits": self.classifier(h), "features": h, "feature_map": feature_map}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits.

        Args:
            x: images `[B, C, H, W]`.

        Returns:
            logits `[B, K]`.
        """
        return self.taps(x)["logits"]


class TorchVAEDecoder(nn.Module):
    """`VAEDecoder`: dense layers + ReLU, `to_grid` + ReLU reshaped to `[C, h, w]`, 4x4/2
    transposed convolutions (ReLU between), a centre crop.

    `forward(z: [B, Z])` returns pixel means `[B, C, H, W]` (the sigmoid of the Bernoulli
    logits), as `jfail.models.decoder_fn` does; `logits(z)` returns the logits.
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
        self.unflattened_outputs = {"to_grid": self.grid_shape}
        self.num_dense, self.num_deconvs = len(hidden), num_up
        sizes = [latent_dim, *hidden]
        for i, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            setattr(self, f"dense{i}", nn.Linear(size_in, size_out))
        self.to_grid = nn.Linear(sizes[-1], math.prod(self.grid_shape))
        widths = [*conv_features, channels]
        for i, (size_in, size_out) in enumerate(zip(widths[:-1], widths[1:])):
            setattr(self, f"deconv{i}", nn.ConvTranspose2d(size_in, size_out, 4, 2, 1))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """`z: [B, Z]` -> Bernoulli logits `[B, C, H, W]`.

        Args:
            z: latent codes `[B, Z]`.

        Returns:
            Bernoulli logits `[B, C, H, W]`.
        """
        h = z
        for i in range(self.num_dense):
            h = torch.relu(getattr(self, f"dense{i}")(h))
        x = torch.relu(self.to_grid(h)).reshape(-1, *self.grid_shape)
        for i in range(self.num_deconvs):
            x = getattr(self, f"deconv{i}")(x)
            if i < self.num_deconvs - 1:
                x = torch.relu(x)
        height, width, _ = self.image_shape
        top, left = (x.shape[2] - height) // 2, (x.shape[3] - width) // 2
        return x[:, :, top : top + height, left : left + width]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The pixel means, `sigmoid(logits(z))`.

        Args:
            z: latent codes `[B, Z]`.

        Returns:
            images `[B, C, H, W]` in [0, 1].
        """
        return torch.sigmoid(self.logits(z))


class TorchBasicBlock(nn.Module):
    """Two 3x3 convolutions (stride on the first) + BN, identity or 1x1-conv + BN shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        """The block's output.

        Args:
            x: feature map `[B, C_in, h, w]`.

        Returns:
            feature map `[B, C, h / stride, w / stride]`.
        """
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 (4x channels) convolutions + BN, as torchvision's ResNet v1.5."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(channels, channels * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x):
        """The block's output.

        Args:
            x: feature map `[B, C_in, h, w]`.

        Returns:
            feature map `[B, 4 C, h / stride, w / stride]`.
        """
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu3(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """torchvision's ResNet layout with an `imagenet` (7x7/2 + max-pool) or `small` (3x3/1) stem.

    `forward(x: [B, C, H, W])` -> logits `[B, K]`; `features(x)` -> `[B, D]` (the global
    average of the last stage); `taps(x)` -> dict of `logits`, `features` and `feature_map
    [B, D, h, w]`.
    """

    def __init__(self, block, layers, in_channels, num_classes, stem="imagenet", width=64):
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = None  # no module at all: Captum's LRP has no rule for nn.Identity
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        channels_in = width
        for stage, num_blocks in enumerate(layers):
            blocks = []
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(channels_in, width * 2**stage, stride))
                channels_in = width * 2**stage * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(channels_in, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output.

        Args:
            x: images `[B, C, H, W]`.

        Returns:
            feature map `[B, D, h, w]`.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features, the global average of `feature_map`.

        Args:
            x: images `[B, C, H, W]`.

        Returns:
            features `[B, D]`.
        """
        return self.feature_map(x).mean(dim=(2, 3))

    def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs jfail's `model_fns` computes, in torch's layout.

        Args:
            x: images `[B, C, H, W]`.

        Returns:
            dict of `logits [B, K]`, `features [B, D]` and `feature_map [B, D, h, w]`.
        """
        feature_map = self.feature_map(x)
        features = feature_map.mean(dim=(2, 3))
        return {"logits": self.fc(features), "features": features, "feature_map": feature_map}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits.

        Args:
            x: images `[B, C, H, W]`.

        Returns:
            logits `[B, K]`.
        """
        return self.fc(self.features(x))


class TorchInputNormalize(nn.Module):
    """The robustness library's `InputNormalize`: clamp to [0, 1], then `(x - mean) / std`.

    `new_mean` and `new_std` are `[C, 1, 1]` buffers, so they are in the state dict.
    """

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.as_tensor(mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("new_std", torch.as_tensor(std, dtype=torch.float32)[:, None, None])

    def forward(self, x):
        """The normalized images.

        Args:
            x: images `[B, C, H, W]`.

        Returns:
            `(clamp(x, 0, 1) - new_mean) / new_std`, `[B, C, H, W]`.
        """
        return (torch.clamp(x, 0, 1) - self.new_mean) / self.new_std


class TorchAttacker(nn.Module):
    """The robustness library's `Attacker`: its own normalizer and the classifier, shared."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalize = TorchInputNormalize(mean, std)
        self.model = model


class TorchRobustModel(nn.Module):
    """The robustness library's `AttackerModel`: `model(normalizer(x))` for x in [0, 1].

    Its state dict holds `normalizer.new_mean/new_std`, `model.<k>`, `attacker.normalize.*` and
    `attacker.model.<k>` (the same tensors as `model.<k>`); wrapped in `DataParallel`, as the
    library trains, every key gains a `module.` prefix. `taps(x)` is the classifier's taps on
    the normalized `x`.
    """

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalizer = TorchInputNormalize(mean, std)
        self.model = model
        self.attacker = TorchAttacker(model, mean, std)

    def taps(self, x):
        """The classifier's taps on the normalized images.

        Args:
            x: images `[B, C, H, W]` in [0, 1].

        Returns:
            dict of `logits`, `features` and `feature_map`, as the classifier's `taps`.
        """
        return self.model.taps(self.normalizer(x))

    def forward(self, x):
        """The classifier's logits on the normalized images.

        Args:
            x: images `[B, C, H, W]` in [0, 1].

        Returns:
            logits `[B, K]`.
        """
        return self.model(self.normalizer(x))


def resnet_pair(name: str, stem: str, width: int, in_channels: int, num_classes: int):
    """jfail's `resnet18`/`resnet50` module and the torch model of the same configuration.

    Args:
        name: "resnet18" or "resnet50".
        stem: "imagenet" or "small".
        width: channels of the first stage.
        in_channels: image channels `C`.
        num_classes: the number of logits `K`.

    Returns:
        `(module, reference)`: the jfail `ResNet` and the `TorchResNet`.

    Raises:
        KeyError: if `name` is neither architecture.
    """
    build, block, layers = {
        "resnet18": (resnet18, TorchBasicBlock, (2, 2, 2, 2)),
        "resnet50": (resnet50, TorchBottleneck, (3, 4, 6, 3)),
    }[name]
    module = build(num_classes, stem=stem, width=width)
    reference = TorchResNet(block, layers, in_channels, num_classes, stem=stem, width=width)
    return module, reference


def torch_classifier(module: DefuseCNN, variables: Mapping[str, Any],
                     image_shape: Sequence[int]) -> TorchDefuseCNN:
    """The torch twin of `logits_fn(module, variables)` on `image_shape` `[H, W, C]` images
    (eval mode, parameters frozen).

    Args:
        module: the jfail `DefuseCNN`.
        variables: its variables.
        image_shape: `(H, W, C)`.

    Returns:
        The `TorchDefuseCNN` holding those weights.

    Raises:
        ValueError: if `variables` do not fit the module's configuration.
    """
    height, width, channels = image_shape
    model = TorchDefuseCNN(channels, (height, width), module.num_classes, module.conv_features,
                           module.hidden)
    return _frozen(load_flax_variables(model, variables))


def torch_decoder(vae, variables: Mapping[str, Any]) -> TorchVAEDecoder:
    """The torch twin of `decoder_fn(vae, variables)` for a `BetaVAE` (or a bare `VAEDecoder`
    with its own variables); eval mode, parameters frozen.

    Args:
        vae: a jfail `BetaVAE` or `VAEDecoder`.
        variables: its variables.

    Returns:
        The `TorchVAEDecoder` holding the decoder's weights.

    Raises:
        ValueError: if `variables` do not fit the decoder's configuration.
    """
    if isinstance(vae, VAEDecoder):
        params = variables["params"]
        latent_dim = np.shape(params["dense0"]["kernel"])[0]
        model = TorchVAEDecoder(latent_dim, vae.image_shape, vae.conv_features, vae.hidden)
    else:
        params = variables["params"]["decoder"]
        model = TorchVAEDecoder(vae.latent_dim, vae.image_shape, vae.decoder_features, vae.hidden)
    return _frozen(load_flax_variables(model, {"params": params}))


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Random BatchNorm scales, shifts and running statistics, so that inference-mode BatchNorm
    is not close to the identity.

    Args:
        model: a torch module; its `BatchNorm2d` layers are changed in place.
        seed: the torch generator's seed.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                size = layer.num_features
                layer.weight.copy_(0.5 + torch.rand(size, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))


def _downsample(in_channels: int, out_channels: int, stride: int):
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# --- the weight copy --------------------------------------------------------------------------


def torch_to_flax(model: nn.Module) -> dict:
    """Flax variables `{'params': ..., ['batch_stats': ...]}` holding `model`'s weights.

    Args:
        model: one of this module's torch models (or any module named by the convention in
            the module doc).

    Returns:
        The variables of the jfail module `model` twins, float32 numpy arrays.
    """
    flattened, unflattened = _reordered_linears(model)
    variables: dict = {"params": {}}
    for name, layer in model.named_modules():
        path = _flax_path(name)
        if isinstance(layer, nn.Conv2d):
            entry = {"kernel": _numpy(layer.weight).transpose(2, 3, 1, 0)}
        elif isinstance(layer, nn.ConvTranspose2d):
            entry = {"kernel": _numpy(layer.weight).transpose(2, 3, 0, 1)[::-1, ::-1]}
        elif isinstance(layer, nn.Linear):
            kernel, bias = _numpy(layer.weight).T, _numpy(layer.bias)
            if name in flattened:
                kernel = _nchw_to_nhwc(kernel, 0, flattened[name])
            if name in unflattened:
                kernel = _nchw_to_nhwc(kernel, 1, unflattened[name])
                bias = _nchw_to_nhwc(bias, 0, unflattened[name])
            entry = {"kernel": kernel, "bias": bias}
        elif isinstance(layer, nn.BatchNorm2d):
            entry = {"scale": _numpy(layer.weight), "bias": _numpy(layer.bias)}
            stats = {"mean": _numpy(layer.running_mean), "var": _numpy(layer.running_var)}
            _set_in(variables.setdefault("batch_stats", {}), path, stats)
        else:
            continue
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.bias is not None:
            entry["bias"] = _numpy(layer.bias)
        _set_in(variables["params"], path, {k: np.ascontiguousarray(v) for k, v in entry.items()})
    return variables


@torch.no_grad()
def load_flax_variables(model: nn.Module, variables: Mapping[str, Any]) -> nn.Module:
    """Copy Flax `variables` into `model`'s parameters (and BatchNorm running statistics).

    The inverse of `torch_to_flax`: `load_flax_variables(model, torch_to_flax(model))` changes
    nothing.

    Args:
        model: one of this module's torch models, built for the jfail module's configuration.
        variables: `{'params': ..., ['batch_stats': ...]}` of that jfail module (numpy or JAX
            arrays).

    Returns:
        `model`, its weights replaced.

    Raises:
        ValueError: when a layer of `model` has no entry in `variables`, a shape differs, or
            `variables['params']` holds layers `model` does not have.
    """
    flattened, unflattened = _reordered_linears(model)
    params, stats = variables["params"], variables.get("batch_stats", {})
    copied = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
            continue
        path = _flax_path(name)
        entry = _get_in(params, path, name)
        copied += len(entry)
        if isinstance(layer, nn.Conv2d):
            _copy(layer.weight, _array(entry["kernel"]).transpose(3, 2, 0, 1), name)
        elif isinstance(layer, nn.ConvTranspose2d):
            _copy(layer.weight, _array(entry["kernel"])[::-1, ::-1].transpose(2, 3, 0, 1), name)
        elif isinstance(layer, nn.Linear):
            kernel, bias = _array(entry["kernel"]), _array(entry["bias"])
            if name in flattened:
                kernel = _nhwc_to_nchw(kernel, 0, flattened[name])
            if name in unflattened:
                kernel = _nhwc_to_nchw(kernel, 1, unflattened[name])
                bias = _nhwc_to_nchw(bias, 0, unflattened[name])
            _copy(layer.weight, kernel.T, name)
            _copy(layer.bias, bias, name)
        else:
            _copy(layer.weight, _array(entry["scale"]), name)
            _copy(layer.bias, _array(entry["bias"]), name)
            running = _get_in(stats, path, name)
            _copy(layer.running_mean, _array(running["mean"]), name)
            _copy(layer.running_var, _array(running["var"]), name)
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.bias is not None:
            _copy(layer.bias, _array(entry["bias"]), name)
    total = len(jax.tree_util.tree_leaves(params))
    if copied != total:
        raise ValueError(
            f"variables['params'] holds {total} arrays but {type(model).__name__} has {copied} to "
            "fill; build the torch model with the jfail module's configuration."
        )
    return model


def _reordered_linears(model: nn.Module) -> tuple[dict, dict]:
    """The `flattened_inputs` and `unflattened_outputs` of `model` and its submodules, by the
    Linear layers' full names."""
    flattened, unflattened = {}, {}
    for prefix, module in model.named_modules():
        for declared, found in ((getattr(module, "flattened_inputs", {}), flattened),
                                (getattr(module, "unflattened_outputs", {}), unflattened)):
            for name, shape in declared.items():
                found[f"{prefix}.{name}" if prefix else name] = shape
    return flattened, unflattened


def _nchw_to_nhwc(array: np.ndarray, axis: int, chw: tuple[int, int, int]) -> np.ndarray:
    """Reorder `axis` (a flattened `[C, h, w]` map) to the flatten order of `[h, w, C]`."""
    channels, height, width = chw
    moved = np.moveaxis(array, axis, 0)
    rest = moved.shape[1:]
    moved = moved.reshape(channels, height, width, *rest)
    moved = moved.transpose(1, 2, 0, *range(3, moved.ndim)).reshape(-1, *rest)
    return np.moveaxis(moved, 0, axis)


def _nhwc_to_nchw(array: np.ndarray, axis: int, chw: tuple[int, int, int]) -> np.ndarray:
    """The inverse of `_nchw_to_nhwc`."""
    channels, height, width = chw
    moved = np.moveaxis(array, axis, 0)
    rest = moved.shape[1:]
    moved = moved.reshape(height, width, channels, *rest)
    moved = moved.transpose(2, 0, 1, *range(3, moved.ndim)).reshape(-1, *rest)
    return np.moveaxis(moved, 0, axis)


def _flax_path(torch_name: str) -> tuple[str, ...]:
    """`layer2.0.downsample.1` -> `('layer2_0', 'downsample_bn')`; `conv1` -> `('conv1',)`."""
    name = re.sub(r"^layer(\d+)\.(\d+)\.", r"layer\1_\2/", torch_name)
    name = name.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
    return tuple(name.split("/"))


def _set_in(tree: dict, path: tuple[str, ...], value: dict) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_in(tree: Mapping, path: tuple[str, ...], torch_name: str) -> Mapping:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise ValueError(
                f"the Flax variables have no {'/'.join(path)!r} for the torch layer "
                f"{torch_name!r}; build the torch model with the jfail module's configuration."
            )
        tree = tree[key]
    return tree


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


def _array(value) -> np.ndarray:
    return np.array(value, dtype=np.float32)  # a writable copy, as torch.from_numpy wants


def _copy(target: torch.Tensor, value: np.ndarray, torch_name: str) -> None:
    if tuple(target.shape) != value.shape:
        raise ValueError(
            f"torch layer {torch_name!r} has shape {tuple(target.shape)} where the Flax "
            f"variables give {value.shape}; build the torch model with the jfail module's "
            "configuration."
        )
    target.copy_(torch.from_numpy(np.ascontiguousarray(value)))


# --- comparison -------------------------------------------------------------------------------


def torch_taps(reference: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """`reference.taps` (eval mode, no grad) on NHWC `x`, the feature map back in NHWC.

    Args:
        reference: a torch model with `taps` (put in eval mode here).
        x: float32 images `[B, H, W, C]`.

    Returns:
        dict of NumPy `logits [B, K]`, `features [B, D]` and `feature_map [B, h, w, D]`.
    """
    reference.eval()
    with torch.no_grad():
        out = reference.taps(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    out = {name: value.numpy() for name, value in out.items()}
    if "feature_map" in out:
        out["feature_map"] = out["feature_map"].transpose(0, 2, 3, 1)
    return out


@jax.jit
def jfail_taps(fns, x):
    """All of a `ModelFns`' outputs on `x`, in one compiled program per model configuration.

    Args:
        fns: a `ModelFns`.
        x: images `[B, H, W, C]`.

    Returns:
        dict of `logits [B, K]`, `features [B, D]` and `feature_map [B, h, w, D]`.
    """
    return {name: fn(x) for name, fn in fns._asdict().items()}


def max_relative_error(got, want) -> float:
    """`max |got - want| / max |want|`: the error relative to the output's scale.

    Args:
        got: array-like.
        want: array-like of the same shape, not all zero.

    Returns:
        The relative error, a float.
    """
    want = np.asarray(want)
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def check_taps(got: dict, expected: dict) -> dict[str, float]:
    """Every tap of `got` equals `expected`'s to `RTOL`; returns the max relative errors.

    Args:
        got: tap name -> array (e.g. `jfail_taps`).
        expected: tap name -> array (e.g. `torch_taps`).

    Returns:
        tap name -> `max_relative_error`.

    Raises:
        AssertionError: if the tap names differ, a tap of `expected` is all zero, or a tap
            differs beyond `RTOL`.
    """
    assert set(got) == set(expected)
    errors = {}
    for name, want in expected.items():
        got_tap = np.asarray(got[name])
        scale = float(np.max(np.abs(want)))
        assert scale > 0, name
        np.testing.assert_allclose(got_tap, want, rtol=RTOL, atol=1e-5 * scale, err_msg=name)
        errors[name] = max_relative_error(got_tap, want)
    return errors
