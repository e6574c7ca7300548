"""Barlow on Fashion-MNIST: Table 1, Tables 2-5 and the visual panels of seed 000's appendix.

    python experiments/barlow.py --config configs/barlow_fmnist.py

A standard ResNet-18's errors on the training split are explained with penultimate features of
an ℓ2-robust ResNet-18 and of the standard one (Table 1: the fraction of groups whose leaf of
highest importance is valid, for each extractor, grouping and depth). Tables 2-3 list the depth-1
rules for the standard classifier's errors, Tables 4-5 for the robust model's own errors, both
with robust features, as in the paper. Writes `results/<name>.md`, `.json` and PNG panels.
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
from jfail.train.run import load_trained_classifier, run_classifier, write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args(argv)
    quiet_libraries()
    config: BarlowConfig = load_config(args.config, args.set)
    if not isinstance(config, BarlowConfig):
        parser.error(f"{args.config} is not a Barlow config")
    command = "python experiments/barlow.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out_dir)
    figures = out / config.name
    figures.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = sys.stderr.isatty()

    data = load(config.dataset, config.split)
    networks = {
        "standard": _trained(config.classifier_config, config.classifier_run),
        "robust": _trained(config.robust_config, config.robust_run),
    }
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
    groupings = {"label": data.labels, "prediction": predictions["standard"]}
    class_names = data.class_names

    # Table 1: the standard classifier's errors, explained by either extractor's features.
    table1, trees = [], {}
    for extractor in ("standard", "robust"):
        for depth in config.depths:
            for grouping in config.groupings:
                result = barlow.failure_trees(
                    features[extractor], errors["standard"], groupings[grouping],
                    num_features=config.num_features, max_depth=depth, delta=config.delta,
                    tau=config.tau, seed=config.seed, progress=progress,
                )
                trees[(extractor, depth, grouping)] = result
                table1.append({
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
    groupings_of = {
        "standard": groupings,
        "robust": {"label": data.labels, "prediction": predictions["robust"]},
    }
    tables = {}
    for analysed in ("standard", "robust"):
        for grouping in ("label", "prediction"):
            if analysed == "standard" and ("robust", 1, grouping) in trees:
                result = trees[("robust", 1, grouping)]  # already fitted for Table 1
            else:
                result = barlow.failure_trees(
                    features["robust"], errors[analysed], groupings_of[analysed][grouping],
                    num_features=config.num_features, max_depth=1, delta=config.delta,
                    tau=config.tau, seed=config.seed, progress=progress,
                )
            tables[(analysed, grouping)] = result

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
        "error_rates": {name: float(e.mean()) for name, e in errors.items()},
        "table1": table1,
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


def _trained(config_path: str, run_dir: str):
    """(module, params, state) of a finished run, training it first when it is missing."""
    if not (Path(run_dir) / "metrics.json").exists():
        run_classifier(load_config(config_path), run_dir, progress=sys.stderr.isatty())
    module, params, state, _ = load_trained_classifier(run_dir)
    return module, params, state


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


def _markdown(summary, tables, class_names, figures, out) -> str:
    names = dict(enumerate(class_names))
    lines = [
        "# Barlow on Fashion-MNIST",
        "",
        "Produced by:",
        "",
        "```",
        summary["command"],
        "```",
        "",
        f"Data: {summary['data']['name']} {summary['data']['split']} split, "
        f"{summary['data']['images']:,} images. Error rates: standard ResNet-18 "
        f"{100 * summary['error_rates']['standard']:.2f} %, robust ResNet-18 "
        f"{100 * summary['error_rates']['robust']:.2f} %. Run time {summary['seconds']:.0f} s.",
        "",
        "## Table 1: fraction of valid leaves (standard classifier's errors)",
        "",
        "The leaf of highest IV per group is valid when ER > BER + δ and EC > τ "
        f"(δ = {summary['config']['delta']}, τ = {summary['config']['tau']}).",
        "",
        "| feature extractor | depth | grouping | valid-leaf fraction | mean ALER − BER | groups |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in summary["table1"]:
        lines.append(
            f"| {row['extractor']} | {row['depth']} | {row['grouping']} | "
            f"{row['valid_leaf_fraction']:.3f} | {row['mean_aler_minus_ber']:.4f} | {row['groups']} |"
        )
    titles = {
        ("standard", "label"): "Table 2 analogue: standard ResNet-18, grouping by label",
        ("standard", "prediction"): "Table 3 analogue: standard ResNet-18, grouping by prediction",
        ("robust", "label"): "Table 4 analogue: robust ResNet-18, grouping by label",
        ("robust", "prediction"): "Table 5 analogue: robust ResNet-18, grouping by prediction",
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


if __name__ == "__main__":
    main()
