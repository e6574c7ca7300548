"""Debugging tests for explanations (seed 002): metrics and model contamination.

- `ssim` (scikit-image's Gaussian-window SSIM on maps normalized to [0, 1]) and `spearman` (rank
  correlation with average ranks for ties), both batched and jitted.
- `spurious_backgrounds`, `background_only`, `ground_truth_background`, `flip_labels`: the
  planted data bugs (class-correlated backgrounds with exact object masks, flipped labels).
- `cascading_randomization`, `independent_randomization`: parameters with re-initialized layers,
  from the output layer down (Figure 7) or one at a time.
- `tcav` and its parts (concept activation vectors, directional derivatives, TCAV scores) and
  `influence_scores`, `self_influence`, with the rankings' summaries (§G, other methods).
"""

from jfail.debugtests.bugs import (
    BACKGROUNDS,
    PREPROCESSING_KINDS,
    SpuriousData,
    background_only,
    flip_labels,
    freeze,
    frozen_layer_mask,
    ground_truth_background,
    ground_truth_weighted,
    load_backgrounds,
    ood_pairs,
    preprocessing_mismatch,
    spurious_backgrounds,
)
from jfail.debugtests.concepts import (
    TCAVResult,
    concept_activation_vector,
    directional_derivatives,
    tcav,
    tcav_score,
)
from jfail.debugtests.influence import (
    fraction_checked_to_find,
    influence_scores,
    self_influence,
    top_fraction_flagged,
)
from jfail.debugtests.metrics import spearman, ssim
from jfail.debugtests.randomization import (
    cascading_randomization,
    forward_layer_order,
    independent_randomization,
    layer_order,
)

__all__ = [
    "BACKGROUNDS", "SpuriousData", "background_only", "flip_labels", "ground_truth_background",
    "load_backgrounds", "spurious_backgrounds",
    "ground_truth_weighted", "frozen_layer_mask", "freeze", "PREPROCESSING_KINDS",
    "preprocessing_mismatch", "ood_pairs",
    "ssim", "spearman", "layer_order", "forward_layer_order", "cascading_randomization",
    "independent_randomization",
    "TCAVResult", "concept_activation_vector", "directional_derivatives", "tcav_score", "tcav",
    "influence_scores", "self_influence", "fraction_checked_to_find", "top_fraction_flagged",
]
