"""Training: it learns, resumes after a kill to the same result, and is the same on 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jfail.config import ClassifierRunConfig, apply_overrides, load_config
from jfail.data import Dataset, load
from jfail.models import DefuseCNN, init_classifier, linen_apply
from jfail.train import TrainConfig, evaluate, fit, predict
from tests.tensorboard_events import tensorboard_scalars

SCRIPT = Path(__file__).with_name("train_script.py")
REPO = SCRIPT.parent.parent


def _run_script(tmp_path, name, *args, env=None):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
    )
    return proc, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc, out = _run_script(tmp, "full")
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_training_learns_digits(uninterrupted):
    assert uninterrupted["train_loss"][-1] < 0.5 * uninterrupted["train_loss"][0]
    assert max(uninterrupted["val_accuracy"]) > 0.85


@pytest.mark.parametrize("kill_at_epoch", [0, 2])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, uninterrupted, kill_at_epoch):
    checkpoints = tmp_path / "ckpt"
    killed, out = _run_script(
        tmp_path, "killed", "--checkpoint-dir", str(checkpoints),
        "--kill-at-epoch", str(kill_at_epoch),
    )
    assert killed.returncode == -9 and not out.exists()
    resumed, out = _run_script(tmp_path, "resumed", "--checkpoint-dir", str(checkpoints))
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(out.read_text())
    np.testing.assert_allclose(result["train_loss"], uninterrupted["train_loss"], rtol=1e-6)
    assert result["best_epoch"] == uninterrupted["best_epoch"]
    for got, want in zip(result["weights"], uninterrupted["weights"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_eight_devices_follow_the_one_device_loss_curve(tmp_path, uninterrupted):
    # batch 20 does not divide by 8: padding rows must carry zero weight
    proc, out = _run_script(
        tmp_path, "eight", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and uninterrupted["devices"] == 1
    np.testing.assert_allclose(result["train_loss"], uninterrupted["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(result["val_accuracy"], uninterrupted["val_accuracy"], atol=0.005)


def test_learning_rate_is_the_step_size_of_the_epochs_last_step():
    import optax

    from jfail.train import make_optimizer
    from jfail.train.run import learning_rate

    steps_per_epoch = 2
    for schedule in ("constant", "cosine"):
        config = TrainConfig(optimizer="sgd", momentum=0.0, learning_rate=0.5, epochs=2,
                             schedule=schedule)
        tx = make_optimizer(config, steps_per_epoch)
        params = np.zeros(1, np.float32)
        opt_state = tx.init(params)
        for epoch in range(config.epochs):
            for _ in range(steps_per_epoch):  # gradient 1: sgd's update is -(step size)
                updates, opt_state = tx.update(np.ones(1, np.float32), opt_state, params)
            np.testing.assert_allclose(-updates[0], learning_rate(config, steps_per_epoch, epoch),
                                       rtol=1e-6)
        assert learning_rate(TrainConfig(optimizer=optax.adam(1e-3)), 3, 0) is None


def test_epoch_summaries_write_numbers_only_and_only_on_process_zero(tmp_path, monkeypatch):
    from jfail.train import epoch_summaries

    record = {"epoch": 0, "train_loss": 0.5, "val_accuracy": np.float32(0.25), "seconds": 3.0,
              "learning_rate": None, "flag": True, "note": "x", "val_loss": float("nan")}
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with epoch_summaries(tmp_path / "other") as write:
        write(0, record)
    assert not (tmp_path / "other").exists()
    monkeypatch.undo()
    with epoch_summaries(tmp_path / "first") as write:
        write(0, record)
        write(1, {**record, "train_loss": 0.25})
    assert tensorboard_scalars(tmp_path / "first") == {
        "train/loss": [(0, 0.5), (1, 0.25)], "val/accuracy": [(0, 0.25), (1, 0.25)]}


def _tiny_setup():
    module = DefuseCNN(num_classes=10, conv_features=(8, 8), hidden=(16,))
    data = load("digits", "train")
    params, state = init_classifier(module, data.images.shape[1:], jax.random.key(0))
    return module, data, params, state


def test_predict_and_evaluate_agree_with_direct_application():
    module, data, params, state = _tiny_setup()
    apply_fn = linen_apply(module)
    logits = predict(apply_fn, params, state, data.images[:50], batch_size=16)
    direct = module.apply({"params": params}, data.images[:50])
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-6)
    scores = evaluate(apply_fn, params, state, Dataset(data.images[:50], data.labels[:50], ()))
    assert scores["accuracy"] == pytest.approx(np.mean(direct.argmax(-1) == data.labels[:50]))


def test_bad_training_inputs_raise_clear_errors():
    module, data, params, state = _tiny_setup()
    apply_fn, config = linen_apply(module), TrainConfig(epochs=1)
    flat = Dataset(data.images[..., 0], data.labels, data.class_names)
    with pytest.raises(ValueError, match=r"images\[\.\.\., None\]"):
        fit(apply_fn, params, state, flat, None, config, progress=False)
    poisoned = np.array(data.images)
    poisoned[7, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit(apply_fn, params, state, Dataset(poisoned, data.labels, ()), None, config,
            progress=False)
    with pytest.raises(ValueError, match="labels"):
        fit(apply_fn, params, state, Dataset(data.images, data.labels[:-1], ()), None, config,
            progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_a_diverging_run_stops_with_the_step_that_failed():
    module, data, params, state = _tiny_setup()
    config = TrainConfig(optimizer="sgd", learning_rate=1e12, epochs=3)
    with pytest.raises(FloatingPointError, match="epoch 0, step"):
        fit(linen_apply(module), params, state, data, None, config, progress=False)


def test_config_overrides_and_unknown_keys():
    config = load_config(REPO / "configs" / "defuse_cnn_fmnist.py",
                         ["train.epochs=2", "dataset=digits"])
    assert isinstance(config, ClassifierRunConfig)
    assert config.train.epochs == 2 and config.dataset == "digits"
    assert config.train.optimizer == "adadelta"  # the paper's optimizer survives
    with pytest.raises(KeyError, match="unknown config key 'train.epoz'.*epochs"):
        apply_overrides(config, ["train.epoz=3"])
    with pytest.raises(KeyError, match="unknown config key 'learning_rate'"):
        apply_overrides(config, ["learning_rate=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(config, ["epochs"])
    with pytest.raises(ValueError, match="optimizer"):
        apply_overrides(config, ["train.optimizer=rmsprop"])


def test_write_config_reads_back_equal_with_every_nested_dataclass(tmp_path):
    from jfail.config import DefuseConfig, write_config
    from jfail.defuse.vae import VAEConfig
    from jfail.prime import PrimeConfig
    from jfail.train import Attack

    robust = ClassifierRunConfig(
        name="robust", dataset="digits@28[:50%]", model_kwargs={"width": 16},
        train=TrainConfig(epochs=2, attack=Attack(norm="l2", epsilon=0.5, steps=2)))
    for config in (robust, DefuseConfig(vae=VAEConfig(epochs=3), lambdas=(1e-10, 1.0)),
                   PrimeConfig(min_gain=(0.1, 0.05))):
        path = write_config(tmp_path / f"{config.name}.py", config, doc='quotes """ survive')
        assert load_config(path) == config
        assert load_config(path, ["name=renamed"]).name == "renamed"
    assert "from jfail.train.adversarial import Attack" in (tmp_path / "robust.py").read_text()
    with pytest.raises(TypeError, match="dataclass instance"):
        write_config(tmp_path / "bad.py", {"name": "x"})


