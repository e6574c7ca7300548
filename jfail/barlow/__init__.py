"""Barlow (seed 000): robust features, mutual information and shallow trees explain failures.

- `features`, `heatmap`, `feature_attack`: a robust model's penultimate activations, where one
  feature fires, and images pushed to maximise it (appendix A-C; `attack_settings` rescales the
  paper's 224 px attack to other image sizes).
- `failure_tree` (one group) and `failure_trees` (many groups, one batched JAX computation of
  mutual information): Algorithm 1, every leaf as a readable rule with BER, ER, EC, IV, ALER and
  validity, and a `reason` when no leaf is valid. `group_indices` groups by label or prediction.
- `mutual_information`, `rank_features`: scikit-learn's nearest-neighbour estimator in JAX.
- `valid_leaf_fraction`, `failure_table`, `plot_feature_panel`: Table 1, Tables 2-5 and the
  per-feature figures.
- `leaf_evidence`: every candidate leaf applied by its rule to held-out rows, with its held-out
  error rate, a Wilson interval, an exact binomial p-value against its group's held-out error
  rate and a Benjamini-Yekutieli q-value over all candidates (`LeafEvidence`).
"""

from jfail.barlow.evidence import LeafEvidence, leaf_evidence
from jfail.barlow.extraction import (
    PAPER_ATTACK,
    AttackSettings,
    attack_batch,
    attack_settings,
    feature_attack,
    features,
    heatmap,
    heatmap_batch,
    most_activating,
)
from jfail.barlow.mutual_info import (
    FeatureRanking,
    mutual_information,
    mutual_information_batch,
    rank_features,
)
from jfail.barlow.plots import plot_feature_panel
from jfail.barlow.synthetic import PlantedFailures, planted_failures, rule_recovered
from jfail.barlow.trees import (
    Condition,
    FailureTree,
    Leaf,
    failure_table,
    failure_tree,
    failure_trees,
    group_indices,
    valid_leaf_fraction,
)

__all__ = [
    "PAPER_ATTACK",
    "AttackSettings",
    "Condition",
    "FailureTree",
    "FeatureRanking",
    "Leaf",
    "LeafEvidence",
    "PlantedFailures",
    "attack_batch",
    "attack_settings",
    "failure_table",
    "failure_tree",
    "failure_trees",
    "feature_attack",
    "features",
    "group_indices",
    "heatmap",
    "heatmap_batch",
    "leaf_evidence",
    "most_activating",
    "mutual_information",
    "mutual_information_batch",
    "planted_failures",
    "plot_feature_panel",
    "rank_features",
    "rule_recovered",
    "valid_leaf_fraction",
]
