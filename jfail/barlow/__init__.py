"""Barlow (seed 000): robust features, mutual information and shallow trees explain failures.

- `features`, `heatmap`, `feature_attack`: a robust model's penultimate activations, where one
  feature fires, and images pushed to maximise it (appendix A-C; `attack_settings` rescales the
  paper's 224 px attack to other image sizes). `features_to_store` computes the features of a
  whole source (`jfail.data.open_source`) through `jfail.engine.map_dataset`: sharded over every
  device and host, written to a resumable on-disk store.
- `failure_tree` (one group) and `failure_trees` (many groups, one batched JAX computation of
  mutual information): Algorithm 1, every leaf as a readable rule with BER, ER, EC, IV, ALER and
  validity, and a `reason` when no leaf is valid. `group_indices` groups by label or prediction.
- `mutual_information`, `rank_features`: scikit-learn's nearest-neighbour estimator in JAX.
- `valid_leaf_fraction`, `failure_table`, `plot_feature_panel`: Table 1, Tables 2-5 and the
  per-feature figures.
- `leaf_evidence`: every candidate leaf applied by its rule to held-out rows, with its held-out
  error rate, a Wilson interval, an exact binomial p-value against its group's held-out error
  rate and a Benjamini-Yekutieli q-value over all candidates (`LeafEvidence`).
- `analyze_source`: all of it over a data set that is never loaded whole: predictions and
  features streamed to the engine's store (`predictions_to_store`), trees fitted on the stored
  arrays, and panels (`feature_panels`) that read only the images they show (`read_images`).
"""

from jfail.barlow.evidence import LeafEvidence, leaf_evidence
from jfail.barlow.extraction import (
    PAPER_ATTACK,
    AttackSettings,
    attack_batch,
    attack_settings,
    feature_attack,
    features,
    features_to_store,
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
from jfail.barlow.streaming import (
    FeaturePanel,
    SourceAnalysis,
    analyze_source,
    feature_panels,
    predictions_to_store,
    read_images,
)
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
    "FeaturePanel",
    "FailureTree",
    "FeatureRanking",
    "Leaf",
    "LeafEvidence",
    "PlantedFailures",
    "SourceAnalysis",
    "analyze_source",
    "attack_batch",
    "attack_settings",
    "failure_table",
    "feature_panels",
    "failure_tree",
    "failure_trees",
    "feature_attack",
    "features",
    "features_to_store",
    "group_indices",
    "heatmap",
    "heatmap_batch",
    "leaf_evidence",
    "most_activating",
    "mutual_information",
    "mutual_information_batch",
    "planted_failures",
    "plot_feature_panel",
    "predictions_to_store",
    "rank_features",
    "read_images",
    "rule_recovered",
    "valid_leaf_fraction",
]
