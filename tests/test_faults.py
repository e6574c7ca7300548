"""SIGKILL at a random moment of a beta-VAE run, then the same command again: it resumes and ends
with bitwise the weights of an uninterrupted run; and the kill harness itself. (Training runs are
killed at epoch boundaries in tests/test_train.py; `experiments/reliability.py` kills `jfail
train`, the VAE and a demo stage at several random moments each.)"""

import os
import sys

import numpy as np
import pytest

from jfail.testing import faults

SHARE = np.random.default_rng(7).uniform(0.2, 0.9)  # of the run's wall time: random, fixed


@pytest.mark.slow
def test_a_vae_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_weights(tmp_path):
    # The processes share a compilation cache: a warm-up run compiles, the timed reference, the
    # killed run and its rerun load its programs (the same executables, so the same bits).
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "compiled"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def command(workdir):
        return [sys.executable, "-m", "jfail.testing.faults", "vae", str(workdir), "--epochs", "2"]

    _, trials = faults.kill_and_resume(command, [SHARE], fingerprint=faults.vae_run_fingerprint,
                                       workdir=lambda i: tmp_path / f"vae{i}", env=env,
                                       warm_up=True)
    assert trials[0].killed and trials[0].resumed and trials[0].identical, trials


def test_a_command_that_ends_before_the_kill_is_reported_as_not_killed(tmp_path):
    assert faults.run_killed([sys.executable, "-c", "pass"], 30.0) is False
    assert faults.run_killed([sys.executable, "-c", "import time; time.sleep(30)"], 0.5) is True
