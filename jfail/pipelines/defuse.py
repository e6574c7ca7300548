"""Defuse end to end (seeds 001, 003): Figure 4, Figure 5, scenario grids, novelty and t-SNE.

    python experiments/defuse.py --config configs/defuse_fmnist.py

Trains (or reloads) the classifier, the simulated annotators and the β-VAE; identifies
unrestricted adversarial examples with Beta latent noise (as written, and centred for
comparison); distils them with a Dirichlet-process GMM; has the annotators review 10 samples of
every scenario; samples 256 fine-tuning and 256 test images from each failure scenario; corrects
the classifier with `L(D) + λ·CE(D_f)` over the λ sweep, against the baseline that fine-tunes on
the individually identified mistakes labelled by the annotators. Intermediate stages are cached
in the run directory (`--workdir`, default `runs/defuse/<name>`), so a rerun only repeats what
changed. Writes `results/<name>.json`, PNGs under `results/<name>/`, and `results/<name>.md`
rendered from that JSON by the template `jfail/templates/defuse.j2`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import pickle
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jfail.config import DefuseConfig, config_to_dict, load_config
from jfail.data import Dataset, load, train_val_split
from jfail.defuse import (
    CorrectionConfig,
    MajorityVote,
    agreement_figure,
    annotation_reviews,
    correct,
    distill,
    encode,
    identify,
    plots,
    prepare_annotation,
    review_scenarios,
    sample_scenarios,
    train_vae,
)
from jfail.logs import quiet_libraries
from jfail.models import BetaVAE, decoder_fn, encoder_fn, linen_apply, logits_fn
from jfail.models.user import USER_VAL_FRACTION, check_user_model, user_model_for_data
from jfail.pipelines import command_line
from jfail.report import render_markdown
from jfail.train import predict
from jfail.train.run import trained_classifier, write_json
from jfail.train.summaries import epoch_summaries
from jfail.train.trainable import trainable

REPORT_TEMPLATE = "defuse"
"""The template in jfail/templates that renders this pipeline's JSON as Markdown and HTML."""


