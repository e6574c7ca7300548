"""Barlow (seed 000): Table 1, Tables 2-5 and the visual panels of seed 000's appendix.

    python experiments/barlow.py --config configs/barlow_fmnist.py

The errors of a standard and of an ℓ2-robust ResNet-18 on `config.split` (by default the standard
classifier's validation images) are explained with the robust model's penultimate features, as in
the paper (Table 1: the fraction of groups whose leaf of highest importance is valid, for each
model, grouping and depth; Tables 2-3 list the depth-1 rules for the standard model's errors,
Tables 4-5 for the robust model's). Beyond the paper, the standard model's errors are also
explained with its own features, and every leaf of every search is measured on
`config.evidence_split` (by default the test images) by its rule (`jfail.barlow.leaf_evidence`):
held-out error rate, Wilson interval, exact binomial p-value against its group's held-out error
rate and a q-value over all the search's leaves; the significant leaves are listed first. Writes
strict `results/<name>.json` (null for missing values), PNG panels, and `results/<name>.md`
rendered from that JSON by the template `jfail/templates/barlow.j2`.

With `model="package.module:function"` (one's own model, `jfail.models.user`) there are no
classifier runs: that model's errors are explained with its own features, with the same held-out
evidence, depth-1 rule tables and panels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jfail import barlow, jsonfile
from jfail.config import BarlowConfig, ConfigError, load_config, validate_config
from jfail.data import Dataset, load, train_val_split
from jfail.logs import quiet_libraries
from jfail.models import ModelFns, linen_apply, model_fns
from jfail.models.user import USER_VAL_FRACTION, check_user_model, user_model_for_data
from jfail.pipelines import command_line, user_splits
from jfail.report import render_markdown
from jfail.train import predict
from jfail.train.run import trained_classifier, write_json

REPORT_TEMPLATE = "barlow"
"""The template in jfail/templates that renders this pipeline's JSON as Markdown and HTML."""


