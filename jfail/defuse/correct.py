"""Correction (seed 001, section 3.3): fine-tune on `L(D) + λ·CE(D_f)` and sweep λ.

Every step takes one minibatch of the training data D and one of the failure set D_f (cycled,
reshuffled each pass), so `λ` weighs the two mean cross-entropies directly. Per λ, the epoch with
the best validation accuracy is kept; over λ, the best of those. `evaluate_on` data sets (e.g. the
test split and the scenarios' held-out samples) are scored for every λ, which gives the paper's
Figure 5 trade-off.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jfail.data import Dataset, batches, num_batches
from jfail.logs import progress_disabled
from jfail.models.cpu_gradients import cpu_friendly_gradients
from jfail.train.classifier import evaluate
from jfail.xla import jit

__all__ = ["CorrectionConfig", "FinetuneResult", "SweepResult", "finetune", "correct"]

log = logging.getLogger("jfail.defuse")


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """Fine-tuning settings; defaults are appendix B.2 (Adam 1e-3, minibatch 256, 3 epochs)."""

    learning_rate: float = 1e-3
    batch_size: int = 256
    epochs: int = 3
    eval_batch_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        for name in ("learning_rate", "batch_size", "epochs", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


class FinetuneResult(NamedTuple):
    """Weights of the epoch with the best validation accuracy, and one record per epoch."""

    params: Any
    state: Any
    best_epoch: int
    history: list[dict]


class SweepResult(NamedTuple):
    """The best λ's weights, and per λ its selected epoch's scores (`val`, then `evaluate_on`)."""

    params: Any
    state: Any
    best_lambda: float
    per_lambda: list[dict]


def finetune(
    apply_fn: Callable,
    params: Any,
    state: Any,
    train: Dataset,
    failures: Dataset,
    val: Dataset,
    lam: float,
    config: CorrectionConfig = CorrectionConfig(),
    *,
    progress: bool | None = None,
) -> FinetuneResult:
    """Minimize `CE(D) + λ·CE(D_f)` from `(params, state)`; keep the best epoch by val accuracy.

    apply_fn: `(params, state, x, train) -> (logits, state)`; train, failures, val: `Dataset`s
    with images `[N, H, W, C]`; `failures` holds the failure instances with their annotated labels.
    """
    _check(train, failures, val, lam)
    step, tx = _make_step(apply_fn, config.learning_rate)
    current = (params, state, tx.init(params))
    best, best_epoch, best_accuracy, history = (params, state), -1, -math.inf, []
    key = jax.random.key(config.seed)
    steps_per_epoch = num_batches(len(train.labels), config.batch_size)
    lam = jnp.float32(lam)
    for epoch in range(config.epochs):
        failure_order = _failure_order(config.seed, epoch, len(failures.labels),
                                       steps_per_epoch * config.batch_size)
        stream = batches(train.images, train.labels, config.batch_size, key=key,
                         epochs=1, first_epoch=epoch)
        for i, batch in enumerate(tqdm(stream, total=steps_per_epoch, leave=False,
                                       desc=f"λ={float(lam):g} epoch {epoch + 1}",
                                       disable=progress_disabled(progress))):
            rows = failure_order[i * config.batch_size : (i + 1) * config.batch_size]
            current, _ = step(current, batch.images, batch.labels,
                              failures.images[rows], failures.labels[rows], lam)
        scores = evaluate(apply_fn, current[0], current[1], val, batch_size=config.eval_batch_size)
        history.append({"epoch": epoch, "val_accuracy": scores["accuracy"]})
        if scores["accuracy"] > best_accuracy:
            best, best_epoch, best_accuracy = (current[0], current[1]), epoch, scores["accuracy"]
    return FinetuneResult(*jax.device_get(best), best_epoch, history)


def correct(
    apply_fn: Callable,
    params: Any,
    state: Any,
    train: Dataset,
    failures: Dataset,
    val: Dataset,
    lambdas,
    config: CorrectionConfig = CorrectionConfig(),
    *,
    evaluate_on: dict[str, Dataset] | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """`finetune` for every λ in `lambdas`; the best overall is the highest validation accuracy.

    Returns per λ `{'lambda', 'best_epoch', 'val_accuracy', '<name>_accuracy' for evaluate_on}`.
    """
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("lambdas is empty: pass at least one regularization weight")
    evaluate_on = evaluate_on or {}
    per_lambda, best = [], None
    for lam in tqdm(lambdas, desc="λ sweep", unit="λ", disable=progress_disabled(progress)):
        result = finetune(apply_fn, params, state, train, failures, val, lam, config,
                          progress=progress)
        record = {"lambda": lam, "best_epoch": result.best_epoch,
                  "val_accuracy": result.history[result.best_epoch]["val_accuracy"]}
        for name, data in evaluate_on.items():
            record[f"{name}_accuracy"] = evaluate(
                apply_fn, result.params, result.state, data, batch_size=config.eval_batch_size
            )["accuracy"]
        log.info("correction %s", record)
        per_lambda.append(record)
        if best is None or record["val_accuracy"] > best[0]:
            best = (record["val_accuracy"], lam, result.params, result.state)
    return SweepResult(best[2], best[3], best[1], per_lambda)


@functools.lru_cache(maxsize=8)
def _make_step(apply_fn, learning_rate: float):
    """The jitted step and its Adam, cached so every λ of a sweep reuses one compiled program."""
    tx = optax.adam(learning_rate)
    apply_fn = cpu_friendly_gradients(apply_fn)  # fast strided-convolution gradients on CPU

    def loss_fn(params, state, x, y, x_fail, y_fail, lam):
        logits, new_state = apply_fn(params, state, x, True)
        data_loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        fail_logits, _ = apply_fn(params, new_state, x_fail, True)
        fail_loss = optax.softmax_cross_entropy_with_integer_labels(fail_logits, y_fail).mean()
        return data_loss + lam * fail_loss, new_state

    @jit
    def step(current, x, y, x_fail, y_fail, lam):
        params, state, opt_state = current
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x, y, x_fail, y_fail, lam
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_state, opt_state), loss

    return step, tx


def _failure_order(seed: int, epoch: int, num_failures: int, length: int) -> np.ndarray:
    """Indices into D_f for one epoch: reshuffled passes over D_f, concatenated to `length`."""
    rng = np.random.default_rng([seed, epoch])
    passes = -(-length // num_failures)
    return np.concatenate([rng.permutation(num_failures) for _ in range(passes)])[:length]


def _check(train: Dataset, failures: Dataset, val: Dataset, lam: float) -> None:
    if len(failures.labels) == 0:
        raise ValueError(
            "the failure set is empty: no scenario was judged a failure, so there is nothing to "
            "correct"
        )
    for name, data in (("failures", failures), ("val", val)):
        if data.images.shape[1:] != train.images.shape[1:]:
            raise ValueError(
                f"{name} images {data.images.shape[1:]} differ in shape from train images "
                f"{train.images.shape[1:]}"
            )
    if np.any(np.asarray(failures.labels) < 0):
        raise ValueError("failure labels must be class indices; drop 'none of the above' samples")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"λ must be a finite non-negative number, got {lam!r}")
