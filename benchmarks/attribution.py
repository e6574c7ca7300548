"""Attribution throughput: every method of `jfail.attribution` against Captum, on the same models.

    python benchmarks/attribution.py
    python benchmarks/attribution.py --quick                      # smoke run, tiny sizes
    python benchmarks/attribution.py --models defuse_cnn --methods gradient,lime --repeats 5
    python benchmarks/attribution.py --torch-device cuda --out-name attribution_h200   # on a GPU

What is measured: images per second of one attribution call (a whole batch, attributions for
every image of it) for each method in `jfail.attribution.METHODS` and, where Captum has the
method, of the Captum counterpart, in one process, for two classifiers. torch and Captum run on
`--torch-device` (`cpu` by default, or `cuda`); jfail runs on JAX's default device (the GPU where
jaxlib has CUDA), and the report names both:

- `defuse_cnn`: `jfail.models.DefuseCNN` (seed 001's Fashion-MNIST classifier, four 4x4/2
  convolutions, two dense layers of 256, a linear classifier);
- `resnet18`: `jfail.models.resnet18(10, stem="small", width=16)` (BatchNorm in inference mode).

and, on request (`--models tiny_cnn --out-name attribution_tiny`), `tiny_cnn`: one 3x3
convolution of 8 channels, a ReLU and a linear classifier, a plain JAX function of its weights
(`jax.tree_util.Partial`). Its calls take well under a millisecond of arithmetic, so what it
measures is each framework's fixed cost per call (checks, dispatches, transfers, Python), the
regime small models and batches are in on an accelerator.

Both frameworks run the same model with the same weights: each model is built in PyTorch
(`torch.nn` with one `nn.ReLU` module per use and a functional flatten, so that Captum's
GuidedBackprop, Deconvolution and LRP can hook it), its weights (random, untrained: PyTorch's
initialization, BatchNorm statistics and affine parameters randomized) are copied into the
jfail model (`resnet_variables_from_torch` for the ResNet), and the logits of both on 64 test
images must agree to 1e-4 (max |difference| / max |logit|) or the benchmark aborts. Inputs are
real Fashion-MNIST test images (mnist5k if Fashion-MNIST is not installed), the same batch for both
frameworks (NHWC for jfail, NCHW for torch), and the targets are the model's predicted classes.
Gradient and propagation methods get `--batch-size` images (32), the sampling methods (SmoothGrad,
SmoothGrad squared, VarGrad, Integrated and Expected Gradients, LIME, KernelSHAP)
`--sampling-batch-size` images (4): the first images of the same shuffled selection.

Hyperparameters are the paper's defaults, the same on both sides:

- gradient: Captum `Saliency(abs=False)`; input_x_gradient: `InputXGradient`.
- integrated_gradients: 128 Gauss-Legendre steps (`--ig-steps`) from the per-image minimum
  baseline; Captum `IntegratedGradients(method="gausslegendre")` with that baseline as a tensor,
  all steps in one batch (`internal_batch_size=None`, as jfail evaluates all steps at once).
- smoothgrad / smoothgrad_squared / vargrad: 50 noisy samples (`--noise-samples`), noise std
  0.15 x the image's range; Captum `NoiseTunnel(Saliency(abs=False))` with nt_type `smoothgrad`,
  `smoothgrad_sq`, `vargrad`, all samples in one batch (`nt_samples_batch_size` = nt_samples).
  Captum takes one std per input tensor, not per image, so it gets 0.15 x the batch's range
  (the report says whether that equals every image's range). Captum's `smoothgrad_sq` is the
  mean of squared gradients, jfail's `smoothgrad_squared` the square of the mean (the paper's
  definition); the work is the same.
- expected_gradients: the first 200 training images as baselines, 200 samples per image
  (`--eg-samples`); Captum `GradientShap(stdevs=0)` with the same baselines and
  `n_samples` = 200.
- lime: SLIC superpixels `segments(x, 50)` computed once (untimed) and given to both as the
  feature mask, 1000 perturbations (`--surrogate-samples`), 100 per model call
  (`--perturbations-per-eval`: jfail's `sample_batch_size`, Captum's `perturbations_per_eval`),
  hidden segments painted with their mean value (jfail's default fill, passed to Captum as
  `baselines`), a ridge fit with alpha 1 (Captum: `SkLearnRidge(alpha=1.0)`), jfail's kernel
  `exp(-d^2 / (2 * 0.25^2))` on the cosine distance of the keep-mask to the all-kept mask
  (Captum: the same function as `similarity_func`). Captum fits one example at a time.
- kernel_shap: the same feature mask, 1000 coalitions, 100 per model call, hidden segments
  painted with the image's mean (jfail's default, Captum's `baselines`); Captum `KernelShap`.
- guided_backprop: `GuidedBackprop`; deconvnet: `Deconvolution`; lrp_epsilon: `LRP` with
  `EpsilonRule(epsilon=1e-7)` on every Conv2d, Linear and BatchNorm2d (jfail's default epsilon).
  Captum's LRP has no rule for residual additions; on the ResNet it is attempted and reported
  as "n/a" if it raises.
- lrp_z, lrp_alpha_beta, lrp_sequential_preset_flat, deep_taylor, pattern_net,
  pattern_attribution: no Captum counterpart, timed for jfail only. PatternNet's patterns are
  fitted once per model (`fit_patterns` on `--pattern-images` training images, timed and
  reported separately, compilation included) before any timing.

Timing, per model and method: jfail's first call (tracing, XLA compilation and the call, reported
as `compile+first call`) and Captum's first (warm-up) call are made and timed separately; then
each of `--repeats` repeats times jfail, then Captum, each running back-to-back calls until
`--min-repeat-seconds` have passed (at least one call); a jfail call ends with
`jax.block_until_ready` on its output, and with `--torch-device cuda` a Captum call ends with
`torch.cuda.synchronize()` (and one precedes its first call). Throughput is batch size x
calls / seconds, the median over repeats; jfail/Captum is the ratio of the medians. jfail's calls
include its input checks (one host sync) and its eager pre-processing (LIME's fill image);
segmentation is outside both. XLA uses all cores; torch uses `--torch-threads` (all cores by
default). For deterministic methods the
last outputs of both are compared (max |difference| / max |Captum|) as a check that both compute
the same thing. On a GPU both sides compute in full float32: TF32 is switched off in torch
(cuBLAS and cuDNN) and JAX's default matmul and convolution precision is set to `highest`, since
TF32 alone would break the 1e-4 logit check and the two would not compute the same thing.
The 1/5/15-minute load average before and after the run and each model, and the
1-minute load before each method, are recorded, and so is the share of the machine's CPU time
that other processes took while each method was timed (/proc/stat's busy time less this
process's own CPU time; the load average cannot tell the benchmark's own threads from others):
other processes distort both sides (torch's multithreaded kernels most), so run it on an
otherwise idle machine; the report flags a run where they took over 10 %.

jfail's programs are compiled with `jfail.xla.OPTIONS` (XLA:CPU's YNNPACK fusions off; on a GPU,
convolutions recorded into command buffers; see `jfail.xla`), and the report lists those in
effect. On CPU, jfail differentiates the Defuse CNN's 4x4/2 convolutions through
space-to-depth (`jfail.xla.cpu_gradients`), the ResNet's 3x3/2 and 1x1/2 ones phase by
phase and its stride-1 ones with the transposed kernel laid out as HWIO (`phased_conv`). Every
model's first convolution (one input channel) runs as patches times a matrix, its value and its
input gradient (`few_channel_conv`), and the Defuse CNN's last one (one output position) as a
single matrix product (`one_window_conv`), in the gradient and the propagation methods.

The targets: at least Captum's speed for every method, and at least 2x for SmoothGrad,
VarGrad, Integrated Gradients and Expected Gradients; the report marks every miss.

Writes `<out-dir>/<out-name>.json` and `<out-dir>/<out-name>.md` (`--out-name`, `attribution` by
default), rewrites them after every method (marked partial until the run ends, so that an
interrupted run leaves what it measured), and prints the Markdown at the end.
"""

