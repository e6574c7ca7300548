"""The configuration of a PRIME experiment (seed 004)."""

from __future__ import annotations

import dataclasses

__all__ = ["PrimeConfig"]


@dataclasses.dataclass(frozen=True)
class PrimeConfig:
    """PRIME on a data set with a trained classifier. Defaults are the paper's.

    The classifier comes from `classifier_run` (a `run_classifier` directory); if that run has no
    metrics yet, `classifier_config` is trained into it first. Failure modes are searched on
    `search_split` and re-evaluated on `heldout_split`:
      "train": the images the classifier was fitted on (the paper searches its training data and
               checks unseen data, sections 4 and 4.1), where the model's errors are rarer
               than on unseen data and not those it makes there;
      "val":   the classifier's validation images (not fitted on, only used to pick the epoch;
               the default);
      "test":  the data set's test split (the default held-out split).
    On the held-out split each mode gets an interval, an exact p-value for its error rate and
    one for each tag's necessity, and q-values under `fdr_method` ("by": Benjamini-Yekutieli,
    "bh": Benjamini-Hochberg); it is significant when all its q-values are at most `alpha`
    (`jfail.prime.mode_evidence`).

    Search (section 3.2, A.2): min_size s = 30, min_drop a = 30 %, min_gain (b2, b3, b4) =
    (10, 5, 2.5) %, max_tags l = 4; tags on fewer than min_tag_count images of a class are
    dropped (section 3.1: 50 to 200 by data set size). greedy_beam_width is the beam of the
    greedy search (A.6), run alongside for comparison. sweep_* is the (s, a) grid of A.5.

    Shape tags: per-class quantiles (low, high) of each measurement, ink threshold on [0, 1]
    pixels. Planted description check (section 4.3 against ground truth): a synthetic problem of
    four classes with one planted mode of 1, 2, 3 and 4 tags each (planted tags on a share
    planted_prevalence[0] of images, the others on planted_prevalence[1]); the search sees the
    true tags flipped with planted_flip_probability.
    """

    name: str = "prime_fmnist"
    dataset: str = "fashion_mnist"
    classifier_config: str = "configs/defuse_cnn_fmnist.py"
    classifier_run: str = "runs/classifiers/defuse_cnn_fmnist"
    search_split: str = "val"
    heldout_split: str = "test"
    fdr_method: str = "by"
    alpha: float = 0.05
    # tags
    shape_quantiles: tuple = (0.2, 0.8)
    ink_threshold: float = 0.2
    min_tag_count: int = 50
    # search
    min_size: int = 30
    min_drop: float = 0.30
    min_gain: tuple = (0.10, 0.05, 0.025)
    max_tags: int = 4
    greedy_beam_width: int = 10
    sweep_min_sizes: tuple = (30, 100)
    sweep_min_drops: tuple = (0.1, 0.2, 0.3)
    # report
    grid_images: int = 8
    max_grid_modes_per_class: int = 8
    # planted description-quality check
    planted_images_per_class: int = 100_000
    planted_num_tags: int = 16
    planted_prevalence: tuple = (0.15, 0.3)
    planted_base_accuracy: float = 0.95
    planted_flip_probability: float = 0.05
    seed: int = 0
