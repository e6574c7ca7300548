"""Debugging tests for explanations (seed 002) on Fashion-MNIST with the Defuse CNN.

The paper's birds-vs-dogs spurious task becomes T-shirt/top vs Shirt (two classes the classifier
often confuses, so the background is the easier cue) on brick vs grass (scikit-image's
textures); its MNIST/Fashion-MNIST out-of-distribution pairs are kept (mnist5k for MNIST);
cascading re-initialization runs on the Defuse CNN instead of VGG-16. Those are
`DebugTestsConfig`'s defaults. Here, for a 2-core CPU: 200 inputs per table (the paper uses 190),
40 for the cascading re-initialization (the paper 200) and 5 epochs for the spurious model (the
paper's BVD-CNN 40).
"""

from jfail.config import DebugTestsConfig, derive_config

BASE = DebugTestsConfig
CHANGES = {
    "num_inputs": 200,
    "spurious_epochs": 5,
    "randomization_inputs": 40,
}


def get_config() -> DebugTestsConfig:
    return derive_config(BASE, CHANGES)
