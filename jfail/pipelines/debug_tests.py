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

`load_experiment` trains (or restores) the models; each table (`spurious_table`,
`mislabel_table`, `ood_table`, `cascading_table`, `appendix_g_table`) returns its entries of the
result, plain values that are the JSON; `render_markdown` writes the report from the result alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Callable

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
from jfail.train import evaluate, fit, predict
from jfail.train.run import trained_classifier, write_json
from jfail.xla import jit


PARTS = ("table2", "mislabel", "table3", "figure7", "appendix_g")
"""What `--parts` (or the config's `parts`) may name, in the order they run."""


def main(argv: list[str] | None = None, prog: str = "python experiments/debug_tests.py") -> None:
    config, args = _parse_arguments(argv, prog)
    out = Path(args.out_dir)
    progress = not args.quiet and sys.stderr.isatty()
    result = {"command": command_line(prog, argv), "config": dataclasses.asdict(config),
              "devices": [str(d) for d in jax.devices()],
              "methods": list(config.methods or attribution.METHODS), "parts": list(config.parts)}
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
        (self.out / f"{self.name}.md").write_text(render_markdown(self.result))

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
    table3, grids = {}, {}
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
        grids.update(ex.grid(f"ood_{_slug(setting)}",
                             f"{setting}: in-domain vs out-of-domain model", (inputs[:k], None),
                             ("in-domain model", "out-of-domain model"), panel))
    return {"grids": grids, "table3": table3}  # the grids first, as the JSON always had them


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
    for step, (layer, step_params) in enumerate(ex.each(steps, "Figure 7")):
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
    return background_tcav(
        spurious.module, spurious.variables, spurious.test, spurious.backgrounds,
        config.backgrounds, spurious.report["classes"], experiment.test.images,
        layers=config.tcav_layers, concept_images=config.tcav_concept_images,
        random_sets=config.tcav_random_sets, inputs_per_class=config.tcav_inputs,
        alpha=config.tcav_alpha, control=config.tcav_control, key=key)


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


def _slug(text: str) -> str:
    text = text.replace("→", " to ").lower()
    return "_".join("".join(c if c.isalnum() else " " for c in text).split())


# --- the report -----------------------------------------------------------------------------------


def render_markdown(result: dict) -> str:
    """The report of a run, from its result (the JSON's content) alone."""
    s, config = result, result["config"]
    grids = s.get("grids", {})

    def fmt(cell: dict) -> str:
        return f"{cell['mean']:.3f} ± {cell['sem']:.3f}"

    def figure(key, alt):
        return [f"![{alt}]({grids[key]})", ""] if key in grids else []

    lines = ["# Debugging tests for explanations (seed 002)", "", "Produced by:", "", "```bash",
             s["command"], "```", "", f"Devices: {', '.join(s['devices'])}. Inputs per table: "
             f"{config['num_inputs']}. Mean ± SEM over the inputs.", ""]
    if list(s.get("parts", PARTS)) != list(PARTS):
        lines += [f"Parts run: {', '.join(s['parts'])} (of {', '.join(PARTS)}).", ""]
    if "table2" in s:
        sp = s["spurious"]
        lines += ["## Table 2: spurious correlation", "",
                  f"{sp['classes'][0]} on {sp['backgrounds'][0]} vs {sp['classes'][1]} on "
                  f"{sp['backgrounds'][1]}: test accuracy {sp['test_accuracy']:.4f}; on the "
                  f"backgrounds alone {sp['background_only_accuracy']:.4f} (the paper: 97 %).", "",
                  "| method | SSIM-GT1 | SSIM-GT2 |", "| --- | ---: | ---: |"]
        lines += [f"| {m} | {fmt(r['ssim_gt1'])} | {fmt(r['ssim_gt2'])} |"
                  for m, r in s["table2"].items()]
        lines += ["", f"Calibration: SSIM of a random Gaussian map to GT-1 "
                  f"{fmt(s['table2_calibration_random_vs_gt1'])}.", "",
                  f"![spurious]({config['name']}/spurious_example.png)", ""]
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
        lines += [f"| {m} | {fmt(r)} |" for m, r in s["mislabel_ssim"].items()]
        lines += [""]
        lines += figure("mislabel_grid", "flipped examples, every method")
    if "table3" in s:
        settings = list(s["table3"])
        lines += ["## Table 3: out-of-distribution inputs", "",
                  "| method | " + " | ".join(f"{x} SSIM | {x} rank" for x in settings) + " |",
                  "| --- | " + " | ".join("---: | ---:" for _ in settings) + " |"]
        for m in s["methods"]:
            cells = [f"{fmt(s['table3'][x][m]['ssim'])} | {fmt(s['table3'][x][m]['rank'])}"
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
        lines += ["", f"![grid]({config['name']}/cascading_grid.png)", "",
                  f"![curves]({config['name']}/cascading_curves.png)", ""]
    if "appendix_g" in s:
        g, sp = s["appendix_g"], s.get("spurious", {})
        lines += ["## Appendix G: TCAV and influence functions", ""]
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
            last = layer_names(DefuseCNN())[-2]
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
                lines.append(f"| {kind} | {fmt(shared['absolute'])} | {fmt(shared['helpful'])} | "
                             f"{fmt(shared['harmful'])} | {e['base_rate']['mean']:.3f} | "
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
                lines.append(f"| {name} | {fmt(r['mean_fraction'])} | {r['to_find']['50%']:.3f} | "
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
        lines += figure("appendix_g_checking", "flipped labels found against training set checked")
    lines += [f"Total time: {s.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(prog="python -m jfail.pipelines.debug_tests")
