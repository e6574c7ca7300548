"""Training throughput of the Defuse CNN: jfail (JAX/Flax/optax) against the same model in PyTorch.

    python benchmarks/train_throughput.py --batch-size 64 --steps 200 --repeats 3

What is measured: images per second of training steps of seed 001's Fashion-MNIST classifier
(four 4x4/2 convolutions, two dense layers of 256, a linear classifier; Adadelta with lr 1.0,
rho 0.9, eps 1e-6; softmax cross-entropy; batch 64 by default), on the CPU, in one process:

- jfail: `DefuseCNN`, `make_optimizer(TrainConfig(optimizer='adadelta', ...))` and the jitted
  step of `make_train_step`, fed as `jfail.train.fit` feeds it: each host batch is placed with
  `DataParallel.shard_batch` and the step's metrics are fetched to the host after every step.
- torch: the identical `torch.nn` model (NCHW) with `torch.optim.Adadelta` and
  `F.cross_entropy`; `loss.item()` after every step; `torch.set_num_threads(--torch-threads)`.

Both start from the same weights (jfail's initialization, copied into torch) and see the same
batches of real Fashion-MNIST training images (mnist5k if Fashion-MNIST is not available), in a
fixed shuffled order, pre-arranged in each framework's layout (NHWC numpy arrays for jfail, NCHW
tensors for torch) so that data loading is not timed. Each repeat runs `--warmup` untimed steps and
then `--steps` timed steps for each framework in turn; the reported throughput is the median over
`--repeats`. Tracing, lowering and XLA compilation of jfail's step are timed separately
(`compile_seconds`), as is each framework's first step (`first_step_seconds`); neither is part
of the timed steps. The mean loss of the last timed steps is
recorded for each framework as a check that both train the same model the same way (their
first losses agree to about 1e-6). XLA uses all cores for jfail; other processes on the machine
distort both numbers (torch's multithreaded kernels suffer most), so the 1/5/15-minute load
average before the run is recorded too: run it on an otherwise idle machine.

Writes `<out-dir>/train_throughput.json` and `<out-dir>/train_throughput.md` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from jfail.data import Dataset, DatasetNotFoundError, load
from jfail.models import DefuseCNN, init_classifier, linen_apply
from jfail.testing.torch_reference import TorchDefuseCNN, load_flax_variables
from jfail.train import DataParallel, TrainConfig, TrainState, make_optimizer, make_train_step

try:
    from benchmarks.machine import cpu_name, provenance
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on the path
    from machine import cpu_name, provenance

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
MAX_DISTINCT_BATCHES = 256  # batches are cycled through after this many (bounds memory)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write the JSON and Markdown results and print the table."""
    args = _parse_args(argv)
    command = shlex.join(["python", "benchmarks/train_throughput.py", *_argv(argv)])
    torch.set_num_threads(args.torch_threads)
    data, dataset_name = load_training_data()
    config = TrainConfig(
        optimizer="adadelta", learning_rate=1.0, batch_size=args.batch_size, seed=args.seed
    )
    environment = _environment(args.torch_threads)  # the load average before the run
    batches = fixed_batches(data, args.batch_size, args.warmup + args.steps, seed=args.seed)
    jfail_bench = JfailBench(data.images.shape[1:], len(data.class_names), config, batches)
    torch_bench = TorchBench(jfail_bench.initial_params, data.images.shape[1:], config, batches)

    runs = {"jfail": [], "torch": []}
    for _ in range(args.repeats):
        for name, bench in (("jfail", jfail_bench), ("torch", torch_bench)):
            bench.run(args.warmup)
            seconds, losses = bench.run(args.steps)
            runs[name].append({"seconds": seconds, "mean_loss": float(np.mean(losses[-20:]))})

    results = {
        "benchmark": "Defuse CNN training throughput, jfail vs. PyTorch",
        "dataset": dataset_name,
        "image_shape": list(data.images.shape[1:]),
        "optimizer": "adadelta(lr=1.0, rho=0.9, eps=1e-6)",
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        **{name: _summary(records, args.batch_size, args.steps) for name, records in runs.items()},
        "environment": environment,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    results["jfail"]["compile_seconds"] = jfail_bench.compile_seconds
    results["jfail"]["first_step_seconds"] = jfail_bench.first_step_seconds
    results["torch"]["first_step_seconds"] = torch_bench.first_step_seconds
    results["ratio_jfail_over_torch"] = (
        results["jfail"]["images_per_second"] / results["torch"]["images_per_second"]
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_markdown(results)
    (out_dir / "train_throughput.md").write_text(table)
    print(table)
    return results


def load_training_data() -> tuple[Dataset, str]:
    """Fashion-MNIST's training split, or mnist5k's if Fashion-MNIST is not installed."""
    try:
        return load("fashion_mnist", "train"), "fashion_mnist"
    except DatasetNotFoundError as error:
        print(f"Fashion-MNIST not found ({error}); using mnist5k", file=sys.stderr)
        return load("mnist5k", "train"), "mnist5k"


def fixed_batches(data: Dataset, batch_size: int, num_steps: int, seed: int) -> list[tuple]:
    """At most MAX_DISTINCT_BATCHES full batches `(images [B, H, W, C], labels [B])`, shuffled."""
    order = np.random.default_rng(seed).permutation(len(data.labels))
    count = min(num_steps, MAX_DISTINCT_BATCHES, len(order) // batch_size)
    if count == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {len(order)} training images")
    return [
        (data.images[rows], data.labels[rows])
        for rows in order[: count * batch_size].reshape(count, batch_size)
    ]


class JfailBench:
    """jfail's trainer step on `DefuseCNN`; `run(n)` -> (seconds, losses) of `n` steps."""

    def __init__(self, image_shape, num_classes: int, config: TrainConfig, batches: list[tuple]):
        module = DefuseCNN(num_classes=num_classes)
        params, state = init_classifier(module, image_shape, jax.random.key(config.seed))
        self.initial_params = jax.device_get(params)
        tx = make_optimizer(config, steps_per_epoch=len(batches))
        self.parallel = DataParallel()
        self.step = make_train_step(linen_apply(module), tx)
        self.train_state = self.parallel.replicate(
            TrainState(params, state, tx.init(params), jnp.zeros((), jnp.int32))
        )
        self.batches = batches
        self.position = 0
        self.compile_seconds = self._compile()
        started = time.perf_counter()
        self.run(1)
        self.first_step_seconds = time.perf_counter() - started

    def run(self, num_steps: int) -> tuple[float, list[float]]:
        losses = []
        started = time.perf_counter()
        for _ in range(num_steps):
            images, labels = self.batches[self.position % len(self.batches)]
            self.position += 1
            (x, y, weight), _ = self.parallel.shard_batch(images, labels, with_weight=True)
            self.train_state, metrics = self.step(self.train_state, x, y, weight)
            losses.append(float(jax.device_get(metrics)["loss"]))
        jax.block_until_ready(self.train_state)
        return time.perf_counter() - started, losses

    def _compile(self) -> float:
        """Seconds to trace, lower and compile the step; the jitted step reuses the executable."""
        images, labels = self.batches[0]
        inputs, _ = self.parallel.shard_batch(images, labels, with_weight=True)
        started = time.perf_counter()
        self.step.lower(self.train_state, *inputs).compile()
        return time.perf_counter() - started


class TorchBench:
    """The same model in PyTorch, from jfail's initial `params`; `run(n)` as in `JfailBench`."""

    def __init__(self, params, image_shape, config: TrainConfig, batches: list[tuple]):
        height, width, channels = image_shape
        num_classes = params["classifier"]["bias"].shape[0]
        self.model = TorchDefuseCNN(channels, (height, width), num_classes=num_classes)
        load_flax_variables(self.model, {"params": params})
        self.model.train()
        self.optimizer = torch.optim.Adadelta(
            self.model.parameters(), lr=config.learning_rate, rho=0.9, eps=1e-6
        )
        self.batches = [
            (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
             torch.from_numpy(labels.astype(np.int64)))
            for images, labels in batches
        ]
        self.position = 0
        started = time.perf_counter()
        self.run(1)  # as jfail's first step, so both see the same batches from here on
        self.first_step_seconds = time.perf_counter() - started

    def run(self, num_steps: int) -> tuple[float, list[float]]:
        losses = []
        started = time.perf_counter()
        for _ in range(num_steps):
            x, y = self.batches[self.position % len(self.batches)]
            self.position += 1
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        return time.perf_counter() - started, losses


def format_markdown(results: dict) -> str:
    """A small Markdown report: the throughput table, the settings and the command."""
    env = results["environment"]
    lines = [
        "# Defuse CNN training throughput",
        "",
        f"{results['dataset']} {tuple(results['image_shape'])}, batch {results['batch_size']}, "
        f"{results['optimizer']}; {results['steps']} timed steps after {results['warmup_steps']} "
        f"warm-up steps, median of {results['repeats']} repeats; {env['device']}, "
        f"{env['cpu_count']} CPUs, torch threads {env['torch_threads']}.",
        "",
        "| implementation | images/s (median) | per repeat | final loss | compile (s) "
        "| first step (s) |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, version in (("jfail", env["jax"]), ("torch", env["torch"])):
        row = results[name]
        per_repeat = ", ".join(f"{value:.0f}" for value in row["images_per_second_per_repeat"])
        compile_seconds = row.get("compile_seconds")
        lines.append(
            f"| {name} ({'jax ' if name == 'jfail' else ''}{version}) "
            f"| {row['images_per_second']:.0f} | {per_repeat} | {row['final_mean_loss']:.4f} "
            f"| {'-' if compile_seconds is None else f'{compile_seconds:.2f}'} "
            f"| {row['first_step_seconds']:.3f} |"
        )
    lines += [
        "",
        f"jfail / torch: **{results['ratio_jfail_over_torch']:.2f}x**",
    ]
    return "\n".join(lines + provenance(results["date"], results["command"]))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before each repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "torch_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be non-negative")
    return args


def _argv(argv: list[str] | None) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)


def _summary(records: list[dict], batch_size: int, steps: int) -> dict:
    rates = [batch_size * steps / record["seconds"] for record in records]
    return {
        "images_per_second": statistics.median(rates),
        "images_per_second_per_repeat": rates,
        "seconds_per_repeat": [record["seconds"] for record in records],
        "final_mean_loss": records[-1]["mean_loss"],
    }


def _environment(torch_threads: int) -> dict:
    return {
        "device": cpu_name(),
        "jax_devices": [str(device) for device in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": list(os.getloadavg()),
        "torch_threads": torch_threads,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


if __name__ == "__main__":
    main()
