"""Per-program XLA:GPU options for jfail's input gradients: their speed and their accuracy.

    python benchmarks/xla_gpu_options.py --out-name xla_gpu_options_h200   # on a GPU

What is measured: one jitted input gradient of the target logit, `jax.grad` of
`logits[i, target_i]` summed over the batch, for the attribution benchmark's two models (the
Defuse CNN and the width-16 small-stem ResNet-18 of `benchmarks/attribution.py`, same random
weights) at batch 200 (the 4 x 50 noisy images of one SmoothGrad call there) and batch 32 (one
gradient call there), compiled once per set of options:

- `default`: XLA's own settings;
- `nchw`: `xla_gpu_force_conv_nchw` (cuDNN's float32 convolution kernels take NCHW; with XLA's
  NHWC layout each convolution runs two or three layout kernels around its arithmetic);
- `cmdbuf`: `xla_gpu_enable_command_buffer` with convolutions (CONVOLUTION) added to the kinds
  of work recorded into CUDA graphs, so that a gradient is a few graph launches, not hundreds of
  kernel launches;
- `nchw+cmdbuf` and `nchw+cmdbuf+min1` (also `xla_gpu_graph_min_graph_size=1`: graphs of a
  single operation too).

Each set's gradients are compared with the defaults' (max |difference| / max |default|); a set
whose error exceeds 1e-4 or whose program fails is out. Timing: after the first call, `--rounds`
interleaved rounds (every set, every case, in turn) each run back-to-back calls for at least
`--min-seconds`; a case's time is its fastest round, and a set's score the geometric mean of its
times relative to the defaults. On a GPU both the matmul and convolution precision are
'highest' (full float32), as in the attribution benchmark. On a CPU the GPU options do nothing
and every set measures the same up to noise.

Writes `<out-dir>/<out-name>.json` and `.md` and prints the Markdown; `--render <json>` rewrites
the Markdown of an earlier run from its JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import build_models, load_images  # noqa: E402
from machine import cpu_name, provenance, time_calls, write_atomic, write_results  # noqa: E402

from jfail import xla  # noqa: E402

COMMAND_BUFFER = xla.GPU_OPTIONS["xla_gpu_enable_command_buffer"]  # the kinds jfail records
OPTION_SETS = {
    "default": {},
    "nchw": {"xla_gpu_force_conv_nchw": True},
    "cmdbuf": {"xla_gpu_enable_command_buffer": COMMAND_BUFFER},
    "nchw+cmdbuf": {"xla_gpu_force_conv_nchw": True,
                    "xla_gpu_enable_command_buffer": COMMAND_BUFFER},
    "nchw+cmdbuf+min1": {"xla_gpu_force_conv_nchw": True,
                         "xla_gpu_enable_command_buffer": COMMAND_BUFFER,
                         "xla_gpu_graph_min_graph_size": 1},
}
MAX_ERROR = 1e-4


def main(argv: list[str] | None = None) -> dict:
    """Time every option set on every case; write and print the results."""
    args = _parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        report = format_markdown(results)
        write_atomic(Path(args.render).with_suffix(".md"), report)
        print(report)
        return results
    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")
    test, _, dataset = load_images()
    cases = _cases(test)
    baseline = jax.jit(_input_gradient)
    reference = {case: jax.block_until_ready(baseline(*inputs)) for case, inputs in cases.items()}
    programs, first_call, errors, failed = {}, {}, {}, {}
    for name, options in OPTION_SETS.items():
        program = jax.jit(_input_gradient, compiler_options=options or None)
        try:
            started = time.perf_counter()
            for case, inputs in cases.items():
                got = jax.block_until_ready(program(*inputs))
                want = reference[case]
                errors[(name, case)] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            first_call[name] = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - an option this XLA rejects or cannot run
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"   {name} failed: {failed[name]}", file=sys.stderr)
            continue
        programs[name] = program
    times = {(name, case): [] for name in programs for case in cases}
    for _ in range(args.rounds):
        for name, program in programs.items():
            for case, inputs in cases.items():
                times[(name, case)].append(_milliseconds(program, inputs, args.min_seconds))
    results = _results(args, argv, dataset, cases, programs, times, errors, first_call, failed)
    report = format_markdown(results)
    write_results(args.out_dir, args.out_name, results, report)
    print(report)
    return results


def format_markdown(results: dict) -> str:
    """The Markdown report of `main`'s results."""
    env = results["environment"]
    jfail_set = results["jfail_gpu_options_set"]
    lines = [
        "# XLA:GPU options for jfail's input gradients",
        "",
        f"Input gradient of the target logit, jitted, on {env['jax_devices']} "
        f"({env['device']}); the attribution benchmark's models and random weights, "
        f"{results['dataset']} test images; full float32 (precision 'highest'). Time: the "
        f"fastest of {results['settings']['rounds']} interleaved rounds of at least "
        f"{results['settings']['min_seconds']:g} s. jfail's `GPU_OPTIONS` at the time of the run "
        f"were the set marked **{jfail_set}**. A set whose gradients differ from the defaults' "
        f"by more than {MAX_ERROR:g} (max |difference| / max |default|) is marked *over*.",
        "",
        "| options | " + " | ".join(f"{case} (ms)" for case in results["cases"])
        + " | geometric mean vs. default | compile+first calls (s) | max rel. difference |",
        "| --- | " + " | ".join("---:" for _ in results["cases"]) + " | ---: | ---: | ---: |",
    ]
    for name, row in results["sets"].items():
        if "failed" in row:
            lines.append(f"| {name} | " + " | ".join("-" for _ in results["cases"])
                         + f" | failed: {row['failed']} | - | - |")
            continue
        label = f"**{name}**" if name == jfail_set else name
        cells = [f"{row['milliseconds'][case]:.3f} ({row['vs_default'][case]:.2f}x)"
                 for case in results["cases"]]
        over = "" if row["valid"] else " *over*"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['score']:.3f} | "
                     f"{row['first_calls_seconds']:.2f} | {row['max_error']:.1e}{over} |")
    lines += ["", "Options of each set:", ""]
    lines += [f"- {name}: `{options}`" for name, options in OPTION_SETS.items()]
    lines += ["", f"Versions: jax {env['jax']} (jaxlib {env['jaxlib']}); {env['platform']}."]
    return "\n".join(lines + provenance(results["date"], results["command"]))