from __future__ import annotations

import os

LOAD_BEFORE = list(os.getloadavg())  # before the heavy imports below, and before any work

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import captum
import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch

# Captum exports its Ridge surrogate and LRP rules from private modules only
from captum._utils.models.linear_model import SkLearnRidge  # noqa: PLC2701
from captum.attr import (
    LRP,
    Deconvolution,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    Lime,
    NoiseTunnel,
    Saliency,
)
from captum.attr._utils.lrp_rules import EpsilonRule  # noqa: PLC2701
from torch import nn

try:
    from benchmarks.machine import (
        cpu_name,
        cpu_snapshot,
        other_cpu_share,
        provenance,
        time_calls,
    )
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on the path
    from machine import cpu_name, cpu_snapshot, other_cpu_share, provenance, time_calls

from jfail import xla as jfail_xla
from jfail.attribution import METHODS, fit_patterns, method_kwargs, segments
from jfail.data import DatasetNotFoundError, load
from jfail.models import DefuseCNN, logits_fn, resnet_variables_from_torch
from jfail.testing.torch_reference import (
    TorchDefuseCNN,
    randomize_batchnorm,
    resnet_pair,
    torch_to_flax,
)

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
MODEL_NAMES = ("defuse_cnn", "resnet18", "tiny_cnn")
DEFAULT_MODELS = ("defuse_cnn", "resnet18")
SAMPLING_METHODS = ("smoothgrad", "smoothgrad_squared", "vargrad", "integrated_gradients",
                    "expected_gradients", "lime", "kernel_shap")
NOISE_METHODS = {"smoothgrad": "smoothgrad", "smoothgrad_squared": "smoothgrad_sq",
                 "vargrad": "vargrad"}
DETERMINISTIC = ("gradient", "input_x_gradient", "integrated_gradients", "guided_backprop",
                 "deconvnet", "lrp_epsilon")
