"""Defuse on the 5,000-image MNIST subset (seed 001's own data set, at a smaller scale).

The paper's MNIST settings (`DefuseConfig`'s defaults), except: the β-VAE trains 60 epochs at
batch 256 (1,080 steps; the paper runs 800 epochs at batch 2048 on 70,000 images), and
identification runs on 1,500 of the 4,500 training images (750,000 draws). The λ sweep is the
paper's full list of 17 values, 3 epochs each. The classifier is configs/defuse_cnn_mnist5k.py,
the annotators configs/annotator_mlp_mnist5k.py.
"""

from jfail.config import DefuseConfig, derive_config

BASE = DefuseConfig
CHANGES = {
    "name": "defuse_mnist5k",
    "dataset": "mnist5k",
    "classifier_config": "configs/defuse_cnn_mnist5k.py",
    "classifier_run": "runs/classifiers/defuse_cnn_mnist5k",
    "annotator_config": "configs/annotator_mlp_mnist5k.py",
    "annotator_runs": "runs/defuse/annotators_mnist5k",
    "vae.batch_size": 256,
    "vae.epochs": 60,
    "vae_run": "runs/defuse/vae_mnist5k",
    "identify_images": 1500,
}


def get_config() -> DefuseConfig:
    return derive_config(BASE, CHANGES)
