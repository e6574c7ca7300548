"""An ℓ2-robust ResNet-18 (small stem, base width 16) on Fashion-MNIST: Barlow's feature extractor.

The paper extracts features with an ImageNet ResNet-50 adversarially trained under ℓ2, ε = 3
(224x224x3). Here: ℓ2 ε = 1.0 on 28x28x1 images, a common strength for (Fashion-)MNIST that keeps
clean accuracy usable, with 2 PGD steps of 2.5 ε / 2 per training batch for two epochs: on two
CPU cores each robust epoch costs about two standard ones. On an accelerator, raise
`train.epochs` and `train.attack.steps`.
"""

from jfail.config import ClassifierRunConfig
from jfail.train import Attack, TrainConfig


def get_config() -> ClassifierRunConfig:
    return ClassifierRunConfig(
        name="resnet18_fmnist_robust_l2",
        dataset="fashion_mnist",
        val_fraction=0.1,
        model="resnet18",
        model_kwargs={"stem": "small", "width": 16},
        train=TrainConfig(
            optimizer="adam", learning_rate=2e-3, schedule="cosine", batch_size=32, epochs=2,
            attack=Attack(norm="l2", epsilon=1.0, steps=2),
        ),
    )
