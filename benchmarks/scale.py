"""Barlow's feature stage at scale: memory, the engine's own cost, and resuming after a kill.

    python benchmarks/scale.py                 # 2,500 / 10,000 / 40,000 images
    python benchmarks/scale.py --quick         # a smoke run: 200 / 400 / 800 images

The data: an ImageNet-shaped image folder (JPEGs of 224x224x3 in 100 class folders) made once
from this machine's offline images by `benchmarks/image_folder.py` (random crops, flips and
colour jitter of scikit-image's bundled images, Fashion-MNIST and scikit-learn's digits) and
cached in `--data-dir`. Each size below is a stratified subset of it
(`imagefolder:<dir>@224[:P%]`, `jfail.data.open_source`).

What is measured:

1. Memory. For each of `--sizes`, a fresh process runs `jfail.barlow.features_to_store` (the
   engine, `jfail.engine.map_dataset`, with its default 8 reading threads and 2 batches read
   ahead) of a small ResNet-18 (`jfail.models.resnet18(width=8)`, random weights, 224x224
   input, features [B, 64]) over the subset into a new store, and reports its peak resident
   memory: `getrusage(RUSAGE_SELF).ru_maxrss`, and the largest `VmRSS` of /proc/self/status
   sampled every 50 ms by a thread. The target: the largest peak within 10 % of the smallest,
   whatever the number of images.
2. Resuming. The same run over `--resume-size` images (the middle size) once without a stop,
   and once killed (SIGKILL) as soon as half of its chunks are marked done and then started
   again over the same folder. Times are wall clock from starting each process to its exit
   (the restart pays again for Python, JAX and compilation). Targets: killed + restarted at
   most 1.1x the uninterrupted run, and the two stores' features equal element for element.
3. The engine's own cost, with ResNet-50 at 224 (`jfail.models.resnet50`, random weights,
   features [B, 2048]) on `--resnet-images` images in batches of `--resnet-batch`:
   - in memory: the images decoded beforehand into one array, the jitted model applied batch
     after batch (a first batch compiles it, untimed);
   - streaming: `map_dataset` of the same model over the same files (reading, JPEG decoding,
     the model, writing the zarr store), `--workers` reading threads, after a one-batch
     `map_dataset` run that compiles it;
   - decoding alone: the same files read and decoded by the source on `--workers` threads.
   The target: streaming at least 85 % of the in-memory images/s. On a machine whose cores
   are all busy with the model, decoding cannot run beside it for free: the report says what
   share of the gap the decoding time alone accounts for.
4. For reference (no target on a CPU): PyTorch's `DataLoader` with `--workers` worker
   processes, decoding the same files the same way (Pillow, float32 in [0, 1]), feeding a
   PyTorch ResNet-50 (torchvision's `resnet50()` when torchvision imports in
   `--torch-python`, else the same architecture from `jfail.testing.torch_reference`), in its
   own process.

Other processes on the machine change every number here: the load average before and after,
and the share of the machine's CPU time that other processes took during the run, are
recorded. Writes `--out` (JSON, default `benchmarks/results/scale.json`) and the Markdown
beside it.
"""

from __future__ import annotations

import os

LOAD_BEFORE = list(os.getloadavg())  # before the heavy imports below

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import math
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks import image_folder
    from benchmarks.machine import (
        cpu_name,
        cpu_snapshot,
        other_cpu_share,
        provenance,
        write_results,
    )
except ModuleNotFoundError:  # run as `python benchmarks/scale.py`: this folder is on the path
    import image_folder
    from machine import (
        cpu_name,
        cpu_snapshot,
        other_cpu_share,
        provenance,
        write_results,
    )

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "scale.json"
DEFAULT_SIZES = (2_500, 10_000, 40_000)
QUICK_SIZES = (200, 400, 800)
MEMORY_TOLERANCE = 0.10
RESUME_TARGET = 1.10
ENGINE_TARGET = 0.85
SMALL_WIDTH = 8
SAMPLE_SECONDS = 0.05
CALL_STARTED = "call-started"