def main(argv: list[str] | None = None, prog: str = "python experiments/defuse.py") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--workdir", default=None,
                        help="run directory (default runs/defuse/<name>)")
    args = parser.parse_args(argv)
    quiet_libraries()
    config: DefuseConfig = load_config(args.config, args.set)
    if not isinstance(config, DefuseConfig):
        parser.error(f"{args.config} is not a Defuse config")
    command = command_line(prog, argv)
    workdir = Path(args.workdir or f"runs/defuse/{config.name}")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    out = Path(args.out_dir)
    figures = out / config.name
    figures.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet and sys.stderr.isatty()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    keys = dict(zip(("identify", "compare", "distill", "review", "tune", "test", "subset"),
                    jax.random.split(jax.random.key(config.seed), 7)))

    # --- models ---------------------------------------------------------------------------------
    user = None
    if config.model is not None:  # one's own model: annotators and β-VAE go to the workdir
        user, dataset = user_model_for_data(config.model, config.dataset, needs=("trainable",))
        full, test = load(dataset, "train"), load(dataset, "test")
        train, val = train_val_split(full, USER_VAL_FRACTION, key=config.seed)
        check_user_model(user, full.images.shape[1:], num_classes=len(full.class_names),
                         needs=("trainable",), where=f"model={config.model}")
        classifier = trainable(user.classifier)
        apply_fn, params, state = classifier.apply, classifier.params, classifier.state
        classifier_metrics = {"test_accuracy": _accuracy(
            _predict(apply_fn, params, state, test.images), test.labels)}
        classifier_name = f"{config.model} (weights {_fingerprint(params, state)})"
        annotators, annotator_accuracy = _annotators(config, progress, dataset=dataset,
                                                     runs=workdir / "annotators")
    else:
        classifier_config = load_config(config.classifier_config)
        full = load(config.dataset, "train")
        test = load(config.dataset, "test")
        train, val = train_val_split(full, classifier_config.val_fraction,
                                     key=classifier_config.train.seed)
        module, params, state, _, classifier_metrics = trained_classifier(
            classifier_config, config.classifier_run, progress=progress)
        apply_fn = linen_apply(module)
        classifier = logits_fn(module, {"params": params, **state})
        classifier_name = config.classifier_run
        annotators, annotator_accuracy = _annotators(config, progress)
    annotator = MajorityVote(annotators)

    tick = time.perf_counter()
    if user is not None and user.encoder is not None and user.decoder is not None:
        decoder, encoder = user.decoder, user.encoder
        vae_record = {"epochs": 0, "history": [], "given": config.model}
    else:
        vae = BetaVAE(image_shape=full.images.shape[1:], latent_dim=config.latent_dim)
        vae_dir = workdir / "vae" if user is not None else Path(config.vae_run).absolute()
        with epoch_summaries(vae_dir, prefix="vae/") as write_summaries:  # TensorBoard curves
            vae_result = train_vae(vae, full.images, config.vae,
                                   checkpoint_dir=vae_dir / "checkpoints", progress=progress,
                                   on_epoch_end=write_summaries)
        decoder = decoder_fn(vae, vae_result.variables)
        encoder = encoder_fn(vae, vae_result.variables)
        vae_record = {"epochs": len(vae_result.history), "history": vae_result.history}
    timings["vae_seconds_this_run"] = time.perf_counter() - tick

    # --- identification -------------------------------------------------------------------------
    if config.identify_images is None or config.identify_images >= len(train.labels):
        subset = np.arange(len(train.labels))
    else:
        subset = np.sort(np.asarray(jax.random.choice(
            keys["subset"], len(train.labels), (config.identify_images,), replace=False)))
    identify_kwargs = dict(num_draws=config.num_draws, a=config.a, b=config.b,
                           max_per_image=config.max_per_image)
    stage_key = {"vae": config_to_dict(config.vae), "subset": len(subset), **identify_kwargs,
                 "classifier": classifier_name, "seed": config.seed}

    def run_identify(noise, key, keep_images):
        mu, _ = encode(encoder, train.images[subset])
        tick = time.perf_counter()
        found = identify(decoder, classifier, mu, train.labels[subset], key=key, noise=noise,
                         keep_images=keep_images, progress=progress, **identify_kwargs)
        return found, time.perf_counter() - tick

    failures, timings["identify_seconds"] = _cached(
        workdir / f"identify_{config.noise}.pkl", {**stage_key, "noise": config.noise},
        lambda: run_identify(config.noise, keys["identify"], True))
    noise_report = {config.noise: _noise_record(failures)}
    if config.compare_noise:
        other = "centred" if config.noise == "paper" else "paper"
        other_failures, _ = _cached(workdir / f"identify_{other}.pkl",
                                    {**stage_key, "noise": other},
                                    lambda: run_identify(other, keys["compare"], False))
        noise_report[other] = _noise_record(other_failures)

    # --- distillation and review ----------------------------------------------------------------
    distill_kwargs = dict(max_components=config.max_components, min_weight=config.min_weight,
                          max_points=config.max_points)
    (scenarios, timings["distill_seconds"]) = _cached(
        workdir / "distill.pkl", {**stage_key, "noise": config.noise, **distill_kwargs},
        lambda: _timed(lambda: distill(failures.latents, key=keys["distill"], **distill_kwargs)))
    _, review_images = sample_scenarios(decoder, scenarios, key=keys["review"],
                                        num_samples=config.review_samples, tau=config.tau)
    reviews = review_scenarios(annotator, classifier, review_images, rho=config.rho)
    review_predictions = np.stack([r.predictions for r in reviews])
    annotation = _annotation_folder(workdir, review_images, review_predictions, full.class_names)
    if config.annotations == "page":  # people's votes from `jfail annotate` replace the simulation
        reviews = annotation_reviews(workdir, review_predictions, rho=config.rho)
    agreement_figure(reviews, figures / "agreement.png",
                     title=f"annotator agreement ({config.annotations} annotators)")
    failing = [s for s, r in enumerate(reviews) if r.is_failure]
    plots.scenario_grid(review_images, review_predictions,
                        np.array([r.label for r in reviews]), full.class_names,
                        figures / "review_all_scenarios.png", columns=config.review_samples,
                        title="every distilled scenario, as reviewed (title: classifier)")
    summary = {
        "config": config_to_dict(config),
        "command": command,
        "classifier": ({"model": config.model, "test_accuracy": classifier_metrics["test_accuracy"]}
                       if user is not None else
                       {"run": config.classifier_run,
                        "test_accuracy": classifier_metrics["test_accuracy"]}),
        "annotators": {"test_accuracy": annotator_accuracy,
                       "majority_test_accuracy": _accuracy(annotator.label(test.images),
                                                           test.labels)},
        "vae": vae_record,
        "identification": {"images": int(len(subset)), "draws": int(len(subset) * config.num_draws),
                           "noise": noise_report},
        "distillation": {"components_kept": len(scenarios), "weights": scenarios.weights.tolist(),
                         "converged": scenarios.converged},
        "review": [_review_record(s, r, full.class_names) for s, r in enumerate(reviews)],
        "annotations": {"source": config.annotations, "folder": str(annotation)},
        "failure_scenarios": failing,
    }
    if not failing:
        summary["outcome"] = "the annotators judged no scenario a failure; nothing to correct"
        _write(out, config, summary, timings, started)
        return

    # --- failure instances, baseline set, correction ----------------------------------------------
    chosen = _select(scenarios, failing)
    labels = np.array([reviews[s].label for s in failing])
    n = config.samples_per_scenario
    _, tune_images = sample_scenarios(decoder, chosen, key=keys["tune"], num_samples=n,
                                    tau=config.tau)
    _, test_images = sample_scenarios(decoder, chosen, key=keys["test"], num_samples=n,
                                    tau=config.tau)
    d_f = Dataset(tune_images.reshape(-1, *tune_images.shape[2:]), np.repeat(labels, n),
                  full.class_names)
    scenario_test = Dataset(test_images.reshape(-1, *test_images.shape[2:]),
                            np.repeat(labels, n), full.class_names)
    baseline_set, baseline_info = _baseline_set(annotator, failures, len(d_f.labels), config.seed,
                                                full.class_names)
    correction = CorrectionConfig(learning_rate=config.finetune_learning_rate,
                                  batch_size=config.finetune_batch_size,
                                  epochs=config.finetune_epochs, seed=config.seed)
    evaluate_on = {"test": test, "scenario": scenario_test}
    before = _scores(apply_fn, params, state, evaluate_on, val)
    sweeps = {}
    for method, failure_set in (("defuse", d_f), ("baseline", baseline_set)):
        if not len(failure_set.labels):  # the annotators gave every mistake "none of the above"
            continue
        tick = time.perf_counter()
        # Cached by pickle: the weights stay (.params, .state), the model (a closure) goes.
        sweeps[method] = _cached(
            workdir / f"correct_{method}.pkl",
            {**stage_key, "distill": distill_kwargs, "tau": config.tau, "rho": config.rho,
             "lambdas": list(config.lambdas), "correction": dataclasses.asdict(correction),
             "samples": n, "annotators": config.num_annotators,
             "failing": failing, "labels": labels.tolist()},
            lambda fs=failure_set: correct(apply_fn, params, state, train, fs, val,
                                           config.lambdas, correction, evaluate_on=evaluate_on,
                                           progress=progress)._replace(model=None))
        timings[f"correct_{method}_seconds"] = time.perf_counter() - tick

    after = {method: _scores(apply_fn, sweep.params, sweep.state, evaluate_on, val)
             | {"lambda": sweep.best_lambda} for method, sweep in sweeps.items()}
    per_scenario = {
        name: _per_scenario(apply_fn, p, s, scenario_test.images, labels, n)
        for name, (p, s) in {"before": (params, state),
                             **{m: (sw.params, sw.state) for m, sw in sweeps.items()}}.items()
    }
    # --- figures ----------------------------------------------------------------------------------
    predictions = {name: _predict(apply_fn, p, s,
                                  test_images[:, :8].reshape(-1, *test_images.shape[2:]))
                   .reshape(len(failing), -1)
                   for name, (p, s) in (("before", (params, state)),
                                        ("defuse", (sweeps["defuse"].params,
                                                    sweeps["defuse"].state)))}
    for name, preds in predictions.items():
        plots.scenario_grid(test_images[:, :8], preds, labels, full.class_names,
                            figures / f"scenarios_{name}.png",
                            title=f"failure scenarios, classifier {name} correction")
    plots.tradeoff_plot({m: sw.per_lambda for m, sw in sweeps.items()}, figures / "tradeoff.png")
    summary["novelty"] = _novelty(apply_fn, params, state, train, test_images, figures,
                                  full.class_names)
    summary["tsne"] = _tsne(failures, scenarios, figures, config.seed)
    summary.update(
        failure_instances=int(len(d_f.labels)), baseline=baseline_info, before=before,
        after=after, per_scenario=per_scenario,
        sweeps={m: sw.per_lambda for m, sw in sweeps.items()},
        scenario_labels=[full.class_names[c] for c in labels],
    )
    _write(out, config, summary, timings, started)


