"""PRIME (seed 004): failure modes as minimal combinations of human-understandable tags.

Tag the images (:mod:`jfail.prime.tags`, :mod:`jfail.prime.shape`, :mod:`jfail.prime.vlm`),
search every class for small tag sets on which accuracy drops (:func:`find_failure_modes`), then
check on held-out data that they are still hard and still minimal (:func:`mode_evidence`) and
that the descriptions describe their images well (:mod:`jfail.prime.evaluate`).
:mod:`jfail.prime.synthetic` plants known modes. :func:`tag_source` computes the shape tags
and the classifier's errors of a data set that is never loaded whole (through the engine), for
the same search.
"""

from jfail.prime.config import PrimeConfig
from jfail.prime.evaluate import (
    DescriptionQuality,
    HeldOutMode,
    ModeEvidence,
    SubsetAccuracy,
    TagEvidence,
    auroc,
    describe,
    description_quality,
    evaluate_on_heldout,
    generalization_summary,
    mode_evidence,
    mode_members,
    recovery_scores,
    subset_accuracies,
    subset_drop_table,
)
from jfail.prime.search import (
    SEARCH_METHODS,
    FailureMode,
    TagSetCounts,
    count_frequent_tag_sets,
    count_tag_sets,
    find_failure_modes,
    pack_bits,
)
from jfail.prime.shape import (
    SHAPE_MEASURES,
    ShapeMeasure,
    ShapeTagger,
    fit_shape_tagger,
    shape_measurements,
)
from jfail.prime.streaming import TaggedSource, open_tags, tag_source
from jfail.prime.synthetic import (
    PlantedProblem,
    flip_tags,
    living17_shaped_problem,
    planted_problem,
)
from jfail.prime.tags import (
    Tagger,
    TagMatrix,
    as_tag_array,
    background_tags,
    concat_tags,
    frequent_tags,
    tags_from_table,
)
from jfail.prime.vlm import (
    CallableEmbedder,
    ImageTextEmbedder,
    TagSpaceEmbedder,
    TransformersClipEmbedder,
    ZeroShotTagger,
    normalize_rows,
)

__all__ = [
    "SEARCH_METHODS",
    "SHAPE_MEASURES",
    "CallableEmbedder",
    "DescriptionQuality",
    "FailureMode",
    "HeldOutMode",
    "ModeEvidence",
    "ImageTextEmbedder",
    "PlantedProblem",
    "PrimeConfig",
    "ShapeMeasure",
    "ShapeTagger",
    "SubsetAccuracy",
    "TagEvidence",
    "TagMatrix",
    "TaggedSource",
    "TagSetCounts",
    "TagSpaceEmbedder",
    "Tagger",
    "TransformersClipEmbedder",
    "ZeroShotTagger",
    "as_tag_array",
    "auroc",
    "background_tags",
    "concat_tags",
    "count_frequent_tag_sets",
    "count_tag_sets",
    "describe",
    "description_quality",
    "evaluate_on_heldout",
    "find_failure_modes",
    "fit_shape_tagger",
    "flip_tags",
    "frequent_tags",
    "generalization_summary",
    "living17_shaped_problem",
    "mode_evidence",
    "mode_members",
    "normalize_rows",
    "pack_bits",
    "planted_problem",
    "recovery_scores",
    "shape_measurements",
    "subset_accuracies",
    "subset_drop_table",
    "tags_from_table",
    "tag_source",
    "open_tags",
]
