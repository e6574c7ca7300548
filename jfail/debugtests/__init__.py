"""Debugging tests for explanations (seed 002): metrics and model contamination.

- `ssim` (scikit-image's Gaussian-window SSIM on maps normalized to [0, 1]) and `spearman` (rank
  correlation with average ranks for ties), both batched and jitted.
- `spurious_backgrounds`, `background_only`, `ground_truth_background`, `flip_labels`: the
  planted data bugs (class-correlated backgrounds with exact object masks, flipped labels).
- `cascading_randomization`, `independent_randomization`: parameters with re-initialized layers,
  from the output layer down (Figure 7) or one at a time.
"""

from jfail.debugtests.bugs import (
    BACKGROUNDS,
    SpuriousData,
    background_only,
    flip_labels,
    ground_truth_background,
    load_backgrounds,
    spurious_backgrounds,
)
from jfail.debugtests.metrics import spearman, ssim
from jfail.debugtests.randomization import (
    cascading_randomization,
    independent_randomization,
    layer_order,
)

__all__ = [
    "BACKGROUNDS", "SpuriousData", "background_only", "flip_labels", "ground_truth_background",
    "load_backgrounds", "spurious_backgrounds",
    "ssim", "spearman", "layer_order", "cascading_randomization", "independent_randomization",
]