def test_cli_trains_writes_a_run_directory_and_rejects_bad_configs(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jfail.cli", "train", "--config",
           str(REPO / "configs" / "defuse_cnn_mnist5k.py"), "--workdir", str(run_dir),
           "--set", "train.epochs=1", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 1
    assert metrics["test_accuracy"] > 0.6 and (run_dir / "train.log").stat().st_size > 0
    assert (run_dir / "model").is_dir() and (run_dir / "checkpoints").is_dir()
    # TensorBoard curves beside metrics.json hold its per-epoch numbers (as float32, the
    # precision of TensorBoard scalars) and the learning rate.
    history = metrics["history"]
    scalars = tensorboard_scalars(run_dir)
    assert set(scalars) == {"train/loss", "train/accuracy", "val/loss", "val/accuracy",
                            "learning_rate"}
    for tag, values in scalars.items():
        key = tag.replace("/", "_")
        want = [1.0] * len(history) if key == "learning_rate" else [r[key] for r in history]
        assert values == [(r["epoch"], np.float32(w)) for r, w in zip(history, want)], tag

    from jfail.train.run import load_trained_classifier, trained_classifier

    module, params, state, config = load_trained_classifier(run_dir)
    test = load(config.dataset, "test")
    scores = evaluate(linen_apply(module), params, state, test)
    assert scores["accuracy"] == pytest.approx(metrics["test_accuracy"])
    # A finished run is loaded as it is, not trained again.
    *_, loaded_config, loaded_metrics = trained_classifier(config, run_dir)
    assert loaded_metrics == metrics and loaded_config == config

    bad = subprocess.run(cmd[:-3] + ["--set", "train.epohcs=1"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown config key 'train.epohcs'" in bad.stderr
    other = subprocess.run(cmd[:-3] + ["--set", "train.epochs=2"], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    assert other.returncode != 0 and "different config" in other.stderr
