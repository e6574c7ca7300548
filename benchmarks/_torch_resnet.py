"""The small-stem ResNet-18 of jfail's benchmarks in PyTorch (torchvision's module names, so that
`jfail.models.resnet_variables_from_torch` copies its weights), and random BatchNorm statistics."""

from __future__ import annotations

import torch
from torch import nn


class TorchBasicBlock(nn.Module):
    """torchvision's BasicBlock with separate `nn.ReLU` modules for its two ReLUs."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18Small(nn.Module):
    """`resnet18(stem="small")`: a 3x3/1 stem, four stages of two blocks, torchvision's names."""

    def __init__(self, in_channels: int, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        channels = width
        for stage in range(4):
            out = width * 2**stage
            stride = 1 if stage == 0 else 2
            setattr(self, f"layer{stage + 1}", nn.Sequential(
                TorchBasicBlock(channels, out, stride), TorchBasicBlock(out, out, 1)))
            channels = out
        self.fc = nn.Linear(channels, num_classes)

    def features(self, x):
        """Penultimate features `[B, 8 * width]`: the last stage's output averaged over space."""
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Random BatchNorm scales, shifts and running statistics, so that inference-mode BatchNorm
    is not close to the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                size = layer.num_features
                layer.weight.copy_(0.5 + torch.rand(size, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))


class TorchBottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3x3 convolution), 4x expansion."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != channels * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels * 4, 1, stride, bias=False),
                nn.BatchNorm2d(channels * 4))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet50(nn.Module):
    """torchvision's `resnet50()` architecture and module names (7x7/2 stem, 3x3/2 max-pool,
    bottleneck stages (3, 4, 6, 3)), for machines without torchvision."""

    def __init__(self, num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        for stage, blocks in enumerate((3, 4, 6, 3)):
            out = width * 2**stage
            layers = []
            for block in range(blocks):
                layers.append(TorchBottleneck(channels, out, 2 if stage and not block else 1))
                channels = out * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(self.avgpool(x).flatten(1))
