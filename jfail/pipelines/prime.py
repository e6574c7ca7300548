"""PRIME (seed 004) on real data: shape tags, a trained classifier, failure modes checked on
held-out data; writes `results/<name>.json`, `.png`, `results/<name>/*.png`, and
`results/<name>.md` rendered from that JSON by the template `jfail/templates/prime.j2`.

    python experiments/prime.py --config configs/prime_fmnist.py

Steps: load (or train) the classifier; tag the search split (by default the classifier's
validation images) and the held-out split (the test split) with the shape tagger (thresholds
fitted on the search split); search every class exhaustively with the paper's hyperparameters,
and greedily (A.6) for comparison; re-evaluate each mode on held-out data by its tags alone
(section 4.1, Figure 4), with an exact test of its error rate and of each tag's necessity under
one false-discovery control (`jfail.prime.mode_evidence`), significant modes listed first;
compare 3-tag modes with their subsets (section 5.1, Tables 1 and 2); repeat for a grid of
(s, a) (A.5); plot sample images of each mode; score descriptions against planted ground truth
on a synthetic problem (section 4.3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jfail import jsonfile
from jfail.config import ConfigError, load_config, validate_config
from jfail.data import Dataset, load, train_val_split
from jfail.logs import quiet_libraries
from jfail.models import linen_apply
from jfail.models.user import (
    USER_VAL_FRACTION,
    check_user_model,
    user_model_for_data,
)
from jfail.pipelines import command_line, user_splits
from jfail.plotting import character_slug, pyplot
from jfail.prime import (
    PrimeConfig,
    TagMatrix,
    TagSpaceEmbedder,
    describe,
    description_quality,
    evaluate_on_heldout,
    find_failure_modes,
    fit_shape_tagger,
    flip_tags,
    frequent_tags,
    generalization_summary,
    mode_evidence,
    mode_members,
    planted_problem,
    recovery_scores,
    shape_measurements,
    subset_accuracies,
    subset_drop_table,
)
from jfail.report import render_markdown
from jfail.train import predict
from jfail.train.run import trained_classifier

REPORT_TEMPLATE = "prime"
"""The template in jfail/templates that renders this pipeline's JSON as Markdown and HTML."""


