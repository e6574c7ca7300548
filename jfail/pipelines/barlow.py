"""Barlow (seed 000): Table 1, Tables 2-5 and the visual panels of seed 000's appendix.

    python experiments/barlow.py --config configs/barlow_fmnist.py

The training-split errors of a standard and of an ℓ2-robust ResNet-18 are explained with the
robust model's penultimate features, as in the paper (Table 1: the fraction of groups whose leaf
of highest importance is valid, for each model, grouping and depth; Tables 2-3 list the depth-1
rules for the standard model's errors, Tables 4-5 for the robust model's). Beyond the paper, the
standard model's errors are also explained with its own features. Writes `results/<name>.md`,
`.json` and PNG panels.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jfail import barlow
from jfail.config import BarlowConfig, load_config
from jfail.data import load
from jfail.logs import quiet_libraries
from jfail.models import linen_apply, model_fns
from jfail.train import predict
from jfail.train.run import trained_classifier, write_json


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
    command = prog + " " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out_dir)
    figures = out / config.name
    figures.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = not args.quiet and sys.stderr.isatty()

    data = load(config.dataset, config.split)
    runs = {  # (module, params, state, config, metrics), trained first when missing
        "standard": trained_classifier(load_config(config.classifier_config),
                                       config.classifier_run, progress=progress),
        "robust": trained_classifier(load_config(config.robust_config), config.robust_run,
                                     progress=progress),
    }
    networks = {name: run[:3] for name, run in runs.items()}
    fns = {name: model_fns(module, {"params": p, **s}) for name, (module, p, s) in networks.items()}
    predictions = {
        name: predict(linen_apply(module), p, s, data.images).argmax(-1)
        for name, (module, p, s) in networks.items()
    }
    errors = {name: pred != data.labels for name, pred in predictions.items()}
    features = {
        name: barlow.features(fn.features, data.images, progress=progress)
        for name, fn in fns.items()
    }
    class_names = data.class_names
    groupings_of = {  # each model's errors are grouped by the labels or by its own predictions
        name: {"label": data.labels, "prediction": predictions[name]} for name in networks
    }

    def explain(extractor, analysed, depth, grouping):
        return barlow.failure_trees(
            features[extractor], errors[analysed], groupings_of[analysed][grouping],
            num_features=config.num_features, max_depth=depth, delta=config.delta,
            tau=config.tau, key=config.seed, progress=progress,
        )

    # Table 1, as the paper: each model's errors explained with the robust model's features.
    # Beyond it: the standard model's errors explained with its own (standard) features.
    table1, extractor_rows, trees = [], [], {}
    for extractor, analysed, rows in (("robust", "standard", table1), ("robust", "robust", table1),
                                       ("standard", "standard", extractor_rows)):
        for depth in config.depths:
            for grouping in config.groupings:
                result = explain(extractor, analysed, depth, grouping)
                trees[(extractor, analysed, depth, grouping)] = result
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
                })

    # Tables 2-5: depth-1 rules with robust features, for each analysed model and grouping.
    tables = {}
    for analysed in ("standard", "robust"):
        for grouping in ("label", "prediction"):
            key = ("robust", analysed, 1, grouping)
            tables[(analysed, grouping)] = (
                trees[key] if key in trees else explain("robust", analysed, 1, grouping)
            )

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
        "data": {"name": config.dataset, "split": config.split, "images": len(data.labels)},
        "models": {name: _ARCHITECTURES.get(run[3].model, run[3].model) for name, run in runs.items()},
        "error_rates": {name: float(e.mean()) for name, e in errors.items()},
        "test_metrics": {name: _test_metrics(run[4]) for name, run in runs.items()},
        "table1": table1,
        "extractor_comparison": extractor_rows,
        "tables": {
            f"{analysed}_{grouping}": [
                _tree_record(group, tree, class_names) for group, tree in result.items()
            ]
            for (analysed, grouping), result in tables.items()
        },
        "panels": panels,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / f"{config.name}.json", summary)
    (out / f"{config.name}.md").write_text(_markdown(summary, tables, class_names, figures, out))
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
    channels = np.shape(fns.feature_map(data.images[top[:1]]))[-1]
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


def _tree_record(group, tree, class_names) -> dict:
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
    }


_ARCHITECTURES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "defuse_cnn": "Defuse CNN",
                  "mlp": "MLP"}


def _markdown(summary, tables, class_names, figures, out) -> str:
    names = dict(enumerate(class_names))
    arch = summary["models"]
    lines = [
        f"# Barlow on {summary['data']['name']}",
        "",
        "Produced by:",
        "",
        "```",
        summary["command"],
        "```",
        "",
        f"Data: {summary['data']['name']} {summary['data']['split']} split, "
        f"{summary['data']['images']:,} images. Error rates: standard {arch['standard']} "
        f"{100 * summary['error_rates']['standard']:.2f} %, robust {arch['robust']} "
        f"{100 * summary['error_rates']['robust']:.2f} %. Run time {summary['seconds']:.0f} s.",
        "",
        "| model | test accuracy | test accuracy under PGD | attack |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, metrics in summary["test_metrics"].items():
        attack = metrics.get("eval_attack")
        robust = metrics.get("test_robust_accuracy")
        lines.append(
            f"| {name} {arch[name]} | {100 * metrics['test_accuracy']:.2f} % | "
            + (f"{100 * robust:.2f} % |" if robust is not None else "- |")
            + (f" ℓ{attack['norm'][1:]} ε = {attack['epsilon']}, {attack['steps']} steps |"
               if attack else " - |")
        )
    lines += [
        "",
        "## Table 1: fraction of valid leaves",
        "",
        "As in the paper, each model's errors are explained with the robust model's features; "
        "the leaf of highest IV per group is valid when ER > BER + δ and EC > τ "
        f"(δ = {summary['config']['delta']}, τ = {summary['config']['tau']}). Paper (ImageNet, "
        "1,000 classes): standard 0.596 / 0.211 / 0.900 / 0.649, robust 0.977 / 0.787 / 0.899 / "
        "0.804 (depth 1 label, depth 1 prediction, depth 3 label, depth 3 prediction).",
        "",
    ]
    lines += _fraction_table(summary["table1"])
    lines += [
        "",
        "## Beyond the paper: which features explain the standard model's errors",
        "",
        "The standard model's errors explained with its own features (compare with the "
        "'standard' rows of Table 1, which use the robust model's features).",
        "",
    ]
    lines += _fraction_table(summary["extractor_comparison"])
    titles = {
        ("standard", "label"): f"Table 2 analogue: standard {arch['standard']}, grouping by label",
        ("standard", "prediction"): f"Table 3 analogue: standard {arch['standard']}, grouping by "
                                    "prediction",
        ("robust", "label"): f"Table 4 analogue: robust {arch['robust']}, grouping by label",
        ("robust", "prediction"): f"Table 5 analogue: robust {arch['robust']}, grouping by "
                                  "prediction",
    }
    for key, title in titles.items():
        lines += ["", f"## {title}", "", "Depth-1 trees on robust features.", "",
                  barlow.failure_table(tables[key], names)]
    lines += ["", "## Panels", "",
              "Rows: most activating images of the leaf's feature in the group, their heatmaps, "
              "feature attacks, random failures in the leaf.", ""]
    for panel in summary["panels"]:
        lines.append(f"![{Path(panel).stem}]({Path(panel).relative_to(out)})")
    return "\n".join(lines) + "\n"


def _fraction_table(rows) -> list[str]:
    lines = [
        "| model explained | features | depth | grouping | valid-leaf fraction | mean ALER − BER | groups |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['extractor']} | {row['depth']} | {row['grouping']} | "
            f"{row['valid_leaf_fraction']:.3f} | {row['mean_aler_minus_ber']:.4f} | {row['groups']} |"
        )
    return lines


if __name__ == "__main__":
    main(prog="python -m jfail.pipelines.barlow")
