"""Fault injection: kill a command with SIGKILL at chosen moments, run it again, and check that
it ends exactly where an uninterrupted run ends.

    reference, trials = kill_and_resume(command, at=[0.3, 0.8], fingerprint=train_run_fingerprint,
                                        workdir=lambda i: tmp / f"run{i}")

`command(workdir) -> argv` builds the command for one work directory; the reference run and each
trial get their own. A trial starts the command, kills it after `delay` seconds (if it is still
running), then reruns it to completion on the same work directory and compares `fingerprint`
of that directory with the reference's.

`full_disk_and_rerun` runs a command on a tiny tmpfs until the disk is full, then again once
there is room (needs the right to mount; root on Linux).

`python -m jfail.testing.faults vae WORKDIR [--epochs N]` is a small resumable β-VAE run on
scikit-learn's digits, for kill tests of `defuse.train_vae`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "BAD_CONFIGS",
    "ConfigTrial",
    "KillTrial",
    "try_bad_configs",
    "kill_and_resume",
    "run_killed",
    "DiskFullTrial",
    "full_disk_and_rerun",
    "mount_tmpfs",
    "small_train_command",
    "is_trained_run",
    "arrays_digest",
    "train_run_fingerprint",
    "vae_run_fingerprint",
]


@dataclasses.dataclass(frozen=True)
class KillTrial:
    """One kill: after `delay` seconds; `killed` if the command was still running then;
    `resumed` if the rerun exited 0; `identical` if it ended where the reference ended."""

    delay: float
    killed: bool
    resumed: bool
    identical: bool
    rerun_seconds: float


BAD_CONFIGS = (
    # (command, config file under configs/, overrides, what the one line must say)
    ("train", "annotator_mlp_mnist5k.py", ("train.epochs=abc",),
     "--set train.epochs must be an integer, got 'abc' (str)"),
    ("train", "annotator_mlp_mnist5k.py", ("train.epochs=2.5",), "must be an integer, got 2.5"),
    ("train", "annotator_mlp_mnist5k.py", ("dataset=fashoin_mnist",),
     "Unknown data set 'fashoin_mnist'"),
    ("train", "annotator_mlp_mnist5k.py", ("model=resnet9",), "model must be one of"),
    ("train", "annotator_mlp_mnist5k.py", ("train.epohcs=1",), "unknown config key 'train.epohcs'"),
    ("train", "annotator_mlp_mnist5k.py", ("train.epochs",), "must look like key=value"),
    ("train", "annotator_mlp_mnist5k.py", ("train.epochs=-1",), "epochs must be positive"),
    ("prime", "prime_fmnist.py", ("min_gain=0.1",), "min_gain must be a tuple"),
    ("prime", "prime_fmnist.py", ("min_size=ten",), "min_size must be an integer"),
    ("defuse", "defuse_mnist5k.py", ("annotations=people",), "annotations must be"),
    ("barlow", "barlow_fmnist.py", ("depths=3",), "depths must be a tuple"),
    ("train", "prime_fmnist.py", (), "`jfail train` needs a ClassifierRunConfig"),
    ("train", "no_such_config.py", (), "does not exist"),
)
"""Bad configs and overrides every `jfail` command must refuse with one line and status 2,
before its work directory exists."""


@dataclasses.dataclass(frozen=True)
class ConfigTrial:
    """One bad config: the command line, its exit status, its stderr lines, whether the line
    said what it must, whether a traceback appeared, and whether the work directory was made."""

    argv: tuple
    status: int
    stderr_lines: int
    message: str
    says_what: bool
    traceback: bool
    workdir_created: bool


def try_bad_configs(configs_dir: Path, scratch: Path, *, env=None) -> list[ConfigTrial]:
    """Run every entry of `BAD_CONFIGS` as a `jfail` subprocess and record what it answered.

    The commands run in the folder above `configs_dir` and name their config relative to it
    (`configs/<name>.py`), as a user in a checkout would.

    Args:
        configs_dir: the `configs/` folder holding the configs `BAD_CONFIGS` names.
        scratch: a folder for the work directories the commands must not create.
        env: the subprocesses' environment (None: this process's).

    Returns:
        One `ConfigTrial` per entry of `BAD_CONFIGS`, in order.

    Raises:
        subprocess.TimeoutExpired: a command ran for more than 300 seconds.
    """
    configs_dir = Path(configs_dir).absolute()
    trials = []
    for index, (command, config, overrides, expected) in enumerate(BAD_CONFIGS):
        workdir = Path(scratch).absolute() / f"bad{index}"
        argv = ["jfail", command, "--config", str(Path(configs_dir.name) / config),
                *[item for o in overrides for item in ("--set", o)], "--workdir", str(workdir)]
        done = subprocess.run([sys.executable, "-m", "jfail.cli", *argv[1:]], env=env,
                              capture_output=True, text=True, timeout=300,
                              cwd=configs_dir.parent)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        trials.append(ConfigTrial(
            argv=tuple(argv), status=done.returncode, stderr_lines=len(lines),
            message=lines[-1] if lines else "", says_what=bool(lines) and expected in lines[-1],
            traceback="Traceback" in done.stderr, workdir_created=workdir.exists()))
    return trials


def run_killed(argv: Sequence[str], delay: float, *, env=None, cwd=None) -> bool:
    """Start `argv`, SIGKILL it after `delay` seconds; True if it was still running then.

    Args:
        argv: the command line.
        delay: seconds to wait before the kill.
        env: its environment (None: this process's).
        cwd: its working directory (None: this process's).

    Returns:
        True if the command was killed, False if it had already exited.
    """
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def kill_and_resume(
    command: Callable[[Path], Sequence[str]],
    at: Sequence[float],
    *,
    fingerprint: Callable[[Path], str],
    workdir: Callable[[int], Path],
    env=None,
    timeout: float = 600,
    warm_up: bool = False,
) -> tuple[str, list[KillTrial]]:
    """The reference fingerprint and one `KillTrial` per share of the reference's wall time in
    `at` (see the module doc); a trial's `delay` is in seconds.

    With `warm_up`, the command runs once first (in `workdir(-2)`, untimed) so that the timed
    reference, the killed runs and their reruns all find the same caches filled (a JAX
    compilation cache named in `env`): the kill moments are shares of a run like theirs.

    Args:
        command: `command(workdir) -> argv`.
        at: the kill moments, as shares of the reference run's wall time.
        fingerprint: `fingerprint(workdir) -> str`, equal for runs that ended alike.
        workdir: `workdir(i) -> Path`: trial `i`'s directory; -1 is the reference's, -2 the
            warm-up's.
        env: the commands' environment (None: this process's).
        timeout: seconds any one complete run may take.
        warm_up: run the command once, untimed, before the reference.

    Returns:
        `(reference, trials)`: the reference's fingerprint and one `KillTrial` per moment.

    Raises:
        RuntimeError: the reference (or warm-up) run failed.
        subprocess.TimeoutExpired: a complete run took more than `timeout` seconds.
    """
    if warm_up:
        done = subprocess.run(command(workdir(-2)), env=env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"the warm-up run failed: {done.stderr[-2000:]}")
    reference_dir = workdir(-1)
    started = time.perf_counter()
    done = subprocess.run(command(reference_dir), env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the reference run failed: {done.stderr[-2000:]}")
    reference_seconds = time.perf_counter() - started
    reference = fingerprint(reference_dir)
    trials = []
    for index, share in enumerate(at):
        delay = share * reference_seconds
        directory = workdir(index)
        killed = run_killed(command(directory), delay, env=env)
        started = time.perf_counter()
        rerun = subprocess.run(command(directory), env=env, capture_output=True, text=True,
                               timeout=timeout)
        seconds = time.perf_counter() - started
        resumed = rerun.returncode == 0
        identical = resumed and fingerprint(directory) == reference
        trials.append(KillTrial(float(delay), killed, resumed, identical, seconds))
    return reference, trials


@dataclasses.dataclass(frozen=True)
class DiskFullTrial:
    """A command run on a full disk: its exit status, its stderr lines (the last in `message`),
    whether a traceback appeared; then the rerun once there is room: its exit status and whether
    `resumed` (exit 0 and the caller's check passed). `skipped` is the reason where the tmpfs
    could not be mounted (then nothing else was measured)."""

    skipped: str = ""
    status: int | None = None
    stderr_lines: int = 0
    message: str = ""
    traceback: bool = False
    rerun_status: int | None = None
    resumed: bool = False


def mount_tmpfs(path: Path, size: str) -> str:
    """Mount a tmpfs of `size` (e.g. "3m") on `path` (made here); "" or why it failed.

    Args:
        path: the mount point, created if missing.
        size: the tmpfs size, as `mount -o size=` takes it.

    Returns:
        "" on success, else the reason the mount failed.
    """
    Path(path).mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except OSError as error:
        return f"mount could not be run: {error}"
    return "" if done.returncode == 0 else (done.stderr.strip() or f"mount exit {done.returncode}")


def small_train_command(workdir: Path) -> list[str]:
    """`jfail train` of the annotator MLP on scikit-learn's digits for 2 epochs into `workdir`:
    a run that writes checkpoints within seconds (the full-disk trial's command).

    Args:
        workdir: the run's work directory.

    Returns:
        The argv, run with this Python interpreter.
    """
    config = Path(__file__).resolve().parents[2] / "configs" / "annotator_mlp_mnist5k.py"
    return [sys.executable, "-m", "jfail.cli", "train", "--config", str(config), "--set",
            "dataset=digits", "--set", "train.epochs=2", "--workdir", str(workdir)]


def is_trained_run(workdir: Path) -> bool:
    """Whether `workdir` holds a finished `jfail train` run (a selected epoch, a test accuracy).

    Args:
        workdir: a `jfail train` work directory.

    Returns:
        True if its `metrics.json` has a best epoch >= 0 and a test accuracy in (0, 1].

    Raises:
        FileNotFoundError: `workdir` has no `metrics.json`.
    """
    metrics = json.loads((Path(workdir) / "metrics.json").read_text())
    return metrics["best_epoch"] >= 0 and 0 < metrics["test_accuracy"] <= 1


def full_disk_and_rerun(
    command: Callable[[Path], Sequence[str]],
    disk: Path,
    *,
    size: str = "3m",
    room: str = "64m",
    check: Callable[[Path], bool] = lambda workdir: True,
    env=None,
    cwd=None,
    timeout: float = 300,
) -> DiskFullTrial:
    """Run `command(disk / "run")` on a tmpfs of `size` mounted on `disk`, remount it with
    `room`, run the same command again and `check(disk / "run")`; unmounts at the end.

    Args:
        command: `command(workdir) -> argv`.
        disk: the mount point of the tmpfs.
        size: the full disk's size (e.g. "3m").
        room: the size it is remounted with for the rerun.
        check: `check(workdir) -> bool`, run after a rerun that exited 0.
        env: the commands' environment (None: this process's).
        cwd: their working directory (None: this process's).
        timeout: seconds each run may take.

    Returns:
        A `DiskFullTrial`; `skipped` says why when the tmpfs could not be mounted.

    Raises:
        subprocess.CalledProcessError: the remount failed.
        subprocess.TimeoutExpired: a run took more than `timeout` seconds.
    """
    disk = Path(disk)
    reason = mount_tmpfs(disk, size)
    if reason:
        return DiskFullTrial(skipped=f"a {size} tmpfs could not be mounted ({reason})")
    workdir = disk / "run"
    try:
        full = subprocess.run(command(workdir), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        lines = [line for line in full.stderr.splitlines() if line.strip()]
        subprocess.run(["mount", "-o", f"remount,size={room}", str(disk)], check=True,
                       capture_output=True)
        again = subprocess.run(command(workdir), env=env, cwd=cwd, capture_output=True,
                               text=True, timeout=timeout)
        resumed = again.returncode == 0 and bool(check(workdir))
        return DiskFullTrial(status=full.returncode, stderr_lines=len(lines),
                             message=lines[-1] if lines else "",
                             traceback="Traceback" in full.stderr,
                             rerun_status=again.returncode, resumed=resumed)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
        os.sync()


def arrays_digest(tree) -> str:
    """SHA-256 of every array leaf of a pytree, bytes and shapes, in tree order.

    Args:
        tree: a pytree of arrays.

    Returns:
        The hex digest.
    """
    import jax
    import numpy as np

    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def train_run_fingerprint(run_dir: Path) -> str:
    """A `jfail train` run directory: its selected weights and its metrics, less timings.

    Args:
        run_dir: a finished `jfail train` work directory.

    Returns:
        The weights' digest followed by the SHA-256 of the metrics without timings.

    Raises:
        FileNotFoundError: the run is not finished (no config, weights or metrics).
    """
    from jfail.train.run import load_trained_classifier

    _, params, state, _ = load_trained_classifier(run_dir)
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    for key in ("train_seconds", "wall_seconds_this_process"):
        metrics.pop(key, None)
    for record in metrics.get("history", []):
        record.pop("seconds", None)
    return arrays_digest((params, state)) + hashlib.sha256(
        json.dumps(metrics, sort_keys=True).encode()).hexdigest()


def vae_run_fingerprint(run_dir: Path) -> str:
    """A `python -m jfail.testing.faults vae` work directory: its final weights' digest.

    Args:
        run_dir: the work directory.

    Returns:
        The `arrays_digest` of the final weights, from `result.json`.

    Raises:
        FileNotFoundError: the run is not finished (no `result.json`).
    """
    return json.loads((Path(run_dir) / "result.json").read_text())["weights"]


def _train_small_vae(workdir: Path, epochs: int) -> None:
    import jax

    from jfail.data import load
    from jfail.defuse import VAEConfig, train_vae
    from jfail.models import BetaVAE

    images = load("digits@28[:20%]", "train").images
    config = VAEConfig(epochs=epochs, batch_size=64, seed=1)
    result = train_vae(BetaVAE(latent_dim=4), images, config,
                       checkpoint_dir=workdir / "checkpoints", progress=False)
    payload = {"weights": arrays_digest(result.variables),
               "loss": [record.get("loss") for record in result.history],
               "devices": jax.device_count()}
    (workdir / "result.json").write_text(json.dumps(payload))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jfail.testing.faults vae WORKDIR [--epochs N]`: a small resumable β-VAE run.

    Args:
        argv: the arguments after the program name (None: `sys.argv[1:]`).

    Returns:
        0, the exit status (argparse exits with status 2 on bad arguments).
    """
    parser = argparse.ArgumentParser(prog="python -m jfail.testing.faults")
    sub = parser.add_subparsers(dest="command", required=True)
    vae = sub.add_parser("vae", help="a small resumable beta-VAE run on digits")
    vae.add_argument("workdir")
    vae.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _train_small_vae(workdir, args.epochs)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