TWICE_AS_FAST = ("smoothgrad", "vargrad", "integrated_gradients", "expected_gradients")
CAPTUM_NAMES = {
    "gradient": "Saliency(abs=False)",
    "input_x_gradient": "InputXGradient",
    "integrated_gradients": "IntegratedGradients",
    "smoothgrad": "NoiseTunnel(Saliency, smoothgrad)",
    "smoothgrad_squared": "NoiseTunnel(Saliency, smoothgrad_sq)",
    "vargrad": "NoiseTunnel(Saliency, vargrad)",
    "expected_gradients": "GradientShap",
    "lime": "Lime",
    "kernel_shap": "KernelShap",
    "guided_backprop": "GuidedBackprop",
    "deconvnet": "Deconvolution",
    "lrp_epsilon": "LRP(EpsilonRule)",
}
NOISE_SCALE = 0.15
LIME_KERNEL_WIDTH = 0.25
LRP_EPSILON = 1e-7
NUM_SEGMENTS = 50
NUM_BASELINES = 200
LOGIT_RTOL = 1e-4
OTHER_LOAD_LIMIT = 0.10  # share of the machine's CPU time other processes may take unflagged
QUICK = {  # --quick: tiny sizes, one repeat
    "batch_size": 4, "sampling_batch_size": 2, "repeats": 1, "min_repeat_seconds": 0.0,
    "noise_samples": 4, "ig_steps": 8, "eg_samples": 8, "surrogate_samples": 64,
    "perturbations_per_eval": 16, "pattern_images": 64,
}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write the JSON and Markdown results and print the table."""
    load_before = LOAD_BEFORE if argv is None else list(os.getloadavg())
    run_start = cpu_snapshot()
    args = _parse_args(argv)
    command = shlex.join(["python", "benchmarks/attribution.py", *_argv(argv)])
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.torch_device)
    float32 = _full_float32(device)
    warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
    warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")
    warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require")
    environment = _environment(args.torch_threads, load_before, device)
    if float32:
        environment["float32_precision"] = float32
    test, train, dataset_name = load_images()
    order = np.random.default_rng(args.seed).permutation(len(test))
    largest = max(args.batch_size, args.sampling_batch_size)
    images = np.ascontiguousarray(test[order[:max(largest, 64)]])
    baselines = np.ascontiguousarray(train[:NUM_BASELINES])
    pattern_images = np.ascontiguousarray(train[:args.pattern_images])

    results = {
        "benchmark": "attribution throughput, jfail vs. Captum",
        "dataset": dataset_name,
        "image_shape": list(images.shape[1:]),
        "weights": "random (untrained): torch initialization, BatchNorm randomized",
        "settings": {name: getattr(args, name) for name in (
            "batch_size", "sampling_batch_size", "repeats", "min_repeat_seconds", "noise_samples",
            "ig_steps", "eg_samples", "surrogate_samples", "perturbations_per_eval",
            "pattern_images", "torch_threads", "seed", "quick")},
        "models": {},
        "environment": environment,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(partial: bool) -> str:
        report = format_markdown({**results, "partial": True} if partial else results)
        (out_dir / f"{args.out_name}.json").write_text(
            json.dumps({**results, "partial": True} if partial else results, indent=2) + "\n"
        )
        (out_dir / f"{args.out_name}.md").write_text(report)
        return report

    for model_name in args.models:
        print(f"== {model_name}", file=sys.stderr)
        record: dict = {}
        results["models"][model_name] = record
        bench_model(model_name, args, images, baselines, pattern_images, device, record,
                    on_method=lambda: write(partial=True))
    results["environment"]["load_average_after_1_5_15_min"] = list(os.getloadavg())
    results["environment"]["other_processes_cpu_share"] = other_cpu_share(
        run_start, cpu_snapshot(), os.cpu_count())
    report = write(partial=False)
    print(report)
    return results


def load_images() -> tuple[np.ndarray, np.ndarray, str]:
    """Test and training images `[N, H, W, C]` of Fashion-MNIST, or of mnist5k if it is missing."""
    try:
        return load("fashion_mnist", "test").images, load("fashion_mnist", "train").images, \
            "fashion_mnist"
    except DatasetNotFoundError as error:
        print(f"Fashion-MNIST not found ({error}); using mnist5k", file=sys.stderr)
        return load("mnist5k", "test").images, load("mnist5k", "train").images, "mnist5k"


# --------------------------------------------------------------------------------------------
# One model: build both, check the logits, then every method.


def bench_model(model_name, args, images, baselines, pattern_images, device, record=None,
                on_method=None) -> dict:
    """Benchmark every method on one model; fills and returns `record`, calling `on_method()`
    after each method."""
    record = {} if record is None else record
    torch_model, jfail_model = build_models(model_name, images.shape[1:], seed=args.seed)
    torch_model.to(device)
    logit_error = check_logits(torch_model, jfail_model, images[:64], model_name)
    record.update({"logit_max_relative_error": logit_error, "methods": {},
                   "load_average_before_1_5_15_min": list(os.getloadavg())})

    patterns = None
    if any(name.startswith("pattern_") for name in args.methods):
        started = time.perf_counter()
        patterns = jax.block_until_ready(
            fit_patterns(jfail_model, pattern_images, batch_size=256, progress=False)
        )
        record["fit_patterns_seconds"] = time.perf_counter() - started
        record["fit_patterns_images"] = len(pattern_images)

    inputs = {}
    for batch in sorted({args.batch_size, args.sampling_batch_size}):
        x = images[:batch]
        target = np.asarray(jnp.argmax(jfail_model(jnp.asarray(x)), axis=-1), np.int32)
        inputs[batch] = BatchInputs(x, target, device)
    sampling = inputs[args.sampling_batch_size]
    if any(name in ("lime", "kernel_shap") for name in args.methods):
        started = time.perf_counter()
        sampling.segments = segments(sampling.x, NUM_SEGMENTS)
        record["segmentation_seconds"] = time.perf_counter() - started
        record["segments_per_image"] = [int(s.max()) + 1 for s in sampling.segments]
    ranges = sampling.x.reshape(len(sampling.x), -1)
    ranges = ranges.max(axis=1) - ranges.min(axis=1)
    record["noise_ranges"] = {"per_image_min": float(ranges.min()),
                              "per_image_max": float(ranges.max()),
                              "batch": float(sampling.x.max() - sampling.x.min())}

    for name in args.methods:
        batch = inputs[args.sampling_batch_size if name in SAMPLING_METHODS else args.batch_size]
        print(f"   {model_name} {name} (batch {len(batch.x)})", file=sys.stderr, flush=True)
        jfail_call = make_jfail_call(name, jfail_model, batch, args, baselines, patterns)
        captum_call, captum_note = make_captum_call(name, torch_model, batch, args, baselines,
                                                    model_name)
        load_1min, method_start = os.getloadavg()[0], cpu_snapshot()
        record["methods"][name] = bench_method(name, jfail_call, captum_call, captum_note,
                                               len(batch.x), args, device)
        record["methods"][name]["load_average_1min_before"] = load_1min
        record["methods"][name]["other_processes_cpu_share"] = other_cpu_share(
            method_start, cpu_snapshot(), os.cpu_count())
        if on_method is not None:
            on_method()
    record["load_average_after_1_5_15_min"] = list(os.getloadavg())
    return record


class BatchInputs:
    """One batch in both layouts: `x` NHWC numpy, `x_jax`, `x_torch` NCHW, targets."""

    def __init__(self, x: np.ndarray, target: np.ndarray, device=None):
        self.x = x
        self.target = target
        self.x_jax = jax.device_put(jnp.asarray(x))
        self.target_jax = jax.device_put(jnp.asarray(target))
        device = torch.device("cpu") if device is None else device
        self.x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
        self.target_torch = torch.from_numpy(target.astype(np.int64)).to(device)
        self.segments: np.ndarray | None = None


def bench_method(name, jfail_call, captum_call, captum_note, batch_size, args,
                 device=None) -> dict:
    """First calls, then `--repeats` interleaved timed repeats; see the module docstring."""
    started = time.perf_counter()
    jfail_out = jax.block_until_ready(jfail_call())
    jfail_first = time.perf_counter() - started
    captum_first = None
    if captum_call is not None and device is not None and device.type == "cuda":
        captum_call = _synchronized(captum_call, device)
    if captum_call is not None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            captum_out = captum_call()
            captum_first = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - e.g. Captum LRP on a residual network
            captum_call = None
            captum_note = f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
            print(f"      Captum failed: {captum_note}", file=sys.stderr)
    runs: dict[str, list] = {"jfail": [], "captum": []}
    for _ in range(args.repeats):
        seconds, calls, jfail_out = time_calls(
            lambda: jax.block_until_ready(jfail_call()), args.min_repeat_seconds
        )
        runs["jfail"].append((seconds, calls))
        if captum_call is not None:
            seconds, calls, captum_out = time_calls(captum_call, args.min_repeat_seconds)
            runs["captum"].append((seconds, calls))
    record = {
        "batch_size": batch_size,
        "jfail": {**_summary(runs["jfail"], batch_size), "first_call_seconds": jfail_first},
        "captum": None,
        "captum_method": CAPTUM_NAMES.get(name),
        "captum_note": captum_note,
    }
    if captum_call is not None:
        record["captum"] = {**_summary(runs["captum"], batch_size),
                            "first_call_seconds": captum_first}
        record["ratio_jfail_over_captum"] = (
            record["jfail"]["images_per_second"] / record["captum"]["images_per_second"]
        )
        if name in DETERMINISTIC:
            want = captum_out.detach().cpu().numpy().transpose(0, 2, 3, 1)
            got = np.asarray(jfail_out)
            record["max_relative_difference"] = float(
                np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30)
            )
    target = 2.0 if name in TWICE_AS_FAST else 1.0
    record["target_ratio"] = target
    if record.get("ratio_jfail_over_captum") is not None:
        record["target_met"] = record["ratio_jfail_over_captum"] >= target
    jfail_ips = record["jfail"]["images_per_second"]
    captum_ips = record["captum"]["images_per_second"] if record["captum"] else None
    print(f"      jfail {jfail_ips:.1f} img/s (first call {jfail_first:.2f} s)"
          + ("" if captum_ips is None else f", Captum {captum_ips:.1f} img/s"),
          file=sys.stderr, flush=True)
    return record


def _synchronized(call: Callable, device) -> Callable:
    """`call`, then `torch.cuda.synchronize` before returning its output."""

    def synchronized():
        out = call()
        torch.cuda.synchronize(device)
        return out

    return synchronized


# --------------------------------------------------------------------------------------------
# The calls.


def make_jfail_call(name, model, batch: BatchInputs, args, baselines, patterns) -> Callable:
    kwargs = method_kwargs(name, train_images=baselines, patterns=patterns,
                           key=jax.random.key(args.seed), num_baselines=NUM_BASELINES)
    if name in NOISE_METHODS:
        kwargs.update(num_samples=args.noise_samples, noise_scale=NOISE_SCALE)
    elif name == "integrated_gradients":
        kwargs.update(steps=args.ig_steps, method="gausslegendre")
    elif name == "expected_gradients":
        kwargs.update(num_samples=args.eg_samples)
        kwargs["baselines"] = jax.device_put(jnp.asarray(kwargs["baselines"]))
    elif name in ("lime", "kernel_shap"):
        kwargs.update(num_samples=args.surrogate_samples, segments=batch.segments,
                      num_segments=NUM_SEGMENTS, sample_batch_size=args.perturbations_per_eval)
    elif name == "lrp_epsilon":
        kwargs.update(epsilon=LRP_EPSILON)
    method = METHODS[name]
    return lambda: method(model, batch.x_jax, batch.target_jax, **kwargs)


def make_captum_call(name, model, batch: BatchInputs, args, baselines, model_name):
    """`(call, note)`: a zero-argument Captum call, or `(None, why not)`."""
    x, target = batch.x_torch, batch.target_torch
    if name == "gradient":
        saliency = Saliency(model)
        return (lambda: saliency.attribute(x, target=target, abs=False)), None
    if name == "input_x_gradient":
        ixg = InputXGradient(model)
        return (lambda: ixg.attribute(x, target=target)), None
    if name == "integrated_gradients":
        ig = IntegratedGradients(model)
        minimum = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x).contiguous()
        return (lambda: ig.attribute(x, baselines=minimum, target=target, n_steps=args.ig_steps,
                                     method="gausslegendre", internal_batch_size=None)), None
    if name in NOISE_METHODS:
        tunnel = NoiseTunnel(Saliency(model))
        stdev = NOISE_SCALE * float(x.max() - x.min())
        return (lambda: tunnel.attribute(
            x, nt_type=NOISE_METHODS[name], nt_samples=args.noise_samples,
            nt_samples_batch_size=args.noise_samples, stdevs=stdev, target=target, abs=False,
        )), f"stdevs = {NOISE_SCALE} x batch range"
    if name == "expected_gradients":
        shap = GradientShap(model)
        references = torch.from_numpy(np.ascontiguousarray(baselines.transpose(0, 3, 1, 2)))
        references = references.to(x.device)
        return (lambda: shap.attribute(x, baselines=references, n_samples=args.eg_samples,
                                       stdevs=0.0, target=target)), None
    if name in ("lime", "kernel_shap"):
        mask = torch.from_numpy(batch.segments.astype(np.int64))[:, None]  # [B, 1, H, W]
        mask = mask.to(x.device)
        fill = _segment_mean_fill(batch.x, batch.segments, per_segment=name == "lime")
        fill = torch.from_numpy(np.ascontiguousarray(fill.transpose(0, 3, 1, 2))).to(x.device)
        if name == "lime":
            explainer = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0),
                             similarity_func=_mask_cosine_kernel(LIME_KERNEL_WIDTH))
        else:
            explainer = KernelShap(model)
        return (lambda: explainer.attribute(
            x, baselines=fill, target=target, feature_mask=mask,
            n_samples=args.surrogate_samples, perturbations_per_eval=args.perturbations_per_eval,
        )), None
    if name == "guided_backprop":
        guided = GuidedBackprop(model)
        return (lambda: guided.attribute(x, target=target)), None
    if name == "deconvnet":
        deconv = Deconvolution(model)
        return (lambda: deconv.attribute(x, target=target)), None
    if name == "lrp_epsilon":
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                layer.rule = EpsilonRule(epsilon=LRP_EPSILON)
        lrp = LRP(model)
        note = "residual additions have no LRP rule in Captum" if model_name == "resnet18" else None
        return (lambda: lrp.attribute(x, target=target)), note
    return None, "no Captum counterpart"


def _segment_mean_fill(x: np.ndarray, labels: np.ndarray, per_segment: bool) -> np.ndarray:
    """jfail's default fill: each segment's mean (LIME) or the image's mean (KernelSHAP)."""
    if not per_segment:
        return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape).astype(np.float32)
    fill = np.empty_like(x)
    for i, (image, label) in enumerate(zip(x, labels)):
        for segment in np.unique(label):
            where = label == segment
            fill[i][where] = image[where].mean(axis=0)
    return fill


