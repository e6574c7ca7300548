"""Reliability under faults and hostile input, measured: `results/reliability.md` and `.json`.

    python experiments/reliability.py [--kills 3] [--demo-kills 2] [--annotators 50]
        [--images 80] [--server-kills 3] [--out results/reliability]

- Kills: `jfail train`, a resumable beta-VAE run and the demo's Defuse stage, each SIGKILLed at
  random moments (seeded shares of an uninterrupted run's wall time) and run again on the same
  work directory; every rerun must end with bitwise the uninterrupted run's weights and outputs.
- Bad configs: every entry of `jfail.testing.faults.BAD_CONFIGS`, each must end with one line,
  status 2, no traceback and no work directory.
- Full disk: `jfail train` on a 3 MB tmpfs must end with one line and status 1, and the same
  command must resume once there is room (skipped, with the reason, where mounting fails).
- The annotation server (`jfail annotate` in a subprocess): annotators vote on every image at
  once while the server is SIGKILLed and restarted on its port; every acknowledged vote must be
  in `votes.sqlite` once. Then the hostile requests of `jfail.testing.http_probe`, each must get
  its expected status and leave the server answering; the servers' stderr must hold no
  traceback.

Every sentence of the Markdown is written from the JSON by `markdown()`, through the template
`jfail/templates/reliability.j2` that also renders its section of a report page.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jfail.pipelines import command_line
from jfail.report import render_markdown
from jfail.testing import faults, http_probe

__all__ = ["main", "run", "run_server", "markdown"]

REPO = Path(__file__).resolve().parents[2]


REPORT_TEMPLATE = "reliability"
"""The template in jfail/templates that renders this pipeline's JSON as Markdown and HTML."""


