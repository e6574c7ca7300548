"""The kill harness itself. Training runs are killed at epoch boundaries in tests/test_train.py;
`experiments/reliability.py` kills `jfail train`, a beta-VAE run and a demo stage at random
moments and checks each rerun bitwise (minutes of work, kept out of the suite's time budget)."""

import sys

from jfail.testing import faults


def test_a_command_that_ends_before_the_kill_is_reported_as_not_killed(tmp_path):
    assert faults.run_killed([sys.executable, "-c", "pass"], 30.0) is False
    assert faults.run_killed([sys.executable, "-c", "import time; time.sleep(30)"], 0.5) is True