# --- stages ---------------------------------------------------------------------------------------


def _annotators(config: DefuseConfig, progress: bool, *, dataset: str | None = None,
                runs: Path | None = None):
    """The simulated annotators: `annotator_config` trained with seeds 1, 2, ... into
    `runs` (default `config.annotator_runs`) on `dataset` (default the annotator config's)."""
    base = load_config(config.annotator_config)
    if dataset is not None:
        base = dataclasses.replace(base, dataset=dataset)
    models, accuracies = [], []
    for i in range(config.num_annotators):
        run_config = dataclasses.replace(
            base, name=f"{base.name}_seed{i + 1}",
            train=dataclasses.replace(base.train, seed=i + 1))
        module, p, s, _, metrics = trained_classifier(
            run_config, Path(runs or config.annotator_runs) / f"seed{i + 1}", progress=progress)
        models.append(logits_fn(module, {"params": p, **s}))
        accuracies.append(metrics["test_accuracy"])
    return models, accuracies


def _annotation_folder(workdir: Path, samples, predictions, class_names) -> Path:
    """The reviewed samples as `workdir/annotation/` for `jfail annotate`, kept once voted on."""
    folder = workdir / "annotation"
    stored = folder / "labels.csv"
    if stored.is_file() and (folder / "votes.sqlite").is_file():
        with open(stored, newline="") as handle:
            rows = list(csv.DictReader(handle))
        names = [class_names[p] for p in np.asarray(predictions).ravel()]
        if [row["prediction"] for row in rows] == names:
            return folder  # the same samples: keep the votes people gave
    try:
        return prepare_annotation(workdir, samples, predictions, class_names, overwrite=True)
    except FileExistsError as error:
        raise ValueError(f"{folder} holds votes on other samples than this run's; move it away "
                         "to start a new annotation round") from error


