"""ResNet-18 with the small-image stem on Fashion-MNIST.

Base width 16 (channels 16-32-64-128) instead of 64: on a 2-core CPU, XLA's convolution weight
gradients make the full-width network about 20x slower per image. Set
`--set model_kwargs.width=64` on an accelerator for the standard network. Adam 2e-3 with a cosine
schedule, batch 32, 5 epochs.
"""

from jfail.config import ClassifierRunConfig, derive_config

BASE = ClassifierRunConfig
CHANGES = {
    "name": "resnet18_fmnist",
    "model": "resnet18",
    "model_kwargs": {"stem": "small", "width": 16},
    "train.optimizer": "adam",
    "train.learning_rate": 2e-3,
    "train.schedule": "cosine",
    "train.batch_size": 32,
}


def get_config() -> ClassifierRunConfig:
    return derive_config(BASE, CHANGES)
