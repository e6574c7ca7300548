"""Classifier training with optax: jitted data-parallel steps, best-epoch selection, resume.

Models: `fit`, `evaluate`, `predict` and `errors` take a model in any style `trainable` knows
(`jfail.train.trainable`): a Flax NNX module, an Equinox module (or other callable pytree) whose
`__call__` takes a batch, `trainable(apply, params)` for `apply(params, x) -> logits`, or a
`TrainableModel`. jfail's original convention still works positionally:
`fit(apply_fn, params, state, train, val, config)` with
`apply_fn(params, state, x, train) -> (logits, new_state)` (`jfail.models.linen_apply` builds it
for a Flax linen module). `evaluate`, `predict` and `errors` also take any inference callable
`model(x) -> logits` (closures included: its weights are read at the moment of the call).

Data: every data argument is a `Dataset` or an `(images [N, H, W, C], labels [N])` tuple.

Optimizers: `TrainConfig(optimizer=...)` is a name ("adam", "adadelta", "sgd", configured by the
other fields) or any `optax.GradientTransformation`, used as it is (e.g. `optax.adamw(1e-3)`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jfail.data import Dataset, batches, check_images, check_labels, num_batches
from jfail.models.adapter import call_shape, traced_model
from jfail.train.adversarial import Attack, as_key, pgd_attack
from jfail.train.checkpoint import RunCheckpointer
from jfail.train.parallel import DataParallel
from jfail.train.trainable import TrainableModel, is_trainable_style, trainable
from jfail.xla import cpu_friendly_gradients, jit

__all__ = [
    "TrainConfig",
    "TrainState",
    "FitResult",
    "make_optimizer",
    "make_train_step",
    "evaluate",
    "predict",
    "errors",
    "fit",
    "as_dataset",
]

log = logging.getLogger("jfail.train")

OPTIMIZERS = ("adam", "adadelta", "sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization settings; defaults are seed 001's Fashion/MNIST classifier (Adadelta, lr 1).

    `optimizer` is a name ("adam", "adadelta", "sgd"; `learning_rate`, `momentum`,
    `weight_decay` and `schedule` configure it) or any `optax.GradientTransformation`, used as
    it is (those four fields are then ignored), e.g. `TrainConfig(optimizer=optax.adamw(1e-3))`.
    A run config (`ClassifierRunConfig`) needs a name, since it is saved as JSON.
    """

    optimizer: str | optax.GradientTransformation = "adadelta"  # seed 001 B.2
    learning_rate: float = 1.0  # seed 001 B.2
    momentum: float = 0.9  # no paper value (used by "sgd" only)
    weight_decay: float = 0.0  # no paper value
    schedule: str = "constant"  # no paper value; or "cosine" (decays to 0 over all steps)
    batch_size: int = 64  # seed 001 B.2
    epochs: int = 5  # seed 001 B.2
    eval_batch_size: int = 1000  # no paper value (memory)
    seed: int = 0  # no paper value
    attack: Attack | None = None  # adversarial training: each batch replaced by its PGD attack

    def __post_init__(self):
        if not isinstance(self.optimizer, optax.GradientTransformation) and (
            self.optimizer not in OPTIMIZERS
        ):
            raise ValueError(
                f"optimizer must be one of {OPTIMIZERS} or an optax.GradientTransformation, "
                f"got {self.optimizer!r}"
            )
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
    """Weights of the best epoch (by validation accuracy) and of the last, and the history.

    `model` is the best epoch's model in the caller's style: a new NNX or Equinox module (the
    module passed to `fit` is left as it was), else a `TrainableModel`, callable as
    `model(x) -> logits` in evaluation mode.
    """

    params: Any
    state: Any
    best_epoch: int
    history: list[dict]
    last: TrainState
    model: Any = None


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation named by `config` (Adam, Adadelta or SGD with momentum), or
    `config.optimizer` itself when it is a transformation.

    Args:
      config: the `TrainConfig` (optimizer, learning rate, schedule, momentum, weight decay,
        epochs).
      steps_per_epoch: optimizer steps per epoch, the length of the cosine schedule's epoch.

    Returns:
      The `optax.GradientTransformation`.
    """
    if isinstance(config.optimizer, optax.GradientTransformation):
        return config.optimizer
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
    *,
    key: Any = 0,
) -> Callable:
    """`step(train_state, x [B,H,W,C], y [B], weight [B]) -> (train_state, metrics)`, jitted.

    `weight` masks padding rows (0) so a batch padded to a multiple of the device count gives
    the same loss and gradient as the unpadded batch. With `attack`, the batch is first replaced
    by its PGD attack against the current weights (BatchNorm in training mode, running statistics
    left untouched by the attack), with noise keyed by `(key, step)`.

    Args:
      apply_fn: `(params, state, x, train) -> (logits, state)` (a `TrainableModel`'s `apply`).
      tx: the optimizer.
      attack: None, or the PGD `Attack` of adversarial training.
      key: the attack's PRNG key (a typed or raw key, or an int seed).

    Returns:
      The jitted `step`; its metrics are `{'loss', 'correct', 'count'}` (mean weighted loss,
      weighted correct count, weight total) as scalars.
    """
    attack_key = jax.random.fold_in(as_key(key), 0x5EED)
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
            x = pgd_attack(model, x, y, attack, key=key)
        (loss, (new_state, correct, total)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            train_state.params, train_state.state, x, y, weight
        )
        updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
        params = optax.apply_updates(train_state.params, updates)
        new = TrainState(params, new_state, opt_state, train_state.step + 1)
        return new, {"loss": loss, "correct": correct, "count": total}

    return step


def predict(model: Any, *args, batch_size: int = 1000, parallel: DataParallel | None = None):
    """Logits `[N, K]` in eval mode, in chunks of `batch_size`, sharded over devices.

    Call as `predict(model, images)` (any model style, see the module docstring) or
    `predict(apply_fn, params, state, images)`.

    Args:
      model: the model.
      images: `[N, H, W, C]`.
      batch_size: rows per compiled call.

    Returns:
      NumPy logits `[N, K]`.

    Raises:
      ModelCallError: the model cannot be called on these images.
      ValueError, TypeError: bad arguments.
    """
    if len(args) == 3:  # predict(apply_fn, params, state, images): the original convention
        params, state, images = args
        apply_fn, legacy = model, True
    elif len(args) == 1:
        images, legacy = args[0], False
        _check_batch(images, "images")
        tm = inference_model(model, images)
        apply_fn, params, state = tm.apply, tm.params, tm.state
    else:
        raise TypeError(
            "predict takes (model, images) or (apply_fn, params, state, images), got "
            f"{1 + len(args)} positional arguments"
        )
    if not legacy and len(images) == 0:
        raise ValueError("images is empty: there is nothing to predict")
    return _predict(apply_fn, params, state, images, batch_size=batch_size, parallel=parallel)


def evaluate(model: Any, *args, batch_size: int = 1000, parallel: DataParallel | None = None):
    """`{'accuracy', 'loss', 'count'}` of the model on `data` (eval mode).

    Call as `evaluate(model, data)` (any model style) or
    `evaluate(apply_fn, params, state, data)`; `data` is a `Dataset` or `(images, labels)`.

    Args:
      model: the model, or `apply_fn(params, state, x, train) -> (logits, state)`.
      *args: `(data,)`, or `(params, state, data)` after an `apply_fn`.
      batch_size: rows per compiled call.
      parallel: the devices to shard batches over (None: all local devices).

    Returns:
      dict `{'accuracy': float, 'loss': float, 'count': int}` (mean cross-entropy).

    Raises:
      TypeError: a wrong number of positional arguments, or `data` or its images of the wrong
        type.
      ModelCallError: the model cannot be called on these images.
      ValueError: empty data, or labels that are not classes of the model.
    """
    if len(args) == 3:
        params, state, data = args
        data = as_dataset(data, "data")
        apply_fn = model
    elif len(args) == 1:
        data = as_dataset(args[0], "data")
        _check_batch(data.images, "data images")
        tm = inference_model(model, data.images)
        check_model_data(tm, {"data": data})
        apply_fn, params, state = tm.apply, tm.params, tm.state
    else:
        raise TypeError(
            "evaluate takes (model, data) or (apply_fn, params, state, data), got "
            f"{1 + len(args)} positional arguments"
        )
    return evaluate_weights(apply_fn, params, state, data, batch_size=batch_size, parallel=parallel)


def errors(model: Any, data: Any, *, batch_size: int = 1000,
           parallel: DataParallel | None = None) -> np.ndarray:
    """Where the model is wrong: `argmax(model(images)) != labels`, computed in chunks.

    Args:
      model: any model style (see the module docstring), in eval mode.
      data: a `Dataset` or `(images [N, H, W, C], labels [N])`.
      batch_size: rows per compiled call.

    Returns:
      `errors [N]` bool, True where the model is wrong.

    Raises:
      ModelCallError: the model cannot be called on these images.
      ValueError: empty data, or labels that are not classes of the model.
    """
    data = as_dataset(data, "data")
    _check_batch(data.images, "data images")
    tm = inference_model(model, data.images)
    check_model_data(tm, {"data": data})
    logits = _predict(tm.apply, tm.params, tm.state, data.images, batch_size=batch_size,
                      parallel=parallel)
    return np.argmax(logits, -1) != np.asarray(data.labels)


def fit(model: Any, *args, **kwargs) -> FitResult:
    """Train for `config.epochs` epochs; keep the epoch with the best validation accuracy.

    Call as `fit(model, train, val=None, config=TrainConfig(), *, checkpoint_dir=None,
    progress=True, parallel=None, on_epoch_end=None)` with a model `trainable` knows (an NNX
    module, an Equinox module, `trainable(apply, params)`, a `TrainableModel`), or as
    `fit(apply_fn, params, state, train, val, config, ...)` with
    `apply_fn(params, state, x, train) -> (logits, state)`.

    Args:
      train, val: `Dataset`s or `(images [N, H, W, C] in [0, 1], labels [N])` tuples; `val`
        may be None (then the last epoch is kept).
      config: a `TrainConfig`; its optimizer is a name or an `optax.GradientTransformation`.
      checkpoint_dir: resume directory. The batch order of epoch `e` is a function of
        `(config.seed, e)` alone, so a run killed at any moment and started again with the same
        arguments resumes from its last finished epoch and ends with exactly the weights an
        uninterrupted run would have.

    Returns:
      A `FitResult`; `.model` is the best epoch's model in the caller's style (a new NNX or
      Equinox module; the one passed in is left unchanged).

    Raises:
      ModelCallError: the model cannot be called on the training images.
      ValueError: empty or malformed data, labels outside the model's classes.
      FloatingPointError: the loss became NaN or infinite.
    """
    tm, rest = trainable_and_rest(model, args, "fit")
    return _fit(tm, *rest, **kwargs)


def _fit(
    tm: TrainableModel,
    train: Any,
    val: Any = None,
    config: TrainConfig = TrainConfig(),
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    parallel: DataParallel | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> FitResult:
    apply_fn, params, state = tm.apply, tm.params, tm.state
    train = as_dataset(train, "train")
    _check_dataset(train, "train")
    if val is not None:
        val = as_dataset(val, "val")
        _check_dataset(val, "val")
        if val.images.shape[1:] != train.images.shape[1:]:
            raise ValueError(
                f"val images {val.images.shape[1:]} differ in shape from train images "
                f"{train.images.shape[1:]}"
            )
    check_model_data(tm, {"train": train, **({"val": val} if val is not None else {})})
    parallel = parallel or DataParallel()
    steps_per_epoch = num_batches(len(train.labels), config.batch_size, drop_remainder=False)
    tx = make_optimizer(config, steps_per_epoch)
    train_step = make_train_step(apply_fn, tx, config.attack, key=config.seed)
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
            scores = evaluate_weights(
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
    return FitResult(params_best, state_best, best_epoch, history, jax.device_get(current),
                     tm.rebuild(params_best, state_best))


def _predict(apply_fn, params, state, images, *, batch_size: int = 1000,
             parallel: DataParallel | None = None) -> np.ndarray:
    parallel = parallel or DataParallel()
    params, state = parallel.replicate((params, state))
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        (x_dev,), _ = parallel.shard_batch(x)
        chunks.append(parallel.to_host(_eval_logits(apply_fn, params, state, x_dev))[: len(x)])
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def evaluate_weights(apply_fn, params, state, data: Dataset, *, batch_size: int = 1000,
                     parallel: DataParallel | None = None) -> dict:
    """Accuracy, mean cross-entropy and count of `apply_fn(params, state, x, False)` on `data`
    (unchecked: `evaluate` is the checked entry point).

    Args:
      apply_fn: `apply_fn(params, state, x, train) -> (logits, state)`.
      params: its trainable weights.
      state: its non-trainable state.
      data: a `Dataset` with images `[N, H, W, C]` and labels `[N]`.
      batch_size: rows per compiled call.
      parallel: the devices to shard batches over (None: all local devices).

    Returns:
      dict `{'accuracy': float, 'loss': float, 'count': int}` (mean cross-entropy).
    """
    logits = _predict(apply_fn, params, state, data.images, batch_size=batch_size,
                      parallel=parallel)
    labels = np.asarray(data.labels)
    log_probs = logits - _logsumexp(logits)
    loss = -np.mean(log_probs[np.arange(len(labels)), labels])
    return {
        "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
        "loss": float(loss),
        "count": int(len(labels)),
    }


@jit(static_argnums=0)
def _eval_logits(apply_fn: Callable, params: Any, state: Any, x: jax.Array) -> jax.Array:
    return apply_fn(params, state, x, False)[0]


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _check_dataset(data: Dataset, name: str) -> None:
    check_images(data.images, name=f"{name} images")
    check_labels(data.labels, len(data.images))


def as_dataset(data: Any, name: str = "data") -> Dataset:
    """`data` as a `Dataset`: a `Dataset` as it is, an `(images, labels)` pair wrapped.

    Args:
      data: a `Dataset` or an `(images [N, H, W, C], labels [N])` pair.
      name: what the error message calls `data`.

    Returns:
      The `Dataset` (with no class names when wrapped).

    Raises:
      TypeError: anything else.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
        if not hasattr(images, "shape") or not hasattr(labels, "shape"):
            images, labels = np.asarray(images), np.asarray(labels)
        return Dataset(images, labels, ())
    raise TypeError(
        f"{name} must be a jfail.data.Dataset or an (images [N, H, W, C], labels [N]) tuple, "
        f"got {type(data).__name__}"
    )


def trainable_and_rest(model: Any, args: tuple, name: str) -> tuple[TrainableModel, tuple]:
    """The `TrainableModel` of a training entry point's leading arguments, and the rest:
    `(model, ...)` for a model `trainable` knows, `(apply_fn, params, state, ...)` otherwise.

    Args:
      model: the entry point's first argument.
      args: its other positional arguments.
      name: the entry point's name, for the error message.

    Returns:
      `(tm, rest)`: the `TrainableModel` and the positional arguments after the model's.

    Raises:
      TypeError: `model` holds no trainable weights and is not followed by `params, state`
        and data.
    """
    if is_trainable_style(model):
        return trainable(model), args
    if len(args) < 3 or isinstance(args[0], Dataset) or not _data_like(args[2]):
        raise TypeError(
            f"{name}: {getattr(model, '__name__', type(model).__name__)} holds no trainable "
            "weights; pass an NNX or Equinox module, trainable(apply, params) for "
            "apply(params, x) -> logits, or apply_fn, params, state for "
            "apply_fn(params, state, x, train) -> (logits, state)"
        )
    return trainable(model, args[0], args[1]), args[2:]


def _data_like(value: Any) -> bool:
    return isinstance(value, Dataset) or (isinstance(value, (tuple, list)) and len(value) == 2)


def inference_model(model: Any, images) -> TrainableModel:
    """Eval-mode view of any model: a trainable style as such, any other callable
    `model(x) -> logits` with every array it reads now as traced weights.

    Args:
      model: any model style, or any JAX callable `model(x) -> logits`.
      images: images `[N, H, W, C]` (only their per-example shape is used, to trace `model`).

    Returns:
      A `TrainableModel` whose `apply(params, state, x, False)` gives the model's logits.

    Raises:
      ModelCallError: tracing the model failed, or it is a Flax NNX module in training mode.
    """
    if is_trainable_style(model):
        return trainable(model)
    example = jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)
    return TrainableModel(_call_pytree, traced_model(model, example), None)