def _mask_cosine_kernel(kernel_width: float) -> Callable:
    """jfail's LIME weight: `exp(-d^2 / (2 w^2))`, d the cosine distance of the keep-mask to the
    all-kept mask (`1 - sqrt(kept / segments)`), as a Captum `similarity_func`."""

    def similarity(original_input, perturbed_input, interpretable_input, **kwargs):
        kept = float(interpretable_input.sum())
        total = float(kwargs["num_interp_features"])
        distance = 1.0 - (math.sqrt(kept / total) if kept > 0 else 0.0)
        return math.exp(-(distance**2) / (2 * kernel_width**2))

    return similarity


# --------------------------------------------------------------------------------------------
# Models: torch, with weights copied into jfail.


class TorchTinyCNN(nn.Module):
    """A 3x3 convolution of 8 channels (padding 1), a ReLU and a linear classifier."""

    def __init__(self, in_channels: int, image_size, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(8 * image_size[0] * image_size[1], num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.relu(self.conv(x)), 1))

    def jax_model(self) -> jax.tree_util.Partial:
        """The same function in JAX on NHWC images, its weights a traced pytree."""
        params = {"kernel": jnp.asarray(_numpy(self.conv.weight).transpose(2, 3, 1, 0)),
                  "bias": jnp.asarray(_numpy(self.conv.bias)),
                  "dense": jnp.asarray(_numpy(self.classifier.weight).T),
                  "dense_bias": jnp.asarray(_numpy(self.classifier.bias))}
        return jax.tree_util.Partial(_tiny_cnn_logits, params)


