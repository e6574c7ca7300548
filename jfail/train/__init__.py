"""Training: optax classifiers with orbax checkpoints, data-parallel over devices."""

from jfail.train.adversarial import Attack, pgd_attack, robust_accuracy
from jfail.train.checkpoint import RunCheckpointer
from jfail.train.classifier import (
    FitResult,
    TrainConfig,
    TrainState,
    evaluate,
    fit,
    make_optimizer,
    make_train_step,
    predict,
)
from jfail.train.parallel import DataParallel

__all__ = [
    "Attack",
    "pgd_attack",
    "robust_accuracy",
    "DataParallel",
    "FitResult",
    "RunCheckpointer",
    "TrainConfig",
    "TrainState",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_train_step",
    "predict",
]
