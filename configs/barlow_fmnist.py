"""Barlow on Fashion-MNIST (seed 000): robust vs standard ResNet-18 features explain errors.

Trees are fitted on the standard classifier's validation images (6,000, held out from its
training) and every leaf is measured on the 10,000 test images, with Benjamini-Yekutieli q-values
over all leaves of each search.

Feature attack: left unset, `jfail.barlow.attack_settings` scales the paper's ε = 500 and step 1
(224x224x3, 500 steps) by sqrt(d / 150,528), keeping the per-pixel budget: ε ≈ 36, step ≈ 0.072
at 28x28x1, 500 steps.
"""

from jfail.config import BarlowConfig


def get_config() -> BarlowConfig:
    return BarlowConfig(
        name="barlow_fmnist",
        dataset="fashion_mnist",
        split="val",
        evidence_split="test",
        classifier_config="configs/resnet18_fmnist.py",
        classifier_run="runs/classifiers/resnet18_fmnist",
        robust_config="configs/resnet18_fmnist_robust_l2.py",
        robust_run="runs/barlow/resnet18_fmnist_robust_l2",
        num_features=50,
        depths=(1, 3),
        groupings=("label", "prediction"),
        delta=0.1,
        tau=0.2,
        screen=None,
        fdr_method="by",
        alpha=0.05,
    )
