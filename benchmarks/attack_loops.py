"""Attack loops: Barlow's feature attack and PGD, jfail against the same loops in PyTorch.

    python benchmarks/attack_loops.py --repeats 3

Both attacks differentiate the model once per step inside a loop (`jax.lax.fori_loop`): Barlow's
feature attack (appendix C: l2-normalised gradient ascent on one penultimate feature, projected
onto the l2 ball and [0, 1]) and PGD (l2, the attack of adversarial training and of
`robust_accuracy`). The model is Barlow's feature extractor, the small-stem ResNet-18 of width 16
(`configs/resnet18_fmnist_robust_l2.py`), with random weights (torch's initialization, BatchNorm
statistics randomized) copied from PyTorch into jfail; the images are Fashion-MNIST test images
(mnist5k if Fashion-MNIST is missing).

Three implementations of each loop are timed in one process, one after the other, on the same
images and weights:
- jfail: `jfail.barlow.feature_attack` and a jitted `jfail.train.pgd_attack`;
- jfail with JAX's own convolution gradients: the same calls with `cpu_friendly_gradients`
  switched off, i.e. the loop as XLA compiles JAX's derivatives (stride-1 input gradients keep
  a flipped `01oi` kernel in a loop body, which XLA:CPU runs as a generic loop);
- torch: the same loop written with `torch.autograd.grad`, `torch.set_num_threads(--torch-threads)`,
  parameters frozen (no weight gradients).

Throughput is images x steps per second, the median over `--repeats` whole attacks after a
first call (jfail's includes compilation and is reported apart). Feature attack: the paper's
settings rescaled to 28 x 28 x 1 (`attack_settings`) but `--feature-steps` steps (100 by
default, the paper has 500), batch 64 (`feature_attack`'s default), the most active feature of
each image. PGD: epsilon 1.0, `--pgd-steps` steps of 2.5 epsilon / steps, no random start, batch
128, labels the model's predictions. The attacked images of jfail and torch are compared (max
absolute difference): the two compute the same steps up to float32 rounding, which an attack of
many steps can amplify.

Writes `<out-dir>/attack_loops.json` and `.md` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from jfail import barlow
from jfail.models import model_fns, resnet_variables_from_torch
from jfail.testing.torch_reference import randomize_batchnorm, resnet_pair
from jfail.train import Attack, pgd_attack
from jfail.xla import cpu_gradients, jit

try:
    from benchmarks.attribution import check_logits, load_images
    from benchmarks.machine import (
        cpu_name,
        cpu_snapshot,
        other_cpu_share,
        provenance,
        write_results,
    )
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on the path
    from attribution import check_logits, load_images
    from machine import cpu_name, cpu_snapshot, other_cpu_share, provenance, write_results

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("jfail", "jfail_jax_rules", "torch")


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    images, _, dataset = load_images()
    torch_model, fns = _build_models(args.seed)
    logit_error = check_logits(torch_model, fns.logits, images[:64], "resnet18")
    load_before, start = list(os.getloadavg()), cpu_snapshot()
    loops = {
        "feature_attack": _feature_attack_calls(torch_model, fns, images[:args.feature_batch],
                                                args.feature_steps),
        "pgd": _pgd_calls(torch_model, fns, images[:args.pgd_batch], args.pgd_steps),
    }
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/attack_loops.py", *_argv(argv)]),
        "dataset": dataset,
        "model": "resnet18(10, stem='small', width=16), random weights copied from torch",
        "logit_agreement": logit_error,
        "repeats": args.repeats,
        "loops": {},
    }
    for name, (batch, steps, calls) in loops.items():
        print(f"{name}: batch {batch}, {steps} steps", file=sys.stderr)
        results["loops"][name] = _time_loop(calls, batch * steps, args.repeats)
        results["loops"][name].update(batch=batch, steps=steps)
    results["environment"] = _environment(args.torch_threads, load_before)
    results["environment"]["other_processes_cpu_share"] = other_cpu_share(
        start, cpu_snapshot(), os.cpu_count())
    report = format_markdown(results)
    write_results(args.out_dir, "attack_loops", results, report)
    print(report)
    return results


def format_markdown(results: dict) -> str:
    """The throughput table, the agreement with torch, the settings and the command."""
    env = results["environment"]
    lines = [
        "# Attack loops: jfail vs. PyTorch",
        "",
        f"{results['model']}; {results['dataset']} test images; {env['device']}, "
        f"{env['cpu_count']} CPUs, torch threads {env['torch_threads']}; jax {env['jax']}, "
        f"torch {env['torch']}. Logits agree to {results['logit_agreement']:.1e} (max |difference|"
        f" / max |logit|). Throughput: images x steps per second, median of "
        f"{results['repeats']} whole attacks after a first call. Load average before the run "
        f"{', '.join(f'{v:.2f}' for v in env['load_average_1_5_15_min'])}; other processes used "
        f"{_share(env['other_processes_cpu_share'])} of the machine's CPU time.",
        "",
        "| loop | batch x steps | jfail | jfail, JAX's own convolution gradients | torch "
        "| jfail / torch | jfail / JAX's own | jfail first call (s) "
        "| max abs. difference to torch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, loop in results["loops"].items():
        rate = {key: loop[key]["image_steps_per_second"] for key in IMPLEMENTATIONS}
        lines.append(
            f"| {name} | {loop['batch']} x {loop['steps']} | {rate['jfail']:.0f} "
            f"| {rate['jfail_jax_rules']:.0f} | {rate['torch']:.0f} "
            f"| **{rate['jfail'] / rate['torch']:.2f}x** "
            f"| {rate['jfail'] / rate['jfail_jax_rules']:.2f}x "
            f"| {loop['jfail']['first_call_seconds']:.2f} | {loop['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines + provenance(results["date"], results["command"]))


# --------------------------------------------------------------------------------------------
# Models and loops.


def _build_models(seed: int):
    """The torch ResNet-18 (eval mode, frozen) and jfail's `model_fns` with the same weights."""
    torch.manual_seed(seed)
    module, torch_model = resnet_pair("resnet18", "small", 16, 1, num_classes=10)
    randomize_batchnorm(torch_model, seed)
    torch_model.eval()
    for parameter in torch_model.parameters():
        parameter.requires_grad_(False)
    return torch_model, model_fns(module, resnet_variables_from_torch(torch_model.state_dict(),
                                                                       module))


