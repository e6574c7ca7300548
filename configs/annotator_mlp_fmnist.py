"""The simulated annotators' classifier on Fashion-MNIST: an MLP with hidden layers 512 and 256.

Defuse's failure scenarios are reviewed by annotators who label decoded samples. Here they are
simulated by classifiers of this architecture, deliberately different from the convolutional
classifier under repair, so that the reviewers do not share its inductive biases. Several
seeds (`--set train.seed=...`) give several independent voters.
"""

from jfail.config import ClassifierRunConfig
from jfail.train import TrainConfig


def get_config() -> ClassifierRunConfig:
    return ClassifierRunConfig(
        name="annotator_mlp_fmnist",
        dataset="fashion_mnist",
        val_fraction=0.1,
        model="mlp",
        train=TrainConfig(optimizer="adam", learning_rate=1e-3, batch_size=128, epochs=5),
    )