def main(argv: list[str] | None = None, prog: str = "python experiments/barlow.py") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    quiet_libraries()
    config: BarlowConfig = load_config(args.config, args.set)
    if not isinstance(config, BarlowConfig):
        parser.error(f"{args.config} is not a Barlow config")
    try:
        validate_config(config)
    except ConfigError as error:
        parser.error(str(error))
    command = command_line(prog, argv)
    out = Path(args.out_dir)
    figures = out / config.name
    figures.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = not args.quiet and sys.stderr.isatty()

    if config.model is not None:
        _user_model_main(config, command, out, figures, started, progress)
        return
    runs = {  # (module, params, state, config, metrics), trained first when missing
        "standard": trained_classifier(load_config(config.classifier_config),
                                       config.classifier_run, progress=progress),
        "robust": trained_classifier(load_config(config.robust_config), config.robust_run,
                                     progress=progress),
    }
    splits = _splits(config, runs["standard"][3])
    data, heldout = splits[config.split], splits[config.evidence_split]
    networks = {name: run[:3] for name, run in runs.items()}
    fns = {name: model_fns(module, {"params": p, **s}) for name, (module, p, s) in networks.items()}

    def observe(part: Dataset):
        """Each model's predictions, errors and features on one split."""
        predictions = {
            name: predict(linen_apply(module), p, s, part.images).argmax(-1)
            for name, (module, p, s) in networks.items()
        }
        return {
            "predictions": predictions,
            "errors": {name: pred != part.labels for name, pred in predictions.items()},
            "features": {
                name: barlow.features(fn.features, part.images, progress=progress)
                for name, fn in fns.items()
            },
            # each model's errors are grouped by the labels or by its own predictions
            "groupings": {
                name: {"label": part.labels, "prediction": predictions[name]} for name in networks
            },
        }

    fitted, measured = observe(data), observe(heldout)
    errors, features, groupings_of = fitted["errors"], fitted["features"], fitted["groupings"]
    class_names = data.class_names

    def explain(extractor, analysed, depth, grouping):
        return barlow.failure_trees(
            features[extractor], errors[analysed], groupings_of[analysed][grouping],
            num_features=config.num_features, max_depth=depth, delta=config.delta,
            tau=config.tau, screen=config.screen, key=config.seed, progress=progress,
        )

    def measure(extractor, analysed, grouping, result):
        return barlow.leaf_evidence(
            result, measured["features"][extractor], measured["errors"][analysed],
            measured["groupings"][analysed][grouping], method=config.fdr_method,
            alpha=config.alpha,
        )

    # Table 1, as the paper: each model's errors explained with the robust model's features.
    # Beyond it: the standard model's errors explained with its own (standard) features.
    # Every search's leaves are measured on the held-out split; q-values are over all the leaves
    # of one search (one model, extractor, depth and grouping: every group's tree).
    table1, extractor_rows, trees, evidence = [], [], {}, {}
    for extractor, analysed, rows in (("robust", "standard", table1), ("robust", "robust", table1),
                                       ("standard", "standard", extractor_rows)):
        for depth in config.depths:
            for grouping in config.groupings:
                result = explain(extractor, analysed, depth, grouping)
                found = measure(extractor, analysed, grouping, result)
                trees[(extractor, analysed, depth, grouping)] = result
                evidence[(extractor, analysed, depth, grouping)] = found
                rows.append({
                    "model": analysed,
                    "extractor": extractor,
                    "depth": depth,
                    "grouping": grouping,
                    "valid_leaf_fraction": barlow.valid_leaf_fraction(result),
                    "mean_aler_minus_ber": float(
                        np.mean([t.aler - t.base_error_rate for t in result.values()])
                    ),
                    "groups": len(result),
                    "candidate_leaves": found.num_candidates,
                    "significant_leaves": found.num_significant,
                })

    # Tables 2-5: depth-1 rules with robust features, for each analysed model and grouping.
    tables = {}
    for analysed in ("standard", "robust"):
        for grouping in ("label", "prediction"):
            key = ("robust", analysed, 1, grouping)
            if key not in trees:
                trees[key] = explain("robust", analysed, 1, grouping)
                evidence[key] = measure("robust", analysed, grouping, trees[key])
            tables[(analysed, grouping)] = trees[key]

    # Panels: for every valid depth-1 leaf of the standard classifier grouped by label.
    panels = []
    key = jax.random.key(config.seed)
    for group, tree in tables[("standard", "label")].items():
        leaf = tree.top_leaf
        if not leaf.valid or not leaf.conditions:
            continue
        feature_index = leaf.conditions[0].feature
        path = figures / f"panel_label_{group}_feature_{feature_index}.png"
        _panel(
            fns["robust"], data, tree, leaf, feature_index, config,
            jax.random.fold_in(key, int(group)), path,
            title=f"label {class_names[group]}: {leaf.rule} "
            f"(ER {leaf.error_rate:.3f} vs BER {tree.base_error_rate:.3f}, "
            f"EC {leaf.error_coverage:.3f})",
        )
        panels.append(str(path))

    summary = {
        "command": command,
        "config": json.loads(json.dumps(config.__dict__, default=str)),
        "data": {"name": config.dataset, "split": config.split, "images": len(data.labels),
                 "evidence_split": config.evidence_split, "evidence_images": len(heldout.labels),
                 "held_out_from_training": _held_out_from_training(config, runs)},
        "models": {name: _ARCHITECTURES.get(run[3].model, run[3].model)
                   for name, run in runs.items()},
        "error_rates": {name: float(e.mean()) for name, e in errors.items()},
        "evidence_error_rates": {name: float(e.mean()) for name, e in measured["errors"].items()},
        "test_metrics": {name: _test_metrics(run[4]) for name, run in runs.items()},
        "table1": table1,
        "extractor_comparison": extractor_rows,
        "evidence": {
            "method": config.fdr_method,
            "alpha": config.alpha,
            "candidate_leaves": sum(found.num_candidates for found in evidence.values()),
            "significant_leaves": sum(found.num_significant for found in evidence.values()),
            "searches": [
                _evidence_record(key, found, class_names) for key, found in evidence.items()
            ],
        },
        "tables": {
            f"{analysed}_{grouping}": [
                _tree_record(group, tree, class_names,
                             _top_leaf_evidence(evidence[("robust", analysed, 1, grouping)],
                                                group, tree))
                for group, tree in result.items()
            ]
            for (analysed, grouping), result in tables.items()
        },
        "panels": panels,
        "seconds": time.perf_counter() - started,
    }
    summary = jsonfile.strict(summary, default=str)
    write_json(out / f"{config.name}.json", summary)
    # the Markdown shows what the JSON holds (null for a missing number)
    summary = json.loads((out / f"{config.name}.json").read_text())
    markdown = render_markdown(REPORT_TEMPLATE, summary, name=config.name)
    (out / f"{config.name}.md").write_text(markdown)
    print((out / f"{config.name}.md").read_text())


def _test_metrics(metrics: dict) -> dict:
    """Clean and PGD test accuracy recorded by a classifier's run."""
    keys = ("test_accuracy", "test_robust_accuracy", "eval_attack", "train_seconds")
    return {key: metrics.get(key) for key in keys}


