"""PyTorch reference models for the tests that check jfail against PyTorch (needs torch).

Plain `torch.nn` in the layouts the paper's code, torchvision and the robustness library use
(neither library is imported): the Defuse CNN, torchvision's ResNet (`TorchResNet`, the same
parameter names as `torchvision.models.resnet18/50`), and the robustness library's
`AttackerModel` wrapper (`TorchRobustModel`: input normalizer, classifier, and an attacker that
shares the classifier). `torch_to_flax` copies a model's weights module by module, independently
of `jfail.models.convert`, and `check_taps` compares jfail's callables with the torch outputs.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import torch

from benchmarks._torch_resnet import randomize_batchnorm  # noqa: F401 (the tests use it)
from jfail.models import resnet18, resnet50

tnn = torch.nn

RTOL = 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- models ---------------------------------------------------------------------------------


class TorchDefuseCNN(tnn.Module):
    """Four Conv2d(k=4, s=2, p=1) + ReLU, flatten (NCHW order), Linear 256 x2 + ReLU, Linear K.

    `forward(x: [B, C, H, W])` -> dict of `logits [B, K]`, `features [B, 256]` and
    `feature_map [B, 64, h, w]`.
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int = 10):
        super().__init__()
        widths = (64, 64, 64, 64)
        height, width = image_size
        for i, out_channels in enumerate(widths):
            setattr(self, f"conv{i}", tnn.Conv2d(in_channels, out_channels, 4, 2, 1))
            in_channels = out_channels
            height, width = (height - 2) // 2 + 1, (width - 2) // 2 + 1
        self.flat_shape = (in_channels, height, width)
        self.dense0 = tnn.Linear(in_channels * height * width, 256)
        self.dense1 = tnn.Linear(256, 256)
        self.classifier = tnn.Linear(256, num_classes)

    def forward(self, x):
        for i in range(4):
            x = torch.relu(getattr(self, f"conv{i}")(x))
        feature_map = x
        h = torch.relu(self.dense0(torch.flatten(x, 1)))
        h = torch.relu(self.dense1(h))
        return {"logits": self.classifier(h), "features": h, "feature_map": feature_map}


class TorchBasicBlock(tnn.Module):
    """Two 3x3 convolutions (stride on the first) + BN, identity or 1x1-conv + BN shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(channels)
        self.conv2 = tnn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(channels)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + shortcut)


class TorchBottleneck(tnn.Module):
    """1x1, 3x3 (strided), 1x1 (4x channels) convolutions + BN, as torchvision's ResNet v1.5."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(channels)
        self.conv2 = tnn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(channels)
        self.conv3 = tnn.Conv2d(channels, channels * self.expansion, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(channels * self.expansion)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + shortcut)


