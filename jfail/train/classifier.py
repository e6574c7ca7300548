"""Classifier training with optax: jitted data-parallel steps, best-epoch selection, resume.

`apply_fn(params, state, x, train) -> (logits, new_state)` is the training-side model signature
(`jfail.models.linen_apply` builds it for a Flax module, `stateless_apply` for `f(params, x)`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jfail.data import Dataset, batches, check_images, check_labels, num_batches
from jfail.models.cpu_gradients import cpu_friendly_gradients
from jfail.train.adversarial import Attack, pgd_attack
from jfail.train.checkpoint import RunCheckpointer
from jfail.train.parallel import DataParallel
from jfail.xla import jit

__all__ = [
    "TrainConfig",
    "TrainState",
    "FitResult",
    "make_optimizer",
    "make_train_step",
    "evaluate",
    "predict",
    "fit",
]

log = logging.getLogger("jfail.train")

OPTIMIZERS = ("adam", "adadelta", "sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization settings; defaults are seed 001's Fashion/MNIST classifier (Adadelta, lr 1)."""

    optimizer: str = "adadelta"
    learning_rate: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "cosine" (decays to 0 over all steps)
    batch_size: int = 64
    epochs: int = 5
    eval_batch_size: int = 1000
    seed: int = 0
    attack: Attack | None = None  # adversarial training: each batch replaced by its PGD attack

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        for name in ("learning_rate", "batch_size", "epochs", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


class TrainState(NamedTuple):
    """Everything that changes during training: a pytree."""

    params: Any
    state: Any
    opt_state: Any
    step: jax.Array


class FitResult(NamedTuple):
    """Weights of the best epoch (by validation accuracy) and of the last, and the history."""

    params: Any
    state: Any
    best_epoch: int
    history: list[dict]
    last: TrainState


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation named by `config` (Adam, Adadelta or SGD with momentum)."""
    learning_rate: Any = config.learning_rate
    if config.schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(
            config.learning_rate, steps_per_epoch * config.epochs
        )
    if config.optimizer == "adam":
        tx = optax.adam(learning_rate)
    elif config.optimizer == "adadelta":
        tx = optax.adadelta(learning_rate, rho=0.9, eps=1e-6)
    else:
        tx = optax.sgd(learning_rate, momentum=config.momentum, nesterov=True)
    if config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


def make_train_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    attack: Attack | None = None,
    seed: int = 0,
) -> Callable:
    """`step(train_state, x [B,H,W,C], y [B], weight [B]) -> (train_state, metrics)`, jitted.

    `weight` masks padding rows (0) so a batch padded to a multiple of the device count gives
    the same loss and gradient as the unpadded batch. With `attack`, the batch is first replaced
    by its PGD attack against the current weights (BatchNorm in training mode, running statistics
    left untouched by the attack), with noise keyed by `(seed, step)`.
    """
    attack_key = jax.random.fold_in(jax.random.key(seed), 0x5EED)
    differentiable_apply = cpu_friendly_gradients(apply_fn)  # fast strided-conv gradients on CPU

    def loss_fn(params, state, x, y, weight):
        logits, new_state = differentiable_apply(params, state, x, True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        total = jnp.maximum(weight.sum(), 1.0)
        loss = jnp.sum(losses * weight) / total
        correct = jnp.sum((jnp.argmax(logits, -1) == y) * weight)
        return loss, (new_state, correct, total)

    @jit
    def step(train_state: TrainState, x, y, weight):
        if attack is not None:
            model = lambda images: apply_fn(  # noqa: E731 (pgd_attack applies the rewrite itself)
                train_state.params, train_state.state, images, True
            )[0]
            key = jax.random.fold_in(attack_key, train_state.step)
            x = pgd_attack(model, x, y, key, attack)
        (loss, (new_state, correct, total)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            train_state.params, train_state.state, x, y, weight
        )
        updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
        params = optax.apply_updates(train_state.params, updates)
        new = TrainState(params, new_state, opt_state, train_state.step + 1)
        return new, {"loss": loss, "correct": correct, "count": total}

    return step


def predict(
    apply_fn: Callable,
    params: Any,
    state: Any,
    images: np.ndarray,
    *,
    batch_size: int = 1000,
    parallel: DataParallel | None = None,
) -> np.ndarray:
    """Logits `[N, K]` in eval mode, in chunks of `batch_size`, sharded over devices."""
    parallel = parallel or DataParallel()
    params, state = parallel.replicate((params, state))
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        (x_dev,), _ = parallel.shard_batch(x)
        chunks.append(np.asarray(_eval_logits(apply_fn, params, state, x_dev))[: len(x)])
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def evaluate(
    apply_fn: Callable,
    params: Any,
    state: Any,
    data: Dataset,
    *,
    batch_size: int = 1000,
    parallel: DataParallel | None = None,
) -> dict:
    """`{'accuracy', 'loss', 'count'}` of the model on `data` (eval mode)."""
    logits = predict(apply_fn, params, state, data.images, batch_size=batch_size, parallel=parallel)
    labels = np.asarray(data.labels)
    log_probs = logits - _logsumexp(logits)
    loss = -np.mean(log_probs[np.arange(len(labels)), labels])
    return {
        "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
        "loss": float(loss),
        "count": int(len(labels)),
    }


def fit(
    apply_fn: Callable,
    params: Any,
    state: Any,
    train: Dataset,
    val: Dataset | None,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    parallel: DataParallel | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train for `config.epochs` epochs; keep the epoch with the best validation accuracy.

    train, val: `Dataset`s with images `[N, H, W, C]` in [0, 1]. The batch order of epoch `e` is a
    function of `(config.seed, e)` alone, so with `checkpoint_dir` a run killed at any moment and
    started again with the same arguments resumes from its last finished epoch and ends with
    exactly the weights an uninterrupted run would have. Without `val`, the last epoch is kept.
    """
    _check_dataset(train, "train")
    if val is not None:
        _check_dataset(val, "val")
        if val.images.shape[1:] != train.images.shape[1:]:
            raise ValueError(
                f"val images {val.images.shape[1:]} differ in shape from train images "
                f"{train.images.shape[1:]}"
            )
    parallel = parallel or DataParallel()
    steps_per_epoch = num_batches(len(train.labels), config.batch_size, drop_remainder=False)
    tx = make_optimizer(config, steps_per_epoch)
    train_step = make_train_step(apply_fn, tx, config.attack, config.seed)
    current = TrainState(params, state, tx.init(params), jnp.zeros((), jnp.int32))
    best = (params, state)
    best_epoch, best_accuracy, history, first_epoch = -1, -math.inf, [], 0

    checkpointer = RunCheckpointer(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpointer is not None and checkpointer.latest_step() is not None:
        (current, best), record = checkpointer.restore((current, best))
        best_epoch, best_accuracy = record["best_epoch"], record["best_accuracy"]
        history, first_epoch = record["history"], record["epoch"] + 1
        log.info("resumed from %s at epoch %d", checkpointer.directory, first_epoch)

    current = parallel.replicate(current)
    key = jax.random.key(config.seed)
    for epoch in range(first_epoch, config.epochs):
        started = time.perf_counter()
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        stream = batches(
            train.images, train.labels, config.batch_size, key=key, epochs=1, first_epoch=epoch
        )
        bar = tqdm(
            stream,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            (x, y, weight), _ = parallel.shard_batch(batch.images, batch.labels, with_weight=True)
            current, metrics = train_step(current, x, y, weight)
            metrics = jax.device_get(metrics)
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"training loss became {metrics['loss']} at epoch {epoch}, step {batch.step}; "
                    "lower the learning rate or check the inputs"
                )
            count = float(metrics["count"])
            sums["loss"] += float(metrics["loss"]) * count  # batch mean -> sum over examples
            sums["correct"] += float(metrics["correct"])
            sums["count"] += count
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        record = {
            "epoch": epoch,
            "train_loss": sums["loss"] / max(sums["count"], 1.0),
            "train_accuracy": sums["correct"] / max(sums["count"], 1.0),
            "seconds": time.perf_counter() - started,
        }
        if val is not None:
            scores = evaluate(
                apply_fn, current.params, current.state, val,
                batch_size=config.eval_batch_size, parallel=parallel,
            )
            record.update(val_accuracy=scores["accuracy"], val_loss=scores["loss"])
        history.append(record)
        score = record.get("val_accuracy", epoch)
        if score > best_accuracy:
            best_accuracy, best_epoch, best = score, epoch, (current.params, current.state)
        log.info("epoch %d: %s", epoch, json.dumps(record))
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if checkpointer is not None:
            checkpointer.save(
                epoch,
                (current, best),
                {
                    "epoch": epoch,
                    "best_epoch": best_epoch,
                    "best_accuracy": best_accuracy,
                    "history": history,
                },
            )
    if checkpointer is not None:
        checkpointer.close()
    params_best, state_best = jax.device_get(best)
    return FitResult(params_best, state_best, best_epoch, history, jax.device_get(current))


@jit(static_argnums=0)
def _eval_logits(apply_fn: Callable, params: Any, state: Any, x: jax.Array) -> jax.Array:
    return apply_fn(params, state, x, False)[0]


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _check_dataset(data: Dataset, name: str) -> None:
    check_images(data.images, name=f"{name} images")
    check_labels(data.labels, len(data.images))
