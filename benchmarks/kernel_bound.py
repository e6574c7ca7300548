"""A bound on the sampling methods' speed on CPU, from the kernels their gradients are made of.

    python benchmarks/kernel_bound.py

SmoothGrad, VarGrad, Integrated and Expected Gradients spend their time in one program: the
target-logit input gradient of a group of model inputs, run once per `lax.map` step. For each
model of the attribution benchmark (the Defuse CNN and the small-stem ResNet-18 of width 16,
random weights, Fashion-MNIST test images; mnist5k if it is missing) and each of SmoothGrad
(VarGrad is the same computation), Integrated and Expected Gradients, this script

1. times the method in jfail and in Captum in the same process, with the settings of
   `benchmarks/attribution.py` (batch 4; 50 noise samples, 128 Gauss-Legendre steps, 200
   baseline samples);
2. compiles the method's gradient step (`cpu_group_size` inputs, through
   `cpu_friendly_gradients`) and reads every convolution and dot product out of the optimized
   HLO; each is compiled alone, with the same shapes, window and dimensions and jfail's XLA
   options, and timed (`--copies` independent calls in one program, so that dispatch does not
   count; XLA may overlap independent calls on the cores, so a kernel's time is if anything
   low: one call a program measured 6-13 % more per step, dispatch included). Their sum is
   what the step would take if everything else in it (ReLU masks, BatchNorm, residual sums,
   copies) were free and each kernel ran as fast inside the program as alone;
3. times the whole step as jfail compiles it, and a 2048 x 2048 float32 matrix product (the
   most XLA gets out of the machine);
4. does 2 and 3 for the step alone at other sizes (`--step-sizes` inputs).

The sum is an estimate, not a strict bound: inside the program a kernel can find its operands
in cache and run faster than alone (the whole step then takes less than its kernels).

It reports the speed the kernels alone would allow each method and the time per gradient that
2x Captum needs. A method, Captum's counterpart, the step and the step's kernels are timed in
interleaved rounds (each for at least `--min-seconds` a round), so that a slow spell of the
machine falls on all of them; each time is the fastest of `--rounds` rounds.

Writes `<out-dir>/kernel_bound.json` and `.md` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

# the step size jfail's sampling methods choose on CPU: an internal policy, measured here
from jfail.attribution._core import cpu_group_size  # noqa: PLC2701
from jfail.attribution.gradients import target_logit_gradients
from jfail.xla import compiler_options, jit

try:
    from benchmarks.attribution import (
        NUM_BASELINES,
        BatchInputs,
        build_models,
        check_logits,
        load_images,
        make_captum_call,
        make_jfail_call,
    )
    from benchmarks.machine import cpu_name, provenance, time_calls, write_results
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on the path
    from attribution import (
        NUM_BASELINES,
        BatchInputs,
        build_models,
        check_logits,
        load_images,
        make_captum_call,
        make_jfail_call,
    )
    from machine import cpu_name, provenance, time_calls, write_results

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
MODELS = ("defuse_cnn", "resnet18")
BATCH = 4
SETTINGS = {"noise_samples": 50, "ig_steps": 128, "eg_samples": 200}
GEMM_SIZE = 2048


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    test, train, dataset = load_images()
    images = test[np.random.default_rng(args.seed).permutation(len(test))[:64]]
    baselines = np.ascontiguousarray(train[:NUM_BASELINES])
    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in _argv(argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": args.torch_threads,
        "dataset": dataset, "batch": BATCH, "settings": SETTINGS, "rounds": args.rounds,
        "xla_options": compiler_options() or {},
        "versions": {name: importlib.metadata.version(name)
                     for name in ("jax", "jaxlib", "torch", "captum", "numpy")},
        "platform": platform.platform(), "models": {},
    }
    results["gemm_gflops"] = _gemm_gflops(args)
    print(f"matrix product {GEMM_SIZE}^2: {results['gemm_gflops']:.0f} GFLOP/s", file=sys.stderr)
    for model_name in args.models:
        results["models"][model_name] = bound_model(model_name, images, baselines, args)
    markdown = format_markdown(results)
    write_results(args.out_dir, args.out_name, results, markdown)
    print(markdown)
    return results


def bound_model(model_name: str, images: np.ndarray, baselines: np.ndarray, args) -> dict:
    """Each sampling method in jfail and Captum, its gradient step whole and kernel by kernel."""
    torch_model, model = build_models(model_name, images.shape[1:], args.seed)
    logit_error = check_logits(torch_model, model, images[:64], model_name)
    x = images[:BATCH]
    target = np.asarray(jnp.argmax(model(jnp.asarray(x)), axis=-1)).astype(np.int32)
    batch = BatchInputs(x, target)
    settings = argparse.Namespace(seed=args.seed, **SETTINGS)
    record = {"logit_error": logit_error, "methods": {}}
    for method, inputs_per_image in _inputs_per_image().items():
        jfail_call = make_jfail_call(method, model, batch, settings, baselines, None)
        captum_call, _ = make_captum_call(method, torch_model, batch, settings, baselines,
                                          model_name)
        group = cpu_group_size(inputs_per_image, BATCH) * BATCH
        step = _step_timing(model, images, target, group, args, extra={
            "jfail": lambda call=jfail_call: jax.block_until_ready(call()),
            "captum": captum_call})
        jfail_seconds, captum_seconds = step.pop("jfail"), step.pop("captum")
        kernel_seconds = sum(k["seconds"] * k["count"] for k in step["kernels"])
        gradients = BATCH * inputs_per_image
        result = {
            "inputs_per_image": inputs_per_image,
            "jfail_images_per_s": BATCH / jfail_seconds,
            "captum_images_per_s": BATCH / captum_seconds,
            **step,
            "twice_captum_ms_per_input": 1e3 * captum_seconds / (2 * gradients),
            "kernel_bound_images_per_s": group / (kernel_seconds * inputs_per_image),
        }
        record["methods"][method] = result
        print(f"   {model_name} {method}: jfail {result['jfail_images_per_s']:.1f} img/s, Captum "
              f"{result['captum_images_per_s']:.1f}; step {result['step_ms_per_input']:.3f} "
              f"ms/input, kernels alone {result['kernel_ms_per_input']:.3f}, 2x Captum needs "
              f"{result['twice_captum_ms_per_input']:.3f}", file=sys.stderr)
    record["step_sizes"] = {}
    for group in args.step_sizes:
        step = _step_timing(model, images, target, group, args)
        record["step_sizes"][group] = {k: v for k, v in step.items() if k != "kernels"}
        print(f"   {model_name} {group} inputs a step: {step['step_ms_per_input']:.3f} ms/input, "
              f"kernels alone {step['kernel_ms_per_input']:.3f}", file=sys.stderr)
    return record


def format_markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# A kernel bound on the sampling methods (CPU)",
        "",
        f"{results['cpu']}, {results['cpus']} CPUs, torch threads {results['torch_threads']}; "
        f"{results['dataset']} test images, random weights, batch {results['batch']}; "
        f"SmoothGrad {settings['noise_samples']} samples, Integrated Gradients "
        f"{settings['ig_steps']} steps, Expected Gradients {settings['eg_samples']} samples "
        f"(as in `attribution.md`). XLA options: {results['xla_options']}. Times: the fastest of "
        f"{results['rounds']} interleaved rounds.",
        "",
        f"A {GEMM_SIZE} x {GEMM_SIZE} float32 matrix product runs at "
        f"{results['gemm_gflops']:.0f} GFLOP/s under the same options.",
        "",
        "| model | method | jfail img/s | Captum img/s | jfail / Captum | inputs a step | "
        "step, ms / input | its convolutions and dot products alone, ms / input | their "
        "GFLOP/s | 2x Captum needs, ms / input | img/s the kernels alone allow |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, record in results["models"].items():
        for method, r in record["methods"].items():
            kernel_gflops = r["kernel_gflop_per_input"] / r["kernel_ms_per_input"] * 1e3
            lines.append(
                f"| {name} | {method} | {r['jfail_images_per_s']:.1f} | "
                f"{r['captum_images_per_s']:.1f} | "
                f"{r['jfail_images_per_s'] / r['captum_images_per_s']:.2f}x | "
                f"{r['group_inputs']} | {r['step_ms_per_input']:.3f} | "
                f"{r['kernel_ms_per_input']:.3f} | {kernel_gflops:.0f} | "
                f"{r['twice_captum_ms_per_input']:.3f} | {r['kernel_bound_images_per_s']:.1f} "
                f"({r['kernel_bound_images_per_s'] / r['captum_images_per_s']:.2f}x Captum) |"
            )
    sizes = sorted({int(g) for record in results["models"].values()
                    for g in record["step_sizes"]})
    if sizes:
        lines += [
            "",
            "The gradient step at other sizes: ms per input, the step whole / its kernels alone.",
            "",
            "| model | " + " | ".join(f"{g} inputs" for g in sizes) + " |",
            "| --- |" + " ---: |" * len(sizes),
        ]
        for name, record in results["models"].items():
            by_size = {int(g): r for g, r in record["step_sizes"].items()}
            lines.append(f"| {name} | " + " | ".join(
                f"{by_size[g]['step_ms_per_input']:.3f} / {by_size[g]['kernel_ms_per_input']:.3f}"
                if g in by_size else "-" for g in sizes) + " |")
    for name, record in results["models"].items():
        method, r = next(iter(record["methods"].items()))
        lines += [
            "",
            f"## {name}: the kernels of {method}'s step ({r['group_inputs']} inputs)",
            "",
            "| kernel | lhs | rhs | count | ms each | GFLOP/s |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for k in sorted(r["kernels"], key=lambda k: -k["seconds"] * k["count"]):
            lines.append(
                f"| {k['description']} | {k['lhs']} | {k['rhs']} | {k['count']} | "
                f"{k['seconds'] * 1e3:.3f} | {k['flop'] / k['seconds'] / 1e9:.0f} |"
            )
    lines += [
        "",
        "Columns: the step is the target-logit input gradient of one `lax.map` group as jfail "
        "compiles it (alone, at the top level); the kernels alone are every convolution and dot "
        "product of that compiled program, each timed by itself, times how often it occurs; "
        "2x Captum needs is Captum's time per image / (2 x gradients per image).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + f"; {results['platform']}.",
    ]
    return "\n".join(lines + provenance(results["date"], results["command"]))


# --------------------------------------------------------------------------------------------
# Private helpers.


def _step_timing(model, images, target, group: int, args, extra=None) -> dict:
    """The gradient step of `group` inputs and each of its kernels, timed in interleaved rounds
    (with the zero-argument calls `extra`, whose seconds per call come back under their names):
    the step's and its kernels' milliseconds per input."""
    inputs = jnp.asarray(np.resize(images, (group,) + images.shape[1:]))
    targets = jnp.asarray(np.resize(target, group))
    step = jit(target_logit_gradients)
    kernels = _kernels(step.lower(model, inputs, targets).compile().as_text())
    calls = {**(extra or {}),
             "step": lambda: jax.block_until_ready(step(model, inputs, targets))}
    for index, kernel in enumerate(kernels):
        calls[index] = _kernel_call(kernel, args.copies)
    seconds = _interleaved(calls, args)
    kernels = [_kernel_record(kernel, seconds[index] / args.copies)
               for index, kernel in enumerate(kernels)]
    kernel_seconds = sum(k["seconds"] * k["count"] for k in kernels)
    return {
        **{name: seconds[name] for name in extra or {}},
        "group_inputs": group,
        "step_ms_per_input": 1e3 * seconds["step"] / group,
        "kernel_ms_per_input": 1e3 * kernel_seconds / group,
        "kernel_gflop_per_input": sum(k["flop"] * k["count"] for k in kernels) / group / 1e9,
        "kernels": kernels,
    }


def _inputs_per_image() -> dict:
    """Model inputs (gradients) per image of each timed method."""
    return {"smoothgrad": SETTINGS["noise_samples"], "integrated_gradients": SETTINGS["ig_steps"],
            "expected_gradients": SETTINGS["eg_samples"]}


def _kernels(hlo: str) -> list[dict]:
    """The distinct convolutions and dot products of a compiled program's text `hlo` (after
    XLA's dead-code elimination and rewrites), with how often each occurs."""
    shapes = {name: shape for name, shape, _ in _instructions(hlo)}
    found = collections.OrderedDict()
    for _name, shape, (opcode, operands, attributes) in _instructions(hlo):
        if opcode not in ("convolution", "dot"):
            continue
        lhs, rhs = (shapes[operand] for operand in re.findall(r"%([\w.-]+)", operands))
        signature = (opcode, lhs, rhs, attributes)
        if signature in found:
            found[signature]["count"] += 1
        else:
            found[signature] = {"opcode": opcode, "lhs": lhs, "rhs": rhs, "out": shape,
                                "attributes": attributes, "count": 1}
    parsed = sum(kernel["count"] for kernel in found.values())
    present = len(re.findall(r" (?:convolution|dot)\(", hlo))
    library_calls = re.findall(r'custom_call_target="([^"]*(?:conv|matmul|dot|gemm)[^"]*)"', hlo,
                               re.IGNORECASE)
    if parsed != present or library_calls:
        raise RuntimeError(f"{present} convolutions and dot products in the program, {parsed} "
                           f"read, library calls {library_calls}: not what this script expects")
    return list(found.values())


