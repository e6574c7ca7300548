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
appendix_g. Writes `results/<name>.json`, PNGs under `results/<name>/`, and
`results/<name>.md` rendered from that JSON by the template `jfail/templates/debug_tests.j2`.

`load_experiment` trains (or restores) the models; each table (`spurious_table`,
`mislabel_table`, `ood_table`, `cascading_table`, `appendix_g_table`) returns its entries of the
result, plain values that are the JSON; `render_markdown` writes the report from the result alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfail import attribution
from jfail.config import DebugTestsConfig, load_config
from jfail.data import Dataset, load, train_val_split
from jfail.debugtests import (
    SpuriousData,
    background_influence,
    background_tcav,
    cascading_randomization,
    find_flipped_labels,
    flip_labels,
    forward_layer_order,
    ground_truth_background,
    ground_truth_weighted,
    load_backgrounds,
    mean_sem,
    plots,
    spearman,
    spurious_backgrounds,
    ssim,
)
from jfail.logs import quiet_libraries
from jfail.models import (
    DefuseCNN,
    build_classifier,
    init_classifier,
    layer_names,
    linen_apply,
    logits_fn,
)
from jfail.pipelines import command_line
from jfail.plotting import word_slug as _slug
from jfail.report import render_markdown as render_template
from jfail.train import evaluate, fit, predict
from jfail.train.run import trained_classifier, write_json
from jfail.xla import jit

REPORT_TEMPLATE = "debug_tests"
"""The template in jfail/templates that renders this pipeline's JSON as Markdown and HTML."""

PARTS = ("table2", "mislabel", "table3", "figure7", "appendix_g")
"""What `--parts` (or the config's `parts`) may name, in the order they run."""


def main(argv: list[str] | None = None, prog: str = "python experiments/debug_tests.py") -> None:
    config, args = _parse_arguments(argv, prog)
    out = Path(args.out_dir)
    progress = not args.quiet and sys.stderr.isatty()
    result = {"command": command_line(prog, argv), "config": dataclasses.asdict(config),
              "devices": [str(d) for d in jax.devices()],
              "methods": list(config.methods or attribution.METHODS), "parts": list(config.parts),
              "all_parts": list(PARTS)}
    save = _Saver(out, config.name, result)
    experiment = load_experiment(config, out / config.name, progress=progress)
    result.update(experiment.reports)
    save("models")
    tables = {"table2": spurious_table, "mislabel": mislabel_table, "table3": ood_table,
              "figure7": cascading_table,
              "appendix_g": functools.partial(appendix_g_table, after_each=save.partial)}
    for part in config.parts:
        _merge(result, tables[part](experiment))
        save(part)
    save()
    print(f"wrote {out / config.name}.md")


