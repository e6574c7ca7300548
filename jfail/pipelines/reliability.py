"""Reliability under faults and hostile input, measured: `results/reliability.md` and `.json`.

    python experiments/reliability.py [--kills 3] [--demo-kills 2] [--out results/reliability]

- Kills: `jfail train`, a resumable beta-VAE run and the demo's Defuse stage, each SIGKILLed at
  random moments (seeded shares of an uninterrupted run's wall time) and run again on the same
  work directory; every rerun must end with bitwise the uninterrupted run's weights and outputs.
- Bad configs: every entry of `jfail.testing.faults.BAD_CONFIGS`, each must end with one line,
  status 2, no traceback and no work directory.

Every sentence of the Markdown is written from the JSON by `markdown()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jfail.testing import faults

__all__ = ["main", "run", "markdown"]

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None, prog: str = "python experiments/reliability.py") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="kills per training and VAE run")
    parser.add_argument("--demo-kills", type=int, default=2,
                        help="kills of the demo's Defuse stage (0 skips it)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--out", default="results/reliability")
    args = parser.parse_args(argv)
    command = prog + " " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = run(kills=args.kills, demo_kills=args.demo_kills, seed=args.seed)
    report["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


def run(*, kills: int, demo_kills: int, seed: int) -> dict:
    """Every measurement; returns the JSON report."""
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jfail-reliability-") as scratch:
        scratch = Path(scratch)
        runs = {
            "jfail train": (_train_command, faults.train_run_fingerprint, kills),
            "beta-VAE training": (_vae_command, faults.vae_run_fingerprint, kills),
            "jfail demo --methods defuse": (_demo_command, _demo_fingerprint, demo_kills),
        }
        kill_rows = []
        for name, (command, fingerprint, count) in runs.items():
            if count < 1:
                continue
            shares = rng.uniform(0.1, 0.95, size=count)
            folder = scratch / name.replace(" ", "_")
            _, trials = faults.kill_and_resume(
                command, shares, fingerprint=fingerprint, workdir=lambda i, f=folder: f / f"{i}")
            kill_rows += [{"run": name, **dataclasses.asdict(t)} for t in trials]
        config_rows = [dataclasses.asdict(t) for t in faults.try_bad_configs(
            REPO / "configs", scratch / "configs")]
    return {"kills": kill_rows, "bad_configs": config_rows,
            "seconds": round(time.perf_counter() - started, 1)}


def markdown(report: dict) -> str:
    """The results file, every sentence from `report`."""
    kills, configs = report["kills"], report["bad_configs"]
    killed = [k for k in kills if k["killed"]]
    lines = ["# Reliability under faults and hostile input", "", "Produced by:", "", "```",
             report["command"], "```", "", "## Kills and resumes", ""]
    if kills:
        good = sum(k["resumed"] and k["identical"] for k in kills)
        lines += [
            f"{len(kills)} runs were started and sent SIGKILL at a random moment; "
            f"{len(killed)} were still running then. {good} of {len(kills)} reruns on the same "
            "work directory ended with the uninterrupted run's weights and outputs, bit for bit.",
            "", "| run | kill after (s) | was running | rerun exit 0 | identical | rerun (s) |",
            "| --- | ---: | --- | --- | --- | ---: |",
        ]
        lines += [f"| {k['run']} | {k['delay']:.1f} | {_yes(k['killed'])} | {_yes(k['resumed'])} "
                  f"| {_yes(k['identical'])} | {k['rerun_seconds']:.1f} |" for k in kills]
    else:
        lines.append("No kills were tried (--kills 0 and --demo-kills 0).")
    one_line = sum(c["stderr_lines"] == 1 and c["status"] == 2 and c["says_what"]
                   and not c["traceback"] and not c["workdir_created"] for c in configs)
    lines += ["", "## Bad configs", "",
              f"{len(configs)} bad configs and overrides were given to the `jfail` commands; "
              f"{one_line} of {len(configs)} ended with one line on stderr that names the problem, "
              "exit status 2, no traceback and no work directory.", "",
              "| command | status | stderr lines | traceback | work directory made | message |",
              "| --- | ---: | ---: | --- | --- | --- |"]
    for c in configs:
        shown = " ".join(a if "/" not in a else Path(a).name for a in c["argv"][:-2])
        lines.append(f"| `{shown}` | {c['status']} | {c['stderr_lines']} | {_yes(c['traceback'])} "
                     f"| {_yes(c['workdir_created'])} | {c['message'].replace('|', '/')} |")
    lines += ["", f"All measurements took {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _train_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "jfail.cli", "train", "--quiet", "--config",
            str(REPO / "configs" / "annotator_mlp_mnist5k.py"), "--set", "dataset=digits",
            "--set", "train.epochs=4", "--set", "train.batch_size=256", "--workdir", str(workdir)]


def _vae_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "jfail.testing.faults", "vae", str(workdir), "--epochs", "4"]


def _demo_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "jfail.cli", "demo", "--quiet", "--methods", "defuse",
            "--data", "mnist5k", "--workdir", str(workdir)]


def _demo_fingerprint(run_dir: Path) -> str:
    """The Defuse stage's results (`defuse.json`, timings and the run's own path left out) and
    its scenario sample images, byte for byte."""
    run_dir = Path(run_dir)
    digest = hashlib.sha256()
    results = sorted(run_dir.rglob("defuse*.json"))
    samples = sorted(p for p in (run_dir / "work").rglob("*.png") if "annotation" in p.parts)
    if not results or not samples:
        raise FileNotFoundError(f"no defuse.json or annotation samples under {run_dir}")
    for path in results + samples:
        digest.update(str(path.relative_to(run_dir)).encode())
        if path.suffix == ".json":
            text = path.read_text().replace(str(run_dir), "RUN_DIR")
            digest.update(json.dumps(_without_timings(json.loads(text)), sort_keys=True).encode())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if "seconds" not in k and k not in ("command", "time", "date")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value
