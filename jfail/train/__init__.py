"""Training: optax classifiers with orbax checkpoints, data-parallel over devices."""

from jfail.train.adversarial import Attack, pgd_attack, robust_accuracy
from jfail.train.checkpoint import RunCheckpointer
from jfail.train.classifier import (
    FitResult,
    TrainConfig,
    TrainState,
    as_dataset,
    errors,
    evaluate,
    fit,
    make_optimizer,
    make_train_step,
    predict,
)
from jfail.train.parallel import DataParallel
from jfail.train.summaries import epoch_summaries
from jfail.train.trainable import TrainableModel, trainable

__all__ = [
    "Attack",
    "pgd_attack",
    "robust_accuracy",
    "DataParallel",
    "FitResult",
    "RunCheckpointer",
    "TrainConfig",
    "TrainState",
    "TrainableModel",
    "as_dataset",
    "epoch_summaries",
    "errors",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_train_step",
    "predict",
    "trainable",
]
