"""The Defuse classifier (seed 001, figure 7) on Fashion-MNIST.

Appendix B.2 trains it with Adadelta, learning rate 1, batch 64, 5 epochs (the defaults);
Fashion-MNIST is harder than MNIST, so this runs 10 epochs and keeps the epoch with the best
validation accuracy.
"""

from jfail.config import ClassifierRunConfig, derive_config

BASE = ClassifierRunConfig
CHANGES = {
    "name": "defuse_cnn_fmnist",
    "train.epochs": 10,
}


def get_config() -> ClassifierRunConfig:
    return derive_config(BASE, CHANGES)
