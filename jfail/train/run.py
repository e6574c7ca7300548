"""A classifier training run: config in, run directory out.

Run directory layout:
  config.json     the config that produced it
  train.log       the log of the run
  checkpoints/    per-epoch orbax checkpoints (a restarted run resumes from the latest)
  model/          orbax checkpoint of the selected weights (`{'params', 'state'}`)
  metrics.json    history per epoch, best epoch, validation and test accuracy
  events.out.tfevents.*  TensorBoard scalars per epoch: train/val loss and accuracy, learning rate
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from jfail import jsonfile
from jfail.config import ClassifierRunConfig, config_from_dict, config_to_dict
from jfail.data import load, num_batches, train_val_split
from jfail.engine.distributed import is_writer
from jfail.logs import log_to_file
from jfail.models import build_classifier, init_classifier, linen_apply
from jfail.train.adversarial import robust_accuracy
from jfail.train.classifier import TrainConfig, evaluate, fit
from jfail.train.parallel import DataParallel
from jfail.train.summaries import epoch_summaries

__all__ = ["run_classifier", "load_trained_classifier", "trained_classifier", "write_json"]

log = logging.getLogger("jfail.train")


def run_classifier(
    config: ClassifierRunConfig, run_dir: str | Path, *, progress: bool = True
) -> dict:
    """Train `config.model` on `config.dataset`, select by validation accuracy, test; returns
    metrics.

    Starting again on the same `run_dir` resumes an interrupted run; a different config there is
    an error rather than a silent mix of two runs. In a multi-host run every process calls it
    (the steps and checkpoints are collective) and process 0 writes `config.json`, `train.log`
    and `metrics.json`.

    Args:
      config: the run's dataset, model, training and validation settings.
      run_dir: the run directory (created if missing): config, log, TensorBoard summaries,
        checkpoints, the best weights under `model/` and `metrics.json`.
      progress: show a progress bar per epoch.

    Returns:
      The metrics dict written to `metrics.json` (accuracies, best epoch, history, timings,
      devices).

    Raises:
      ValueError: `run_dir` holds a run with a different config, or the data or model are
        malformed (see `fit`).
      FloatingPointError: the training loss became NaN or infinite.
    """
    run_dir = Path(run_dir).absolute()
    if is_writer():  # on many hosts process 0 writes the run directory's files
        run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = config_to_dict(config)
    _claim_run_dir(run_dir, config_dict)
    handler = log_to_file(run_dir / "train.log")
    try:
        started = time.perf_counter()
        train_full = load(config.dataset, "train")
        test = load(config.dataset, "test")
        train, val = train_val_split(train_full, config.val_fraction, key=config.train.seed)
        log.info(
            "data %s: train %d, val %d, test %d, image %s",
            config.dataset, len(train.labels), len(val.labels), len(test.labels),
            train.images.shape[1:],
        )
        module = build_classifier(config.model, len(train_full.class_names), **config.model_kwargs)
        params, state = init_classifier(
            module, train.images.shape[1:], jax.random.key(config.train.seed)
        )
        apply_fn = linen_apply(module)
        parallel = DataParallel()
        steps_per_epoch = num_batches(len(train.labels), config.train.batch_size,
                                      drop_remainder=False)
        with epoch_summaries(run_dir) as write_summaries:

            def on_epoch_end(epoch: int, record: dict) -> None:
                rate = learning_rate(config.train, steps_per_epoch, epoch)
                write_summaries(epoch, {**record, "learning_rate": rate})

            result = fit(
                apply_fn, params, state, train, val, config.train,
                checkpoint_dir=run_dir / "checkpoints", progress=progress, parallel=parallel,
                on_epoch_end=on_epoch_end,
            )
        scores = {
            split: evaluate(
                apply_fn, result.params, result.state, data,
                batch_size=config.train.eval_batch_size, parallel=parallel,
            )
            for split, data in (("val", val), ("test", test))
        }
        if config.train.attack is not None:
            strong = dataclasses.replace(config.train.attack, steps=10, step_size=None)
            scores["test_pgd"] = robust_accuracy(
                apply_fn, result.params, result.state, test, strong,
                key=config.train.seed + 1, parallel=parallel,
            )
        _save_weights(run_dir / "model", result.params, result.state)
        metrics = {
            "name": config.name,
            "dataset": config.dataset,
            "model": config.model,
            "model_kwargs": config.model_kwargs,
            "num_params": sum(x.size for x in jax.tree_util.tree_leaves(result.params)),
            "best_epoch": result.best_epoch,
            "val_accuracy": scores["val"]["accuracy"],
            "test_accuracy": scores["test"]["accuracy"],
            "test_loss": scores["test"]["loss"],
            "test_robust_accuracy": scores.get("test_pgd", {}).get("robust"),
            "eval_attack": dataclasses.asdict(strong) if config.train.attack else None,
            "history": result.history,
            "train_seconds": sum(r["seconds"] for r in result.history),
            "wall_seconds_this_process": time.perf_counter() - started,
            "devices": [str(d) for d in jax.devices()],
            "host": platform.processor() or platform.machine(),
        }
        if is_writer():
            write_json(run_dir / "metrics.json", metrics)
        log.info("test accuracy %.4f (best epoch %d)", metrics["test_accuracy"], result.best_epoch)
        return metrics
    finally:
        logging.getLogger("jfail").removeHandler(handler)
        handler.close()


def load_trained_classifier(run_dir: str | Path) -> tuple[Any, Any, Any, ClassifierRunConfig]:
    """`(module, params, state, config)` of a finished `run_classifier` run directory.

    Args:
      run_dir: the directory `run_classifier` wrote.

    Returns:
      `(module, params, state, config)`: the Flax module, its best weights and non-trainable
      state, and the run's `ClassifierRunConfig`.

    Raises:
      FileNotFoundError: `run_dir` has no `config.json` (or no saved weights).
    """
    run_dir = Path(run_dir).absolute()
    raw = json.loads((run_dir / "config.json").read_text())
    config = config_from_dict(ClassifierRunConfig, raw)
    data = load(config.dataset, "test")
    module = build_classifier(config.model, len(data.class_names), **config.model_kwargs)
    params, state = init_classifier(module, data.images.shape[1:], jax.random.key(0))
    abstract = jax.tree_util.tree_map(
        ocp.utils.to_shape_dtype_struct, {"params": params, "state": state}
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(run_dir / "model", abstract)
    return module, restored["params"], restored["state"], config


def trained_classifier(
    config: ClassifierRunConfig, run_dir: str | Path, *, progress: bool = False
) -> tuple[Any, Any, Any, ClassifierRunConfig, dict]:
    """`(module, params, state, config, metrics)` of `run_dir`, training `config` there first
    when the directory holds no finished run (no `metrics.json`).

    Args:
      config: the run to train if `run_dir` has none.
      run_dir: the run directory.
      progress: show a progress bar per epoch while training.

    Returns:
      `(module, params, state, config, metrics)`; `config` is the one stored in `run_dir`.

    Raises:
      ValueError: `run_dir` holds an unfinished run with a different config.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        log.info("no finished run in %s: training %s", run_dir, config.name)
        run_classifier(config, run_dir, progress=progress)
    module, params, state, run_config = load_trained_classifier(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return module, params, state, run_config, metrics


def learning_rate(config: TrainConfig, steps_per_epoch: int, epoch: int) -> float | None:
    """The learning rate of the last step of `epoch` (0-based) under `make_optimizer(config,
    steps_per_epoch)`; None when `config.optimizer` is an optax transformation (its rate is
    not known from outside).

    Args:
      config: the training config.
      steps_per_epoch: optimizer steps per epoch.
      epoch: the 0-based epoch.

    Returns:
      The learning rate as a float, or None.
    """
    if isinstance(config.optimizer, optax.GradientTransformation):
        return None
    if config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(
            config.learning_rate, steps_per_epoch * config.epochs
        )
        return float(schedule((epoch + 1) * steps_per_epoch - 1))
    return float(config.learning_rate)


def write_json(path: str | Path, payload: Any) -> None:
    """Write strict JSON atomically (`jfail.jsonfile.write`); other objects (a config's paths)
    as their `str`.

    Args:
      path: the file to write.
      payload: a JSON-serialisable object; other objects are written as their `str`.
    """
    jsonfile.write(path, payload, default=str)


def _claim_run_dir(run_dir: Path, config_dict: dict) -> None:
    config_path = run_dir / "config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous != json.loads(jsonfile.dumps(config_dict, default=str)):
            raise ValueError(
                f"{run_dir} holds a run with a different config; choose another --workdir "
                "or delete it"
            )
    elif is_writer():
        write_json(config_path, config_dict)


def _save_weights(path: Path, params: Any, state: Any) -> None:
    if path.exists():
        shutil.rmtree(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"params": params, "state": state})