def main(argv: list[str] | None = None, prog: str = "python experiments/reliability.py") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="kills per training and VAE run")
    parser.add_argument("--demo-kills", type=int, default=2,
                        help="kills of the demo's Defuse stage (0 skips it)")
    parser.add_argument("--annotators", type=int, default=50,
                        help="annotators voting at once on the annotation server")
    parser.add_argument("--images", type=int, default=80, help="images each annotator votes on")
    parser.add_argument("--server-kills", type=int, default=3,
                        help="SIGKILLs and restarts of the annotation server while they vote")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--out", default="results/reliability")
    args = parser.parse_args(argv)
    command = command_line(prog, argv)
    report = run(kills=args.kills, demo_kills=args.demo_kills, seed=args.seed,
                 annotators=args.annotators, images=args.images, server_kills=args.server_kills)
    report["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


def run(*, kills: int, demo_kills: int, seed: int, annotators: int = 50, images: int = 80,
        server_kills: int = 3, disk_full: bool = True) -> dict:
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
        disk = None
        if disk_full:
            disk = dataclasses.asdict(faults.full_disk_and_rerun(
                faults.small_train_command, scratch / "disk", size="3m", room="64m",
                check=faults.is_trained_run, cwd=scratch))
        server = run_server(scratch / "server", annotators=annotators, images=images,
                            kills=server_kills)
    return {"kills": kill_rows, "bad_configs": config_rows, "full_disk": disk, "server": server,
            "seconds": round(time.perf_counter() - started, 1)}


CLASSES = ("zero", "one", "two", "three")


def run_server(folder: Path, *, annotators: int, images: int, kills: int,
               deadline: float = 900.0) -> dict:
    """The annotation server's measurements (see the module doc) in `folder`; a JSON dict.

    `images` are laid out as scenarios of 2 samples (1 if odd); the server is killed when
    1/(kills+1), 2/(kills+1), ... of the votes have been acknowledged. `deadline`: seconds
    every vote has to be acknowledged.
    """
    from jfail.defuse import prepare_annotation

    folder = Path(folder)
    started = time.perf_counter()
    per_scenario = 2 if images % 2 == 0 else 1
    scenarios = images // per_scenario
    run_dir = folder / "run"
    samples = np.random.default_rng(0).uniform(
        size=(scenarios, per_scenario, 8, 8, 1)).astype(np.float32)
    prepare_annotation(run_dir, samples, np.zeros((scenarios, per_scenario), int), CLASSES)
    jobs = http_probe.voting_jobs(annotators, scenarios, per_scenario, len(CLASSES))
    servers = [http_probe.ServerProcess(run_dir, folder / "stderr0.txt").start()]
    port = servers[0].port
    try:
        results, failures, lock = [], [], threading.Lock()
        stop_by = time.monotonic() + deadline

        def annotate(name):
            for job in (j for j in jobs if j[0] == name):
                try:
                    status, attempts = http_probe.vote_until_acknowledged(
                        lambda _: port, job, stop_by)
                except (http_probe.UnexpectedStatus, TimeoutError) as error:
                    with lock:
                        failures.append({"vote": list(job), "error": str(error),
                                         "status": getattr(error, "status", None)})
                    continue
                with lock:
                    results.append((job, status, attempts))

        kill_rows = []
        names = [f"annotator-{i}" for i in range(annotators)]
        with ThreadPoolExecutor(max(1, annotators)) as pool:
            futures = [pool.submit(annotate, name) for name in names]
            for n in range(kills):
                target = len(jobs) * (n + 1) // (kills + 1)
                while len(results) + len(failures) < target and time.monotonic() < stop_by:
                    time.sleep(0.002)
                at = len(results)
                running = servers[-1].process.poll() is None
                killed_at = time.perf_counter()
                servers[-1].kill()
                servers.append(_restart(run_dir, folder / f"stderr{n + 1}.txt", port))
                kill_rows.append({"acknowledged_before": at, "was_running": running,
                                  "restart_seconds": round(time.perf_counter() - killed_at, 2)})
            for future in futures:
                future.result()
        voting_seconds = time.perf_counter() - started

        stored, duplicated = _stored_votes(run_dir)
        sent = {(a, k, q): label for a, k, q, label in jobs}
        acknowledged = {(a, k, q): label for (a, k, q, label), _, _ in results}
        lost = sorted(key for key, label in acknowledged.items() if stored.get(key) != label)
        unexpected = sorted(key for key in stored if key not in sent)
        summary = http_probe.request(port, "GET", "/api/summary")[1]

        hostile_rows = _hostile_rows(port)
        after = http_probe.request(port, "GET", "/api/summary")[1]
        status = servers[-1].stop()
    finally:  # nothing left running, whatever went wrong
        for server in servers:
            server.kill()
    stderr = [server.stderr for server in servers]
    return {
        "annotators": annotators, "images": images, "scenarios": scenarios,
        "samples_per_scenario": per_scenario, "kills": kill_rows,
        "votes_sent": len(jobs), "acknowledged": len(results),
        "acknowledged_new": sum(s == 201 for _, s, _ in results),
        "acknowledged_replaced": sum(s == 200 for _, s, _ in results),
        "retried": sum(a > 1 for _, _, a in results),
        "attempts": sum(a for _, _, a in results),
        "not_acknowledged": failures,
        "stored": len(stored) + duplicated, "lost": [list(k) for k in lost],
        "duplicated": duplicated, "unexpected_rows": [list(k) for k in unexpected],
        "summary_votes": summary.get("votes"),
        "voting_seconds": round(voting_seconds, 1),
        "hostile": hostile_rows,
        "votes_before_hostile": summary.get("votes"), "votes_after_hostile": after.get("votes"),
        "servers_started": len(servers), "final_exit_status": status,
        "final_stopped_line": any(line.startswith("Stopped;")
                                  for line in servers[-1].stdout.splitlines()),
        "stderr_lines": sum(len(text.splitlines()) for text in stderr),
        "tracebacks": sum("Traceback" in text for text in stderr),
        "stderr_excerpt": next((text[-1500:] for text in stderr if text.strip()), ""),
    }


def _restart(run_dir: Path, stderr_path: Path, port: int) -> http_probe.ServerProcess:
    """A new server on the killed one's port (retried while the port is still held)."""
    for attempt in range(50):
        try:
            return http_probe.ServerProcess(run_dir, stderr_path, port=port).start()
        except RuntimeError:
            if attempt == 49:
                raise
            time.sleep(0.1)


def _stored_votes(run_dir: Path) -> tuple[dict, int]:
    """{(annotator, scenario, sample): label} of `votes.sqlite` and the number of rows beyond
    one per key."""
    from jfail.defuse.annotation_server import ANNOTATION_DIR, VOTES_FILE

    connection = sqlite3.connect(Path(run_dir) / ANNOTATION_DIR / VOTES_FILE)
    try:
        found = connection.execute(
            "SELECT annotator, scenario, sample, MAX(label), COUNT(*) FROM votes "
            "GROUP BY annotator, scenario, sample").fetchall()
    finally:
        connection.close()
    return {(a, k, q): label for a, k, q, label, _ in found}, sum(n - 1 for *_, n in found)


def _hostile_rows(port: int) -> list[dict]:
    """Each hostile and truncated request: expected and received status, seconds, and whether
    an ordinary request right after it was answered."""
    cases = [(name, data, expected, False) for name, data, expected in http_probe.hostile(port)]
    cases += [(name, data, None, True) for name, data in http_probe.truncated(port)]
    rows = []
    for name, data, expected, half_close in cases:
        try:
            status, _, _, seconds = http_probe.exchange(port, data, half_close=half_close,
                                                        wait=15.0)
            error = ""
        except OSError as failure:
            status, seconds, error = None, float("nan"), f"{type(failure).__name__}: {failure}"
        try:
            answered = http_probe.request(port, "GET", "/api/summary")[0] == 200
        except (OSError, ValueError):
            answered = False
        rows.append({"name": name, "expected": expected, "status": status,
                     "seconds": None if seconds != seconds else round(seconds, 3),
                     "error": error, "then_answered": answered})
    return rows


def markdown(report: dict) -> str:
    """The results file, every sentence from `report`: `jfail/templates/reliability.j2`."""
    return render_markdown(REPORT_TEMPLATE, report, name="reliability")


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