_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%([\w.-]+)\s*=\s*f32\[([\d,]*)\]\S*\s+([\w-]+)\((.*?)\)(.*)$"
)


def _instructions(hlo: str):
    """`(name, shape, (opcode, operands, attributes))` of every float32 array instruction."""
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, dims, opcode, operands, attributes = match.groups()
            shape = tuple(int(d) for d in dims.split(",") if d)
            yield name, shape, (opcode, operands, attributes.split(", metadata=")[0])


def _kernel_call(kernel: dict, copies: int) -> Callable:
    """A zero-argument call running one kernel `copies` times on independent operands in one
    program, so that the time to launch a program is shared."""
    one = _kernel_fn(kernel)
    if tuple(jax.eval_shape(one, jax.ShapeDtypeStruct(kernel["lhs"], jnp.float32),
                            jax.ShapeDtypeStruct(kernel["rhs"], jnp.float32)).shape) \
            != kernel["out"]:
        raise RuntimeError(f"could not rebuild {kernel['opcode']} {kernel['attributes']}")
    run = jit(lambda lhs, rhs: [one(a, b) for a, b in zip(lhs, rhs)])
    rng = np.random.default_rng(0)
    lhs, rhs = ([jnp.asarray(rng.standard_normal(kernel[side], np.float32))
                 for _ in range(copies)] for side in ("lhs", "rhs"))
    return lambda: jax.block_until_ready(run(lhs, rhs))