def _tiny_cnn_logits(params, x):
    h = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + params["bias"])
    h = h.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch flattens C, H, W
    return h @ params["dense"] + params["dense_bias"]


def build_models(model_name: str, image_shape, seed: int):
    """`(torch_model, jfail_model)`: a torch model (random weights, eval mode, frozen) and the
    jfail `model(x) -> logits` callable holding the same weights."""
    height, width, channels = image_shape
    torch.manual_seed(seed)
    if model_name == "defuse_cnn":
        torch_model = TorchDefuseCNN(channels, (height, width), num_classes=10)
        module = DefuseCNN(num_classes=10)
        variables = jax.tree_util.tree_map(jnp.asarray, torch_to_flax(torch_model))
    elif model_name == "resnet18":
        module, torch_model = resnet_pair("resnet18", "small", 16, channels, num_classes=10)
        randomize_batchnorm(torch_model, seed)
        variables = resnet_variables_from_torch(torch_model.state_dict(), module)
    elif model_name == "tiny_cnn":
        torch_model = TorchTinyCNN(channels, (height, width), num_classes=10)
    else:
        raise ValueError(f"unknown model {model_name!r}; choose from {MODEL_NAMES}")
    torch_model.eval()
    for parameter in torch_model.parameters():
        parameter.requires_grad_(False)  # attributions differentiate w.r.t. the input only
    if model_name == "tiny_cnn":
        return torch_model, torch_model.jax_model()
    return torch_model, logits_fn(module, variables)


