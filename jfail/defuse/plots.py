"""Figures for Defuse: scenario sample grids, the λ trade-off, novelty, and the latent t-SNE."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jfail.plotting import pyplot, save_figure

__all__ = ["scenario_grid", "tradeoff_plot", "novelty_figure", "tsne_figure"]


def scenario_grid(samples, predictions, labels, class_names: Sequence[str], path, *,
                  columns: int = 8, title: str = "") -> Path:
    """One row per scenario: `samples [S, n, H, W, C]`, the classifier's `predictions [S, n]`
    over each image, the scenario's annotated label `labels [S]` on the left (-1: none).

    Args:
        samples: `[S, n, H, W, C]` in [0, 1], C = 1 or 3.
        predictions: `[S, n]` int, the classifier's class of each sample (red when it differs
            from the scenario's label).
        labels: `[S]` int, each scenario's annotated label, -1 for none.
        class_names: one name per class.
        path: the PNG to write.
        columns: the most samples shown per row.
        title: the figure's title (empty: a default that explains the layout).

    Returns:
        The path of the saved PNG.
    """
    plt = pyplot()
    rows, columns = len(samples), min(columns, samples.shape[1])
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows + 0.4),
                             squeeze=False)
    for s in range(rows):
        for c in range(columns):
            ax = axes[s, c]
            _show(ax, samples[s, c])
            ax.set_title(class_names[predictions[s, c]], fontsize=7, pad=2,
                         color="crimson" if predictions[s, c] != labels[s] else "black")
        name = class_names[labels[s]] if labels[s] >= 0 else "none"
        axes[s, 0].set_ylabel(f"S{s}: {name}", fontsize=7)
    fig.suptitle(title or "failure scenarios (row: annotated label; title: prediction)",
                 fontsize=9)
    return save_figure(fig, path)


def tradeoff_plot(curves: dict, path) -> Path:
    """Figure 5: per method, test accuracy against failure-scenario accuracy over λ.

    Args:
        curves: `{method: [{'lambda', 'test_accuracy', 'scenario_accuracy'}, ...]}`.
        path: the PNG to write.

    Returns:
        The path of the saved PNG.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, records in curves.items():
        xs = [r["scenario_accuracy"] for r in records]
        ys = [r["test_accuracy"] for r in records]
        ax.plot(xs, ys, "o-", label=method)
        for r, x, y in zip(records, xs, ys):
            ax.annotate(f"{r['lambda']:g}", (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("failure-scenario test accuracy")
    ax.set_ylabel("test-set accuracy")
    ax.set_title("correction trade-off over λ")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def novelty_figure(queries, query_predictions, neighbours, neighbour_predictions, distances,
                   class_names: Sequence[str], path) -> Path:
    """Seed 003 §4.3: scenario samples (top) and their nearest misclassified training images by
    ℓ2 (bottom), each titled with the classifier's prediction and the distance.

    Args:
        queries: `[n, H, W, C]` scenario samples.
        query_predictions: `[n]` int, the classifier's class of each sample.
        neighbours: `[n, H, W, C]`, each sample's nearest misclassified training image.
        neighbour_predictions: `[n]` int, the classifier's class of each neighbour.
        distances: `[n]`, the ℓ2 distance of each pair.
        class_names: one name per class.
        path: the PNG to write.

    Returns:
        The path of the saved PNG.
    """
    plt = pyplot()
    n = len(queries)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.0), squeeze=False)
    for i in range(n):
        _show(axes[0, i], queries[i])
        axes[0, i].set_title(class_names[query_predictions[i]], fontsize=7)
        _show(axes[1, i], neighbours[i])
        axes[1, i].set_title(f"{class_names[neighbour_predictions[i]]}\nℓ2 {distances[i]:.1f}",
                             fontsize=7)
    axes[0, 0].set_ylabel("scenario", fontsize=8)
    axes[1, 0].set_ylabel("nearest\ntrain error", fontsize=8)
    return save_figure(fig, path)


def tsne_figure(embedding, groups, path, *, title: str = "") -> Path:
    """A 2-D embedding `[N, 2]` coloured by `groups [N]` (-1 drawn grey).

    Args:
        embedding: `[N, 2]` points, e.g. a t-SNE of the failures' latents.
        groups: `[N]` int numpy array, each point's scenario, -1 for a dropped component.
        path: the PNG to write.
        title: the figure's title (empty: "t-SNE of the failures' latents").

    Returns:
        The path of the saved PNG.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    outside = groups < 0
    ax.scatter(*embedding[outside].T, s=2, c="lightgrey", label="dropped component")
    scatter = ax.scatter(*embedding[~outside].T, s=3, c=groups[~outside], cmap="tab20")
    ax.legend(*scatter.legend_elements(num=None), fontsize=6, title="scenario", loc="best",
              markerscale=0.6, ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of the failures' latents", fontsize=9)
    return save_figure(fig, path)


def _show(ax, image) -> None:
    image = np.asarray(image)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(image, 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])