def _panel(fns, data, tree, leaf, feature_index, config, key, path, title):
    """Most activating images, their heatmaps, feature attacks, random failures in the leaf."""
    members = tree.indices
    values = np.asarray(barlow.features(fns.features, data.images[members]))[:, feature_index]
    top = members[np.argsort(-values)[: config.panel_images]]
    channels = (None if fns.feature_map is None
                else np.shape(fns.feature_map(data.images[top[:1]]))[-1])
    if channels == np.shape(fns.features(data.images[top[:1]]))[-1]:
        heatmaps = barlow.heatmap(fns.feature_map, data.images[top], feature_index)
    else:  # features are not a pooled feature map (e.g. a dense layer): no spatial map to show
        heatmaps = np.zeros(data.images[top].shape[:3], np.float32)
    attacked = barlow.feature_attack(
        fns.features, data.images[top], feature_index, epsilon=config.attack_epsilon,
        step_size=config.attack_step_size, steps=config.attack_steps,
    )
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    failures = leaf.error_indices
    failures = rng.choice(failures, min(config.panel_images, len(failures)), replace=False)
    barlow.plot_feature_panel(
        data.images[top], np.asarray(heatmaps), np.asarray(attacked), data.images[failures],
        title, path,
    )


def _user_model_main(config: BarlowConfig, command: str, out: Path, figures: Path,
                     started: float, progress: bool) -> None:
    """Barlow on one's own model (`config.model`): its errors on `config.split` explained with its
    own features, every leaf measured on `config.evidence_split`, depth-1 rules and panels."""
    user, dataset = user_model_for_data(config.model, config.dataset, needs=("features",))
    splits = user_splits(dataset, {config.split, config.evidence_split}, seed=config.seed)
    data, heldout = splits[config.split], splits[config.evidence_split]
    check_user_model(user, data.images.shape[1:], num_classes=len(data.class_names),
                     needs=("features",), where=f"model={config.model}")
    class_names = data.class_names

    def observe(part: Dataset):
        predictions = np.asarray(predict(user.classifier, part.images)).argmax(-1)
        return {"errors": predictions != part.labels,
                "features": barlow.features(user.features, part.images, progress=progress),
                "groupings": {"label": part.labels, "prediction": predictions}}

    fitted, measured = observe(data), observe(heldout)
    rows, trees, evidence = [], {}, {}
    for depth in sorted(set(config.depths) | {1}):
        for grouping in config.groupings:
            result = barlow.failure_trees(
                fitted["features"], fitted["errors"], fitted["groupings"][grouping],
                num_features=config.num_features, max_depth=depth, delta=config.delta,
                tau=config.tau, screen=config.screen, key=config.seed, progress=progress)
            found = barlow.leaf_evidence(
                result, measured["features"], measured["errors"],
                measured["groupings"][grouping], method=config.fdr_method, alpha=config.alpha)
            key = ("user", "user", depth, grouping)
            trees[key], evidence[key] = result, found
            if depth not in config.depths:  # depth 1 only for the rule tables
                continue
            rows.append({
                "model": "user", "extractor": "user", "depth": depth, "grouping": grouping,
                "valid_leaf_fraction": barlow.valid_leaf_fraction(result),
                "mean_aler_minus_ber": float(
                    np.mean([t.aler - t.base_error_rate for t in result.values()])),
                "groups": len(result),
                "candidate_leaves": found.num_candidates,
                "significant_leaves": found.num_significant,
            })
    shown = {key: found for key, found in evidence.items() if key[2] in config.depths}

    panels = []
    fns = ModelFns(logits=user.classifier, features=user.features, feature_map=None)
    key = jax.random.key(config.seed)
    if "label" in config.groupings:
        for group, tree in trees[("user", "user", 1, "label")].items():
            leaf = tree.top_leaf
            if not leaf.valid or not leaf.conditions:
                continue
            feature_index = leaf.conditions[0].feature
            path = figures / f"panel_label_{group}_feature_{feature_index}.png"
            _panel(fns, data, tree, leaf, feature_index, config,
                   jax.random.fold_in(key, int(group)), path,
                   title=f"label {class_names[group]}: {leaf.rule} "
                   f"(ER {leaf.error_rate:.3f} vs BER {tree.base_error_rate:.3f}, "
                   f"EC {leaf.error_coverage:.3f})")
            panels.append(str(path))

    summary = {
        "command": command,
        "config": json.loads(json.dumps(config.__dict__, default=str)),
        "data": {"name": dataset, "split": config.split, "images": len(data.labels),
                 "evidence_split": config.evidence_split, "evidence_images": len(heldout.labels),
                 "held_out_from_training": None, "user_model": True,
                 "val_fraction": USER_VAL_FRACTION},  # the share `user_splits` holds out
        "models": {"user": config.model},
        "error_rates": {"user": float(fitted["errors"].mean())},
        "evidence_error_rates": {"user": float(measured["errors"].mean())},
        "class_error_rates": {
            class_names[c]: float(fitted["errors"][data.labels == c].mean())
            if (data.labels == c).any() else None for c in range(len(class_names))},
        "table1": rows,
        "evidence": {
            "method": config.fdr_method,
            "alpha": config.alpha,
            "candidate_leaves": sum(found.num_candidates for found in shown.values()),
            "significant_leaves": sum(found.num_significant for found in shown.values()),
            "searches": [_evidence_record(k, found, class_names) for k, found in shown.items()],
        },
        "tables": {
            f"user_{grouping}": [
                _tree_record(group, tree, class_names,
                             _top_leaf_evidence(evidence[("user", "user", 1, grouping)], group,
                                                tree))
                for group, tree in trees[("user", "user", 1, grouping)].items()]
            for grouping in config.groupings
        },
        "panels": panels,
        "seconds": time.perf_counter() - started,
    }
    summary = jsonfile.strict(summary, default=str)
    write_json(out / f"{config.name}.json", summary)
    summary = json.loads((out / f"{config.name}.json").read_text())
    (out / f"{config.name}.md").write_text(render_markdown(REPORT_TEMPLATE, summary,
                                                           name=config.name))
    print((out / f"{config.name}.md").read_text())


