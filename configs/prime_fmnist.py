"""PRIME (seed 004) on Fashion-MNIST: shape tags, the Defuse CNN, the paper's search defaults.

Failure modes are searched on the classifier's validation images (600 a class, never trained
on, so its errors there are those it makes on unseen data) and checked on the test split (section
4.1), each with an exact test of its error rate and of each tag's necessity under
Benjamini-Yekutieli false-discovery control. s = 30 and a 50-image tag threshold, as the paper
uses for its smaller data sets.
"""

from jfail.prime import PrimeConfig


def get_config() -> PrimeConfig:
    return PrimeConfig(
        name="prime_fmnist",
        dataset="fashion_mnist",
        classifier_config="configs/defuse_cnn_fmnist.py",
        classifier_run="runs/classifiers/defuse_cnn_fmnist",
        search_split="val",
        heldout_split="test",
        min_tag_count=50,
        min_size=30,
        min_drop=0.30,
        min_gain=(0.10, 0.05, 0.025),
        max_tags=4,
    )
