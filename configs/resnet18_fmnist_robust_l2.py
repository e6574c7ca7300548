"""An ℓ2-robust ResNet-18 on Fashion-MNIST, Barlow's feature extractor: resnet18_fmnist.py plus
ℓ2 adversarial training.

The paper extracts features with an ImageNet ResNet-50 adversarially trained under ℓ2, ε = 3
(224x224x3). Here: ℓ2 ε = 1.0 on 28x28x1 images, a common strength for (Fashion-)MNIST that keeps
clean accuracy usable, with 2 PGD steps of 2.5 ε / 2 per training batch for two epochs: on two
CPU cores each robust epoch costs about two standard ones. On an accelerator, raise
`train.epochs` and `train.attack.steps`.
"""

from pathlib import Path

from jfail.config import ClassifierRunConfig, derive_config
from jfail.train import Attack

BASE = Path(__file__).with_name("resnet18_fmnist.py")
CHANGES = {
    "name": "resnet18_fmnist_robust_l2",
    "train.epochs": 2,
    "train.attack": Attack(norm="l2", epsilon=1.0, steps=2),
}


def get_config() -> ClassifierRunConfig:
    return derive_config(BASE, CHANGES)
