"""`jfail` on many hosts: two processes of two simulated CPU devices each, joined by the three
flags, train as one process does; process 0 alone writes the run directory."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jfail import cli
from jfail.config import load_config
from jfail.train.run import load_trained_classifier, run_classifier

REPO = Path(__file__).resolve().parents[1]
MLP = str(REPO / "configs" / "annotator_mlp_mnist5k.py")


def _train(cwd: Path, *flags: str, devices: int) -> subprocess.Popen:
    """`jfail train` of the annotator MLP for one epoch on a quarter of scikit-learn's digits,
    into the default run directory under `cwd`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "jfail.cli", "train", "--config", MLP, "--set",
               "dataset=digits[:25%]", "--set", "train.epochs=1", "--quiet", *flags]
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_train_as_one_and_only_process_0_writes_the_run(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    one = tmp_path / "one"
    processes = [
        _train(tmp_path, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(process_id), devices=2)
        for process_id in (0, 1)
    ]
    try:
        # Meanwhile the same run in this process, on one device (`_train`'s settings).
        run_classifier(load_config(MLP, ["dataset=digits[:25%]", "train.epochs=1"]), one,
                       progress=False)
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]

    # Process 0 printed the summary and wrote the log; process 1 logged to stderr only.
    (out0, _), (out1, err1) = [(_without_gloo(out), err) for out, err in outputs]
    # Both processes named the same default run directory, from process 0's clock.
    (two,) = (tmp_path / "runs").iterdir()
    assert json.loads(out0)["run_dir"] == str(two) and out1 == ""
    assert "process 1: " in err1 and "INFO jfail.train: test accuracy" in err1
    train_log = (two / "train.log").read_text()
    assert train_log.count("test accuracy") == 1 and "process 1" not in train_log
    written = sorted(os.listdir(two))
    events = [name for name in written if name.startswith("events.out.tfevents")]
    assert len(events) == 1  # TensorBoard's curves, from process 0 alone
    assert [name for name in written if name not in events] == [  # the rest one process writes,
        "checkpoints", "config.json", "jfail.log", "metrics.json", "model", "train.log"]  # + log

    metrics = [json.loads((run / "metrics.json").read_text()) for run in (two, one)]
    for name in ("best_epoch", "val_accuracy", "test_accuracy"):
        assert metrics[0][name] == metrics[1][name], name
    # One device against four: the sums of a batch's gradient are ordered differently (the
    # tolerance of tests/test_train.py's eight devices against one).
    np.testing.assert_allclose(metrics[0]["test_loss"], metrics[1]["test_loss"], rtol=1e-4)
    for key in ("train_loss", "train_accuracy", "val_loss"):
        np.testing.assert_allclose(metrics[0]["history"][0][key], metrics[1]["history"][0][key],
                                   rtol=1e-4, err_msg=key)

    weights = [load_trained_classifier(run)[1] for run in (two, one)]
    for a, b in zip(jax.tree_util.tree_leaves(weights[0]), jax.tree_util.tree_leaves(weights[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _without_gloo(stdout: str) -> str:
    """stdout without the lines Gloo prints there as its processes connect."""
    return "".join(line for line in stdout.splitlines(keepends=True)
                   if not line.startswith("[Gloo]"))


BAD_FLAGS = [
    (["--coordinator", "127.0.0.1:1234"], "give all three of --coordinator HOST:PORT"),
    (["--num-processes", "2", "--process-id", "0"], "--coordinator missing"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT"),
    (["--coordinator", "host:http", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT"),
    (["--coordinator", ":1234", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT"),
    (["--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"],
     "a port in 1..65535"),
    (["--coordinator", "h:1234", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be a whole number >= 1, got '0'"),
    (["--coordinator", "h:1234", "--num-processes", "two", "--process-id", "0"],
     "--num-processes must be a whole number"),
    (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be a whole number in 0..1 (for --num-processes 2), got '2'"),
    (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "-1"],
     "--process-id must be a whole number in 0..1"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
@pytest.mark.parametrize("command", ["train", "barlow", "demo"])
def test_bad_host_flags_are_one_line_and_status_2_before_anything_is_written(
        tmp_path, capsys, command, flags, message):
    config = [] if command == "demo" else [
        "--config", MLP if command == "train" else str(REPO / "configs" / "barlow_fmnist.py")]
    workdir = tmp_path / "run"
    assert cli.main([command, *config, "--workdir", str(workdir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jfail {command}: ") and message in err[0], err
    assert not workdir.exists()


def test_a_plain_process_joins_no_cluster_and_is_the_writer():
    """Without a multi-process launch in the environment, initialize_distributed() finds no
    cluster, and is_writer() says so without starting JAX (a second try still finds no cluster
    rather than JAX already in use)."""
    code = "\n".join([
        "from jfail.engine import NoClusterError, initialize_distributed, is_writer",
        "for _ in range(2):",
        "    try:",
        "        initialize_distributed()",
        "    except NoClusterError:",
        "        pass",
        "    else:",
        "        raise SystemExit('joined a cluster')",
        "    assert is_writer()",
        "print('ok')",
    ])
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_", "MEGASCALE_"))}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