def _call_pytree(params, state, x, train):
    del train
    return params(x), state


def _check_batch(images, name: str) -> None:
    if not hasattr(images, "shape"):
        raise TypeError(f"{name} must be an array [N, H, W, C], got {type(images).__name__}")
    if len(images.shape) != 4:
        raise ValueError(f"{name} must be [N, H, W, C], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)} has no examples")


def check_model_data(tm: TrainableModel, datasets: dict[str, Dataset]) -> int:
    """The model's number of classes, after checking it can be called on every data set's
    images (`ModelCallError` otherwise) and that their labels are among its classes.

    Args:
      tm: the model.
      datasets: data sets by name (the name goes into error messages); the first one's image
        shape is the one checked.

    Returns:
      The number of classes `K`.

    Raises:
      ModelCallError: the model cannot be called on the images.
      ValueError: the model does not return logits `[B, K]`, or labels are malformed or not in
        `[0, K)`.
    """
    first = next(iter(datasets.values()))
    example = jax.ShapeDtypeStruct((1, *first.images.shape[1:]), jnp.float32)
    out = call_shape(lambda x: tm.apply(tm.params, tm.state, x, False)[0], example)
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != 1:
        raise ValueError(
            f"the model must return logits [B, K]; on a batch of 1 it returned "
            f"{jax.tree_util.tree_map(lambda s: s.shape, out)}"
        )
    classes = int(shape[1])
    for name, data in datasets.items():
        check_labels(data.labels, len(data.images))
        labels = np.asarray(data.labels)
        if len(labels) and int(labels.max()) >= classes:
            raise ValueError(
                f"{name} labels go up to {int(labels.max())} but the model has {classes} "
                f"classes: labels must be in [0, {classes})"
            )
    return classes
