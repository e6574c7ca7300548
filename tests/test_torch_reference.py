"""jfail's classifiers compute what the same PyTorch models compute, weight for weight.

The PyTorch reference models are written here with plain `torch.nn` in the layouts the paper's
code and torchvision use (torchvision itself is not imported). Random torch weights, and random
BatchNorm running statistics in eval mode, are copied into jfail's Flax variables; the logits,
the pooled penultimate `features` and the last `feature_map` must then agree to 1e-4 relative.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jfail.models import DefuseCNN, init_classifier, model_fns, resnet18, resnet50

torch = pytest.importorskip("torch")
tnn = torch.nn

RTOL = 1e-4


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Reproducible random torch weights in every test."""
    torch.manual_seed(0)


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_defuse_cnn_matches_torch(image_shape):
    """28 px flattens a 1x1 map; 32 px a 2x2 one, which checks the NCHW -> NHWC flatten order."""
    height, width, channels = image_shape
    reference = TorchDefuseCNN(channels, (height, width), num_classes=10)
    module = DefuseCNN(num_classes=10)
    variables = torch_to_flax(reference, nchw_flatten={"dense0": reference.flat_shape})
    _check_against_torch(module, variables, reference, image_shape, batch=4)


@pytest.mark.parametrize(
    "name, stem, width, image_shape, batch",
    [
        ("resnet18", "small", 16, (28, 28, 1), 4),
        ("resnet18", "imagenet", 64, (64, 64, 3), 4),
        ("resnet50", "imagenet", 64, (64, 64, 3), 2),
    ],
)
def test_resnet_matches_torch(name, stem, width, image_shape, batch):
    module, reference = _resnet_pair(name, stem, width, image_shape[-1], num_classes=10)
    _randomize_batchnorm(reference, seed=1)
    _check_against_torch(module, torch_to_flax(reference), reference, image_shape, batch)


@pytest.mark.parametrize(
    "name, stem, image_shape",
    [("resnet18", "small", (28, 28, 1)), ("resnet50", "small", (32, 32, 3)),
     ("resnet50", "imagenet", (64, 64, 3))],
)
def test_weight_copy_fills_exactly_jfails_variables(name, stem, image_shape):
    """Same tree, same shapes: nothing missing, nothing extra (e.g. a downsample branch)."""
    module, reference = _resnet_pair(name, stem, 4, image_shape[-1], num_classes=7)
    init = jax.eval_shape(lambda key: init_classifier(module, image_shape, key), jax.random.key(0))
    params, state = jax.tree_util.tree_map(np.shape, init)
    got = jax.tree_util.tree_map(np.shape, torch_to_flax(reference))
    assert got == {"params": params, **state}


# --- PyTorch reference models -------------------------------------------------------------


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


def _resnet_pair(name: str, stem: str, width: int, in_channels: int, num_classes: int):
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


# --- weight copy ------------------------------------------------------------------------


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


def _randomize_batchnorm(model, seed: int) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm2d."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, tnn.BatchNorm2d):
                size = layer.num_features
                layer.weight.copy_(0.5 + torch.rand(size, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))


def _check_against_torch(module, variables, reference, image_shape, batch):
    """jfail's three taps on `[batch, *image_shape]` noise equal the torch model's (eval mode)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *image_shape)).astype(np.float32)
    reference.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    expected = {name: value.numpy() for name, value in expected.items()}
    expected["feature_map"] = expected["feature_map"].transpose(0, 2, 3, 1)
    fns = model_fns(module, variables)
    got = jax.jit(lambda fns, x: {name: fn(x) for name, fn in fns._asdict().items()})(fns, x)
    assert set(got) == set(expected)
    for name, want in expected.items():
        got_tap = np.asarray(got[name])
        scale = float(np.max(np.abs(want)))
        assert scale > 0, name
        np.testing.assert_allclose(got_tap, want, rtol=RTOL, atol=1e-5 * scale, err_msg=name)