class TorchResNet(tnn.Module):
    """torchvision's ResNet layout with an `imagenet` (7x7/2 + max-pool) or `small` (3x3/1) stem.

    `forward(x: [B, C, H, W])` -> dict of `logits [B, K]`, `features [B, D]` (global average of
    the last stage) and `feature_map [B, D, h, w]`.
    """

    def __init__(self, block, layers, in_channels, num_classes, stem="imagenet", width=64):
        super().__init__()
        if stem == "imagenet":
            self.conv1 = tnn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = tnn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = tnn.Identity()
        self.bn1 = tnn.BatchNorm2d(width)
        channels_in = width
        for stage, num_blocks in enumerate(layers):
            blocks = []
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(channels_in, width * 2**stage, stride))
                channels_in = width * 2**stage * block.expansion
            setattr(self, f"layer{stage + 1}", tnn.Sequential(*blocks))
        self.fc = tnn.Linear(channels_in, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        features = x.mean(dim=(2, 3))
        return {"logits": self.fc(features), "features": features, "feature_map": x}


class TorchInputNormalize(tnn.Module):
    """The robustness library's `InputNormalize`: clamp to [0, 1], then `(x - mean) / std`.

    `new_mean` and `new_std` are `[C, 1, 1]` buffers, so they are in the state dict.
    """

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.as_tensor(mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("new_std", torch.as_tensor(std, dtype=torch.float32)[:, None, None])

    def forward(self, x):
        return (torch.clamp(x, 0, 1) - self.new_mean) / self.new_std


class TorchAttacker(tnn.Module):
    """The robustness library's `Attacker`: its own normalizer and the classifier, shared."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalize = TorchInputNormalize(mean, std)
        self.model = model


class TorchRobustModel(tnn.Module):
    """The robustness library's `AttackerModel`: `model(normalizer(x))` for x in [0, 1].

    Its state dict holds `normalizer.new_mean/new_std`, `model.<k>`, `attacker.normalize.*` and
    `attacker.model.<k>` (the same tensors as `model.<k>`); wrapped in `DataParallel`, as the
    library trains, every key gains a `module.` prefix.
    """

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalizer = TorchInputNormalize(mean, std)
        self.model = model
        self.attacker = TorchAttacker(model, mean, std)

    def forward(self, x):
        return self.model(self.normalizer(x))


def resnet_pair(name: str, stem: str, width: int, in_channels: int, num_classes: int):
    """jfail's `resnet18`/`resnet50` and the torch model of the same configuration."""
    build, block, layers = {
        "resnet18": (resnet18, TorchBasicBlock, (2, 2, 2, 2)),
        "resnet50": (resnet50, TorchBottleneck, (3, 4, 6, 3)),
    }[name]
    module = build(num_classes, stem=stem, width=width)
    reference = TorchResNet(block, layers, in_channels, num_classes, stem=stem, width=width)
    return module, reference


def _downsample(in_channels: int, out_channels: int, stride: int):
    if stride == 1 and in_channels == out_channels:
        return None
    return tnn.Sequential(
        tnn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        tnn.BatchNorm2d(out_channels),
    )


# --- module-by-module weight copy -------------------------------------------------------------


def torch_to_flax(model, nchw_flatten: dict[str, tuple[int, int, int]] | None = None) -> dict:
    """Flax variables `{'params': ..., ['batch_stats': ...]}` holding `model`'s weights.

    Conv weights `[O, I, kh, kw]` become kernels `[kh, kw, I, O]`; Linear weights `[out, in]`
    become `[in, out]`; BatchNorm weight/bias/running_mean/running_var become
    params scale/bias and batch_stats mean/var. `nchw_flatten` names Linear layers fed by a
    flattened `[C, h, w]` map: their kernel rows are reordered to the NHWC flatten order.
    """
    nchw_flatten = nchw_flatten or {}
    variables: dict = {"params": {}}
    for name, layer in model.named_modules():
        path = _flax_path(name)
        if isinstance(layer, tnn.Conv2d):
            entry = {"kernel": _numpy(layer.weight).transpose(2, 3, 1, 0)}
            if layer.bias is not None:
                entry["bias"] = _numpy(layer.bias)
        elif isinstance(layer, tnn.Linear):
            weight = _numpy(layer.weight)  # [out, in]
            kernel = weight.T
            if name in nchw_flatten:  # rows (c, i, j) -> (i, j, c)
                channels, height, width = nchw_flatten[name]
                kernel = weight.reshape(-1, channels, height, width).transpose(2, 3, 1, 0)
                kernel = kernel.reshape(layer.in_features, layer.out_features)
            entry = {"kernel": kernel, "bias": _numpy(layer.bias)}
        elif isinstance(layer, tnn.BatchNorm2d):
            entry = {"scale": _numpy(layer.weight), "bias": _numpy(layer.bias)}
            stats = {"mean": _numpy(layer.running_mean), "var": _numpy(layer.running_var)}
            _set_in(variables.setdefault("batch_stats", {}), path, stats)
        else:
            continue
        _set_in(variables["params"], path, entry)
    return variables


def _flax_path(torch_name: str) -> tuple[str, ...]:
    """`layer2.0.downsample.1` -> `('layer2_0', 'downsample_bn')`; `conv1` -> `('conv1',)`."""
    name = re.sub(r"^layer(\d+)\.(\d+)\.", r"layer\1_\2/", torch_name)
    name = name.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
    return tuple(name.split("/"))


def _set_in(tree: dict, path: tuple[str, ...], value: dict) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


# --- comparison ---------------------------------------------------------------------------


def torch_taps(reference, x: np.ndarray) -> dict[str, np.ndarray]:
    """The torch model's outputs (eval mode, no grad) on NHWC `x`, feature maps back in NHWC."""
    reference.eval()
    with torch.no_grad():
        out = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    out = {name: value.numpy() for name, value in out.items()}
    if "feature_map" in out:
        out["feature_map"] = out["feature_map"].transpose(0, 2, 3, 1)
    return out


@jax.jit
def jfail_taps(fns, x):
    """All of a `ModelFns`' outputs on `x`, in one compiled program per model configuration."""
    return {name: fn(x) for name, fn in fns._asdict().items()}


def max_relative_error(got, want) -> float:
    """`max |got - want| / max |want|`: the error relative to the output's scale."""
    want = np.asarray(want)
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def check_taps(got: dict, expected: dict) -> dict[str, float]:
    """Every tap of `got` equals `expected`'s to `RTOL`; returns the max relative errors."""
    assert set(got) == set(expected)
    errors = {}
    for name, want in expected.items():
        got_tap = np.asarray(got[name])
        scale = float(np.max(np.abs(want)))
        assert scale > 0, name
        np.testing.assert_allclose(got_tap, want, rtol=RTOL, atol=1e-5 * scale, err_msg=name)
        errors[name] = max_relative_error(got_tap, want)
    return errors
