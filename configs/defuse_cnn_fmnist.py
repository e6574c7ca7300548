"""The Defuse classifier (seed 001, figure 7) on Fashion-MNIST.

Appendix B.2 trains it with Adadelta, learning rate 1, batch 64, 5 epochs; Fashion-MNIST is
harder than MNIST, so this runs 10 epochs and keeps the epoch with the best validation accuracy.
"""

from jfail.config import ClassifierRunConfig
from jfail.train import TrainConfig


def get_config() -> ClassifierRunConfig:
    return ClassifierRunConfig(
        name="defuse_cnn_fmnist",
        dataset="fashion_mnist",
        val_fraction=0.1,
        model="defuse_cnn",
        train=TrainConfig(optimizer="adadelta", learning_rate=1.0, batch_size=64, epochs=10),
    )
