"""Correction (seed 001, section 3.3): fine-tune on `L(D) + λ·CE(D_f)` and sweep λ.

Every step takes one minibatch of the training data D and one of the failure set D_f (cycled,
reshuffled each pass), so `λ` weighs the two mean cross-entropies directly. Per λ, the epoch with
the best validation accuracy is kept; over λ, the best of those. `evaluate_on` data sets (e.g. the
test split and the scenarios' held-out samples) are scored for every λ, which gives the paper's
Figure 5 trade-off.

Models: any style `jfail.train.trainable` knows (`finetune(model, train, failures, val, lam)`
with an NNX module, an Equinox module, `trainable(apply, params)` or a `TrainableModel`), or
jfail's original `finetune(apply_fn, params, state, train, failures, val, lam)`. Data: `Dataset`s
or `(images, labels)` tuples. Optimizer: `CorrectionConfig(optimizer=...)`, None for Adam at
`learning_rate`, or any `optax.GradientTransformation`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jfail.data import Dataset, batches, num_batches
from jfail.logs import progress_disabled
from jfail.train.classifier import (
    as_dataset,
    check_model_data,
    evaluate_weights,
    trainable_and_rest,
)
from jfail.xla import cpu_friendly_gradients, jit

__all__ = ["CorrectionConfig", "FinetuneResult", "SweepResult", "finetune", "correct"]

log = logging.getLogger("jfail.defuse")


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """Fine-tuning settings; defaults are appendix B.2 (Adam 1e-3, minibatch 256, 3 epochs).

    `optimizer`: None for Adam at `learning_rate`, or any `optax.GradientTransformation` (used
    as it is; `learning_rate` is then ignored).
    """

    learning_rate: float = 1e-3
    batch_size: int = 256
    epochs: int = 3
    eval_batch_size: int = 1000
    seed: int = 0
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        if self.optimizer is not None and not isinstance(
            self.optimizer, optax.GradientTransformation
        ):
            raise ValueError(
                f"optimizer must be None (Adam) or an optax.GradientTransformation, got "
                f"{self.optimizer!r}"
            )
        for name in ("learning_rate", "batch_size", "epochs", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


class FinetuneResult(NamedTuple):
    """Weights of the epoch with the best validation accuracy, and one record per epoch."""

    params: Any
    state: Any
    best_epoch: int
    history: list[dict]
    model: Any = None  # the selected weights in the caller's style (a new NNX/Equinox module)


class SweepResult(NamedTuple):
    """The best λ's weights, and per λ its selected epoch's scores (`val`, then `evaluate_on`)."""

    params: Any
    state: Any
    best_lambda: float
    per_lambda: list[dict]
    model: Any = None  # the best λ's weights in the caller's style


def finetune(model: Any, *args, **kwargs) -> FinetuneResult:
    """Minimize `CE(D) + λ·CE(D_f)` from the model's weights; keep the best epoch by val accuracy.

    Call as `finetune(model, train, failures, val, lam, config=CorrectionConfig(), *,
    progress=None)` (any model style `jfail.train.trainable` knows) or
    `finetune(apply_fn, params, state, train, failures, val, lam, config)` with
    `apply_fn(params, state, x, train) -> (logits, state)`.

    Args:
        train, failures, val: `Dataset`s or `(images [N, H, W, C], labels [N])` tuples;
            `failures` holds the failure instances with their annotated labels.
        lam: λ ≥ 0, the weight of the failure set's cross-entropy.

    Returns:
        A `FinetuneResult`; `.model` is the selected weights in the caller's style.

    Raises:
        ValueError: an empty failure set, shapes that differ, labels outside the model's
            classes, a negative or non-finite λ.
        ModelCallError: the model cannot be called on the images.
    """
    tm, rest = trainable_and_rest(model, args, "finetune")
    return _finetune(tm, *rest, **kwargs)


def _finetune(
    tm,
    train: Any,
    failures: Any,
    val: Any,
    lam: float,
    config: CorrectionConfig = CorrectionConfig(),
    *,
    progress: bool | None = None,
    checked: bool = False,
) -> FinetuneResult:
    apply_fn, params, state = tm.apply, tm.params, tm.state
    train, failures, val = (as_dataset(d, n) for d, n in
                            ((train, "train"), (failures, "failures"), (val, "val")))
    if not checked:
        _check(tm, train, failures, val, lam)
    step, tx = _make_step(apply_fn, config.optimizer or config.learning_rate)
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
        scores = evaluate_weights(apply_fn, current[0], current[1], val,
                           batch_size=config.eval_batch_size)
        history.append({"epoch": epoch, "val_accuracy": scores["accuracy"]})
        if scores["accuracy"] > best_accuracy:
            best, best_epoch, best_accuracy = (current[0], current[1]), epoch, scores["accuracy"]
    best = jax.device_get(best)
    return FinetuneResult(*best, best_epoch, history, tm.rebuild(*best))


def correct(model: Any, *args, **kwargs) -> SweepResult:
    """`finetune` for every λ in `lambdas`; the best overall is the highest validation accuracy.

    Call as `correct(model, train, failures, val, lambdas, config=CorrectionConfig(), *,
    evaluate_on=None, progress=None)` (any model style) or
    `correct(apply_fn, params, state, train, failures, val, lambdas, config, ...)`. Data
    arguments (and `evaluate_on`'s values) are `Dataset`s or `(images, labels)` tuples.

    Args:
        model: the classifier in any model style, or `apply_fn` followed by `params, state`.
        *args: `train, failures, val, lambdas[, config]` after the model, as above: the data
            sets, the λ values (λ >= 0 each, at least one) and a `CorrectionConfig`.
        **kwargs: `config`, `evaluate_on` (name -> data set scored for every λ) and `progress`.

    Returns:
        A `SweepResult`: per λ `{'lambda', 'best_epoch', 'val_accuracy', '<name>_accuracy' for
        evaluate_on}`, and `.model`, the best λ's weights in the caller's style.

    Raises:
        ValueError: an empty `lambdas`, and the errors of `finetune` (an empty failure set,
            shapes that differ, labels outside the model's classes, a negative or non-finite λ).
        ModelCallError: the model cannot be called on the images.
    """
    tm, rest = trainable_and_rest(model, args, "correct")
    return _correct(tm, *rest, **kwargs)


def _correct(
    tm,
    train: Any,
    failures: Any,
    val: Any,
    lambdas,
    config: CorrectionConfig = CorrectionConfig(),
    *,
    evaluate_on: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> SweepResult:
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("lambdas is empty: pass at least one regularization weight")
    train, failures, val = (as_dataset(d, n) for d, n in
                            ((train, "train"), (failures, "failures"), (val, "val")))
    evaluate_on = {name: as_dataset(data, name) for name, data in (evaluate_on or {}).items()}
    for lam in lambdas:
        _check(tm, train, failures, val, lam)
    if evaluate_on:
        check_model_data(tm, evaluate_on)
    per_lambda, best = [], None
    for lam in tqdm(lambdas, desc="λ sweep", unit="λ", disable=progress_disabled(progress)):
        result = _finetune(tm, train, failures, val, lam, config, progress=progress,
                           checked=True)
        record = {"lambda": lam, "best_epoch": result.best_epoch,
                  "val_accuracy": result.history[result.best_epoch]["val_accuracy"]}
        for name, data in evaluate_on.items():
            record[f"{name}_accuracy"] = evaluate_weights(
                tm.apply, result.params, result.state, data, batch_size=config.eval_batch_size
            )["accuracy"]
        log.info("correction %s", record)
        per_lambda.append(record)
        if best is None or record["val_accuracy"] > best[0]:
            best = (record["val_accuracy"], lam, result.params, result.state)
    return SweepResult(best[2], best[3], best[1], per_lambda, tm.rebuild(best[2], best[3]))


@functools.lru_cache(maxsize=8)
def _make_step(apply_fn, optimizer):
    """The jitted step and its optimizer (a transformation, or Adam's learning rate), cached so
    every λ of a sweep reuses one compiled program."""
    tx = optimizer if isinstance(optimizer, optax.GradientTransformation) else optax.adam(optimizer)
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


def _check(tm, train: Dataset, failures: Dataset, val: Dataset, lam: float) -> None:
    if len(train.labels) == 0 or len(val.labels) == 0:
        raise ValueError("train and val must hold at least one example each")
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
    check_model_data(tm, {"train": train, "failures": failures, "val": val})
