"""Debugging tests for explanations (seed 002): Table 2, Table 3, the mislabel range, Figure 7.

    python experiments/debug_tests.py --config configs/debug_tests.py

For every attribution method, on real data:
- spurious correlation (Table 2): a model trained on objects of two classes composited on
  class-correlated backgrounds; the SSIM of each input's attribution to GT-1 (all relevance on
  the background) and to GT-2 (GT-1 weighted by the attribution of the background alone), with
  the SEM over the inputs; the background-only accuracy shows the model learned the shortcut;
- mislabelled examples: the SSIM between the attributions of flipped training examples under the
  model trained on correct labels and under the same training with the labels flipped;
- model contamination (Figure 7): cascading re-initialization from the top layer down, SSIM and
  Spearman rank correlation (absolute values) to the trained model's attribution at every step;
- test-time contamination (Table 3): the attributions of an input under its in-domain model
  against an out-of-domain model (Fashion-MNIST → MNIST model, MNIST → Fashion-MNIST model,
  Fashion-MNIST → the spurious model), SSIM and rank correlation.
Maps are |attribution| summed over channels and scaled to [0, 1] per example, the paper's
normalization for SSIM. Writes `results/<name>.md`, `.json` and PNGs under `results/<name>/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jfail import attribution
from jfail.config import DebugTestsConfig, load_config
from jfail.data import Dataset, load, train_val_split
from jfail.debugtests import (
    cascading_randomization,
    flip_labels,
    forward_layer_order,
    ground_truth_background,
    ground_truth_weighted,
    load_backgrounds,
    spearman,
    spurious_backgrounds,
    ssim,
)
from jfail.logs import quiet_libraries
from jfail.models import build_classifier, init_classifier, linen_apply, logits_fn
from jfail.train import evaluate, fit, predict
from jfail.train.run import trained_classifier, write_json


def main(argv: list[str] | None = None, prog: str = "python experiments/debug_tests.py") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args(argv)
    quiet_libraries()
    config: DebugTestsConfig = load_config(args.config, args.set)
    if not isinstance(config, DebugTestsConfig):
        parser.error(f"{args.config} is not a debugging-tests config")
    command = prog + " " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out_dir)
    figures = out / config.name
    figures.mkdir(parents=True, exist_ok=True)
    workdir = Path(config.workdir)
    progress = sys.stderr.isatty()
    started = time.perf_counter()
    methods = tuple(config.methods or attribution.METHODS)
    unknown = sorted(set(methods) - set(attribution.METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(attribution.METHODS)}")
    n = config.num_inputs
    keys = dict(zip(("spurious", "flip", "fresh", "inputs", "methods", "calibration"),
                    jax.random.split(jax.random.key(config.seed), 6)))
    summary: dict = {"command": command, "config": dataclasses.asdict(config),
                     "devices": [str(d) for d in jax.devices()], "methods": list(methods)}

    def save():
        summary["seconds"] = time.perf_counter() - started
        write_json(out / f"{config.name}.json", summary)
        (out / f"{config.name}.md").write_text(_markdown(summary, config))

    # --- models -------------------------------------------------------------------------------
    classifier_config = load_config(config.classifier_config)
    module, params, state, _, metrics = trained_classifier(classifier_config, config.classifier_run,
                                                           progress=progress)
    full = load(config.dataset, "train")
    test = load(config.dataset, "test")
    train, val = train_val_split(full, classifier_config.val_fraction,
                                 seed=classifier_config.train.seed)
    ood_module, ood_params, ood_state, _, ood_metrics = trained_classifier(
        load_config(config.ood_config), config.ood_run, progress=progress)
    ood_test = load(config.ood_dataset, "test")
    normal = logits_fn(module, {"params": params, **state})
    ood_model = logits_fn(ood_module, {"params": ood_params, **ood_state})
    summary["models"] = {"normal_test_accuracy": metrics["test_accuracy"],
                         "ood_test_accuracy": ood_metrics["test_accuracy"]}

    def attribute(name, model, x, target, patterns_from=None):
        kwargs = attribution.method_kwargs(
            name, train_images=train.images,
            key=jax.random.fold_in(keys["methods"], list(attribution.METHODS).index(name)),
            patterns=patterns_from if name in ("pattern_net", "pattern_attribution") else None)
        maps = attribution.METHODS[name](model, jnp.asarray(x), jnp.asarray(target),
                                         batch_size=config.batch_size, **kwargs)
        return np.asarray(attribution.normalize_unit(
            attribution.reduce_channels(attribution.absolute(maps))))

    predict_fn = jax.jit(lambda m, v: jnp.argmax(m(v), -1))

    def needs_patterns(model, images):
        if {"pattern_net", "pattern_attribution"} & set(methods):
            return attribution.fit_patterns(model, images[:5000], progress=False)
        return None

    # --- spurious correlation (Table 2) -----------------------------------------------------------
    spurious = _spurious_model(config, module, classifier_config, full, test, workdir, keys, progress)
    summary["spurious"] = spurious["report"]
    spurious_model, data, background = spurious["model"], spurious["test"], spurious["background"]
    x, masks = data.images[:n], data.object_masks[:n]
    target = np.asarray(predict_fn(spurious_model, x))
    patterns = needs_patterns(spurious_model, spurious["train_images"])
    gt1 = ground_truth_background(masks)
    rows = {}
    calibration = np.asarray(jax.random.normal(keys["calibration"], gt1.shape))
    for name in methods:
        maps = attribute(name, spurious_model, x, target, patterns)
        background_maps = attribute(name, spurious_model, background[:n], target, patterns)
        gt2 = ground_truth_weighted(background_maps, masks)
        rows[name] = {"ssim_gt1": _mean_sem(ssim(maps, gt1)), "ssim_gt2": _mean_sem(ssim(maps, gt2))}
        if name == methods[0]:
            _example_panel(x[:4], maps[:4], gt1[:4], gt2[:4], figures / "spurious_example.png", name)
    random_maps = np.asarray(attribution.normalize_unit(jnp.abs(calibration)))
    summary["table2"] = rows
    summary["table2_calibration_random_vs_gt1"] = _mean_sem(ssim(random_maps, gt1))
    save()

    # --- mislabelled examples ---------------------------------------------------------------------
    mislabel = _mislabel_model(config, module, classifier_config, train, val, workdir, keys, progress)
    flipped = mislabel["flipped"][:n]
    mis_model = mislabel["model"]
    xs = train.images[flipped]
    summary["mislabel"] = mislabel["report"]
    patterns_clean = needs_patterns(normal, train.images)
    patterns_mis = needs_patterns(mis_model, train.images)
    target_clean, target_mis = np.asarray(predict_fn(normal, xs)), np.asarray(predict_fn(mis_model, xs))
    summary["mislabel_ssim"] = {
        name: _mean_sem(ssim(attribute(name, normal, xs, target_clean, patterns_clean),
                             attribute(name, mis_model, xs, target_mis, patterns_mis)))
        for name in methods
    }
    save()

    # --- out-of-distribution inputs (Table 3) ---------------------------------------------------
    pick = np.asarray(jax.random.permutation(keys["inputs"], len(test.labels)))[:n]
    pick_ood = np.asarray(jax.random.permutation(keys["inputs"], len(ood_test.labels)))[:n]
    patterns_ood = needs_patterns(ood_model, load(config.ood_dataset, "train").images)
    settings = {
        "FMNIST → MNIST model": (test.images[pick], normal, patterns_clean, ood_model, patterns_ood),
        "MNIST → FMNIST model": (ood_test.images[pick_ood], ood_model, patterns_ood, normal,
                                 patterns_clean),
        "FMNIST → spurious model": (test.images[pick], normal, patterns_clean, spurious_model,
                                    patterns),
    }
    table3 = {}
    for setting, (inputs, in_model, in_patterns, out_model, out_patterns) in settings.items():
        t_in, t_out = np.asarray(predict_fn(in_model, inputs)), np.asarray(predict_fn(out_model, inputs))
        table3[setting] = {}
        for name in methods:
            a = attribute(name, in_model, inputs, t_in, in_patterns)
            b = attribute(name, out_model, inputs, t_out, out_patterns)
            table3[setting][name] = {"ssim": _mean_sem(ssim(a, b)),
                                     "rank": _mean_sem(spearman(a, b, absolute=True))}
    summary["table3"] = table3
    save()

    # --- cascading randomization (Figure 7) -----------------------------------------------------
    fresh, _ = init_classifier(module, train.images.shape[1:], keys["fresh"])
    order = forward_layer_order(lambda p, v: module.apply({"params": p, **state}, v), params,
                                test.images[:1])
    steps = [("trained", params)] + cascading_randomization(params, fresh, order)
    inputs = test.images[pick[: config.randomization_inputs]]
    target = np.asarray(predict_fn(normal, inputs))
    curves, grid = {name: {"ssim": [], "rank": []} for name in methods}, {}
    for step, (layer, step_params) in enumerate(steps):
        model = logits_fn(module, {"params": step_params, **state})
        step_patterns = needs_patterns(model, train.images)
        for name in methods:
            maps = attribute(name, model, inputs, target, step_patterns)
            if step == 0:
                grid[name] = [maps[0]]
                reference = curves[name]["reference"] = maps
            else:
                grid[name].append(maps[0])
                reference = curves[name]["reference"]
            curves[name]["ssim"].append(_mean_sem(ssim(reference, maps)))
            curves[name]["rank"].append(_mean_sem(spearman(reference, maps, absolute=True)))
    for name in methods:
        del curves[name]["reference"]
    summary["cascading"] = {"layers": [layer for layer, _ in steps], "curves": curves}
    _cascading_figures(inputs[0], grid, summary["cascading"], figures)
    save()
    print(f"wrote {out / config.name}.md")


# --- models ---------------------------------------------------------------------------------------


def _spurious_model(config, module, classifier_config, full, test, workdir, keys, progress):
    """Train (or resume) the classifier on two classes composited onto their backgrounds."""
    backgrounds = load_backgrounds(config.backgrounds)
    classes = np.asarray(config.spurious_classes)

    def composite(data, key):
        keep = np.isin(data.labels, classes)
        labels = np.searchsorted(classes, data.labels[keep])
        return spurious_backgrounds(data.images[keep], labels, backgrounds, key)

    train_data = composite(full, jax.random.fold_in(keys["spurious"], 0))
    test_data = composite(test, jax.random.fold_in(keys["spurious"], 1))
    names = tuple(full.class_names[c] for c in classes)
    spurious_train = Dataset(train_data.images, train_data.labels.astype(np.int32), names)
    spurious_test = Dataset(test_data.images, test_data.labels.astype(np.int32), names)
    train, val = train_val_split(spurious_train, 0.1, seed=config.seed)
    model_module = build_classifier("defuse_cnn", len(classes))
    train_config = dataclasses.replace(classifier_config.train, epochs=config.spurious_epochs)
    run_dir = workdir / _run_name("spurious", config.spurious_classes, config.backgrounds,
                                  train_config, config.seed)
    result = _fit_cached(model_module, train, val, train_config, run_dir, progress)
    apply_fn = linen_apply(model_module)
    background = _background_of(test_data, backgrounds)
    # the shortcut test: the background alone, labelled by the class it stands for
    shortcut = evaluate(apply_fn, result.params, result.state,
                        Dataset(background, test_data.background_ids.astype(np.int32), names))
    clean = evaluate(apply_fn, result.params, result.state, spurious_test)
    report = {"classes": list(names), "backgrounds": list(config.backgrounds),
              "train_images": int(len(train.labels)), "test_accuracy": clean["accuracy"],
              "background_only_accuracy": shortcut["accuracy"]}
    return {"model": logits_fn(model_module, {"params": result.params, **result.state}),
            "test": test_data, "background": background, "report": report,
            "train_images": train.images}


def _mislabel_model(config, module, classifier_config, train, val, workdir, keys, progress):
    """The classifier's own training with `mislabel_fraction` of the training labels flipped."""
    labels, flipped = flip_labels(train.labels, config.mislabel_fraction, len(train.class_names),
                                  keys["flip"])
    train_config = classifier_config.train
    if config.mislabel_epochs is not None:
        train_config = dataclasses.replace(train_config, epochs=config.mislabel_epochs)
    result = _fit_cached(module, Dataset(train.images, labels.astype(np.int32), train.class_names),
                         val, train_config,
                         workdir / _run_name("mislabel", config.mislabel_fraction, train_config,
                                             config.seed), progress)
    apply_fn = linen_apply(module)
    report = {"fraction": config.mislabel_fraction, "flipped": int(len(flipped)),
              "val_accuracy": evaluate(apply_fn, result.params, result.state, val)["accuracy"],
              "fits_flipped_labels": float(np.mean(np.argmax(predict(
                  apply_fn, result.params, result.state, train.images[flipped]), -1)
                  == labels[flipped]))}
    return {"model": logits_fn(module, {"params": result.params, **result.state}),
            "flipped": flipped, "report": report}