def check_logits(torch_model, jfail_model, x: np.ndarray, model_name: str) -> float:
    """Max |jfail - torch| / max |torch| of the logits on `x`; exits if it exceeds 1e-4."""
    device = next(torch_model.parameters()).device
    with torch.no_grad():
        want = torch_model(
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
        ).cpu().numpy()
    got = np.asarray(jax.jit(lambda model, images: model(images))(jfail_model, jnp.asarray(x)))
    error = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    if not error <= LOGIT_RTOL:
        raise SystemExit(
            f"{model_name}: jfail and torch logits differ by {error:.2e} (relative to the largest "
            f"logit), more than {LOGIT_RTOL:g}; the weight copy is wrong, aborting."
        )
    print(f"   {model_name}: logits agree to {error:.1e}", file=sys.stderr)
    return error


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Report.


def format_markdown(results: dict) -> str:
    env, settings = results["environment"], results["settings"]
    load_before = ", ".join(f"{v:.2f}" for v in env["load_average_1_5_15_min"])
    load_after = ", ".join(f"{v:.2f}" for v in env.get("load_average_after_1_5_15_min", []))
    lines = [
        "# Attribution throughput: jfail vs. Captum",
        "",
        *(["**Partial results**: the run had not finished when this was written.", ""]
          if results.get("partial") else []),
        f"{results['dataset']} test images {tuple(results['image_shape'])}, {results['weights']}; "
        f"targets are the predicted classes. Batch {settings['batch_size']} for gradient and "
        f"propagation methods, {settings['sampling_batch_size']} for the sampling methods "
        f"({', '.join(SAMPLING_METHODS)}). Images/s is the median over {settings['repeats']} "
        f"repeats of at least {settings['min_repeat_seconds']:g} s each after a first "
        f"(compile / warm-up) call; {env['device']}, {env['cpu_count']} CPUs, torch threads "
        f"{env['torch_threads']}." + _devices_sentence(env) + _options_sentence(env),
        "",
        f"Hyperparameters: SmoothGrad/SmoothGrad²/VarGrad {settings['noise_samples']} samples, "
        f"noise {NOISE_SCALE} x range; Integrated Gradients {settings['ig_steps']} Gauss-Legendre "
        f"steps from the per-image minimum; Expected Gradients {settings['eg_samples']} samples "
        f"over {NUM_BASELINES} training baselines; LIME and KernelSHAP "
        f"{settings['surrogate_samples']} samples over SLIC segments (about {NUM_SEGMENTS}), "
        f"{settings['perturbations_per_eval']} "
        f"per model call; LRP-ε ε = {LRP_EPSILON:g}.",
        "",
        f"Load average (1, 5, 15 min): {load_before} before the run, {load_after} after.",
        "",
    ]
    shares = [row["other_processes_cpu_share"] for record in results["models"].values()
              for row in record["methods"].values()
              if row.get("other_processes_cpu_share") is not None]
    if shares:
        lines += [
            f"Other processes (and the hypervisor) used {100 * max(shares):.1f} % of the "
            f"machine's CPU time at most while a method was timed ({100 * min(shares):.1f} % at "
            "least; from /proc/stat less this process's own CPU time; the load average counts "
            "the benchmark's own threads too).",
            "",
        ]
    if shares and max(shares) > OTHER_LOAD_LIMIT:
        lines += [
            f"**The machine was not idle** (other processes took up to {100 * max(shares):.0f} % "
            "of its CPU time while a method was timed): they distort both sides, torch's "
            "multithreaded kernels most (its threads wait for each other when one is "
            "descheduled); compare with `--torch-threads 1` before reading much into the ratios.",
            "",
        ]
    misses = []
    for model_name, record in results["models"].items():
        lines += [
            f"## {model_name}",
            "",
            f"Logits of jfail and torch agree to {record['logit_max_relative_error']:.1e} "
            "(max |difference| / max |logit|)." + _model_load(record),
            "",
            "| method | batch | jfail img/s | Captum img/s | jfail / Captum | target | "
            "jfail compile+first call (s) | Captum first call (s) | max rel. difference |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for name, row in record["methods"].items():
            jfail, captum = row["jfail"], row["captum"]
            if captum is None:
                captum_ips, ratio, target = row["captum_note"] or "n/a", "-", "-"
                captum_first = "-"
            else:
                captum_ips = f"{captum['images_per_second']:.1f}"
                met = row["target_met"]
                ratio = f"**{_ratio(row['ratio_jfail_over_captum'], row['target_ratio'])}x**"
                target = f"≥{row['target_ratio']:g}x: {'met' if met else 'MISSED'}"
                captum_first = f"{captum['first_call_seconds']:.2f}"
                if not met:
                    misses.append(
                        f"- {model_name} {name}: jfail {jfail['images_per_second']:.1f} img/s, "
                        f"Captum {captum['images_per_second']:.1f} img/s, "
                        f"{_ratio(row['ratio_jfail_over_captum'], row['target_ratio'])}x against "
                        f"≥{row['target_ratio']:g}x."
                    )
            difference = row.get("max_relative_difference")
            lines.append(
                f"| {name} | {row['batch_size']} | {jfail['images_per_second']:.1f} "
                f"| {captum_ips} | {ratio} | {target} | {jfail['first_call_seconds']:.2f} "
                f"| {captum_first} | {'-' if difference is None else f'{difference:.1e}'} |"
            )
        notes = []
        if "fit_patterns_seconds" in record:
            notes.append(f"`fit_patterns` on {record['fit_patterns_images']} training images "
                         f"(once, compilation included, not in the table): "
                         f"{record['fit_patterns_seconds']:.2f} s.")
        if "segmentation_seconds" in record:
            notes.append(f"SLIC segmentation of the LIME/KernelSHAP batch (once, shared, not "
                         f"timed): {record['segmentation_seconds']:.2f} s, "
                         f"{record['segments_per_image']} segments.")
        ranges = record["noise_ranges"]
        same = math.isclose(ranges["per_image_min"], ranges["batch"]) and math.isclose(
            ranges["per_image_max"], ranges["batch"])
        notes.append(
            "Captum's NoiseTunnel noise uses the batch's range "
            f"({ranges['batch']:.3f}); the per-image ranges jfail uses are "
            f"{ranges['per_image_min']:.3f}-{ranges['per_image_max']:.3f}"
            + (", the same for every image." if same else ", so Captum's noise differs slightly.")
        )
        for name, row in record["methods"].items():
            if row["captum"] is not None and row.get("captum_note") and name == "lrp_epsilon":
                notes.append(f"Captum LRP: {row['captum_note']} (it runs, but its relevance is "
                             "not the conserving LRP jfail computes at the additions).")
        lines += [""] + [f"- {note}" for note in notes] + [""]
    lines += ["## Target (≥1x Captum everywhere, ≥2x for smoothgrad, vargrad, "
              "integrated_gradients, expected_gradients)", ""]
    lines += misses or ["Met for every method with a Captum counterpart."]
    lines += [
        "",
        "Columns: jfail compile+first call is tracing, XLA compilation and one call; max rel. "
        "difference compares the last outputs of deterministic methods (max |jfail - Captum| / "
        "max |Captum|).",
        "",
        f"Versions: python {env['python']}, jax {env['jax']} (jaxlib {env['jaxlib']}), flax "
        f"{env['flax']}, torch {env['torch']}, captum {env['captum']}, numpy {env['numpy']}; "
        f"{env['platform']}.",
    ]
    return "\n".join(lines + provenance(results["date"], results["command"]))


# --------------------------------------------------------------------------------------------
# Arguments and environment.


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help=f"any of {', '.join(MODEL_NAMES)} (space or comma separated)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="attribution methods (space or comma separated); default: all")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per call for gradient and propagation methods (32)")
    parser.add_argument("--sampling-batch-size", type=int, default=None,
                        help=f"images per call for {', '.join(SAMPLING_METHODS)} (4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (3)")
    parser.add_argument("--min-repeat-seconds", type=float, default=None,
                        help="each repeat calls the method until this much time passed (0.5)")
    parser.add_argument("--noise-samples", type=int, default=None, help="SmoothGrad family (50)")
    parser.add_argument("--ig-steps", type=int, default=None, help="Integrated Gradients (128)")
    parser.add_argument("--eg-samples", type=int, default=None, help="Expected Gradients (200)")
    parser.add_argument("--surrogate-samples", type=int, default=None,
                        help="LIME and KernelSHAP perturbations (1000)")
    parser.add_argument("--perturbations-per-eval", type=int, default=None,
                        help="LIME/KernelSHAP perturbations per model call (100)")
    parser.add_argument("--pattern-images", type=int, default=None,
                        help="training images for fit_patterns (1000)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--torch-device", default="cpu",
                        help="device of the torch models and Captum: cpu or cuda[:N] (cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one repeat, for a smoke run (explicit options win)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--out-name", default="attribution",
                        help="file name (no suffix) of the .json and .md results (attribution)")
    args = parser.parse_args(argv)
    defaults = {"batch_size": 32, "sampling_batch_size": 4, "repeats": 3,
                "min_repeat_seconds": 0.5, "noise_samples": 50, "ig_steps": 128,
                "eg_samples": 200, "surrogate_samples": 1000, "perturbations_per_eval": 100,
                "pattern_images": 1000}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    args.models = _split(args.models)
    args.methods = _split(args.methods)
    for model in args.models:
        if model not in MODEL_NAMES:
            parser.error(f"unknown model {model!r}; choose from {', '.join(MODEL_NAMES)}")
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    for name in ("batch_size", "sampling_batch_size", "repeats", "noise_samples", "ig_steps",
                 "eg_samples", "surrogate_samples", "perturbations_per_eval", "pattern_images",
                 "torch_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_repeat_seconds < 0:
        parser.error("--min-repeat-seconds must be non-negative")
    try:
        device = torch.device(args.torch_device)
    except RuntimeError:
        parser.error(f"unknown --torch-device {args.torch_device!r}; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--torch-device must be cpu or cuda, got {args.torch_device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--torch-device cuda: torch sees no CUDA device")
    if not args.out_name or Path(args.out_name).name != args.out_name:
        parser.error("--out-name must be a plain file name")
    return args


def _model_load(record: dict) -> str:
    """The load average while one model ran: 1/5/15 min at its start and end, 1-min range."""
    if "load_average_before_1_5_15_min" not in record or not record["methods"]:
        return ""
    loads = [row["load_average_1min_before"] for row in record["methods"].values()]
    before = ", ".join(f"{v:.2f}" for v in record["load_average_before_1_5_15_min"])
    if "load_average_after_1_5_15_min" not in record:
        return (f" Load average (1, 5, 15 min) {before} at the start of this model; 1-minute load "
                f"before each method {min(loads):.2f}-{max(loads):.2f} (in the JSON).")
    after = ", ".join(f"{v:.2f}" for v in record["load_average_after_1_5_15_min"])
    return (f" Load average (1, 5, 15 min) {before} at the start of this model, {after} at its "
            f"end; 1-minute load before each method {min(loads):.2f}-{max(loads):.2f} "
            f"(in the JSON).")


def _ratio(ratio: float, target: float) -> str:
    """Two decimals, or three where two would round a miss up to the target."""
    text = f"{ratio:.2f}"
    return f"{ratio:.3f}" if ratio < target and float(text) >= target else text


def _split(values: list[str]) -> list[str]:
    out = []
    for value in values:
        out += [part for part in value.split(",") if part and part not in out]
    return out


def _argv(argv: list[str] | None) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)