def _feature_attack_calls(torch_model, fns, images: np.ndarray, steps: int):
    settings = barlow.attack_settings(images.shape[1:])
    index = np.asarray(barlow.features(fns.features, images)).argmax(axis=1).astype(np.int32)

    def jfail_call():
        return barlow.feature_attack(fns.features, images, index, epsilon=settings.epsilon,
                                     step_size=settings.step_size, steps=steps, progress=False)

    x, rows = _nchw(images), torch.arange(len(images))

    def torch_call():
        current = x.clone()
        for _ in range(steps):
            current.requires_grad_(True)
            value = torch_model.features(current)[rows, torch.from_numpy(index).long()].sum()
            (gradient,) = torch.autograd.grad(value, current)
            with torch.no_grad():
                norm = gradient.flatten(1).norm(dim=1)
                direction = gradient / _per_image(torch.where(norm > 0, norm, 1.0))
                delta = current + settings.step_size * direction - x
                length = delta.flatten(1).norm(dim=1)
                shrink = torch.clamp(settings.epsilon / torch.where(length > 0, length, 1.0),
                                     max=1.0)
                current = torch.clamp(x + delta * _per_image(shrink), 0.0, 1.0)
        return current.detach()

    return len(images), steps, (jfail_call, torch_call)


def _pgd_calls(torch_model, fns, images: np.ndarray, steps: int):
    attack = Attack(norm="l2", epsilon=1.0, steps=steps, random_start=False)
    labels = np.asarray(fns.logits(images)).argmax(axis=1)
    x_jax, y_jax, key = jnp.asarray(images), jnp.asarray(labels), jax.random.key(0)

    def jfail_call():  # made anew per call: the JAX-rules variant must trace again
        program = _pgd_program(attack)
        return np.asarray(program(fns.logits, x_jax, y_jax, key))

    x, y = _nchw(images), torch.from_numpy(labels).long()

    def torch_call():
        delta = torch.zeros_like(x)
        for _ in range(steps):
            adversarial = (x + delta).requires_grad_(True)
            loss = F.cross_entropy(torch_model(adversarial), y, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, adversarial)
            with torch.no_grad():
                delta = delta + attack.alpha * gradient / _per_image(_l2(gradient) + 1e-12)
                delta = delta * _per_image(torch.clamp(attack.epsilon / (_l2(delta) + 1e-12),
                                                       max=1.0))
                delta = torch.clamp(x + delta, 0.0, 1.0) - x
        return (x + delta).detach()

    return len(images), steps, (jfail_call, torch_call)


