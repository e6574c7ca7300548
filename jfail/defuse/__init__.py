"""Defuse (seeds 001, 003): identify failures in a β-VAE's latent space, distil them into
scenarios, annotate the scenarios and correct the classifier by fine-tuning.

Over a data set that is never loaded whole: `encode_to_store` (the encoder through the engine),
`identify_to_store` (failures written to disk chunk by chunk, `StoredFailures`) and
`distill_stored` (the mixture on a seeded subsample of the stored latents)."""

from jfail.defuse.annotate import (
    NONE_OF_THE_ABOVE,
    Annotator,
    FileAnnotator,
    MajorityVote,
    Review,
    annotator_agreement,
    majority_label,
    review_scenarios,
    reviews_from_labels,
)
from jfail.defuse.annotation_server import (
    AnnotationServer,
    agreement_figure,
    annotation_reviews,
    load_votes,
    prepare_annotation,
    run_annotation_server,
    serve,
)
from jfail.defuse.correct import (
    CorrectionConfig,
    FinetuneResult,
    SweepResult,
    correct,
    finetune,
)
from jfail.defuse.distill import Scenarios, distill, sample_latents, sample_scenarios
from jfail.defuse.identify import NOISE_MODES, Draws, Failures, identify, identify_batch
from jfail.defuse.streaming import (
    StoredFailures,
    distill_stored,
    encode_to_store,
    identify_to_store,
    open_failures,
)
from jfail.defuse.vae import VAEConfig, VAEResult, encode, train_vae, vae_loss

__all__ = [
    "CorrectionConfig",
    "FinetuneResult",
    "SweepResult",
    "VAEConfig",
    "VAEResult",
    "correct",
    "encode",
    "finetune",
    "train_vae",
    "vae_loss",
    "NOISE_MODES",
    "Draws",
    "Failures",
    "Scenarios",
    "StoredFailures",
    "distill_stored",
    "encode_to_store",
    "identify_to_store",
    "open_failures",
    "distill",
    "identify",
    "identify_batch",
    "sample_latents",
    "sample_scenarios",
    "NONE_OF_THE_ABOVE",
    "Annotator",
    "FileAnnotator",
    "MajorityVote",
    "Review",
    "annotator_agreement",
    "majority_label",
    "review_scenarios",
    "reviews_from_labels",
    "AnnotationServer",
    "agreement_figure",
    "annotation_reviews",
    "load_votes",
    "prepare_annotation",
    "run_annotation_server",
    "serve",
]
