"""PRIME (seed 004) on Fashion-MNIST: shape tags, the Defuse CNN, the paper's search defaults.

Failure modes are searched on the images the classifier was trained on (section 4: the data of
the trained model) and checked on the unseen test split (section 4.1). Fashion-MNIST has 5,400
training images a class, about Living17's 5,200, so s = 30 and a 50-image tag threshold, as the
paper uses for data of that size.
"""

from jfail.prime import PrimeConfig


def get_config() -> PrimeConfig:
    return PrimeConfig(
        name="prime_fmnist",
        dataset="fashion_mnist",
        classifier_config="configs/defuse_cnn_fmnist.py",
        classifier_run="runs/classifiers/defuse_cnn_fmnist",
        search_split="train",
        heldout_split="test",
        min_tag_count=50,
        min_size=30,
        min_drop=0.30,
        min_gain=(0.10, 0.05, 0.025),
        max_tags=4,
    )