_PGD_PROGRAMS: dict = {}


def _pgd_program(attack: Attack) -> Callable:
    """One jitted PGD program per attack and per gradient-rule setting (compiled once each)."""
    rules = cpu_gradients.on_cpu()
    if (attack, rules) not in _PGD_PROGRAMS:
        _PGD_PROGRAMS[attack, rules] = jit(
            lambda model, x, y, key: pgd_attack(model, x, y, attack, key=key))
    return _PGD_PROGRAMS[attack, rules]


def _time_loop(calls, image_steps: int, repeats: int) -> dict:
    """Each implementation: a first call, then `repeats` timed calls; the outputs compared."""
    jfail_call, torch_call = calls
    record, outputs = {}, {}
    for name in IMPLEMENTATIONS:
        call = torch_call if name == "torch" else jfail_call
        with _jax_rules(name == "jfail_jax_rules"):
            start = time.perf_counter()
            outputs[name] = _numpy_nhwc(call())
            first = time.perf_counter() - start
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                _numpy_nhwc(call())
                seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        record[name] = {"image_steps_per_second": image_steps / median,
                        "seconds_per_repeat": seconds, "first_call_seconds": first}
        print(f"  {name}: {image_steps / median:.0f} image-steps/s", file=sys.stderr)
    record["max_abs_difference"] = float(np.abs(outputs["jfail"] - outputs["torch"]).max())
    record["max_abs_difference_jax_rules"] = float(
        np.abs(outputs["jfail_jax_rules"] - outputs["torch"]).max())
    return record


class _jax_rules:
    """Within the block (if `on`), `cpu_friendly_gradients` returns models unchanged."""

    def __init__(self, on: bool):
        self.on, self.saved = on, cpu_gradients.on_cpu

    def __enter__(self):
        if self.on:
            cpu_gradients.on_cpu = lambda platform=None: False
            jax.clear_caches()  # jfail's jitted kernels must trace again without the rules

    def __exit__(self, *exc):
        if self.on:
            cpu_gradients.on_cpu = self.saved
            jax.clear_caches()


# --------------------------------------------------------------------------------------------
# Helpers.


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _numpy_nhwc(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.numpy().transpose(0, 2, 3, 1)
    return np.asarray(images)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def _l2(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).norm(dim=1)


def _share(value) -> str:
    return "unknown" if value is None else f"{100 * value:.1f} %"


def _environment(torch_threads: int, load_before: list[float]) -> dict:
    return {
        "device": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads,
        "load_average_1_5_15_min": load_before,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feature-steps", type=int, default=100)
    parser.add_argument("--feature-batch", type=int, default=64)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--pgd-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    for name in ("feature_steps", "feature_batch", "pgd_steps", "pgd_batch", "repeats",
                 "torch_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _argv(argv: list[str] | None) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)


if __name__ == "__main__":
    main()