def _summary(runs: list[tuple[float, int]], batch_size: int) -> dict:
    rates = [batch_size * calls / seconds for seconds, calls in runs]
    return {
        "images_per_second": statistics.median(rates),
        "images_per_second_per_repeat": rates,
        "seconds_per_call_per_repeat": [seconds / calls for seconds, calls in runs],
        "calls_per_repeat": [calls for _, calls in runs],
    }


def _environment(torch_threads: int, load_before: list[float], torch_device=None) -> dict:
    torch_device = torch.device("cpu") if torch_device is None else torch_device
    env = {
        "device": cpu_name(),
        "jax_devices": [str(device) for device in jax.devices()],
        "jax_backend": jax.default_backend(),
        "torch_device": str(torch_device),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": load_before,
        "torch_threads": torch_threads,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "flax": flax.__version__,
        "torch": torch.__version__,
        "captum": captum.__version__,
        "numpy": np.__version__,
        "scikit-image": importlib.metadata.version("scikit-image"),
        "scikit-learn": importlib.metadata.version("scikit-learn"),
        "platform": platform.platform(),
        "jfail_xla_options": _backend_options(jax.default_backend()),
    }
    if torch_device.type == "cuda":
        env["torch_gpu"] = torch.cuda.get_device_name(torch_device)
    return env


