"""Debugging tests for explanations (seed 002): metrics and model contamination.

- `ssim` (scikit-image's Gaussian-window SSIM on maps normalized to [0, 1]) and `spearman` (rank
  correlation with average ranks for ties), both batched and jitted.
- `spurious_backgrounds`, `background_only`, `ground_truth_background`, `flip_labels`: the
  planted data bugs (class-correlated backgrounds with exact object masks, flipped labels).
- `cascading_randomization`, `independent_randomization`: parameters with re-initialized layers,
  from the output layer down (Figure 7) or one at a time.
- `tcav` and its parts (concept activation vectors, directional derivatives, TCAV scores) and
  `influence_scores`, `self_influence`, with the rankings' summaries (§G, other methods), and
  the paper's checks with them on the bugged models: `background_tcav`,
  `background_influence`, `find_flipped_labels`.
- `mean_sem`: the tables' mean ± SEM cells. Figures are in `jfail.debugtests.plots`.
- `attributions_to_store`, `randomization_similarity_to_store`: attribution maps, and the
  randomization tests' SSIM and rank correlation per example, over a data set that is never
  loaded whole (through `jfail.engine.map_dataset`, per-example keys).
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
    background_tcav,
    concept_activation_vector,
    directional_derivatives,
    tcav,
    tcav_score,
)
from jfail.debugtests.influence import (
    background_influence,
    find_flipped_labels,
    fraction_checked_to_find,
    influence_scores,
    self_influence,
    top_fraction_flagged,
)
from jfail.debugtests.metrics import mean_sem, spearman, ssim
from jfail.debugtests.randomization import (
    cascading_randomization,
    forward_layer_order,
    independent_randomization,
    layer_order,
)
from jfail.debugtests.streaming import (
    attributions_to_store,
    paper_postprocess,
    randomization_similarity_to_store,
)

__all__ = [
    "attributions_to_store", "paper_postprocess", "randomization_similarity_to_store",
    "BACKGROUNDS", "SpuriousData", "background_only", "flip_labels", "ground_truth_background",
    "load_backgrounds", "spurious_backgrounds",
    "ground_truth_weighted", "frozen_layer_mask", "freeze", "PREPROCESSING_KINDS",
    "preprocessing_mismatch", "ood_pairs",
    "ssim", "spearman", "mean_sem", "layer_order", "forward_layer_order", "cascading_randomization",
    "independent_randomization",
    "TCAVResult", "concept_activation_vector", "directional_derivatives", "tcav_score", "tcav",
    "influence_scores", "self_influence", "fraction_checked_to_find", "top_fraction_flagged",
    "background_tcav", "background_influence", "find_flipped_labels",
]