def _baseline_set(annotator, failures, count: int, seed: int, class_names):
    """The individually identified mistakes, each labelled by the annotators (none-of-the-above
    dropped), down-sampled to the size of Defuse's failure set."""
    labels = annotator.label(failures.images)
    keep = np.flatnonzero(labels >= 0)
    rng = np.random.default_rng(seed)
    if len(keep) > count:
        keep = np.sort(rng.choice(keep, count, replace=False))
    info = {"identified": int(len(failures)), "labelled": int(np.sum(labels >= 0)),
            "used": int(len(keep)),
            "annotator_agrees_with_classifier":
                float(np.mean(labels[keep] == failures.predictions[keep])) if len(keep) else None}
    return Dataset(failures.images[keep], labels[keep].astype(np.int32), class_names), info


def _novelty(apply_fn, params, state, train, test_images, figures, class_names) -> dict:
    """Seed 003 §4.3: nearest misclassified training image (ℓ2) of one sample per scenario."""
    train_pred = _predict(apply_fn, params, state, train.images)
    wrong = np.flatnonzero(train_pred != train.labels)
    queries = test_images[:, 0][:10]
    query_pred = _predict(apply_fn, params, state, queries)
    nearest, distances = _nearest(queries, train.images[wrong])
    _, nearest_any = _nearest(queries, train.images)
    plots.novelty_figure(queries, query_pred, train.images[wrong][nearest],
                         train_pred[wrong][nearest], distances, class_names,
                         figures / "novelty.png")
    same_error = train_pred[wrong][nearest] == query_pred
    return {"queries": int(len(queries)), "train_errors": int(len(wrong)),
            "distance_to_nearest_train_error": distances.tolist(),
            "distance_to_nearest_train_image": nearest_any.tolist(),
            "nearest_error_has_same_prediction": same_error.tolist()}