def main(argv: list[str] | None = None) -> dict:
    load_before = LOAD_BEFORE if argv is None else list(os.getloadavg())
    args = _parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/scale.py", *given])
    if args.child:
        return _child(args)
    started = cpu_snapshot()
    sizes = sorted(args.sizes)
    folder_size = max(args.folder_images, max(sizes), args.resnet_images)
    data_dir = args.data_dir or image_folder.default_folder(folder_size, args.seed)
    _say(f"image folder: {data_dir} ({folder_size} images)")
    t0 = time.perf_counter()
    manifest = image_folder.make_image_folder(data_dir, folder_size, seed=args.seed,
                                               workers=args.workers)
    folder = {"path_default": args.data_dir is None, "images": manifest["count"],
              "classes": manifest["classes"], "image_size": manifest["image_size"],
              "bytes": manifest["bytes"], "bases": manifest["bases"],
              "seconds_this_run": time.perf_counter() - t0}
    work = Path(tempfile.mkdtemp(prefix="jfail-scale-", dir=args.work_dir))
    try:
        resume_size = args.resume_size or sizes[len(sizes) // 2]
        order = [n for n in sizes if n != resume_size] + [resume_size]  # uninterrupted run last
        memory = {}
        for n in order:
            memory[n] = _run_features(args, data_dir, folder_size, n, work / f"features-{n}")
            _say(f"memory {n}: peak {memory[n]['peak_rss_bytes'] / 2**20:.0f} MiB, "
                 f"{memory[n]['wall_seconds']:.1f} s")
        resume = _resume(args, data_dir, folder_size, resume_size, work, memory.get(resume_size))
        resnet = _resnet_section(args, data_dir, folder_size, work)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    rows = [memory[n] for n in sizes]
    peaks = [row["peak_rss_bytes"] for row in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    ended = cpu_snapshot()
    results = {
        "benchmark": "Barlow's feature stage at scale (jfail.barlow.features_to_store, "
                     "jfail.engine.map_dataset)",
        "folder": folder,
        "settings": {"sizes": sizes, "default_sizes": list(DEFAULT_SIZES), "quick": args.quick,
                     "batch_size": args.batch_size, "resume_size": resume_size,
                     "resnet_images": args.resnet_images, "resnet_batch": args.resnet_batch,
                     "workers": args.workers, "seed": args.seed,
                     "small_model": f"jfail.models.resnet18(width={SMALL_WIDTH}), features [B, "
                                    f"{8 * SMALL_WIDTH}]"},
        "memory": {"rows": rows, "spread": spread, "tolerance": MEMORY_TOLERANCE,
                   "met": spread <= MEMORY_TOLERANCE},
        "resume": resume,
        "resnet50": resnet,
        "environment": {
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": importlib.metadata.version("jax"),
            "jaxlib": importlib.metadata.version("jaxlib"),
            "flax": importlib.metadata.version("flax"),
            "tensorstore": importlib.metadata.version("tensorstore"),
            "grain": importlib.metadata.version("grain"),
            "numpy": np.__version__, "platform": platform.platform(),
            "load_average_1_5_15_min": load_before,
            "load_average_after_1_5_15_min": list(os.getloadavg()),
            "other_processes_cpu_share": other_cpu_share(started, ended, os.cpu_count() or 1),
            "wall_seconds": ended["wall"] - started["wall"],
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    markdown = format_markdown(results)
    out = Path(args.out)
    write_results(out.parent, out.stem, results, markdown)
    print(markdown)
    return results


# --------------------------------------------------------------------------------------------
# Memory and resuming: each run a fresh process (`--child features`).


def _subset_name(data_dir: str, folder_size: int, n: int) -> str:
    percent = 100 * n / folder_size
    return f"imagefolder:{data_dir}@{image_folder.IMAGE_SIZE}[:{percent:.10g}%]"


def _child_command(args, *extra) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *extra,
            "--seed", str(args.seed), "--workers", str(args.workers)]


def _run_features(args, data_dir, folder_size, n, out_dir, kill_at_half: bool = False) -> dict:
    """Runs one features_to_store process; with kill_at_half, SIGKILLs it once half of the
    chunks are done. Returns the child's report plus wall_seconds (start to exit)."""
    command = _child_command(args, "features", "--source", _subset_name(data_dir, folder_size, n),
                             "--store", str(out_dir), "--batch-size", str(args.batch_size))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(command, stdout=stdout, env=_child_env())
        killed_at = None
        if kill_at_half:
            while process.poll() is None:
                done, total = _chunks_done(out_dir)
                if total and done >= math.ceil(total / 2):
                    process.send_signal(signal.SIGKILL)
                    killed_at = {"chunks_done": done, "chunks": total}
                    break
                time.sleep(0.1)
        killed_time = time.time()
        code = process.wait()
        wall = time.perf_counter() - started
        stdout.seek(0)
        lines = stdout.read().strip().splitlines()
    if killed_at is not None:
        call_started = [float(line.split()[1]) for line in lines
                        if line.startswith(CALL_STARTED)]
        return {"wall_seconds": wall, "killed": True, **killed_at,
                "seconds_in_call": killed_time - call_started[0] if call_started else None,
                "load_average_1min_before": load}
    if code != 0 or not lines:
        raise RuntimeError(f"{shlex.join(command)} failed with exit status {code}.")
    return {**json.loads(lines[-1]), "wall_seconds": wall, "load_average_1min_before": load}


def _chunks_done(out_dir) -> tuple[int, int]:
    try:
        with open(Path(out_dir) / "engine.json") as handle:
            total = json.load(handle)["num_chunks"]
        return len([name for name in os.listdir(Path(out_dir) / "done")
                    if name.endswith(".json")]), total
    except (OSError, ValueError, KeyError):
        return 0, 0


def _resume(args, data_dir, folder_size, n, work, uninterrupted) -> dict:
    store = work / f"resumed-{n}"
    first = _run_features(args, data_dir, folder_size, n, store, kill_at_half=True)
    if not first.get("killed"):
        raise RuntimeError(f"the run over {n} images ended before half of it was done; give "
                           "a larger --resume-size.")
    _say(f"killed after {first['wall_seconds']:.1f} s at {first['chunks_done']} of "
         f"{first['chunks']} chunks")
    second = _run_features(args, data_dir, folder_size, n, store)
    _say(f"restarted run: {second['wall_seconds']:.1f} s")
    from jfail.engine import open_outputs

    a = np.asarray(open_outputs(work / f"features-{n}")["features"])
    b = np.asarray(open_outputs(store)["features"])
    total = first["wall_seconds"] + second["wall_seconds"]
    in_call = first["seconds_in_call"] + second["seconds_in_call"]
    ratio = in_call / uninterrupted["seconds_in_call"]
    return {
        "images": n, "uninterrupted_seconds": uninterrupted["wall_seconds"],
        "uninterrupted_seconds_in_call": uninterrupted["seconds_in_call"],
        "killed_run": first, "restarted_run": {key: second[key] for key in (
            "wall_seconds", "seconds_in_call", "peak_rss_bytes", "load_average_1min_before")},
        "killed_plus_restarted_seconds": total,
        "killed_plus_restarted_seconds_in_call": in_call,
        "ratio": ratio, "process_ratio": total / uninterrupted["wall_seconds"],
        "target": RESUME_TARGET, "met": ratio <= RESUME_TARGET, "features_shape": list(a.shape),
        "outputs_identical": bool(a.shape == b.shape and np.array_equal(a, b)),
    }


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _RssSampler:
    """The largest VmRSS of this process, read from /proc/self/status every SAMPLE_SECONDS."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_bytes("VmRSS"))
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("VmRSS"))
        return self.peak


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _small_feature_fn(seed: int):
    import jax
    import jax.numpy as jnp

    from jfail.models import resnet18

    model = resnet18(num_classes=10, stem="imagenet", width=SMALL_WIDTH)
    size = image_folder.IMAGE_SIZE
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return lambda images: model.apply(variables, images, output="features")


def _child_features(args) -> dict:
    import resource

    sampler = _RssSampler()
    from jfail.barlow import features_to_store

    feature_fn = _small_feature_fn(args.seed)
    rss_ready = _status_bytes("VmRSS")
    print(CALL_STARTED, time.time(), flush=True)  # lets the parent time a killed call
    started = time.perf_counter()
    outputs = features_to_store(feature_fn, args.source, args.store, batch_size=args.batch_size,
                                progress=False)
    seconds = time.perf_counter() - started
    sampled = sampler.stop()
    return {"images": outputs.num_examples, "source": args.source,
            "features_shape": list(outputs["features"].shape),
            "seconds_in_call": seconds, "images_per_second": outputs.num_examples / seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_vmrss_sampled_bytes": sampled, "vmhwm_bytes": _status_bytes("VmHWM"),
            "rss_before_call_bytes": rss_ready}


# --------------------------------------------------------------------------------------------
# ResNet-50: in memory, streaming, decoding alone, and PyTorch's DataLoader.


def _resnet_section(args, data_dir, folder_size, work) -> dict:
    import jax
    import jax.numpy as jnp

    from jfail.data import open_source
    from jfail.engine import map_dataset
    from jfail.models import resnet50

    n, batch = args.resnet_images, args.resnet_batch
    if n % batch:
        raise ValueError(f"--resnet-images ({n}) must be a multiple of --resnet-batch ({batch}).")
    source = open_source(_subset_name(data_dir, folder_size, n), "train")
    warm_source = open_source(_subset_name(data_dir, folder_size, batch), "train")
    if len(source) != n or len(warm_source) != batch:
        raise RuntimeError(f"the subsets hold {len(source)} and {len(warm_source)} images, not "
                           f"{n} and {batch}.")
    size = image_folder.IMAGE_SIZE
    model = resnet50()
    variables = model.init(jax.random.key(args.seed), jnp.zeros((1, size, size, 3)))

    def feature_fn(images):
        return model.apply(variables, images, output="features")

    record: dict = {"images": n, "batch_size": batch, "workers": args.workers,
                    "model": "jfail.models.resnet50(), random weights, features [B, 2048]"}

    # Decoding alone: read and decode every file on `workers` threads.
    def decode_all():
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            return np.stack(list(pool.map(lambda i: source[i]["image"], range(n))))

    record["load_average_1min_before"] = os.getloadavg()[0]
    t = time.perf_counter()
    images = decode_all()
    record["decode_seconds"] = time.perf_counter() - t
    _say(f"decode: {n / record['decode_seconds']:.1f} images/s")

    # In memory: the jitted model on batches already decoded.
    compiled = jax.jit(lambda v, x: model.apply(v, x, output="features"))
    t = time.perf_counter()
    jax.block_until_ready(compiled(variables, images[:batch]))
    record["memory_first_batch_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    in_memory = [compiled(variables, images[i:i + batch]) for i in range(0, n, batch)]
    in_memory = np.concatenate([np.asarray(out) for out in in_memory])
    record["memory_seconds"] = time.perf_counter() - t
    _say(f"in memory: {n / record['memory_seconds']:.2f} images/s")

    # Streaming: map_dataset over the files, after a one-batch run that compiles the model.
    t = time.perf_counter()
    map_dataset(feature_fn, warm_source, work / "resnet-warm", batch_size=batch,
                num_threads=args.workers, progress=False)
    record["stream_warmup_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    streamed = map_dataset(feature_fn, source, work / "resnet-stream", batch_size=batch,
                           num_threads=args.workers, progress=False)
    record["stream_seconds"] = time.perf_counter() - t
    _say(f"streaming: {n / record['stream_seconds']:.2f} images/s")
    streamed = np.asarray(streamed["output"])
    record["stream_vs_memory_max_abs_difference"] = float(np.max(np.abs(streamed - in_memory)))

    for name in ("decode", "memory", "stream"):
        record[f"{name}_images_per_second"] = n / record[f"{name}_seconds"]
    ratio = record["stream_images_per_second"] / record["memory_images_per_second"]
    gap = record["stream_seconds"] - record["memory_seconds"]
    record["stream_over_memory"] = ratio
    record["target"] = ENGINE_TARGET
    record["met"] = ratio >= ENGINE_TARGET
    record["gap_seconds"] = gap
    record["decode_share_of_gap"] = record["decode_seconds"] / gap if gap > 0 else None
    record["torch"] = _torch_reference(args, source, work)
    if record["torch"].get("images_per_second"):
        record["stream_over_torch"] = (record["stream_images_per_second"]
                                       / record["torch"]["images_per_second"])
    return record


def _torch_reference(args, source, work) -> dict:
    python = args.torch_python or sys.executable
    if args.no_torch:
        return {"skipped": "--no-torch was given"}
    paths = [source.parent.paths[i] for i in source.indices] if hasattr(source, "indices") \
        else list(source.paths)
    listing = work / "torch-paths.json"
    listing.write_text(json.dumps(paths))
    command = [python, str(Path(__file__).resolve()), "--child", "torch", "--paths", str(listing),
               "--resnet-batch", str(args.resnet_batch), "--workers", str(args.workers),
               "--seed", str(args.seed)]
    result = subprocess.run(command, capture_output=True, text=True, env=_child_env(), check=False)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no message"]
        return {"skipped": f"the PyTorch process ({python}) failed: {tail[0]}"}
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["python"] = python
    _say(f"torch: {report['images_per_second']:.2f} images/s ({report['model']})")
    return report


def _child_torch(args) -> dict:
    import torch
    from PIL import Image

    from jfail.testing.torch_reference import TorchBottleneck, TorchResNet

    paths = json.loads(Path(args.paths).read_text())
    size = image_folder.IMAGE_SIZE

    class Files(torch.utils.data.Dataset):
        """Each file decoded as jfail's image folder source does: Pillow, RGB, shorter side
        resized to `size` (bilinear) and centre-cropped, float32 in [0, 1]; CHW."""

        def __len__(self):
            return len(paths)

        def __getitem__(self, index):
            with Image.open(paths[index]) as image:
                image = image.convert("RGB")
                if image.size != (size, size):
                    width, height = image.size
                    scale = size / min(width, height)
                    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
                    image = image.resize(resized, Image.BILINEAR)
                    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
                    image = image.crop((left, top, left + size, top + size))
                array = np.divide(np.asarray(image, np.uint8), np.float32(255), dtype=np.float32)
            return torch.from_numpy(array).permute(2, 0, 1)

    try:
        import torchvision

        model = torchvision.models.resnet50()
        name = f"torchvision {torchvision.__version__} resnet50()"
    except ImportError:
        model = TorchResNet(TorchBottleneck, (3, 4, 6, 3), 3, 1000)  # ResNet-50's layout
        name = ("jfail.testing.torch_reference TorchResNet, ResNet-50's layout (torchvision is "
                "not installed)")
    model.fc = torch.nn.Identity()  # penultimate features [B, 2048], as on the jfail side
    model.eval()
    torch.set_num_threads(os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(Files(), batch_size=args.resnet_batch,
                                         num_workers=args.workers)
    with torch.no_grad():
        model(torch.zeros(args.resnet_batch, 3, size, size))  # warm-up
        started = time.perf_counter()
        count = 0
        for images in loader:
            model(images)
            count += len(images)
        seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds, "images_per_second": count / seconds,
            "model": name, "torch": torch.__version__, "workers": args.workers,
            "threads": torch.get_num_threads()}


def _child(args) -> dict:
    report = _child_features(args) if args.child == "features" else _child_torch(args)
    print(json.dumps(report), flush=True)
    return report


# --------------------------------------------------------------------------------------------
# The report.


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def format_markdown(results: dict) -> str:
    env, settings, folder = results["environment"], results["settings"], results["folder"]
    memory, resume, resnet = results["memory"], results["resume"], results["resnet50"]
    load_before = ", ".join(f"{v:.2f}" for v in env["load_average_1_5_15_min"])
    load_after = ", ".join(f"{v:.2f}" for v in env["load_average_after_1_5_15_min"])
    share = env["other_processes_cpu_share"]
    lines = [
        "# Barlow's feature stage at scale",
        "",
        f"Run {results['date']} on {env['cpu_count']} CPU cores ({env['cpu']}); jax {env['jax']}, "
        f"tensorstore {env['tensorstore']}, grain {env['grain']}. Load average (1, 5, 15 min): "
        f"{load_before} before, {load_after} after"
        + (f"; other processes took {share:.0%} of the machine's CPU time during the "
           f"{env['wall_seconds'] / 60:.0f} minutes of the run." if share is not None else "."),
        "",
        f"Data: an image folder of {folder['images']:,} JPEGs of {folder['image_size']}x"
        f"{folder['image_size']}x3 in {folder['classes']} class folders "
        f"({folder['bytes'] / 2**20:,.0f} MiB), made by `benchmarks/image_folder.py` from "
        f"{folder['bases']['skimage']} scikit-image images, "
        f"{folder['bases']['fashion_mnist']:,} Fashion-MNIST images and "
        f"{folder['bases']['digits']:,} scikit-learn digits (random crops, flips, colour "
        "jitter); each size below is a stratified subset of it.",
        "",
    ]
    sizes = settings["sizes"]
    default = settings["default_sizes"]
    if sizes != default:
        why = ("--quick was given (a smoke run)" if settings["quick"] else
               "--sizes was given, to fit the run into the time there was on this loaded "
               "machine")
        largest = memory["rows"][-1]
        projected = (default[-1] - largest["images"]) / largest["images_per_second"]
        lines += [f"Sizes run: {', '.join(f'{n:,}' for n in sizes)} images, not the default "
                  f"{', '.join(f'{n:,}' for n in default)}, because {why}. At the "
                  f"{largest['images_per_second']:.1f} images/s of the {largest['images']:,}-image "
                  f"row, a {default[-1]:,}-image row would take about {projected / 60:.0f} "
                  "minutes more.", ""]
    lines += [
        "## Peak resident memory",
        "",
        f"Each row is a fresh process running `jfail.barlow.features_to_store` of "
        f"{settings['small_model']} (random weights) with batches of {settings['batch_size']} "
        "into a new store. Peak: `ru_maxrss`; sampled: the largest VmRSS read every "
        f"{SAMPLE_SECONDS * 1000:.0f} ms; before: VmRSS after the imports and the model's "
        "initialisation.",
        "",
        "| images | peak RSS (MiB) | sampled VmRSS peak (MiB) | RSS before the call (MiB) "
        "| seconds in the call | images/s | process wall (s) | load (1 min) before |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in memory["rows"]:
        lines.append(
            f"| {row['images']:,} | {_mib(row['peak_rss_bytes'])} "
            f"| {_mib(row['peak_vmrss_sampled_bytes'])} | {_mib(row['rss_before_call_bytes'])} "
            f"| {row['seconds_in_call']:.1f} | {row['images_per_second']:.1f} "
            f"| {row['wall_seconds']:.1f} | {row['load_average_1min_before']:.1f} |")
    met = "met" if memory["met"] else "MISSED"
    lines += [
        "",
        f"The largest peak is {memory['spread']:.1%} above the smallest, from {sizes[0]:,} to "
        f"{sizes[-1]:,} images (target: within "
        f"{memory['tolerance']:.0%}, {met}).",
        "",
        "## Killed half way and restarted",
        "",
    ]
    killed = resume["killed_run"]
    met = "met" if resume["met"] else "MISSED"
    lines += [
        f"Over {resume['images']:,} images: the uninterrupted `features_to_store` call took "
        f"{resume['uninterrupted_seconds_in_call']:.1f} s; a call killed (SIGKILL) after "
        f"{killed['seconds_in_call']:.1f} s, with {killed['chunks_done']} of "
        f"{killed['chunks']} chunks done, then started again over the same store finished in "
        f"{resume['restarted_run']['seconds_in_call']:.1f} s, "
        f"{resume['killed_plus_restarted_seconds_in_call']:.1f} s in all: "
        f"{resume['ratio']:.2f}x the uninterrupted call (target: at most "
        f"{resume['target']:.1f}x, {met}). These times include the compilation in each call. "
        f"Counting whole processes instead (Python, JAX and the model's initialisation paid "
        f"twice): {resume['uninterrupted_seconds']:.1f} s against "
        f"{killed['wall_seconds']:.1f} + {resume['restarted_run']['wall_seconds']:.1f} s, "
        f"{resume['process_ratio']:.2f}x.",
        "",
        ("The two stores' features are identical" if resume["outputs_identical"]
         else "The two stores' features DIFFER")
        + f" ({' x '.join(str(d) for d in resume['features_shape'])}, compared element for "
        "element).",
        "",
        "## The engine's own cost: ResNet-50 at 224",
        "",
    ]
    r = resnet
    met = "met" if r["met"] else "MISSED"
    lines += [
        f"{r['model']}, {r['images']} images in batches of {r['batch_size']}, "
        f"{r['workers']} reading threads (DataLoader: {r['workers']} worker processes).",
        "",
        "| what | seconds | images/s |",
        "| --- | ---: | ---: |",
        f"| decoding alone (read + JPEG decode, {r['workers']} threads) "
        f"| {r['decode_seconds']:.2f} | {r['decode_images_per_second']:.1f} |",
        f"| jitted model on batches in memory | {r['memory_seconds']:.1f} "
        f"| {r['memory_images_per_second']:.2f} |",
        f"| `map_dataset` streaming (read, decode, model, write) | {r['stream_seconds']:.1f} "
        f"| {r['stream_images_per_second']:.2f} |",
    ]
    torch_record = r["torch"]
    if torch_record.get("images_per_second"):
        lines.append(f"| PyTorch DataLoader + ResNet-50 ({torch_record['torch']}) "
                     f"| {torch_record['seconds']:.1f} | {torch_record['images_per_second']:.2f} |")
    lines += [
        "",
        f"Streaming runs at {r['stream_over_memory']:.0%} of the in-memory rate (target: at "
        f"least {r['target']:.0%}, {met}).",
    ]
    if r["decode_share_of_gap"] is not None:
        lines[-1] += (
            f" The gap is {r['gap_seconds']:.1f} s; decoding the same images alone takes "
            f"{r['decode_seconds']:.2f} s, {min(r['decode_share_of_gap'], 9.99):.0%} of the gap"
            + (": on these cores the decoding cannot run beside the model for free, and it "
               "accounts for the whole gap." if r["decode_share_of_gap"] >= 0.9 else
               ", the rest is the engine's own overhead (sharding, writing, threads)."))
    lines += [
        "",
        f"Streamed and in-memory features differ by at most "
        f"{r['stream_vs_memory_max_abs_difference']:.1e}.",
        "",
    ]
    if torch_record.get("images_per_second"):
        lines += [
            f"For reference (no target on a CPU): PyTorch's DataLoader with {r['workers']} "
            f"workers feeding {torch_record['model']} on {torch_record['threads']} threads runs "
            f"at {torch_record['images_per_second']:.2f} images/s; jfail's streaming stage is "
            f"{r['stream_over_torch']:.2f}x that.",
            "",
        ]
    else:
        lines += [f"The PyTorch reference did not run: {torch_record['skipped']}.", ""]
    lines += provenance(results["date"], results["command"])
    return "\n".join(lines)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: sizes {QUICK_SIZES}, 16 ResNet-50 images")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"images per memory row (default {DEFAULT_SIZES})")
    parser.add_argument("--resume-size", type=int, default=None,
                        help="images of the kill-and-restart run (default: the middle size)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch of the small-model runs (default 128; --quick 32)")
    parser.add_argument("--resnet-images", type=int, default=None,
                        help="images of the ResNet-50 comparison (default 96; --quick 16)")
    parser.add_argument("--resnet-batch", type=int, default=None,
                        help="ResNet-50 batch (default 16; --quick 8)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="reading threads / DataLoader workers / folder writers "
                             "(default: the CPU count)")
    parser.add_argument("--folder-images", type=int, default=None,
                        help="images in the generated folder, of which the sizes are subsets "
                             f"(default {max(DEFAULT_SIZES)}; --quick {max(QUICK_SIZES)})")
    parser.add_argument("--data-dir", default=None,
                        help="the image folder's cache (default: "
                             "$XDG_CACHE_HOME/jfail/scale-imagefolder-<N>-seed<seed>)")
    parser.add_argument("--work-dir", default=None,
                        help="where the stores are written (default: the system's temp folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep the stores")
    parser.add_argument("--torch-python", default=None,
                        help="the Python that runs the PyTorch reference (default: this one)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--child", choices=("features", "torch"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = args.sizes or list(QUICK_SIZES if quick else DEFAULT_SIZES)
    args.folder_images = args.folder_images or max(QUICK_SIZES if quick else DEFAULT_SIZES)
    args.batch_size = args.batch_size or (32 if quick else 128)
    args.resnet_images = args.resnet_images or (16 if quick else 96)
    args.resnet_batch = args.resnet_batch or (8 if quick else 16)
    return args


if __name__ == "__main__":
    main()
