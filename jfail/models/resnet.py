"""ResNet-18 and ResNet-50 with BatchNorm, laid out as torchvision's so weights convert 1:1.

Two stems: `imagenet` (7x7/2 convolution, 3x3/2 max-pool) and `small` (one 3x3/1 convolution,
no pooling) for 28-32 px images. Padding is symmetric everywhere, as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from jfail.models.cnn import select_output

__all__ = ["ResNet", "resnet18", "resnet50", "BasicBlock", "Bottleneck"]


class ResNet(nn.Module):
    """A ResNet. `__call__(x: [B, H, W, C], train=False, output='logits')`.

    `output`: `logits` `[B, K]`, `features` (global-average-pooled penultimate activations
    `[B, C]`), `feature_map` (output of the last residual stage `[B, h, w, C]`), or `taps`.
    `width` is the number of channels of the first stage (64 in the paper's networks).
    """

    stage_sizes: Sequence[int]
    bottleneck: bool = False
    num_classes: int = 1000
    stem: str = "imagenet"
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        if self.stem == "imagenet":
            x = _conv(self.width, 7, 2, "conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "small":
            x = _conv(self.width, 3, 1, "conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}")
        block_cls = Bottleneck if self.bottleneck else BasicBlock
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = block_cls(
                    self.width * 2**stage, strides, norm, name=f"layer{stage + 1}_{block}"
                )(x)
        feature_map = x
        features = jnp.mean(feature_map, axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="fc")(features)
        return select_output(output, logits=logits, features=features, feature_map=feature_map)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    features: int
    strides: int
    norm: type
    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm(name="bn1")(_conv(self.features, 3, self.strides, "conv1")(x)))
        y = self.norm(name="bn2")(_conv(self.features, 3, 1, "conv2")(y))
        if residual.shape != y.shape:
            residual = _conv(self.features, 1, self.strides, "downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided, as torchvision's v1.5), 1x1 convolutions, 4x expansion (ResNet-50)."""

    features: int
    strides: int
    norm: type
    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm(name="bn1")(_conv(self.features, 1, 1, "conv1")(x)))
        y = nn.relu(self.norm(name="bn2")(_conv(self.features, 3, self.strides, "conv2")(y)))
        y = self.norm(name="bn3")(_conv(self.features * 4, 1, 1, "conv3")(y))
        if residual.shape != y.shape:
            residual = _conv(self.features * 4, 1, self.strides, "downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


def resnet18(num_classes: int = 1000, stem: str = "imagenet", width: int = 64) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2); penultimate features `[B, 8 * width]`.

    Args:
        num_classes: the number of logits `K`.
        stem: "imagenet" (7x7/2 convolution and max-pool) or "small" (one 3x3/1 convolution).
        width: channels of the first stage (doubled at each later stage).

    Returns:
        The `ResNet` module (a bad `stem` raises a ValueError when it is first called).
    """
    return ResNet((2, 2, 2, 2), False, num_classes, stem, width)


def resnet50(num_classes: int = 1000, stem: str = "imagenet", width: int = 64) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3); penultimate features `[B, 32 * width]`.

    Args:
        num_classes: the number of logits `K`.
        stem: "imagenet" (7x7/2 convolution and max-pool) or "small" (one 3x3/1 convolution).
        width: channels of the first stage (the bottlenecks output 4 times as many).

    Returns:
        The `ResNet` module (a bad `stem` raises a ValueError when it is first called).
    """
    return ResNet((3, 4, 6, 3), True, num_classes, stem, width)


def _conv(features: int, kernel: int, strides: int, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )
