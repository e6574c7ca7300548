"""The simulated annotators' classifier on the 5,000-image MNIST subset: annotator_mlp_fmnist.py
on mnist5k.

The subset is small, so this trains for 20 epochs; several seeds (`--set train.seed=...`) give
several independent voters.
"""

from pathlib import Path

from jfail.config import ClassifierRunConfig, derive_config

BASE = Path(__file__).with_name("annotator_mlp_fmnist.py")
CHANGES = {
    "name": "annotator_mlp_mnist5k",
    "dataset": "mnist5k",
    "train.epochs": 20,
}


def get_config() -> ClassifierRunConfig:
    return derive_config(BASE, CHANGES)