def main(argv: list[str] | None = None, prog: str = "python experiments/prime.py") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="output prefix (default results/<name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    quiet_libraries()
    command = command_line(prog, argv)
    config = load_config(args.config, args.set)
    if not isinstance(config, PrimeConfig):
        raise TypeError(f"{args.config} must return a PrimeConfig, got {type(config).__name__}")
    try:
        validate_config(config)
    except ConfigError as error:
        parser.error(str(error))
    out = Path(args.out or f"results/{config.name}")
    figures = out.parent / out.name
    figures.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet and sys.stderr.isatty()
    report = run(config, figures, progress=progress)
    report["command"] = command
    jsonfile.write(out.with_suffix(".json"), report)
    # what the JSON holds (null for a missing number) is what is shown
    report = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".md").write_text(render_markdown(REPORT_TEMPLATE, report, name=out.name))
    _figure4(report, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


def run(config: PrimeConfig, figures: Path, *, progress: bool) -> dict:
    """The whole experiment; returns the JSON report (figures are written under `figures`)."""
    started = time.perf_counter()
    if config.model is not None:  # one's own model: no classifier run
        user, dataset_name = user_model_for_data(config.model, config.dataset)
        data = user_splits(dataset_name, {config.search_split, config.heldout_split},
                           seed=config.seed)
        check_user_model(user, data[config.search_split].images.shape[1:],
                         num_classes=len(data[config.search_split].class_names),
                         where=f"model={config.model}")
        classifier = {"run": None, "model": config.model, "test_accuracy": None,
                      "val_accuracy": None, "user_model": True,
                      "val_fraction": USER_VAL_FRACTION}  # the share `user_splits` holds out

        def logits_of(images):
            return predict(user.classifier, images, batch_size=1000)
    else:
        module, params, state, classifier_config, classifier_metrics = _classifier(config,
                                                                                   progress)
        data = _splits(config, classifier_config)
        classifier = {"run": config.classifier_run, "model": classifier_config.model,
                      "test_accuracy": classifier_metrics.get("test_accuracy"),
                      "val_accuracy": classifier_metrics.get("val_accuracy")}
        apply_fn = linen_apply(module)

        def logits_of(images):
            return predict(apply_fn, params, state, images, batch_size=1000)
    search, heldout = data[config.search_split], data[config.heldout_split]
    class_names = search.class_names
    correct = {}
    for split, dataset in ((config.search_split, search), (config.heldout_split, heldout)):
        correct[split] = np.argmax(logits_of(dataset.images), -1) == dataset.labels
    search_correct, heldout_correct = correct[config.search_split], correct[config.heldout_split]
    search_errors = ~search_correct

    t0 = time.perf_counter()
    search_measurements = shape_measurements(search.images, ink_threshold=config.ink_threshold)
    heldout_measurements = shape_measurements(heldout.images, ink_threshold=config.ink_threshold)
    tagger = fit_shape_tagger(None, search.labels, measurements=search_measurements,
                              quantiles=tuple(config.shape_quantiles),
                              ink_threshold=config.ink_threshold)
    search_tags = tagger.tag_measurements(search_measurements, search.labels)
    heldout_tags = tagger.tag_measurements(heldout_measurements, heldout.labels)
    tagging_seconds = time.perf_counter() - t0

    search_kwargs = dict(
        tag_names=search_tags.names, min_size=config.min_size, min_drop=config.min_drop,
        min_gain=tuple(config.min_gain), max_tags=config.max_tags,
        min_tag_count=config.min_tag_count, progress=progress,
    )
    t0 = time.perf_counter()
    modes = find_failure_modes(search_tags.tags, errors=search_errors, labels=search.labels,
                               **search_kwargs)
    first_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    modes = find_failure_modes(search_tags.tags, errors=search_errors, labels=search.labels,
                               **search_kwargs)
    exhaustive_seconds = time.perf_counter() - t0
    find_failure_modes(search_tags.tags, errors=search_errors, labels=search.labels,
                       method="greedy", beam_width=config.greedy_beam_width,
                       **search_kwargs)  # compile
    t0 = time.perf_counter()
    greedy = find_failure_modes(search_tags.tags, errors=search_errors, labels=search.labels,
                                method="greedy",
                                beam_width=config.greedy_beam_width, **search_kwargs)
    greedy_seconds = time.perf_counter() - t0

    heldout_modes = evaluate_on_heldout(modes, heldout_tags, errors=~heldout_correct,
                                        labels=heldout.labels)
    evidence = mode_evidence(modes, heldout_tags, errors=~heldout_correct, labels=heldout.labels,
                             method=config.fdr_method, alpha=config.alpha)
    order = sorted(range(len(modes)), key=lambda i: (not evidence[i].significant,
                                                    _max_q(evidence[i]), i))
    summary = generalization_summary(heldout_modes)
    table1 = _table1(modes, heldout_modes, heldout_tags, heldout_correct, heldout.labels,
                     class_names)
    table2 = {
        split: _jsonable(subset_drop_table(modes, tags, errors=~corr, labels=labels))
        for split, tags, corr, labels in (
            (config.heldout_split, heldout_tags, heldout_correct, heldout.labels),
            (config.search_split, search_tags, search_correct, search.labels),
        )
    }
    sweep = _sweep(config, search_tags, search_correct, search.labels, heldout_tags,
                   heldout_correct, heldout.labels)
    _sweep_figure(sweep, figures / "sweep.png")
    grids = _mode_grids(config, modes, search, search_tags, search_correct, class_names, figures)
    planted = _planted_descriptions(config, progress)

    keep = frequent_tags(search_tags.tags, search.labels, config.min_tag_count,
                         num_classes=len(class_names))
    prevalence = {
        class_names[c]: {name: float(search_tags.tags[search.labels == c, t].mean())
                         for t, name in enumerate(search_tags.names)}
        for c in range(len(class_names))
    }
    return {
        "config": _jsonable(dataclasses.asdict(config)),
        "classifier": classifier,
        "splits": {
            "search": {"name": config.search_split, "images": int(len(search.labels)),
                       "accuracy": float(search_correct.mean())},
            "heldout": {"name": config.heldout_split, "images": int(len(heldout.labels)),
                        "accuracy": float(heldout_correct.mean())},
        },
        "class_names": list(class_names),
        "class_accuracy": {
            "search": [float(search_correct[search.labels == c].mean())
                       for c in range(len(class_names))],
            "heldout": [float(heldout_correct[heldout.labels == c].mean())
                        for c in range(len(class_names))],
        },
        "tags": {
            "names": list(search_tags.names),
            "kept_per_class": {class_names[c]: int(keep[c].sum()) for c in range(len(class_names))},
            "prevalence_search": prevalence,
        },
        "evidence": {
            "method": config.fdr_method,
            "alpha": config.alpha,
            "candidates": len(modes),
            "mode_tests": len(modes),
            "minimality_tests": sum(len(e.minimality) for e in evidence),
            "tests": len(modes) + sum(len(e.minimality) for e in evidence),
            "significant": sum(e.significant for e in evidence),
            "significant_by_size": _by_size([e.mode for e in evidence if e.significant],
                                            config.max_tags),
        },
        "modes": [_mode_json(heldout_modes[i], evidence[i], class_names) for i in order],
        "modes_by_size": _by_size(modes, config.max_tags),
        "generalization": summary,
        "table1": table1,
        "table2": table2,
        "greedy": {
            "beam_width": config.greedy_beam_width,
            "modes": len(greedy),
            "modes_by_size": _by_size(greedy, config.max_tags),
            "subset_of_exhaustive": {(m.label, m.tag_indices) for m in greedy}
            <= {(m.label, m.tag_indices) for m in modes},
            "seconds": greedy_seconds,
        },
        "timing": {
            "tagging_seconds": tagging_seconds,
            "exhaustive_seconds_first_call": first_seconds,
            "exhaustive_seconds": exhaustive_seconds,
            "greedy_seconds": greedy_seconds,
            "total_seconds": time.perf_counter() - started,
            "devices": [str(d) for d in jax.devices()],
        },
        "sweep": sweep,
        "grids": grids,
        "planted": planted,
    }


# ----------------------------------------------------------------------------- pieces


def _classifier(config: PrimeConfig, progress: bool):
    module, params, state, classifier_config, metrics = trained_classifier(
        load_config(config.classifier_config), config.classifier_run, progress=progress
    )
    if classifier_config.dataset != config.dataset:
        raise ValueError(f"the classifier in {config.classifier_run} was trained on "
                         f"{classifier_config.dataset}, not {config.dataset}")
    return module, params, state, classifier_config, metrics


def _splits(config: PrimeConfig, classifier_config) -> dict[str, Dataset]:
    """The classifier's own train / val split (same fraction and seed) and the test split."""
    full = load(config.dataset, "train")
    train, val = train_val_split(full, classifier_config.val_fraction,
                                 key=classifier_config.train.seed)
    return {"train": train, "val": val, "test": load(config.dataset, "test")}


TABLE1_MIN_HELDOUT_IMAGES = 10


def _table1(modes, heldout_modes, tags, correct, labels, class_names) -> dict | None:
    """Table 1's illustration: among the 3-tag modes with at least TABLE1_MIN_HELDOUT_IMAGES
    held-out images (or, if none has, all with some), the one with the largest held-out drop,
    and every subset of its tags on held-out data."""
    three = [h for h in heldout_modes if len(h.mode.tags) == 3 and h.size > 0]
    if not three:
        return None
    large = [h for h in three if h.size >= TABLE1_MIN_HELDOUT_IMAGES] or three
    chosen = max(large, key=lambda h: (h.drop, h.size))
    rows = subset_accuracies(chosen.mode, tags, errors=~correct, labels=labels)
    return {
        "rule": f"the 3-tag mode with the largest held-out drop among those with at least "
                f"{TABLE1_MIN_HELDOUT_IMAGES} held-out images",
        "class": class_names[chosen.mode.label],
        "class_accuracy": chosen.class_accuracy,
        "rows": [{"tags": list(r.tags), "size": r.size, "accuracy": r.accuracy} for r in rows],
    }


def _sweep(config, search_tags, search_correct, search_labels, heldout_tags, heldout_correct,
           heldout_labels):
    rows = []
    for min_size in config.sweep_min_sizes:
        for min_drop in config.sweep_min_drops:
            found = find_failure_modes(
                search_tags.tags, errors=~search_correct, labels=search_labels,
                tag_names=search_tags.names,
                min_size=min_size, min_drop=min_drop, min_gain=tuple(config.min_gain),
                max_tags=config.max_tags, min_tag_count=config.min_tag_count, progress=False,
            )
            held = evaluate_on_heldout(found, heldout_tags, errors=~heldout_correct,
                                       labels=heldout_labels)
            rows.append({
                "min_size": min_size,
                "min_drop": min_drop,
                "modes": len(found),
                "modes_by_size": _by_size(found, config.max_tags),
                "summary": generalization_summary(held),
                "points": [[h.mode.drop, h.drop, h.size] for h in held if h.size > 0],
            })
    return rows


def _planted_descriptions(config: PrimeConfig, progress: bool) -> dict:
    """Section 4.3 against ground truth: true attributes embed the images, the search sees noisy
    tags; PRIME's descriptions are compared with the planted ones and with shorter ones."""
    num_tags = config.planted_num_tags
    planted_sets = [(0, (0,)), (1, (1, 2)), (2, (3, 4, 5)), (3, (6, 7, 8, 9))]
    if num_tags < 12:
        raise ValueError("planted_num_tags must be >= 12 (10 planted tags and some others)")
    prevalence = np.full(num_tags, config.planted_prevalence[1], np.float32)
    prevalence[:10] = config.planted_prevalence[0]
    key = jax.random.key(config.seed)
    problem_key, flip_key, quality_key = jax.random.split(key, 3)
    problem = planted_problem(
        key=problem_key, num_classes=4, images_per_class=config.planted_images_per_class,
        tag_prevalence=prevalence, planted=planted_sets, base_accuracy=config.planted_base_accuracy,
    )
    truth = TagMatrix(problem.tags, problem.tag_names)
    class_names = tuple(f"class{c}" for c in range(4))
    search_kwargs = dict(tag_names=problem.tag_names, min_size=config.min_size,
                         min_drop=config.min_drop, min_gain=tuple(config.min_gain),
                         max_tags=config.max_tags, progress=progress)
    clean = find_failure_modes(problem.tags, errors=problem.errors, labels=problem.labels,
                               **search_kwargs)
    observed = TagMatrix(flip_tags(problem.tags, config.planted_flip_probability, key=flip_key),
                         problem.tag_names)
    noisy = find_failure_modes(observed.tags, errors=problem.errors, labels=problem.labels,
                               **search_kwargs)

    embedder = TagSpaceEmbedder(truth)
    images = embedder.embed_images(np.arange(len(problem.labels)))
    rows = {}
    if noisy:
        members = np.stack([mode_members(m, observed, problem.labels, problem.tag_names)
                            for m in noisy])
        labels = [m.label for m in noisy]
        variants = {
            "PRIME (all tags of each mode)": [describe(m, class_names) for m in noisy],
            "one tag (the mode's hardest single tag)": [
                describe(m._replace(tags=(_hardest_tag(m, observed, problem),)), class_names)
                for m in noisy
            ],
            "class name only": [f"a photo of a {class_names[m.label]}" for m in noisy],
        }
        for name, texts in variants.items():
            quality = description_quality(images, embedder.embed_texts(texts), members,
                                          problem.labels, labels, key=quality_key)
            rows[name] = {"similarity": quality.similarity,
                          "similarity_std": quality.similarity_std,
                          "auroc": quality.auroc, "mean_auroc": quality.mean_auroc}
    truth_members = np.stack([
        (problem.labels == label) & problem.tags[:, list(tags)].all(axis=1)
        for label, tags in planted_sets
    ])
    truth_texts = [f"a photo of a {class_names[label]}, "
                   + ", ".join(problem.tag_names[t] for t in tags)
                   for label, tags in planted_sets]
    quality = description_quality(images, embedder.embed_texts(truth_texts), truth_members,
                                  problem.labels, [label for label, _ in planted_sets],
                                  key=quality_key)
    rows["planted truth on the true groups"] = {
        "similarity": quality.similarity, "similarity_std": quality.similarity_std,
        "auroc": quality.auroc, "mean_auroc": quality.mean_auroc,
    }
    return {
        "planted": [[label, [problem.tag_names[t] for t in tags]] for label, tags in planted_sets],
        "images": int(len(problem.labels)),
        "class_accuracy": [float(problem.correct[problem.labels == c].mean()) for c in range(4)],
        "recovery_clean_tags": _jsonable(recovery_scores(clean, problem.planted)),
        "recovery_noisy_tags": _jsonable(recovery_scores(noisy, problem.planted)),
        "noisy_modes": [{"label": m.label, "tags": list(m.tags), "size": m.size,
                         "accuracy": m.accuracy}
                        for m in noisy],
        "description_quality": rows,
    }


def _hardest_tag(mode, tags: TagMatrix, problem) -> str:
    in_class = problem.labels == mode.label
    best, best_accuracy = mode.tags[0], 2.0
    for name in mode.tags:
        column = tags.names.index(name)
        accuracy = problem.correct[in_class & tags.tags[:, column]].mean()
        if accuracy < best_accuracy:
            best, best_accuracy = name, accuracy
    return best


# ----------------------------------------------------------------------------- figures


def _figure4(report: dict, path: Path) -> None:
    points = [m for m in report["modes"] if m["heldout_size"] > 0]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    split_names = (report["splits"]["search"]["name"], report["splits"]["heldout"]["name"])
    for ax, (key, title) in zip(axes, (("accuracy", "accuracy of the mode"),
                                       ("drop", "accuracy drop A_c - A_S"))):
        xs = [m[key] for m in points]
        ys = [m[f"heldout_{key}"] for m in points]
        sizes = [10 + 4 * m["heldout_size"] for m in points]
        colors = [len(m["tags"]) for m in points]
        scatter = ax.scatter(xs, ys, s=sizes, c=colors, cmap="viridis", vmin=1,
                             vmax=report["config"]["max_tags"], alpha=0.8, edgecolors="k",
                             linewidths=0.4)
        low = min(xs + ys + [0.0])
        high = max(xs + ys + [1.0 if key == "accuracy" else 0.5])
        ax.plot([low, high], [low, high], "k--", linewidth=0.8, label="y = x")
        ax.set_xlabel(f"{title} on {split_names[0]} (search)")
        ax.set_ylabel(f"{title} on {split_names[1]} (held out)")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    fig.colorbar(scatter, ax=axes, label="number of tags",
                 ticks=range(1, report["config"]["max_tags"] + 1))
    summary = report["generalization"]
    fig.suptitle(
        f"{len(report['modes'])} failure modes (s = {report['config']['min_size']}, "
        f"a = {report['config']['min_drop']:.0%}); "
        f"{_num(summary['share_heldout_drop_at_least_0.25'], '.0%')} keep a drop >= 25 % on "
        f"held-out data; {report['evidence']['significant']} significant "
        "(marker area: held-out images)"
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _sweep_figure(sweep: list[dict], path: Path) -> None:
    sizes = sorted({row["min_size"] for row in sweep})
    drops = sorted({row["min_drop"] for row in sweep})
    plt = pyplot()
    fig, axes = plt.subplots(len(sizes), len(drops), figsize=(3.6 * len(drops), 3.4 * len(sizes)),
                             squeeze=False)
    for row in sweep:
        ax = axes[sizes.index(row["min_size"])][drops.index(row["min_drop"])]
        points = np.array(row["points"]).reshape(-1, 3)
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], s=8 + 2 * points[:, 2], alpha=0.7,
                       edgecolors="k", linewidths=0.3)
        ax.plot([0, 0.8], [0, 0.8], "k--", linewidth=0.8)
        ax.set_xlim(0, 0.8)
        ax.set_ylim(-0.3, 0.9)
        ax.set_title(f"s = {row['min_size']}, a = {row['min_drop']:.0%}: {row['modes']} modes",
                     fontsize=9)
        ax.set_xlabel("drop on search split", fontsize=8)
        ax.set_ylabel("drop on held-out split", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mode_grids(config, modes, data: Dataset, tags: TagMatrix, correct, class_names, folder: Path):
    """One PNG per class: a row of sample images for each of its modes (red frame:
    misclassified)."""
    rng = np.random.default_rng(config.seed)
    plt = pyplot()
    written = {}
    for label in sorted({m.label for m in modes}):
        class_modes = sorted((m for m in modes if m.label == label), key=lambda m: m.accuracy)
        class_modes = class_modes[: config.max_grid_modes_per_class]
        fig, axes = plt.subplots(len(class_modes), 1,
                                 figsize=(1.3 * config.grid_images, 1.55 * len(class_modes)),
                                 squeeze=False)
        for ax, mode in zip(axes[:, 0], class_modes):
            members = np.flatnonzero(mode_members(mode, tags, data.labels, tags.names))
            chosen = rng.choice(members, min(config.grid_images, len(members)), replace=False)
            ax.imshow(_strip(data.images[chosen], correct[chosen], config.grid_images),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{' + '.join(mode.tags)}: {mode.accuracy:.0%} of {mode.size} "
                         f"(class {mode.class_accuracy:.0%})", fontsize=8, loc="left")
        fig.suptitle(f"{class_names[label]}: sample images per failure mode "
                     "(red frame: misclassified)", fontsize=9)
        fig.tight_layout()
        name = f"modes_{character_slug(class_names[label])}.png"
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written[class_names[label]] = f"{folder.name}/{name}"
    return written


def _strip(images: np.ndarray, correct: np.ndarray, slots: int) -> np.ndarray:
    height, width = images.shape[1:3]
    frame = 2
    canvas = np.ones((height + 2 * frame, slots * (width + 2 * frame + 2), 3), np.float32)
    for i, (image, right) in enumerate(zip(images, correct)):
        x = i * (width + 2 * frame + 2)
        color = np.array([0.1, 0.7, 0.2] if right else [0.9, 0.1, 0.1], np.float32)
        canvas[:, x : x + width + 2 * frame] = color
        gray = image.mean(axis=-1, keepdims=True)
        canvas[frame : frame + height, x + frame : x + frame + width] = np.repeat(gray, 3, axis=-1)
    return canvas


# ----------------------------------------------------------------------------- report


def _max_q(evidence) -> float:
    """The largest q-value of a mode's tests: the mode is significant when it is at most alpha."""
    return max([evidence.q_value] + [t.q_value for t in evidence.minimality])


def _mode_json(held, evidence, class_names) -> dict:
    mode = held.mode
    row = evidence.row(class_names)
    return {
        "label": mode.label,
        "class": class_names[mode.label],
        "tags": list(mode.tags),
        "size": mode.size,
        "accuracy": mode.accuracy,
        "class_accuracy": mode.class_accuracy,
        "drop": mode.drop,
        "heldout_size": held.size,
        "heldout_accuracy": held.accuracy,
        "heldout_class_accuracy": held.class_accuracy,
        "heldout_drop": held.drop,
        "heldout_errors": row["heldout_errors"],
        "heldout_error_rate": row["heldout_error_rate"],
        "heldout_error_interval": row["interval"],
        "heldout_class_error_rate": row["class_heldout_error_rate"],
        "p_value": row["p_value"],
        "q_value": row["q_value"],
        "minimality": row["minimality"],
        "max_q_value": _max_q(evidence),
        "significant": row["significant"],
    }


def _by_size(modes, max_tags) -> dict:
    counts = np.bincount([len(m.tags) for m in modes], minlength=max_tags + 1)
    return {size: int(counts[size]) for size in range(1, max_tags + 1)}




def _num(value, spec: str) -> str:
    """A number formatted with `spec`, or "–" where it is missing (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value




if __name__ == "__main__":
    main(prog="python -m jfail.pipelines.prime")