def _full_float32(device) -> str | None:
    """On a GPU, full float32 in both frameworks (no TF32); returns what was set, or None."""
    settings = []
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        settings.append("torch: TF32 off (cuBLAS and cuDNN)")
    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")
        settings.append("jax: default matmul/conv precision 'highest'")
    return "; ".join(settings) or None


def _devices_sentence(env: dict) -> str:
    """Where torch and jax ran, when either is not the CPU (empty on the CPU)."""
    torch_device = env.get("torch_device", "cpu")
    jax_backend = env.get("jax_backend", "cpu")
    if torch_device == "cpu" and jax_backend == "cpu":
        return ""
    torch_where = torch_device + (f" ({env['torch_gpu']})" if env.get("torch_gpu") else "")
    sentence = (f" torch and Captum ran on {torch_where}, jfail on JAX's {jax_backend} backend "
                f"({', '.join(env.get('jax_devices', []))})")
    if env.get("float32_precision"):
        sentence += f"; full float32 on both sides ({env['float32_precision']})"
    return sentence + "."


def _backend_options(backend: str) -> dict:
    """The per-program XLA options jfail compiles with that act on `backend` ("cpu", "gpu")."""
    options = jfail_xla.compiler_options() or {}
    return {name: value for name, value in options.items() if name.startswith(f"xla_{backend}_")}


def _options_sentence(env: dict) -> str:
    options = env.get("jfail_xla_options")
    if not options:
        return ""
    listed = ", ".join(f"{name}={value!r}" for name, value in options.items())
    return f" jfail's programs were compiled with {listed}."


if __name__ == "__main__":
    main()