def _splits(config: BarlowConfig, classifier_config) -> dict[str, Dataset]:
    """The splits the config names: "train" (all of it), "val" (the standard classifier's own
    validation part: same fraction and seed as its training) and "test"."""
    wanted = {config.split, config.evidence_split}
    parts: dict[str, Dataset] = {}
    if wanted & {"train", "val"}:
        full = load(config.dataset, "train")
        parts["train"] = full
        if "val" in wanted:
            _, parts["val"] = train_val_split(
                full, classifier_config.val_fraction, key=classifier_config.train.seed
            )
    if "test" in wanted:
        parts["test"] = load(config.dataset, "test")
    return parts


def _held_out_from_training(config: BarlowConfig, runs) -> dict[str, dict[str, bool]]:
    """Per model, whether the images the trees are fitted on and those the leaves are measured on
    were kept out of its training (its own validation part, or the test split)."""
    standard = runs["standard"][3]

    def held_out(split, run_config):
        if split == "test":
            return True
        if split == "train":
            return False
        return (run_config.dataset == standard.dataset
                and run_config.val_fraction == standard.val_fraction
                and run_config.train.seed == standard.train.seed)

    return {
        name: {"fit": held_out(config.split, run[3]),
               "evidence": held_out(config.evidence_split, run[3])}
        for name, run in runs.items()
    }


def _evidence_record(key, found, class_names) -> dict:
    extractor, analysed, depth, grouping = key
    rows = found.rows()
    for row in rows:
        row["name"] = class_names[int(row["group"])]
    return {
        "model": analysed,
        "extractor": extractor,
        "depth": depth,
        "grouping": grouping,
        "candidate_leaves": found.num_candidates,
        "significant_leaves": found.num_significant,
        "leaves": rows,  # significant first, then by q-value
    }


def _top_leaf_evidence(found, group, tree) -> dict | None:
    """The held-out evidence of a tree's leaf of highest importance (None for an unsplit tree)."""
    leaf = tree.top_leaf
    for index, (name, candidate) in enumerate(zip(found.groups, found.leaves)):
        if name == group and candidate is leaf:
            return found.row(index)
    return None


def _tree_record(group, tree, class_names, heldout=None) -> dict:
    leaf = tree.top_leaf
    return {
        "group": int(group),
        "name": class_names[int(group)],
        "feature": [c.feature for c in leaf.conditions],
        "rule": leaf.rule,
        "ber": tree.base_error_rate,
        "er": leaf.error_rate,
        "ec": leaf.error_coverage,
        "iv": leaf.importance,
        "aler": tree.aler,
        "valid": leaf.valid,
        "size": leaf.size,
        "errors_in_group": tree.num_errors,
        "reason": tree.reason,
        "heldout": heldout,
    }


_ARCHITECTURES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "defuse_cnn": "Defuse CNN",
                  "mlp": "MLP"}


if __name__ == "__main__":
    main(prog="python -m jfail.pipelines.barlow")
