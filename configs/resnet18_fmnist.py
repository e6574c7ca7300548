"""ResNet-18 with the small-image stem on Fashion-MNIST.

Base width 16 (channels 16-32-64-128) instead of 64: on a 2-core CPU, XLA's convolution weight
gradients make the full-width network about 20x slower per image. Set
`--set model_kwargs.width=64` on an accelerator for the standard network.
"""

from jfail.config import ClassifierRunConfig
from jfail.train import TrainConfig


def get_config() -> ClassifierRunConfig:
    return ClassifierRunConfig(
        name="resnet18_fmnist",
        dataset="fashion_mnist",
        val_fraction=0.1,
        model="resnet18",
        model_kwargs={"stem": "small", "width": 16},
        train=TrainConfig(
            optimizer="adam", learning_rate=2e-3, schedule="cosine", batch_size=32, epochs=5
        ),
    )
