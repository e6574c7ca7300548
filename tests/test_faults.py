"""SIGKILL at random moments of a training run and of a beta-VAE run, then the same command
again: it resumes and ends with bitwise the weights of an uninterrupted run."""

import sys
from pathlib import Path

import numpy as np
import pytest

from jfail.testing import faults

REPO = Path(__file__).resolve().parents[1]
SHARES = np.random.default_rng(7).uniform(0.25, 0.95, size=2)  # random, and the same each run


@pytest.mark.slow
def test_killed_training_runs_resume_to_the_uninterrupted_weights(tmp_path):
    def command(workdir):
        return [sys.executable, "-m", "jfail.cli", "train", "--quiet", "--config",
                str(REPO / "configs" / "annotator_mlp_mnist5k.py"), "--set", "dataset=digits",
                "--set", "train.epochs=4", "--set", "train.batch_size=256",
                "--workdir", str(workdir)]

    _, trials = faults.kill_and_resume(command, SHARES, fingerprint=faults.train_run_fingerprint,
                                       workdir=lambda i: tmp_path / f"run{i}")
    assert any(trial.killed for trial in trials)
    assert all(trial.resumed and trial.identical for trial in trials), trials


@pytest.mark.slow
def test_killed_vae_runs_resume_to_the_uninterrupted_weights(tmp_path):
    def command(workdir):
        return [sys.executable, "-m", "jfail.testing.faults", "vae", str(workdir),
                "--epochs", "2"]

    _, trials = faults.kill_and_resume(command, SHARES[:1], fingerprint=faults.vae_run_fingerprint,
                                       workdir=lambda i: tmp_path / f"vae{i}")
    assert any(trial.killed for trial in trials)
    assert all(trial.resumed and trial.identical for trial in trials), trials


def test_a_command_that_ends_before_the_kill_is_reported_as_not_killed(tmp_path):
    assert faults.run_killed([sys.executable, "-c", "pass"], 30.0) is False
    assert faults.run_killed([sys.executable, "-c", "import time; time.sleep(30)"], 0.5) is True
