"""The simulated annotators' classifier on Fashion-MNIST: an MLP with hidden layers 512 and 256.

Defuse's failure scenarios are reviewed by annotators who label decoded samples. Here they are
simulated by classifiers of this architecture, deliberately different from the convolutional
classifier under repair, so that the reviewers do not share its inductive biases. Adam 1e-3,
batch 128, 5 epochs. Several seeds (`--set train.seed=...`) give several independent voters.
"""

from jfail.config import ClassifierRunConfig, derive_config

BASE = ClassifierRunConfig
CHANGES = {
    "name": "annotator_mlp_fmnist",
    "model": "mlp",
    "train.optimizer": "adam",
    "train.learning_rate": 1e-3,
    "train.batch_size": 128,
}


def get_config() -> ClassifierRunConfig:
    return derive_config(BASE, CHANGES)
