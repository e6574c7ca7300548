"""PRIME (seed 004) on Fashion-MNIST: shape tags, the Defuse CNN, the paper's search defaults.

`PrimeConfig`'s defaults are this experiment. Failure modes are searched on the classifier's
validation images (600 a class, never trained on, so its errors there are those it makes on
unseen data) and checked on the test split (section 4.1), each with an exact test of its error
rate and of each tag's necessity under Benjamini-Yekutieli false-discovery control. s = 30 and a
50-image tag threshold, as the paper uses for its smaller data sets; a = 30 %, b = (10, 5, 2.5) %,
l = 4.
"""

from jfail.config import PrimeConfig, derive_config

BASE = PrimeConfig
CHANGES = {}


def get_config() -> PrimeConfig:
    return derive_config(BASE, CHANGES)