# --------------------------------------------------------------------------------------------
# Private helpers.


def _input_gradient(model, images, target):
    """`[N, H, W, C]`: d logits[i, target_i] / d images_i."""
    def objective(batch):
        return jnp.take_along_axis(model(batch), target[:, None], axis=1).sum()

    return jax.grad(objective)(images)


def _cases(test: np.ndarray) -> dict:
    """`{"<model>/<batch>": (model, images, target)}` for both models at batch 200 and 32."""
    cases = {}
    for model_name in ("resnet18", "defuse_cnn"):
        _, model = build_models(model_name, test.shape[1:], seed=0)
        x = jnp.asarray(test[:32])
        target = jnp.argmax(model(x), axis=-1).astype(jnp.int32)
        noise = jax.random.normal(jax.random.key(0), (200,) + x.shape[1:])
        noisy = jnp.repeat(x[:4], 50, axis=0) + 0.15 * noise
        cases[f"{model_name}/200"] = (model, noisy, jnp.repeat(target[:4], 50))
        cases[f"{model_name}/32"] = (model, x, target)
    return cases


def _milliseconds(program, inputs, min_seconds: float) -> float:
    elapsed, calls, _ = time_calls(lambda: jax.block_until_ready(program(*inputs)), min_seconds)
    return 1e3 * elapsed / calls


def _results(args, argv, dataset, cases, programs, times, errors, first_call, failed) -> dict:
    sets = {}
    for name in OPTION_SETS:
        if name in failed:
            sets[name] = {"failed": failed[name]}
            continue
        best = {case: min(times[(name, case)]) for case in cases}
        base = {case: min(times[("default", case)]) for case in cases}
        ratio = {case: best[case] / base[case] for case in cases}
        max_error = max(errors[(name, case)] for case in cases)
        score = math.exp(np.mean(np.log(list(ratio.values()))))
        sets[name] = {"milliseconds": best, "vs_default": ratio, "score": score,
                      "max_error": max_error, "first_calls_seconds": first_call[name],
                      "valid": max_error <= MAX_ERROR}
    jfail_set = next((name for name, options in OPTION_SETS.items()
                      if options == xla.GPU_OPTIONS), "none of these")
    return {
        "benchmark": "XLA:GPU options for jitted input gradients",
        "dataset": dataset,
        "cases": list(cases),
        "settings": {"rounds": args.rounds, "min_seconds": args.min_seconds},
        "sets": sets,
        "options": OPTION_SETS,
        "jfail_gpu_options_set": jfail_set,
        "environment": {
            "device": jax.devices()[0].device_kind if jax.default_backend() != "cpu"
            else cpu_name(),
            "jax_devices": ", ".join(str(device) for device in jax.devices()),
            "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
            "platform": platform.platform(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/xla_gpu_options.py",
                               *(sys.argv[1:] if argv is None else argv)]),
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.25)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--out-name", default="xla_gpu_options")
    parser.add_argument("--render", metavar="JSON", help="rewrite the Markdown of this result")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
