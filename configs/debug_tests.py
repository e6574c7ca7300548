"""Debugging tests for explanations (seed 002) on Fashion-MNIST with the Defuse CNN.

The paper's birds-vs-dogs spurious task becomes T-shirt/top vs Shirt (two classes the classifier
often confuses, so the background is the easier cue) on brick vs grass (scikit-image's textures); its MNIST/Fashion-MNIST out-of-distribution pairs are kept
(mnist5k for MNIST); cascading re-initialization runs on the Defuse CNN instead of VGG-16.
200 inputs per table (the paper uses 190).
"""

from jfail.config import DebugTestsConfig


def get_config() -> DebugTestsConfig:
    return DebugTestsConfig(
        name="debug_tests",
        dataset="fashion_mnist",
        classifier_config="configs/defuse_cnn_fmnist.py",
        classifier_run="runs/classifiers/defuse_cnn_fmnist",
        ood_dataset="mnist5k",
        ood_config="configs/defuse_cnn_mnist5k.py",
        ood_run="runs/classifiers/defuse_cnn_mnist5k",
        spurious_classes=(0, 6),
        backgrounds=("brick", "grass"),
        num_inputs=200,
    )