def _parse_arguments(argv, prog) -> tuple[DebugTestsConfig, argparse.Namespace]:
    """The config, with `--set` overrides and the parts to run, and the other arguments."""
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
    unknown = sorted(set(config.methods or attribution.METHODS) - set(attribution.METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(attribution.METHODS)}")
    return dataclasses.replace(config, parts=parts), args


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


class _Saver:
    """Writes the result's JSON and Markdown after each part, with the seconds it took."""

    def __init__(self, out: Path, name: str, result: dict):
        self.out, self.name, self.result = out, name, result
        self.started = self.part_started = time.perf_counter()

    def __call__(self, part: str | None = None) -> None:
        now = time.perf_counter()
        if part is not None:  # seconds since the previous part ended (models included)
            self.result.setdefault("part_seconds", {})[part] = now - self.part_started
            self.part_started = now
        self.result["seconds"] = now - self.started
        write_json(self.out / f"{self.name}.json", self.result)
        # the Markdown shows what the JSON holds
        written = json.loads((self.out / f"{self.name}.json").read_text())
        (self.out / f"{self.name}.md").write_text(render_markdown(written))

    def partial(self, entries: dict) -> None:
        """Save a part's entries before it ends (appendix G, step by step)."""
        _merge(self.result, entries)
        self()


def _merge(result: dict, entries: dict) -> None:
    """Put a table's entries into the result; its figures join the result's `grids`."""
    for key, value in entries.items():
        if key == "grids":
            result.setdefault("grids", {}).update(value)
        else:
            result[key] = value


# --- the models the tables share ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpuriousModel:
    """The classifier trained on two classes composited onto their class-correlated backgrounds.

    model: its `model(x) -> logits`; test: the composited test set; background: each test
    image's background alone `[N, H, W, 1]`; backgrounds: the textures; train_*: its training
    images, labels and each image's background id; report: the JSON's `spurious` entry.
    """

    module: Any
    variables: dict
    model: Callable
    test: SpuriousData
    background: np.ndarray
    backgrounds: list
    train_images: np.ndarray
    train_labels: np.ndarray
    train_background_ids: np.ndarray
    report: dict


@dataclasses.dataclass(frozen=True)
class MislabelModel:
    """The classifier's own training with labels flipped: `labels` as trained on, `flipped`
    the indices of the flipped ones; report: the JSON's `mislabel` entry."""

    module: Any
    variables: dict
    model: Callable
    labels: np.ndarray
    flipped: np.ndarray
    report: dict


@dataclasses.dataclass
class Experiment:
    """What the tables share: the config, data, trained models, keys, and where figures go.

    `attribute`, `patterns` and `predict` are the steps every table repeats; `grid` draws one
    bug's attribution grid and says where it went.
    """

    config: DebugTestsConfig
    methods: tuple
    keys: dict
    figures: Path
    progress: bool
    module: Any
    params: Any
    state: dict
    normal: Callable
    train: Dataset
    test: Dataset
    reports: dict
    ood: tuple | None = None  # (model, test set, training images)
    spurious: SpuriousModel | None = None
    mislabel: MislabelModel | None = None
    fitted_patterns: dict = dataclasses.field(default_factory=dict)

    def each(self, items, desc):
        """A progress bar over one part's loop."""
        return tqdm(items, desc=desc, leave=False, disable=not self.progress)

    def attribute(self, name, model, x, target, patterns=None) -> np.ndarray:
        """Method `name`'s maps `[N, H, W]`: |attribution| summed over channels, scaled to
        [0, 1] per example."""
        kwargs = attribution.method_kwargs(
            name, train_images=self.train.images,
            key=jax.random.fold_in(self.keys["methods"], list(attribution.METHODS).index(name)),
            patterns=patterns if name in ("pattern_net", "pattern_attribution") else None)
        maps = attribution.METHODS[name](model, jnp.asarray(x), jnp.asarray(target),
                                         batch_size=self.config.batch_size, **kwargs)
        return np.asarray(attribution.normalize_unit(
            attribution.reduce_channels(attribution.absolute(maps))))

    def patterns(self, model, images, cache_key=None):
        """PatternNet's signal estimators for `model` when a pattern method runs, else None."""
        if not {"pattern_net", "pattern_attribution"} & set(self.methods):
            return None
        if cache_key is not None and cache_key in self.fitted_patterns:
            return self.fitted_patterns[cache_key]
        patterns = attribution.fit_patterns(model, images[:5000], progress=False)
        if cache_key is not None:
            self.fitted_patterns[cache_key] = patterns
        return patterns

    def predict(self, model, x) -> np.ndarray:
        return np.asarray(_predict(model, x))

    def grid(self, key, title, inputs, labels, maps) -> dict:
        """One attribution grid (a row per method) in the figures folder: `{key: its path}`."""
        path = self.figures / f"{key}.png"
        plots.bug_grid(path, title, inputs, labels, maps)
        return {key: f"{self.config.name}/{path.name}"}

    def test_inputs(self) -> np.ndarray:
        """The test rows Table 3 and Figure 7 draw their inputs from, in order."""
        permutation = jax.random.permutation(self.keys["inputs"], len(self.test.labels))
        return np.asarray(permutation)[: self.config.num_inputs]


_predict = jit(lambda m, v: jnp.argmax(m(v), -1))


def load_experiment(config: DebugTestsConfig, figures: Path, *, progress: bool = False
                    ) -> Experiment:
    """Train (or restore) every model `config.parts` needs; data and keys for the tables."""
    figures.mkdir(parents=True, exist_ok=True)
    workdir = Path(config.workdir)
    keys = dict(zip(("spurious", "flip", "fresh", "inputs", "methods", "calibration"),
                    jax.random.split(jax.random.key(config.seed), 6)))
    # a stream of its own, so adding Appendix G changed none of the keys above
    keys["appendix_g"] = jax.random.fold_in(jax.random.key(config.seed), 7)
    classifier_config = load_config(config.classifier_config)
    module, params, state, _, metrics = trained_classifier(classifier_config, config.classifier_run,
                                                           progress=progress)
    full = load(config.dataset, "train")
    test = load(config.dataset, "test")
    train, val = train_val_split(full, classifier_config.val_fraction,
                                 key=classifier_config.train.seed)
    reports = {"models": {"normal_test_accuracy": metrics["test_accuracy"]}}
    parts, ood = set(config.parts), None
    if "table3" in parts:
        ood_module, ood_params, ood_state, _, ood_metrics = trained_classifier(
            load_config(config.ood_config), config.ood_run, progress=progress)
        ood = (_attributable(ood_module, {"params": ood_params, **ood_state}),
               load(config.ood_dataset, "test"), load(config.ood_dataset, "train").images)
        reports["models"]["ood_test_accuracy"] = ood_metrics["test_accuracy"]
    spurious = mislabel = None
    if {"table2", "table3", "appendix_g"} & parts:
        spurious = spurious_model(config, classifier_config, full, test, workdir, keys, progress)
        reports["spurious"] = spurious.report
    if {"mislabel", "appendix_g"} & parts:
        mislabel = mislabel_model(config, module, classifier_config, train, val, workdir, keys,
                                  progress)
        reports["mislabel"] = mislabel.report
    return Experiment(
        config=config, methods=tuple(config.methods or attribution.METHODS), keys=keys,
        figures=figures, progress=progress, module=module, params=params, state=state,
        normal=_attributable(module, {"params": params, **state}), train=train, test=test,
        reports=reports, ood=ood, spurious=spurious, mislabel=mislabel)


def spurious_model(config, classifier_config, full, test, workdir, keys, progress
                   ) -> SpuriousModel:
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
    return SpuriousModel(
        module=model_module, variables=variables, model=_attributable(model_module, variables),
        test=test_data, background=background, backgrounds=backgrounds,
        train_images=train.images, train_labels=train.labels,
        train_background_ids=train_data.background_ids[train_rows], report=report)


def mislabel_model(config, module, classifier_config, train, val, workdir, keys, progress
                   ) -> MislabelModel:
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
    return MislabelModel(module=module, variables=variables,
                         model=_attributable(module, variables), labels=labels, flipped=flipped,
                         report=report)


def _attributable(module, variables):
    """`logits_fn` with every weight committed to the default device. Trained weights are
    committed and freshly initialised or restored ones are not, and jit compiles a program
    once per such placement: cascading randomization mixes the two layer by layer, which cost
    one compilation per method and step."""
    return logits_fn(module, jax.device_put(variables, jax.devices()[0]))


def _fit_cached(module, train, val, train_config, run_dir, progress):
    """`fit` with checkpoints in `run_dir`: a finished run is restored, not retrained."""
    params, state = init_classifier(module, train.images.shape[1:],
                                    jax.random.key(train_config.seed))
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


# --- the tables: each returns its entries of the result, plain values ----------------------------


def spurious_table(experiment: Experiment) -> dict:
    """Table 2: SSIM of each method's maps of the spurious model to GT-1 and GT-2 (mean, SEM).

    Returns `{"table2": {method: {"ssim_gt1", "ssim_gt2"}}, "table2_calibration_random_vs_gt1",
    "grids"}`; draws `spurious_example.png` and `spurious_grid.png`.
    """
    ex, spurious = experiment, experiment.spurious
    n, k = ex.config.num_inputs, _grid_inputs(ex.config)
    x, masks = spurious.test.images[:n], spurious.test.object_masks[:n]
    background = spurious.background
    target = ex.predict(spurious.model, x)
    patterns = ex.patterns(spurious.model, spurious.train_images, "spurious")
    gt1 = ground_truth_background(masks)
    rows, panel = {}, {}
    calibration = np.asarray(jax.random.normal(ex.keys["calibration"], gt1.shape))
    for name in ex.each(ex.methods, "Table 2"):
        maps = ex.attribute(name, spurious.model, x, target, patterns)
        background_maps = ex.attribute(name, spurious.model, background[:n], target, patterns)
        gt2 = ground_truth_weighted(background_maps, masks)
        rows[name] = {"ssim_gt1": mean_sem(ssim(maps, gt1)), "ssim_gt2": mean_sem(ssim(maps, gt2))}
        panel[name] = (maps[:k], background_maps[:k])
        if name == ex.methods[0]:
            plots.spurious_example(x[:4], maps[:4], gt1[:4], gt2[:4],
                                   ex.figures / "spurious_example.png", name)
    random_maps = np.asarray(attribution.normalize_unit(jnp.abs(calibration)))
    return {"table2": rows,
            "table2_calibration_random_vs_gt1": mean_sem(ssim(random_maps, gt1)),
            "grids": ex.grid("spurious_grid", "spurious model: the input vs its background alone",
                             (x[:k], background[:k]), ("input", "background alone"), panel)}


def mislabel_table(experiment: Experiment) -> dict:
    """SSIM between the maps of flipped training examples under the model trained on correct
    labels and under the mislabelled model: `{"mislabel_ssim": {method: cell}, "grids"}`."""
    ex, mislabel = experiment, experiment.mislabel
    k = _grid_inputs(ex.config)
    xs = ex.train.images[mislabel.flipped[: ex.config.num_inputs]]
    patterns_clean = ex.patterns(ex.normal, ex.train.images, "normal")
    patterns_mis = ex.patterns(mislabel.model, ex.train.images, "mislabel")
    target_clean = ex.predict(ex.normal, xs)
    target_mis = ex.predict(mislabel.model, xs)
    rows, panel = {}, {}
    for name in ex.each(ex.methods, "mislabelled"):
        clean_maps = ex.attribute(name, ex.normal, xs, target_clean, patterns_clean)
        mis_maps = ex.attribute(name, mislabel.model, xs, target_mis, patterns_mis)
        rows[name] = mean_sem(ssim(clean_maps, mis_maps))
        panel[name] = (clean_maps[:k], mis_maps[:k])
    return {"mislabel_ssim": rows,
            "grids": ex.grid("mislabel_grid",
                             "flipped training examples: correct-label vs mislabelled model",
                             (xs[:k], None), ("correct labels", "flipped labels"), panel)}


def ood_table(experiment: Experiment) -> dict:
    """Table 3: maps of inputs under their in-domain model against an out-of-domain one, SSIM
    and rank correlation: `{"grids", "table3": {setting: {method: {"ssim", "rank"}}}}`."""
    ex, spurious = experiment, experiment.spurious
    n, k = ex.config.num_inputs, _grid_inputs(ex.config)
    ood_model, ood_test, ood_train_images = ex.ood
    pick = ex.test_inputs()
    pick_ood = np.asarray(jax.random.permutation(ex.keys["inputs"], len(ood_test.labels)))[:n]
    patterns_clean = ex.patterns(ex.normal, ex.train.images, "normal")
    patterns = ex.patterns(spurious.model, spurious.train_images, "spurious")
    patterns_ood = ex.patterns(ood_model, ood_train_images, "ood")
    settings = {
        "FMNIST → MNIST model": (ex.test.images[pick], ex.normal, patterns_clean, ood_model,
                                 patterns_ood),
        "MNIST → FMNIST model": (ood_test.images[pick_ood], ood_model, patterns_ood, ex.normal,
                                 patterns_clean),
        "FMNIST → spurious model": (ex.test.images[pick], ex.normal, patterns_clean,
                                    spurious.model, patterns),
    }
    table3, grids, ood_grids = {}, {}, {}
    for setting, bundle in ex.each(settings.items(), "Table 3"):
        inputs, in_model, in_patterns, out_model, out_patterns = bundle
        t_in = ex.predict(in_model, inputs)
        t_out = ex.predict(out_model, inputs)
        table3[setting], panel = {}, {}
        for name in ex.methods:
            a = ex.attribute(name, in_model, inputs, t_in, in_patterns)
            b = ex.attribute(name, out_model, inputs, t_out, out_patterns)
            table3[setting][name] = {"ssim": mean_sem(ssim(a, b)),
                                     "rank": mean_sem(spearman(a, b, absolute=True))}
            panel[name] = (a[:k], b[:k])
        ood_grids[setting] = f"ood_{_slug(setting)}"
        grids.update(ex.grid(ood_grids[setting],
                             f"{setting}: in-domain vs out-of-domain model", (inputs[:k], None),
                             ("in-domain model", "out-of-domain model"), panel))
    # the grids first, as the JSON always had them; ood_grids: each setting's grid in `grids`
    return {"grids": grids, "table3": table3, "ood_grids": ood_grids}


def cascading_table(experiment: Experiment) -> dict:
    """Figure 7: re-initialize the trained classifier from the top layer down; SSIM and rank
    correlation of each step's maps to the trained model's: `{"cascading": {"layers",
    "curves": {method: {"ssim": [cell per step], "rank": [...]}}}}`; draws the figures."""
    ex = experiment
    module, params, state = ex.module, ex.params, ex.state
    fresh, _ = init_classifier(module, ex.train.images.shape[1:], ex.keys["fresh"])
    order = forward_layer_order(lambda p, v: module.apply({"params": p, **state}, v), params,
                                ex.test.images[:1])
    steps = [("trained", params)] + cascading_randomization(params, fresh, order)
    inputs = ex.test.images[ex.test_inputs()[: ex.config.randomization_inputs]]
    target = ex.predict(ex.normal, inputs)
    curves, cascade = {name: {"ssim": [], "rank": []} for name in ex.methods}, {}
    for step, (_layer, step_params) in enumerate(ex.each(steps, "Figure 7")):
        model = _attributable(module, {"params": step_params, **state})
        step_patterns = ex.patterns(model, ex.train.images)
        for name in ex.methods:
            maps = ex.attribute(name, model, inputs, target, step_patterns)
            if step == 0:
                cascade[name] = [maps[0]]
                reference = curves[name]["reference"] = maps
            else:
                cascade[name].append(maps[0])
                reference = curves[name]["reference"]
            curves[name]["ssim"].append(mean_sem(ssim(reference, maps)))
            curves[name]["rank"].append(mean_sem(spearman(reference, maps, absolute=True)))
    for name in ex.methods:
        del curves[name]["reference"]
    layers = [layer for layer, _ in steps]
    plots.cascading_grid(inputs[0], cascade, layers, ex.figures / "cascading_grid.png")
    plots.cascading_curves(curves, layers, ex.figures / "cascading_curves.png")
    return {"cascading": {"layers": layers, "curves": curves}}


def tcav_table(experiment: Experiment, *, key) -> dict:
    """Appendix G: TCAV of each spurious background for each class of the spurious model (and
    of its re-initialized architecture with `tcav_control`); see `background_tcav`."""
    config, spurious = experiment.config, experiment.spurious
    found = background_tcav(
        spurious.module, spurious.variables, spurious.test, spurious.backgrounds,
        config.backgrounds, spurious.report["classes"], experiment.test.images,
        layers=config.tcav_layers, concept_images=config.tcav_concept_images,
        random_sets=config.tcav_random_sets, inputs_per_class=config.tcav_inputs,
        alpha=config.tcav_alpha, control=config.tcav_control, key=key)
    if "skipped" not in found:  # past this layer the network is linear: one gradient for all
        found["linear_layer"] = layer_names(spurious.module)[-2]
    return found


def influence_table(experiment: Experiment, *, key) -> dict:
    """Appendix G: influence of the spurious model's training images on test losses, by
    background; see `background_influence`."""
    config, spurious = experiment.config, experiment.spurious
    return background_influence(
        spurious.module, spurious.variables, spurious.train_images, spurious.train_labels,
        spurious.train_background_ids, spurious.test, spurious.background, spurious.backgrounds,
        pool_size=config.influence_train, test_size=config.influence_test,
        top=config.influence_top, damping=config.influence_damping, key=key)


def self_influence_table(experiment: Experiment, *, key) -> dict:
    """Appendix G: the mislabelled model's training set checked in decreasing self-influence;
    see `find_flipped_labels`."""
    config, mislabel = experiment.config, experiment.mislabel
    return find_flipped_labels(
        mislabel.module, mislabel.variables, experiment.train.images, mislabel.labels,
        mislabel.flipped, subset=config.self_influence_train, damping=config.influence_damping,
        key=key)


def appendix_g_table(experiment: Experiment, *, after_each: Callable[[dict], None] = lambda e: None
                     ) -> dict:
    """Appendix G: the TCAV, influence and self-influence tables with the seconds each took:
    `{"appendix_g": {"seconds", "tcav", "influence", "self_influence"}, "grids"}`.

    after_each: called with the entries so far after each table (to save them as they come).
    """
    appendix = {"seconds": {}}
    key = experiment.keys["appendix_g"]
    steps = (("tcav", tcav_table), ("influence", influence_table),
             ("self_influence", self_influence_table))
    for i, (step_name, table) in enumerate(steps):
        step_started = time.perf_counter()
        appendix[step_name] = table(experiment, key=jax.random.fold_in(key, i))
        appendix["seconds"][step_name] = time.perf_counter() - step_started
        after_each({"appendix_g": appendix})
    entries = {"appendix_g": appendix}
    if "rankings" in appendix["self_influence"]:
        path = plots.checking_figure(appendix["self_influence"]["rankings"],
                                     experiment.figures / "appendix_g_checking.png")
        entries["grids"] = {"appendix_g_checking": f"{experiment.config.name}/{path.name}"}
    return entries


def _grid_inputs(config) -> int:
    """Input columns of the attribution grids."""
    return max(1, min(config.grid_inputs, config.num_inputs))


# --- the report -----------------------------------------------------------------------------------


def render_markdown(result: dict) -> str:
    """The report of a run, from its result (the JSON's content) alone.

    The template `jfail/templates/debug_tests.j2` (REPORT_TEMPLATE) renders it; a result written
    before the JSON named every part (`all_parts`), each Table 3 setting's grid (`ood_grids`) and
    TCAV's last nonlinear layer (`linear_layer`) gets them from this module's definitions.
    """
    result = dict(result)
    result.setdefault("all_parts", list(PARTS))
    if "table3" in result:
        result.setdefault("ood_grids", {setting: f"ood_{_slug(setting)}"
                                        for setting in result["table3"]})
    tcav = result.get("appendix_g", {}).get("tcav", {})
    if tcav and "skipped" not in tcav and "linear_layer" not in tcav:
        tcav = {**tcav, "linear_layer": layer_names(DefuseCNN())[-2]}
        result["appendix_g"] = {**result["appendix_g"], "tcav": tcav}
    return render_template(REPORT_TEMPLATE, result, name=result["config"]["name"])


if __name__ == "__main__":
    main(prog="python -m jfail.pipelines.debug_tests")