def _kernel_record(kernel: dict, seconds: float) -> dict:
    out_size = int(np.prod(kernel["out"]))
    if kernel["opcode"] == "dot":
        contracting = _dims(kernel["attributes"], "lhs_contracting_dims")
        flop = 2.0 * out_size * int(np.prod([kernel["lhs"][d] for d in contracting]))
    else:  # b01f_01io: the kernel is [kh, kw, in, out]
        flop = 2.0 * out_size * int(np.prod(kernel["rhs"][:-1]))
    if kernel["opcode"] == "dot":
        description = "dot, contracting " + ", ".join(
            f"{side} {list(_dims(kernel['attributes'], f'{side}_contracting_dims'))}"
            for side in ("lhs", "rhs"))
    else:
        window = re.search(r"window=\{([^}]*)\}", kernel["attributes"])
        description = f"convolution {window.group(1)}"
    return {
        "description": description,
        "lhs": "x".join(map(str, kernel["lhs"])), "rhs": "x".join(map(str, kernel["rhs"])),
        "count": kernel["count"], "seconds": seconds, "flop": flop,
    }


def _kernel_fn(kernel: dict) -> Callable:
    """The HLO `convolution` (layout `b01f_01io->b01f`) or `dot` as a lax call."""
    attributes = kernel["attributes"]
    if kernel["opcode"] == "dot":
        numbers = ((_dims(attributes, "lhs_contracting_dims"),
                    _dims(attributes, "rhs_contracting_dims")),
                   (_dims(attributes, "lhs_batch_dims"), _dims(attributes, "rhs_batch_dims")))
        return lambda a, b: lax.dot_general(a, b, numbers, precision=lax.Precision.HIGHEST)
    if "dim_labels=b01f_01io->b01f" not in attributes:
        raise RuntimeError(f"convolution of another layout: {attributes}")
    window = dict(item.split("=") for item in
                  re.search(r"window=\{([^}]*)\}", attributes).group(1).split())
    unknown = set(window) - {"size", "stride", "pad", "lhs_dilate", "rhs_dilate"}
    if unknown:
        raise RuntimeError(f"window fields this script does not rebuild: {sorted(unknown)}")
    spatial = len(kernel["rhs"]) - 2

    def pairs(field, default):
        if field not in window:
            return [default] * spatial
        return [tuple(int(v) for v in part.split("_")) if "_" in part else int(part)
                for part in window[field].split("x")]

    groups = re.search(r"feature_group_count=(\d+)", attributes)
    return lambda a, b: lax.conv_general_dilated(
        a, b, window_strides=pairs("stride", 1), padding=pairs("pad", (0, 0)),
        lhs_dilation=pairs("lhs_dilate", 1), rhs_dilation=pairs("rhs_dilate", 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=int(groups.group(1)) if groups else 1,
        precision=lax.Precision.HIGHEST,
    )


def _dims(attributes: str, field: str) -> tuple[int, ...]:
    match = re.search(field + r"=\{([\d,]*)\}", attributes)
    return tuple(int(d) for d in match.group(1).split(",") if d) if match else ()


def _gemm_gflops(args) -> float:
    a = jax.random.normal(jax.random.key(1), (GEMM_SIZE, GEMM_SIZE), jnp.float32)
    product = jit(lambda u, v: u @ v)
    seconds = _interleaved({"gemm": lambda: jax.block_until_ready(product(a, a))}, args)
    return 2 * GEMM_SIZE ** 3 / seconds["gemm"] / 1e9


def _interleaved(calls: dict, args) -> dict:
    """Seconds per call of each zero-argument call: after a first (compiling) call of each,
    `args.rounds` rounds that time every call in turn for at least `args.min_seconds`; the
    fastest round of each. Interleaving shares slow spells of the machine among the calls."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(args.rounds):
        for name, call in calls.items():
            elapsed, count, _ = time_calls(call, args.min_seconds)
            best[name] = min(best[name], elapsed / count)
    return best


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-sizes", type=int, nargs="*", default=[8, 20, 40, 100, 200],
                        help="inputs per gradient step for the sweep of step sizes")
    parser.add_argument("--copies", type=int, default=8,
                        help="calls of each kernel per timed program")
    parser.add_argument("--min-seconds", type=float, default=0.25)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--out-name", default="kernel_bound")
    return parser.parse_args(argv)


def _argv(argv):
    return ["benchmarks/kernel_bound.py"] + (sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
