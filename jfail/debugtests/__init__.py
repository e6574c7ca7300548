"""Debugging tests for explanations (seed 002): metrics and model contamination.

- `ssim` (scikit-image's Gaussian-window SSIM on maps normalized to [0, 1]) and `spearman` (rank
  correlation with average ranks for ties), both batched and jitted.
- `cascading_randomization`, `independent_randomization`: parameters with re-initialized layers,
  from the output layer down (Figure 7) or one at a time.
"""

from jfail.debugtests.metrics import spearman, ssim
from jfail.debugtests.randomization import (
    cascading_randomization,
    independent_randomization,
    layer_order,
)

__all__ = [
    "ssim", "spearman", "layer_order", "cascading_randomization", "independent_randomization",
]
