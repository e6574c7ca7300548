"""What the benchmarks share: the processor's name, timed repeated calls, atomic result files
with the command that made them, and how much of the machine other processes took during a
run."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from jfail import jsonfile


def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo with its widest vector instructions (e.g.
    "AMD EPYC (AVX-512)": machines sold under one name differ there, and so do the kernels XLA
    and PyTorch pick), else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((set(line.split(":", 1)[1].split()) for line in lines
                  if line.startswith("flags")), set())
    if not names:
        return platform.processor() or platform.machine()
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{names[0]} ({vectors})" if vectors else names[0]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out_dir, name: str, results: dict, markdown: str) -> None:
    """`<out_dir>/<name>.json` (the results, indented, strict: NaN as null, `jfail.jsonfile`)
    and `<name>.md`, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonfile.write(out_dir / f"{name}.json", results)
    write_atomic(out_dir / f"{name}.md", markdown)


def time_calls(call, min_seconds: float) -> tuple[float, int, object]:
    """Call `call()` back to back until at least `min_seconds` have passed: `(elapsed seconds,
    number of calls, the last output)`."""
    calls, started = 0, time.perf_counter()
    while True:
        out = call()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed, calls, out


def provenance(date: str, command: str) -> list[str]:
    """The Markdown lines that end every results file: when, and by which command, it was made."""
    return ["", f"Produced on {date} by:", "", "```", command, "```", ""]


def cpu_snapshot() -> dict:
    """Wall clock, busy CPU seconds of the whole machine (all cores, from /proc/stat, stolen time
    included) and CPU seconds of this process; None where /proc/stat is unreadable."""
    times = os.times()
    snapshot = {"wall": time.monotonic(), "own": times.user + times.system, "machine": None}
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return snapshot
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    ticks = os.sysconf("SC_CLK_TCK")
    snapshot["machine"] = (user + nice + system + irq + softirq + steal) / ticks
    return snapshot


def other_cpu_share(start: dict, end: dict, cpu_count: int) -> float | None:
    """Fraction of the machine's CPU capacity between two `cpu_snapshot`s that other processes
    (or the hypervisor) used: (machine busy - own) / (wall x CPUs); None without /proc/stat."""
    if start["machine"] is None or end["machine"] is None:
        return None
    wall = end["wall"] - start["wall"]
    others = (end["machine"] - start["machine"]) - (end["own"] - start["own"])
    return max(0.0, others) / max(wall * cpu_count, 1e-9)
