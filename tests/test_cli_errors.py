"""Bad input ends a command with one line and status 2, before anything is written; a full disk
with one line and status 1, and the same command resumes once there is room."""

from pathlib import Path

import pytest

from jfail import cli
from jfail.config import ConfigError, load_config, validate_config
from jfail.testing import faults

REPO = Path(__file__).resolve().parents[1]
MLP = str(REPO / "configs" / "annotator_mlp_mnist5k.py")

BAD = [
    ([command, "--config", str(REPO / "configs" / config),
      *[item for o in overrides for item in ("--set", o)]], message)
    for command, config, overrides, message in faults.BAD_CONFIGS
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[2:]).split("configs/")[-1]
                                                     for a, _ in BAD])
def test_bad_input_is_one_line_and_status_2_before_the_workdir_exists(tmp_path, capsys, argv,
                                                                      message):
    workdir = tmp_path / "run"
    assert cli.main(argv + ["--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith(f"jfail {argv[0]}: ")
    assert not workdir.exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        cli.main(["train", "--debug", "--config", MLP, "--set", "train.epochs=abc",
                  "--workdir", str(tmp_path / "run")])


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.py")):
        validate_config(load_config(path))


def test_environment_faults_are_told_apart_from_bad_input():
    status, line = cli.describe_failure(OSError(28, "No space left on device", "/data/run"))
    assert status == 1 and line.startswith("no space left on device (/data/run)")
    wrapped = ValueError('RESOURCE_EXHAUSTED: Failed writing "x": No space left on device')
    assert cli.describe_failure(wrapped)[0] == 1
    chained = RuntimeError("checkpoint failed")
    chained.__cause__ = OSError(30, "Read-only file system")
    assert cli.describe_failure(chained)[1].startswith("the file system is read-only")
    assert cli.describe_failure(ValueError("bad"))[0] == 2
    assert cli.describe_failure(RuntimeError("boom"))[0] == 1


@pytest.mark.slow
def test_full_disk_gives_one_line_status_1_and_the_rerun_resumes(tmp_path):
    trial = faults.full_disk_and_rerun(faults.small_train_command, tmp_path / "disk", size="3m",
                                       room="64m", check=faults.is_trained_run, cwd=tmp_path)
    if trial.skipped:
        pytest.skip(trial.skipped)
    assert trial.status == 1
    # threads' failed writes go to the log file
    assert trial.stderr_lines == 1 and not trial.traceback, trial
    assert trial.message.startswith("jfail train: no space left on device"), trial
    assert trial.rerun_status == 0 and trial.resumed, trial
