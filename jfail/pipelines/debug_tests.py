"""Debugging tests for explanations (seed 002): Tables 2 and 3, mislabels, Figure 7, appendix G.

    python experiments/debug_tests.py --config configs/debug_tests.py [--parts appendix_g,...]

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
normalization for SSIM. Each bug also gets a grid of every method's maps (normal vs bugged).

Appendix G, other methods on the same bugged models:
- TCAV on the spurious model: CAVs of each background (crops of it alone) against random
  concepts (data-set images on other textures) at `tcav_layers`, scores for each class's
  spurious test inputs, a t-test against random-vs-random CAVs; also on the re-initialized
  network as a control;
- influence functions (Koh & Liang, Hessian of the last layer over a pool of the spurious
  model's training images): the share of the top 1 % most influential training images that
  carry the test input's background, for composited inputs, backgrounds alone and objects on
  the other class's background;
- self-influence (last layer, and TracIn over all layers) on the mislabelled model: how much of
  the training set one checks, in that order, to find the flipped labels.

`--parts` (or the config's `parts`) runs a subset: table2, mislabel, table3, figure7,
appendix_g. Writes `results/<name>.md`, `.json` and PNGs under `results/<name>/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
import optax

from jfail import attribution
from jfail.config import DebugTestsConfig, load_config
from jfail.data import Dataset, load, train_val_split
from jfail.debugtests import (
    BACKGROUNDS,
    background_only,
    cascading_randomization,
    flip_labels,
    forward_layer_order,
    fraction_checked_to_find,
    ground_truth_background,
    ground_truth_weighted,
    influence_scores,
    load_backgrounds,
    self_influence,
    spearman,
    spurious_backgrounds,
    ssim,
    tcav,
    top_fraction_flagged,
)
from jfail.logs import quiet_libraries
from jfail.models import (
    DefuseCNN,
    build_classifier,
    init_classifier,
    linen_apply,
    logits_fn,
    model_fns,
)
from jfail.pipelines import command_line
from jfail.plotting import pyplot as _pyplot
from jfail.plotting import word_slug as _slug
from jfail.train import evaluate, fit, predict
from jfail.train.run import trained_classifier, write_json
from jfail.xla import jit


PARTS = ("table2", "mislabel", "table3", "figure7", "appendix_g")
"""What `--parts` (or the config's `parts`) may name, in the order they run."""


def main(argv: list[str] | None = None, prog: str = "python experiments/debug_tests.py") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--parts", default=None, metavar="PART[,PART...]",
                        help=f"run only these parts (default: the config's `parts`): "
                             f"{', '.join(PARTS)}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    quiet_libraries()
    config: DebugTestsConfig = load_config(args.config, args.set)
    if not isinstance(config, DebugTestsConfig):
        parser.error(f"{args.config} is not a debugging-tests config")
    try:
        parts = _checked_parts(config.parts if args.parts is None else args.parts)
    except ValueError as error:
        parser.error(str(error))
    config = dataclasses.replace(config, parts=parts)
    command = command_line(prog, argv)
    out = Path(args.out_dir)
    figures = out / config.name
    figures.mkdir(parents=True, exist_ok=True)
    workdir = Path(config.workdir)
    progress = not args.quiet and sys.stderr.isatty()
    started = time.perf_counter()
    methods = tuple(config.methods or attribution.METHODS)

    def each(items, desc):  # a progress bar over one part's loop
        return tqdm(items, desc=desc, leave=False, disable=not progress)

    unknown = sorted(set(methods) - set(attribution.METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(attribution.METHODS)}")
    n = config.num_inputs
    keys = dict(zip(("spurious", "flip", "fresh", "inputs", "methods", "calibration"),
                    jax.random.split(jax.random.key(config.seed), 6)))
    # a stream of its own, so adding Appendix G changed none of the keys above
    keys["appendix_g"] = jax.random.fold_in(jax.random.key(config.seed), 7)
    summary: dict = {"command": command, "config": dataclasses.asdict(config),
                     "devices": [str(d) for d in jax.devices()], "methods": list(methods),
                     "parts": list(parts)}
    grid_k = max(1, min(config.grid_inputs, n))

    part_started = {"at": time.perf_counter()}

    def save(part=None):
        now = time.perf_counter()
        if part is not None:  # seconds since the previous part ended (models included)
            summary.setdefault("part_seconds", {})[part] = now - part_started["at"]
            part_started["at"] = now
        summary["seconds"] = now - started
        write_json(out / f"{config.name}.json", summary)
        (out / f"{config.name}.md").write_text(_markdown(summary, config))

    def grid(key, title, inputs, labels, maps):
        """One attribution grid (a row per method) under the figures folder, named in `summary`."""
        path = figures / f"{key}.png"
        _bug_grid(path, title, inputs, labels, maps)
        summary.setdefault("grids", {})[key] = f"{config.name}/{path.name}"

    # --- models -------------------------------------------------------------------------------
    classifier_config = load_config(config.classifier_config)
    module, params, state, _, metrics = trained_classifier(classifier_config, config.classifier_run,
                                                           progress=progress)
    full = load(config.dataset, "train")
    test = load(config.dataset, "test")
    train, val = train_val_split(full, classifier_config.val_fraction,
                                 key=classifier_config.train.seed)
    normal = _attributable(module, {"params": params, **state})
    summary["models"] = {"normal_test_accuracy": metrics["test_accuracy"]}
    if "table3" in parts:
        ood_module, ood_params, ood_state, _, ood_metrics = trained_classifier(
            load_config(config.ood_config), config.ood_run, progress=progress)
        ood_test = load(config.ood_dataset, "test")
        ood_model = _attributable(ood_module, {"params": ood_params, **ood_state})
        summary["models"]["ood_test_accuracy"] = ood_metrics["test_accuracy"]

    def attribute(name, model, x, target, patterns_from=None):
        kwargs = attribution.method_kwargs(
            name, train_images=train.images,
            key=jax.random.fold_in(keys["methods"], list(attribution.METHODS).index(name)),
            patterns=patterns_from if name in ("pattern_net", "pattern_attribution") else None)
        maps = attribution.METHODS[name](model, jnp.asarray(x), jnp.asarray(target),
                                         batch_size=config.batch_size, **kwargs)
        return np.asarray(attribution.normalize_unit(
            attribution.reduce_channels(attribution.absolute(maps))))

    predict_fn = jit(lambda m, v: jnp.argmax(m(v), -1))
    fitted_patterns: dict = {}

    def needs_patterns(model, images, cache_key=None):
        if not {"pattern_net", "pattern_attribution"} & set(methods):
            return None
        if cache_key is not None and cache_key in fitted_patterns:
            return fitted_patterns[cache_key]
        patterns = attribution.fit_patterns(model, images[:5000], progress=False)
        if cache_key is not None:
            fitted_patterns[cache_key] = patterns
        return patterns

    spurious = mislabel = None
    if {"table2", "table3", "appendix_g"} & set(parts):
        spurious = _spurious_model(config, module, classifier_config, full, test, workdir, keys,
                                   progress)
        summary["spurious"] = spurious["report"]
    if {"mislabel", "appendix_g"} & set(parts):
        mislabel = _mislabel_model(config, module, classifier_config, train, val, workdir, keys,
                                   progress)
        summary["mislabel"] = mislabel["report"]
    save("models")

    # --- spurious correlation (Table 2) -----------------------------------------------------------
    if "table2" in parts:
        spurious_model, data = spurious["model"], spurious["test"]
        background = spurious["background"]
        x, masks = data.images[:n], data.object_masks[:n]
        target = np.asarray(predict_fn(spurious_model, x))
        patterns = needs_patterns(spurious_model, spurious["train_images"], "spurious")
        gt1 = ground_truth_background(masks)
        rows, panel = {}, {}
        calibration = np.asarray(jax.random.normal(keys["calibration"], gt1.shape))
        for name in each(methods, "Table 2"):
            maps = attribute(name, spurious_model, x, target, patterns)
            background_maps = attribute(name, spurious_model, background[:n], target, patterns)
            gt2 = ground_truth_weighted(background_maps, masks)
            rows[name] = {"ssim_gt1": _mean_sem(ssim(maps, gt1)),
                          "ssim_gt2": _mean_sem(ssim(maps, gt2))}
            panel[name] = (maps[:grid_k], background_maps[:grid_k])
            if name == methods[0]:
                _example_panel(x[:4], maps[:4], gt1[:4], gt2[:4], figures / "spurious_example.png",
                               name)
        random_maps = np.asarray(attribution.normalize_unit(jnp.abs(calibration)))
        summary["table2"] = rows
        summary["table2_calibration_random_vs_gt1"] = _mean_sem(ssim(random_maps, gt1))
        grid("spurious_grid", "spurious model: the input vs its background alone",
             (x[:grid_k], background[:grid_k]), ("input", "background alone"), panel)
        save("table2")

    # --- mislabelled examples ---------------------------------------------------------------------
    if "mislabel" in parts:
        flipped = mislabel["flipped"][:n]
        mis_model = mislabel["model"]
        xs = train.images[flipped]
        patterns_clean = needs_patterns(normal, train.images, "normal")
        patterns_mis = needs_patterns(mis_model, train.images, "mislabel")
        target_clean = np.asarray(predict_fn(normal, xs))
        target_mis = np.asarray(predict_fn(mis_model, xs))
        summary["mislabel_ssim"], panel = {}, {}
        for name in each(methods, "mislabelled"):
            clean_maps = attribute(name, normal, xs, target_clean, patterns_clean)
            mis_maps = attribute(name, mis_model, xs, target_mis, patterns_mis)
            summary["mislabel_ssim"][name] = _mean_sem(ssim(clean_maps, mis_maps))
            panel[name] = (clean_maps[:grid_k], mis_maps[:grid_k])
        grid("mislabel_grid", "flipped training examples: correct-label vs mislabelled model",
             (xs[:grid_k], None), ("correct labels", "flipped labels"), panel)
        save("mislabel")

    # --- out-of-distribution inputs (Table 3) ---------------------------------------------------
    pick = np.asarray(jax.random.permutation(keys["inputs"], len(test.labels)))[:n]
    if "table3" in parts:
        pick_ood = np.asarray(jax.random.permutation(keys["inputs"], len(ood_test.labels)))[:n]
        patterns_clean = needs_patterns(normal, train.images, "normal")
        patterns = needs_patterns(spurious["model"], spurious["train_images"], "spurious")
        patterns_ood = needs_patterns(ood_model, load(config.ood_dataset, "train").images, "ood")
        settings = {
            "FMNIST → MNIST model": (test.images[pick], normal, patterns_clean, ood_model,
                                     patterns_ood),
            "MNIST → FMNIST model": (ood_test.images[pick_ood], ood_model, patterns_ood, normal,
                                     patterns_clean),
            "FMNIST → spurious model": (test.images[pick], normal, patterns_clean,
                                        spurious["model"], patterns),
        }
        table3 = {}
        for setting, bundle in each(settings.items(), "Table 3"):
            inputs, in_model, in_patterns, out_model, out_patterns = bundle
            t_in = np.asarray(predict_fn(in_model, inputs))
            t_out = np.asarray(predict_fn(out_model, inputs))
            table3[setting], panel = {}, {}
            for name in methods:
                a = attribute(name, in_model, inputs, t_in, in_patterns)
                b = attribute(name, out_model, inputs, t_out, out_patterns)
                table3[setting][name] = {"ssim": _mean_sem(ssim(a, b)),
                                         "rank": _mean_sem(spearman(a, b, absolute=True))}
                panel[name] = (a[:grid_k], b[:grid_k])
            grid(f"ood_{_slug(setting)}", f"{setting}: in-domain vs out-of-domain model",
                 (inputs[:grid_k], None), ("in-domain model", "out-of-domain model"), panel)
        summary["table3"] = table3
        save("table3")

    # --- cascading randomization (Figure 7) -----------------------------------------------------
    if "figure7" in parts:
        fresh, _ = init_classifier(module, train.images.shape[1:], keys["fresh"])
        order = forward_layer_order(lambda p, v: module.apply({"params": p, **state}, v), params,
                                    test.images[:1])
        steps = [("trained", params)] + cascading_randomization(params, fresh, order)
        inputs = test.images[pick[: config.randomization_inputs]]
        target = np.asarray(predict_fn(normal, inputs))
        curves, cascade = {name: {"ssim": [], "rank": []} for name in methods}, {}
        for step, (layer, step_params) in enumerate(each(steps, "Figure 7")):
            model = _attributable(module, {"params": step_params, **state})
            step_patterns = needs_patterns(model, train.images)
            for name in methods:
                maps = attribute(name, model, inputs, target, step_patterns)
                if step == 0:
                    cascade[name] = [maps[0]]
                    reference = curves[name]["reference"] = maps
                else:
                    cascade[name].append(maps[0])
                    reference = curves[name]["reference"]
                curves[name]["ssim"].append(_mean_sem(ssim(reference, maps)))
                curves[name]["rank"].append(_mean_sem(spearman(reference, maps, absolute=True)))
        for name in methods:
            del curves[name]["reference"]
        summary["cascading"] = {"layers": [layer for layer, _ in steps], "curves": curves}
        _cascading_figures(inputs[0], cascade, summary["cascading"], figures)
        save("figure7")

    # --- Appendix G: TCAV and influence functions -----------------------------------------------
    if "appendix_g" in parts:
        appendix = summary["appendix_g"] = {"seconds": {}}
        key = keys["appendix_g"]
        steps = (("tcav", lambda: _tcav_spurious(config, spurious, test,
                                                 jax.random.fold_in(key, 0))),
                 ("influence", lambda: _influence_spurious(config, spurious,
                                                           jax.random.fold_in(key, 1))),
                 ("self_influence", lambda: _self_influence_mislabel(
                     config, mislabel, train, jax.random.fold_in(key, 2))))
        for step_name, run_step in steps:
            step_started = time.perf_counter()
            appendix[step_name] = run_step()
            appendix["seconds"][step_name] = time.perf_counter() - step_started
            save()
        if "rankings" in appendix["self_influence"]:
            _checking_figure(appendix["self_influence"], figures / "appendix_g_checking.png")
            summary.setdefault("grids", {})["appendix_g_checking"] = \
                f"{config.name}/appendix_g_checking.png"
        save("appendix_g")
    save()
    print(f"wrote {out / config.name}.md")


def _checked_parts(parts) -> tuple:
    """`parts` as a tuple of known part names, in `PARTS` order; a string is comma-separated."""
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",")]
    parts = [p for p in parts if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"unknown parts {unknown}; choose one or more of {', '.join(PARTS)}"
                         if unknown else f"no part to run; choose from {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in parts)


# --- models ---------------------------------------------------------------------------------------


def _spurious_model(config, module, classifier_config, full, test, workdir, keys, progress):
    """Train (or resume) the classifier on two classes composited onto their backgrounds."""
    backgrounds = load_backgrounds(config.backgrounds)
    classes = np.asarray(config.spurious_classes)

    def composite(data, key):
        keep = np.isin(data.labels, classes)
        labels = np.searchsorted(classes, data.labels[keep])
        return spurious_backgrounds(data.images[keep], labels, backgrounds, key=key)

    train_data = composite(full, jax.random.fold_in(keys["spurious"], 0))
    test_data = composite(test, jax.random.fold_in(keys["spurious"], 1))
    names = tuple(full.class_names[c] for c in classes)
    spurious_train = Dataset(train_data.images, train_data.labels.astype(np.int32), names)
    spurious_test = Dataset(test_data.images, test_data.labels.astype(np.int32), names)
    train, val = train_val_split(spurious_train, 0.1, key=config.seed)
    # the same split of the row numbers, for the background behind each training image
    row_numbers = np.arange(len(spurious_train.labels), dtype=np.float32)[:, None, None, None]
    rows, _ = train_val_split(Dataset(row_numbers, spurious_train.labels, names), 0.1,
                              key=config.seed)
    train_rows = rows.images[:, 0, 0, 0].astype(np.int64)
    if not np.array_equal(spurious_train.labels[train_rows], train.labels):
        raise RuntimeError("the row split does not reproduce the spurious training split")
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
    variables = {"params": result.params, **result.state}
    return {"model": _attributable(model_module, variables),
            "test": test_data, "background": background, "report": report,
            "train_images": train.images, "train_labels": train.labels,
            "train_background_ids": train_data.background_ids[train_rows],
            "module": model_module, "variables": variables, "backgrounds": backgrounds}


def _mislabel_model(config, module, classifier_config, train, val, workdir, keys, progress):
    """The classifier's own training with `mislabel_fraction` of the training labels flipped."""
    labels, flipped = flip_labels(train.labels, config.mislabel_fraction, len(train.class_names),
                                  key=keys["flip"])
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
    variables = {"params": result.params, **result.state}
    return {"model": _attributable(module, variables), "flipped": flipped, "report": report,
            "labels": labels, "module": module, "variables": variables}


def _attributable(module, variables):
    """`logits_fn` with every weight committed to the default device. Trained weights are
    committed and freshly initialised or restored ones are not, and jit compiles a program
    once per such placement: cascading randomization mixes the two layer by layer, which cost
    one compilation per method and step."""
    return logits_fn(module, jax.device_put(variables, jax.devices()[0]))


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


# --- Appendix G: TCAV and influence functions -------------------------------------------------


def _tcav_spurious(config, spurious, test, key) -> dict:
    """TCAV of each spurious background (crops of it alone) for each class of the spurious model.

    Random concepts: `tcav_random_sets` sets of data-set test images (any class) composited onto
    crops of the textures the spurious data does not use; the null is random-vs-random CAVs.
    Inputs: spurious test inputs of the class. With `tcav_control`, the same on the spurious
    architecture re-initialized (model contamination). Returns rows for the JSON.
    """
    module, variables = spurious["module"], spurious["variables"]
    if not isinstance(module, DefuseCNN):
        return {"skipped": f"TCAV splits a DefuseCNN by layer, not a {type(module).__name__}"}
    layers = tuple(config.tcav_layers)
    known = _cnn_layer_names(module)[:-1]
    if not layers or set(layers) - set(known):
        return {"skipped": f"tcav_layers {list(layers)} must be among {list(known)}"}
    data = spurious["test"]
    classes, names = spurious["report"]["classes"], list(config.backgrounds)
    size = data.images.shape[1:3]
    count = max(10, int(config.tcav_concept_images))
    concepts = {name: background_only([spurious["backgrounds"][i]], count, size,
                                      key=jax.random.fold_in(key, i))[0]
                for i, name in enumerate(names)}
    others = tuple(b for b in BACKGROUNDS if b not in names)
    other_images = load_backgrounds(others)
    random_sets = []
    for r in range(max(2, int(config.tcav_random_sets))):
        k_pick, k_id, k_crop = jax.random.split(jax.random.fold_in(key, 100 + r), 3)
        rows = np.asarray(jax.random.choice(k_pick, len(test.labels), (count,),
                                            replace=len(test.labels) < count))
        ids = np.asarray(jax.random.randint(k_id, (count,), 0, len(others)))
        random_sets.append(spurious_backgrounds(test.images[rows], ids, other_images,
                                                key=k_crop).images)
    models = {"spurious": variables}
    if config.tcav_control:
        fresh, _ = init_classifier(module, data.images.shape[1:], jax.random.fold_in(key, 999))
        models["re-initialized"] = {"params": fresh}
    inputs = {c: data.images[data.labels == c][: max(1, int(config.tcav_inputs))]
              for c in range(len(classes))}
    rows = []
    for model_name, model_variables in models.items():
        logits = np.asarray(logits_fn(module, model_variables)(data.images[:4]))
        for layer in layers:
            features, head = _split_cnn(module, model_variables, layer)
            if not np.allclose(np.asarray(head(features(data.images[:4]))), logits,
                               rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"the split at {layer} does not reproduce the model's logits")
            for concept in names:
                for c, class_name in enumerate(classes):
                    if not len(inputs[c]):
                        continue
                    result = tcav(features, head, inputs[c], c, concepts[concept], random_sets,
                                  key=jax.random.fold_in(key, 1000), alpha=config.tcav_alpha,
                                  batch_size=256)
                    rows.append({
                        "model": model_name, "layer": layer, "concept": concept,
                        "target": class_name, "own_background": concept == names[c],
                        "inputs": int(len(inputs[c])), "score": float(result.mean),
                        "score_std": float(result.std),
                        "null_score": float(np.mean(result.null_scores)),
                        "p_value": result.p_value, "significant": result.significant,
                        "cav_accuracy": float(np.mean(result.accuracies)),
                        "scores": result.scores.tolist(),
                        "null_scores": result.null_scores.tolist()})
    return {"concept_images": count, "random_sets": len(random_sets),
            "random_textures": list(others), "alpha": config.tcav_alpha, "rows": rows}


def _influence_spurious(config, spurious, key) -> dict:
    """Koh & Liang influence of a pool of the spurious model's training images on test losses.

    For each test input (its loss at the model's prediction), the `influence_top` fraction of
    the pool with the largest influence, and the share of it on the input's own background.
    Three kinds of test input: composited as in training, the background alone, and the object
    moved onto another class's background (background and object disagree).
    """
    module, variables = spurious["module"], spurious["variables"]
    head_name = _head_name(variables["params"])
    if head_name is None:
        return {"skipped": "no final dense layer ('classifier' or 'fc') to take the Hessian of"}
    head = variables["params"][head_name]
    features = model_fns(module, variables).features
    labels, groups = spurious["train_labels"], spurious["train_background_ids"]
    k_pool, k_test, k_swap = jax.random.split(key, 3)
    pool = np.sort(np.asarray(jax.random.permutation(k_pool, len(labels)))[
        : max(1, min(int(config.influence_train), len(labels)))])
    data = spurious["test"]
    picked = np.sort(np.asarray(jax.random.permutation(k_test, len(data.labels)))[
        : max(1, min(int(config.influence_test), len(data.labels)))])
    objects = data.images[picked] * data.object_masks[picked][..., None]
    swapped = spurious_backgrounds(objects, data.labels[picked], spurious["backgrounds"], key=k_swap,
                                   correlation=0.0)
    kinds = {
        "spurious inputs": (data.images[picked], data.background_ids[picked], data.labels[picked]),
        "backgrounds alone": (spurious["background"][picked], data.background_ids[picked], None),
        "swapped backgrounds": (swapped.images, swapped.background_ids, data.labels[picked]),
    }
    pool_features = _features_of(features, spurious["train_images"][pool])
    _check_head(spurious["model"], head, spurious["train_images"][pool[:4]], pool_features[:4])
    pool_labels, pool_groups = labels[pool].astype(np.int32), groups[pool]
    top_count = max(1, math.ceil(config.influence_top * len(pool) - 1e-9))
    out = {"pool": int(len(pool)), "test_inputs": int(len(picked)), "top": config.influence_top,
           "top_count": top_count, "damping": config.influence_damping, "layer": head_name,
           "parameters": int(sum(np.size(v) for v in jax.tree_util.tree_leaves(head))),
           "kinds": {}}
    for kind, (x, background_ids, object_labels) in kinds.items():
        test_features = _features_of(features, x)
        predictions = np.argmax(np.asarray(_head_logits(head, test_features)), -1)
        scores = np.asarray(influence_scores(
            _head_loss, head, pool_features, pool_labels, test_features,
            predictions.astype(np.int32), damping=config.influence_damping, batch_size=1000))
        entry = {
            "share_own_background": {
                by: _mean_sem(_flagged_by_group(scores, pool_groups, background_ids,
                                                config.influence_top, by))
                for by in ("absolute", "helpful", "harmful")},
            # every training image's background is its label's: which of the two do they follow?
            "share_predicted_class": {
                by: _mean_sem(_flagged_by_group(scores, pool_labels, predictions,
                                                config.influence_top, by))
                for by in ("absolute", "helpful", "harmful")},
            "base_rate": _mean_sem((pool_groups[None, :] == background_ids[:, None]).mean(1)),
            "predicted_background_class": float(np.mean(predictions == background_ids))}
        if object_labels is not None:
            entry["predicted_object_class"] = float(np.mean(predictions == object_labels))
        out["kinds"][kind] = entry
    return out


def _self_influence_mislabel(config, mislabel, train, key) -> dict:
    """Rank a subset of the mislabelled model's training set by self-influence; how much of it
    must be checked, in that order, to find its flipped labels."""
    module, variables = mislabel["module"], mislabel["variables"]
    head_name = _head_name(variables["params"])
    if head_name is None:
        return {"skipped": "no final dense layer ('classifier' or 'fc') to take the Hessian of"}
    k_rows, k_random = jax.random.split(key)
    rows = np.sort(np.asarray(jax.random.permutation(k_rows, len(train.labels)))[
        : max(1, min(int(config.self_influence_train), len(train.labels)))])
    flagged = np.isin(rows, mislabel["flipped"])
    if not flagged.any():
        return {"skipped": f"none of the {len(rows)} training examples drawn has a flipped label"}
    x, y = train.images[rows], np.asarray(mislabel["labels"])[rows].astype(np.int32)
    head = variables["params"][head_name]
    feats = _features_of(model_fns(module, variables).features, x)
    _check_head(mislabel["model"], head, x[:4], feats[:4])
    scores = {"self-influence (last layer)": self_influence(
        _head_loss, head, feats, y, damping=config.influence_damping, batch_size=1000)}
    if set(variables) == {"params"}:  # no batch statistics: the whole network is its params
        scores["TracIn self-influence (all layers, final weights)"] = self_influence(
            _FullLoss(module), variables["params"], x, y, method="tracin", batch_size=100)
    scores["training loss (baseline)"] = _head_loss(head, feats, y)
    scores["random order (baseline)"] = jax.random.uniform(k_random, (len(rows),))
    rankings = {name: _checking(np.asarray(value, np.float64), flagged)
                for name, value in scores.items()}
    return {"subset": int(len(rows)), "flipped_in_subset": int(flagged.sum()),
            "damping": config.influence_damping, "layer": head_name, "rankings": rankings}


def _cnn_layer_names(module) -> tuple:
    return (tuple(f"conv{i}" for i in range(len(module.conv_features)))
            + tuple(f"dense{i}" for i in range(len(module.hidden))) + ("classifier",))


@dataclasses.dataclass(frozen=True)
class _CNNLayers:
    """`DefuseCNN`'s layers `names`, in order, as `fn(params, x)`: each 4x4/2 convolution or
    dense layer with its ReLU (none after `classifier`); a dense layer flattens its input."""

    names: tuple

    def __call__(self, params, x):
        for name in self.names:
            layer = params[name]
            if name.startswith("conv"):
                x = jax.lax.conv_general_dilated(
                    x, layer["kernel"], (2, 2), ((1, 1), (1, 1)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer["bias"]
            else:
                x = x.reshape(x.shape[0], -1) @ layer["kernel"] + layer["bias"]
            if name != "classifier":
                x = jax.nn.relu(x)
        return x


def _split_cnn(module, variables, layer):
    """`(features, head)` of a `DefuseCNN` cut after `layer`: `head(features(x))` = logits."""
    names = _cnn_layer_names(module)
    cut = names.index(layer) + 1
    params = variables["params"]
    return (jax.tree_util.Partial(_CNNLayers(names[:cut]), params),
            jax.tree_util.Partial(_CNNLayers(names[cut:]), params))


@dataclasses.dataclass(frozen=True)
class _FullLoss:
    """Per-example cross-entropy of a stateless classifier, `loss(params, x, y) -> [B]`."""

    module: Any

    def __call__(self, params, x, y):
        logits = self.module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _head_logits(head, features):
    return features @ head["kernel"] + head["bias"]


def _head_loss(head, features, labels):
    """Per-example cross-entropy of the final dense layer on penultimate features."""
    return optax.softmax_cross_entropy_with_integer_labels(_head_logits(head, features), labels)


def _head_name(params):
    return next((name for name in ("classifier", "fc") if name in params), None)


def _check_head(model, head, x, features):
    if not np.allclose(np.asarray(_head_logits(head, features)), np.asarray(model(x)),
                       rtol=1e-3, atol=1e-3):
        raise RuntimeError("the last layer on the features does not reproduce the logits")


@jit
def _apply_features(features, x):
    return features(x)


def _features_of(features, x, batch: int = 500) -> jax.Array:
    """`features(x)` in chunks: `[N, D]`."""
    return jnp.concatenate([_apply_features(features, jnp.asarray(x[i:i + batch]))
                            for i in range(0, len(x), batch)])


def _flagged_by_group(influence, pool_groups, test_groups, top, by) -> np.ndarray:
    """Per test input, the share of its top `top` most influential pool points in its group."""
    result = np.empty(len(test_groups))
    for group in np.unique(test_groups):
        rows = test_groups == group
        result[rows] = np.asarray(top_fraction_flagged(influence[rows], pool_groups == group, top,
                                                       by=by))
    return result


def _checking(scores, flagged) -> dict:
    """Check the points in decreasing score: the fraction checked to find the flagged ones."""
    found = fraction_checked_to_find(scores, flagged)
    count = len(scores)
    ranks = count - np.searchsorted(np.sort(scores), scores, side="left")  # ties count against
    fractions = np.sort(ranks[flagged]) / count
    num = len(fractions)

    def to_find(share):
        return float(fractions[max(1, math.ceil(share * num - 1e-9)) - 1])

    return {"mean_fraction": _mean_sem(ranks[flagged] / count),
            "to_find": {"50%": to_find(0.5), "90%": to_find(0.9),
                        "all": float(found["fraction_to_find_all"])},
            "found_in_top": float(np.mean(ranks[flagged] <= num)),
            "curve": [to_find(share) for share in np.linspace(0.01, 1.0, 100)]}


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


def _bug_grid(path, title, inputs, labels, maps):
    """One bug's maps, a row per method: for each input, the normal and the bugged model's map.

    inputs: `(images [k, H, W, C], second images or None)`, drawn in the top row over the two
    map columns (the second column shows the first images again when there is no second);
    labels: the two columns' titles; maps: `{method: (maps [k, H, W], maps [k, H, W])}`.
    """
    plt = _pyplot()
    methods = list(maps)
    first, second = inputs
    k = len(first)
    fig, axes = plt.subplots(len(methods) + 1, 2 * k, figsize=(1.15 * 2 * k + 1.2,
                                                                1.15 * (len(methods) + 1) + 0.4),
                             squeeze=False)
    for i in range(k):
        for column, images in enumerate((first, second if second is not None else first)):
            ax = axes[0, 2 * i + column]
            ax.imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{labels[column]}", fontsize=6)
        for r, name in enumerate(methods, start=1):
            for column in (0, 1):
                axes[r, 2 * i + column].imshow(maps[name][column][i], cmap="magma", vmin=0, vmax=1)
    axes[0, 0].set_ylabel("input", fontsize=7, rotation=0, ha="right", va="center")
    for r, name in enumerate(methods, start=1):
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _checking_figure(self_influence_summary, path):
    """Share of the flipped labels found against the share of the training subset checked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    shares = np.linspace(0.01, 1.0, 100)
    for name, ranking in self_influence_summary["rankings"].items():
        ax.plot(ranking["curve"], shares, label=name, lw=1.2,
                ls="--" if "baseline" in name else "-")
    ax.set_xlabel("fraction of the training subset checked")
    ax.set_ylabel("fraction of the flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, loc="lower right")
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


def _fmt(cell: dict) -> str:
    return f"{cell['mean']:.3f} ± {cell['sem']:.3f}"


def _markdown(s: dict, config) -> str:
    grids = s.get("grids", {})

    def figure(key, alt):
        return [f"![{alt}]({grids[key]})", ""] if key in grids else []

    lines = ["# Debugging tests for explanations (seed 002)", "", "Produced by:", "", "```bash",
             s["command"], "```", "", f"Devices: {', '.join(s['devices'])}. Inputs per table: "
             f"{config.num_inputs}. Mean ± SEM over the inputs.", ""]
    if list(s.get("parts", PARTS)) != list(PARTS):
        lines += [f"Parts run: {', '.join(s['parts'])} (of {', '.join(PARTS)}).", ""]
    if "table2" in s:
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
        lines += ["Every method's maps of the spurious model, for the input and for its "
                  "background alone (the paper's Figure 3):", ""]
        lines += figure("spurious_grid", "spurious model, every method")
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
        lines += figure("mislabel_grid", "flipped examples, every method")
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
        for x in settings:
            if f"ood_{_slug(x)}" in grids:
                lines += [f"{x}: the in-domain and the out-of-domain model's maps.", ""]
                lines += figure(f"ood_{_slug(x)}", x)
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
    if "appendix_g" in s:
        lines += _appendix_g_markdown(s, config)
        lines += figure("appendix_g_checking", "flipped labels found against training set checked")
    lines += [f"Total time: {s.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def _appendix_g_markdown(s: dict, config) -> list[str]:
    g, sp = s["appendix_g"], s.get("spurious", {})
    lines = ["## Appendix G: TCAV and influence functions", ""]
    if sp:
        lines += [f"The spurious model ({sp['classes'][0]} on {sp['backgrounds'][0]} vs "
                  f"{sp['classes'][1]} on {sp['backgrounds'][1]}, {sp['train_images']} training "
                  f"images): test accuracy {sp['test_accuracy']:.4f}, on the backgrounds alone "
                  f"{sp['background_only_accuracy']:.4f}.", ""]
    findings = []
    tc = g.get("tcav", {})
    lines += ["### TCAV of the background concept (spurious model)", ""]
    if "skipped" in tc:
        lines += [f"Skipped: {tc['skipped']}.", ""]
    elif tc:
        lines += [f"Concept: {tc['concept_images']} crops of one background alone; "
                  f"{tc['random_sets']} random concepts of {tc['concept_images']} data-set images "
                  f"on crops of other textures ({', '.join(tc['random_textures'])}). TCAV score = "
                  "share of the class's spurious test inputs whose logit rises along the CAV; "
                  f"mean ± std over the {tc['random_sets']} concept-vs-random CAVs; p: two-sided "
                  "t-test against random-vs-random CAVs (the null), significant at "
                  f"α = {tc['alpha']}. The paper (Figure 11) ranks the background concept for "
                  "the spurious model and reads it as a sign TCAV can identify the spurious "
                  "correlation.", "",
                  "| model | layer | concept | class | own background | TCAV score | null | p | "
                  "CAV accuracy |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in tc["rows"]:
            star = " *" if r["significant"] else ""
            lines.append(
                f"| {r['model']} | {r['layer']} | {r['concept']} | {r['target']} | "
                f"{'yes' if r['own_background'] else 'no'} | {r['score']:.2f} ± "
                f"{r['score_std']:.2f}{star} | {r['null_score']:.2f} | {r['p_value']:.2g} | "
                f"{r['cav_accuracy']:.2f} |")
        lines += ["", "\\* significant."]
        last = _cnn_layer_names(DefuseCNN())[-2]
        if any(r["layer"] == last for r in tc["rows"]):
            lines += [f"At {last} the rest of the network is linear: every input has the same "
                      "gradient, so a score there can only be 0 or 1."]
        lines += [""]
        for model in dict.fromkeys(r["model"] for r in tc["rows"]):
            rows = [r for r in tc["rows"] if r["model"] == model]
            own = [r for r in rows if r["own_background"]]
            other = [r for r in rows if not r["own_background"]]
            up = sum(r["significant"] and r["score"] > r["null_score"] for r in own)
            down = sum(r["significant"] and r["score"] < r["null_score"] for r in other)
            findings.append(
                f"TCAV, {model} network: a class's own background is a significant positive "
                f"concept in {up} of {len(own)} (layer, class) pairs, the other class's background "
                f"a significant negative one in {down} of {len(other)}; mean score "
                f"{np.mean([r['score'] for r in own]):.2f} for the own background against "
                f"{np.mean([r['score'] for r in other]):.2f} for the other "
                f"({sum(r['significant'] for r in rows)} of {len(rows)} tests significant).")
    inf = g.get("influence", {})
    lines += ["### Influence functions: spurious training points among the most influential", ""]
    if "skipped" in inf:
        lines += [f"Skipped: {inf['skipped']}.", ""]
    elif inf:
        lines += [f"Koh & Liang's influence on each test input's loss (at the model's "
                  f"prediction) of {inf['pool']} training images of the spurious model, with the "
                  f"Hessian of the mean training loss over the last layer ({inf['layer']}, "
                  f"{inf['parameters']} parameters, damping {inf['damping']}); {inf['test_inputs']}"
                  f" test inputs of each kind. Cells: the share of the top {inf['top']:.0%} "
                  f"({inf['top_count']} images) most influential training images that carry the "
                  "test input's background, ranked by |influence|, by most helpful (up-weighting "
                  "lowers the test loss) or most harmful (mean ± SEM over the inputs). Every "
                  "training image carries its class's background, so the base rate is the share "
                  "of the pool on that background, and the last columns say how often the model "
                  "predicts the background's class and how many of the most helpful images have "
                  "the predicted label. The paper: 91 % (SE 2.4) of the top 1 % (86 images) are "
                  "spurious, on 50 inputs.", "",
                  "| test inputs | by abs. influence | most helpful | most harmful | base rate | "
                  "predicted: background's class | most helpful: predicted label |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for kind, e in inf["kinds"].items():
            shared = e["share_own_background"]
            lines.append(f"| {kind} | {_fmt(shared['absolute'])} | {_fmt(shared['helpful'])} | "
                         f"{_fmt(shared['harmful'])} | {e['base_rate']['mean']:.3f} | "
                         f"{e['predicted_background_class']:.2f} | "
                         f"{e['share_predicted_class']['helpful']['mean']:.3f} |")
        lines += [""]
        kinds = inf["kinds"]
        if "spurious inputs" in kinds:
            e = kinds["spurious inputs"]
            findings.append(
                f"Influence, composited inputs: of the top {inf['top']:.0%}, "
                f"{e['share_own_background']['helpful']['mean']:.0%} (SE "
                f"{e['share_own_background']['helpful']['sem']:.1%}) of the most helpful and "
                f"{e['share_own_background']['absolute']['mean']:.0%} (SE "
                f"{e['share_own_background']['absolute']['sem']:.1%}) by |influence| carry the "
                f"input's background, against a base rate of {e['base_rate']['mean']:.0%} (the "
                "paper: 91 %, SE 2.4).")
        if "swapped backgrounds" in kinds:
            e = kinds["swapped backgrounds"]
            findings.append(
                f"Influence, objects on the other class's background: the model predicts the "
                f"background's class for {e['predicted_background_class']:.0%} of them and "
                f"{e['share_own_background']['helpful']['mean']:.0%} of the most helpful "
                f"training images carry that background; "
                f"{e['share_predicted_class']['helpful']['mean']:.0%} have the predicted label "
                "(the ranking follows the prediction, which here cannot be told from the "
                "background).")
    si = g.get("self_influence", {})
    lines += ["### Self-influence: finding the flipped labels (mislabelled model)", ""]
    if "skipped" in si:
        lines += [f"Skipped: {si['skipped']}.", ""]
    elif si:
        mi = s.get("mislabel")
        if mi:
            lines += [f"The mislabelled model: {mi['flipped']} training labels flipped "
                      f"({mi['fraction']:.0%}), val accuracy {mi['val_accuracy']:.4f}, it fits "
                      f"{mi['fits_flipped_labels']:.1%} of the flipped labels.", ""]
        lines += [f"{si['subset']} training examples of the mislabelled model, "
                  f"{si['flipped_in_subset']} of them flipped, checked in decreasing score. "
                  "Mean: the average over flipped examples of (rank / subset size), ± SEM; then "
                  "the fraction checked once 50 %, 90 % and all of them are found; top-k: the "
                  "share of the flipped examples among the k highest scores, k = their number. "
                  "The paper: an average of 11 % of the training set checked (SE 5.9), "
                  "for 50 examples.", "",
                  "| ranking | mean fraction checked | 50 % found | 90 % found | all found | "
                  "top-k |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in si["rankings"].items():
            lines.append(f"| {name} | {_fmt(r['mean_fraction'])} | {r['to_find']['50%']:.3f} | "
                         f"{r['to_find']['90%']:.3f} | {r['to_find']['all']:.3f} | "
                         f"{r['found_in_top']:.3f} |")
        lines += [""]
        best = si["rankings"].get("self-influence (last layer)")
        if best:
            findings.append(
                f"Self-influence: on average {best['mean_fraction']['mean']:.1%} (SE "
                f"{best['mean_fraction']['sem']:.2%}) of the training subset is checked per "
                f"flipped label (the paper: 11 %, SE 5.9); half are found after "
                f"{best['to_find']['50%']:.1%}, 90 % after {best['to_find']['90%']:.1%}, all "
                f"after {best['to_find']['all']:.1%}.")
    if findings:
        lines += ["### Findings", ""] + [f"- {f}" for f in findings] + [""]
    return lines


if __name__ == "__main__":
    main(prog="python -m jfail.pipelines.debug_tests")
