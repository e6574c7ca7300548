"""Defuse on Fashion-MNIST (seeds 001, 003) with the Defuse CNN of configs/defuse_cnn_fmnist.py.

The paper's MNIST settings (`DefuseConfig`'s defaults) throughout, with three changes for a
2-core CPU, each stated:
- the β-VAE trains 6 epochs at batch 256 (1,266 steps) instead of 800 epochs at batch 2048;
- identification runs on 1,000 training images (500,000 draws) instead of all 60,000;
- the λ sweep keeps 4 of the paper's 17 values (0.01, 1, 5, 20), 3 epochs each, as in the paper.
Everything else (β = 4, z = 10, Beta(50, 50), Q = 500, at most 100 per image, K = 100, ε = 0.01,
τ = 0.5, 10 reviewed samples, ρ = 0.5, 256 + 256 samples per scenario, Adam 1e-3, batch 256) is
the paper's. The annotators are 5 MLPs (configs/annotator_mlp_fmnist.py) trained with different
seeds; the classifier under repair is never one of them.
"""

from jfail.config import DefuseConfig, derive_config

BASE = DefuseConfig
CHANGES = {
    "vae.batch_size": 256,
    "vae.epochs": 6,
    "identify_images": 1000,
    "lambdas": (1e-2, 1.0, 5.0, 20.0),
}


def get_config() -> DefuseConfig:
    return derive_config(BASE, CHANGES)