def _fit_cached(module, train, val, train_config, run_dir, progress):
    """`fit` with checkpoints in `run_dir`: a finished run is restored, not retrained."""
    params, state = init_classifier(module, train.images.shape[1:], jax.random.key(train_config.seed))
    return fit(linen_apply(module), params, state, train, val, train_config,
               checkpoint_dir=Path(run_dir).absolute() / "checkpoints", progress=progress)


def _run_name(kind: str, *settings) -> str:
    """A run directory name that changes with the settings, so a stale run is never restored."""
    digest = hashlib.sha256(repr(settings).encode()).hexdigest()[:10]
    return f"{kind}_{digest}"


def _background_of(data, backgrounds) -> np.ndarray:
    """The background crop behind every composited image, without its object: `[N, H, W, 1]`."""
    height, width = data.images.shape[1:3]
    crops = [backgrounds[b][top : top + height, left : left + width]
             for b, (top, left) in zip(data.background_ids, data.crop_offsets)]
    return np.stack(crops)[..., None].astype(np.float32)


# --- metrics and figures --------------------------------------------------------------------------


def _mean_sem(values) -> dict:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()) if len(values) else float("nan"), "sem": sem,
            "count": int(len(values))}


def _example_panel(x, maps, gt1, gt2, path, name):
    plt = _pyplot()
    fig, axes = plt.subplots(4, len(x), figsize=(1.6 * len(x), 6.4), squeeze=False)
    for i in range(len(x)):
        for row, (image, title) in enumerate(((x[i, ..., 0], "input"), (maps[i], name),
                                              (gt1[i], "GT-1"), (gt2[i], "GT-2"))):
            axes[row, i].imshow(image, cmap="gray" if row == 0 else "magma", vmin=0, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
            if i == 0:
                axes[row, i].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cascading_figures(image, grid, cascading, figures):
    plt = _pyplot()
    methods, layers = list(grid), cascading["layers"]
    fig, axes = plt.subplots(len(methods), len(layers) + 1,
                             figsize=(1.1 * (len(layers) + 1), 1.1 * len(methods)), squeeze=False)
    for r, name in enumerate(methods):
        axes[r, 0].imshow(image[..., 0], cmap="gray")
        axes[r, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
        for c, heat in enumerate(grid[name]):
            axes[r, c + 1].imshow(heat, cmap="magma", vmin=0, vmax=1)
            if r == 0:
                axes[r, c + 1].set_title(layers[c], fontsize=6, rotation=45)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(figures / "cascading_grid.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in cascading["curves"].items():
        for ax, metric in zip(axes, ("ssim", "rank")):
            ax.plot(range(len(layers)), [p["mean"] for p in curve[metric]], "o-", ms=3, label=name)
    for ax, title in zip(axes, ("SSIM to the trained model's map", "Spearman rank correlation (|·|)")):
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=45, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("re-initialized down to")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(figures / "cascading_curves.png", dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(cell: dict) -> str:
    return f"{cell['mean']:.3f} ± {cell['sem']:.3f}"


def _markdown(s: dict, config) -> str:
    lines = ["# Debugging tests for explanations (seed 002)", "", "Produced by:", "", "```bash",
             s["command"], "```", "", f"Devices: {', '.join(s['devices'])}. Inputs per table: "
             f"{config.num_inputs}. Mean ± SEM over the inputs.", ""]
    if "spurious" in s:
        sp = s["spurious"]
        lines += ["## Table 2: spurious correlation", "",
                  f"{sp['classes'][0]} on {sp['backgrounds'][0]} vs {sp['classes'][1]} on "
                  f"{sp['backgrounds'][1]}: test accuracy {sp['test_accuracy']:.4f}; on the "
                  f"backgrounds alone {sp['background_only_accuracy']:.4f} (the paper: 97 %).", "",
                  "| method | SSIM-GT1 | SSIM-GT2 |", "| --- | ---: | ---: |"]
        lines += [f"| {m} | {_fmt(r['ssim_gt1'])} | {_fmt(r['ssim_gt2'])} |"
                  for m, r in s["table2"].items()]
        lines += ["", f"Calibration: SSIM of a random Gaussian map to GT-1 "
                  f"{_fmt(s['table2_calibration_random_vs_gt1'])}.", "",
                  f"![spurious]({config.name}/spurious_example.png)", ""]
    if "mislabel_ssim" in s:
        mi = s["mislabel"]
        values = [r["mean"] for r in s["mislabel_ssim"].values()]
        lines += ["## Mislabelled examples", "",
                  f"{mi['flipped']} training labels flipped ({mi['fraction']:.0%}); the model fits "
                  f"{mi['fits_flipped_labels']:.1%} of the flipped labels; val accuracy "
                  f"{mi['val_accuracy']:.4f}. SSIM between the attributions of flipped examples "
                  f"under the clean and the mislabelled model: {min(values):.2f} – {max(values):.2f} "
                  "over methods (the paper: 0.73 – 0.99).", "",
                  "| method | SSIM clean vs mislabelled |", "| --- | ---: |"]
        lines += [f"| {m} | {_fmt(r)} |" for m, r in s["mislabel_ssim"].items()]
        lines += [""]
    if "table3" in s:
        settings = list(s["table3"])
        lines += ["## Table 3: out-of-distribution inputs", "",
                  "| method | " + " | ".join(f"{x} SSIM | {x} rank" for x in settings) + " |",
                  "| --- | " + " | ".join("---: | ---:" for _ in settings) + " |"]
        for m in s["methods"]:
            cells = [f"{_fmt(s['table3'][x][m]['ssim'])} | {_fmt(s['table3'][x][m]['rank'])}"
                     for x in settings]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += [""]
    if "cascading" in s:
        layers = s["cascading"]["layers"]
        lines += ["## Figure 7: cascading re-initialization", "",
                  "SSIM / Spearman (|·|) to the trained model's map after re-initializing the "
                  "layers from the top down to the named one.", "",
                  "| method | " + " | ".join(layers[1:]) + " |",
                  "| --- | " + " | ".join("---:" for _ in layers[1:]) + " |"]
        for m, curve in s["cascading"]["curves"].items():
            cells = [f"{a['mean']:.2f} / {b['mean']:.2f}"
                     for a, b in zip(curve["ssim"][1:], curve["rank"][1:])]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", f"![grid]({config.name}/cascading_grid.png)", "",
                  f"![curves]({config.name}/cascading_curves.png)", ""]
    lines += [f"Total time: {s.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"

