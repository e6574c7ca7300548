"""Barlow on Fashion-MNIST (seed 000): robust vs standard ResNet-18 features explain errors.

`BarlowConfig`'s defaults are this experiment: the paper's δ = 0.1, τ = 0.2, 50 features, trees of
depth 1 and 3, grouping by label and by prediction; the classifier of configs/resnet18_fmnist.py,
the robust feature extractor of configs/resnet18_fmnist_robust_l2.py. Trees are fitted on the
standard classifier's validation images (6,000, held out from its training) and every leaf is
measured on the 10,000 test images, with Benjamini-Yekutieli q-values over all leaves of each
search.

Feature attack: left unset, `jfail.barlow.attack_settings` scales the paper's ε = 500 and step 1
(224x224x3, 500 steps) by sqrt(d / 150,528), keeping the per-pixel budget: ε ≈ 36, step ≈ 0.072
at 28x28x1, 500 steps.
"""

from jfail.config import BarlowConfig, derive_config

BASE = BarlowConfig
CHANGES = {}


def get_config() -> BarlowConfig:
    return derive_config(BASE, CHANGES)