def _nearest(queries, pool) -> tuple[np.ndarray, np.ndarray]:
    """Per query image, the index of the nearest `pool` image by ℓ2 and that distance."""
    q, p = jnp.asarray(queries.reshape(len(queries), -1)), jnp.asarray(pool.reshape(len(pool), -1))
    squared = jnp.sum(q**2, 1)[:, None] - 2 * q @ p.T + jnp.sum(p**2, 1)[None]
    index = jnp.argmin(squared, 1)
    return np.asarray(index), np.sqrt(np.maximum(np.asarray(squared[jnp.arange(len(q)), index]), 0))


def _tsne(failures, scenarios, figures, seed: int, max_points: int = 3000) -> dict:
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(failures), min(max_points, len(failures)), replace=False))
    embedding = TSNE(n_components=2, random_state=seed, init="pca").fit_transform(
        failures.latents[rows])
    plots.tsne_figure(embedding, scenarios.assignments[rows], figures / "tsne.png")
    return {"points": int(len(rows))}


# --- helpers --------------------------------------------------------------------------------------


def _fingerprint(*trees) -> str:
    """A short digest of a model's weights: the cached stages of a workdir are redone when one's
    own model changes under the same name."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(trees):
        if hasattr(leaf, "shape"):
            digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]


def _scores(apply_fn, params, state, datasets: dict, val) -> dict:
    scores = {f"{name}_accuracy": _accuracy(_predict(apply_fn, params, state, d.images), d.labels)
              for name, d in datasets.items()}
    scores["val_accuracy"] = _accuracy(_predict(apply_fn, params, state, val.images), val.labels)
    return scores


def _per_scenario(apply_fn, params, state, images, labels, n) -> list[float]:
    correct_ = _predict(apply_fn, params, state, images) == np.repeat(labels, n)
    return correct_.reshape(len(labels), n).mean(1).round(4).tolist()


def _predict(apply_fn, params, state, images) -> np.ndarray:
    return np.argmax(predict(apply_fn, params, state, np.asarray(images)), -1)


def _accuracy(predictions, labels) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def _select(scenarios, rows):
    rows = np.asarray(rows)
    return dataclasses.replace(scenarios, means=scenarios.means[rows],
                               covariances=scenarios.covariances[rows],
                               weights=scenarios.weights[rows],
                               components=scenarios.components[rows])


def _noise_record(failures) -> dict:
    return {"kept": int(len(failures)), "misclassified_draws": failures.misclassified_draws,
            "failure_rate": failures.failure_rate,
            "images_with_a_failure": int(np.sum(failures.per_image > 0))}


def _review_record(index, review, class_names) -> dict:
    return {"scenario": index,
            "label": class_names[review.label] if review.label >= 0 else "none of the above",
            "disagreement": review.disagreement, "is_failure": bool(review.is_failure),
            "agreement": review.agreement,
            "predictions": [class_names[p] for p in review.predictions]}


def _timed(fn):
    tick = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - tick


def _cached(path: Path, key: dict, compute):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    if path.exists():
        stored = pickle.loads(path.read_bytes())
        if stored["key"] == digest:
            return stored["value"]
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps({"key": digest, "value": jax.device_get(value)}))
    tmp.replace(path)
    return value


def _write(out: Path, config, summary: dict, timings: dict, started: float) -> None:
    summary["timings"] = {**timings, "total_seconds_this_run": time.perf_counter() - started}
    write_json(out / f"{config.name}.json", summary)
    # the Markdown shows what the JSON holds
    summary = json.loads((out / f"{config.name}.json").read_text())
    markdown = render_markdown(REPORT_TEMPLATE, summary, name=config.name)
    (out / f"{config.name}.md").write_text(markdown)
    print(f"wrote {out / config.name}.md")


if __name__ == "__main__":
    main(prog="python -m jfail.pipelines.defuse")
