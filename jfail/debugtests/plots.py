"""Figures for the debugging tests: attribution maps of normal vs bugged models, cascading
re-initialization (Figure 7) and the search for flipped labels (appendix G)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["spurious_example", "bug_grid", "cascading_grid", "cascading_curves",
           "checking_figure"]


def spurious_example(x, maps, gt1, gt2, path, name: str) -> Path:
    """A column per input: the input `x [k, H, W, C]`, its map under method `name` `maps
    [k, H, W]`, and the two ground truths `gt1`, `gt2` `[k, H, W]` (Table 2)."""
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
    return Path(path)


def bug_grid(path, title: str, inputs, labels, maps) -> Path:
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
    return Path(path)


def cascading_grid(image, maps, layers, path) -> Path:
    """Figure 7's maps: a row per method, the input `image [H, W, C]` and then its map after
    each step of `layers`; maps: `{method: [maps [H, W], one per step]}`."""
    plt = _pyplot()
    methods = list(maps)
    fig, axes = plt.subplots(len(methods), len(layers) + 1,
                             figsize=(1.1 * (len(layers) + 1), 1.1 * len(methods)), squeeze=False)
    for r, name in enumerate(methods):
        axes[r, 0].imshow(image[..., 0], cmap="gray")
        axes[r, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
        for c, heat in enumerate(maps[name]):
            axes[r, c + 1].imshow(heat, cmap="magma", vmin=0, vmax=1)
            if r == 0:
                axes[r, c + 1].set_title(layers[c], fontsize=6, rotation=45)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def cascading_curves(curves, layers, path) -> Path:
    """Figure 7's curves: per method, SSIM and rank correlation to the trained model's map at
    each step of `layers`; curves: `{method: {'ssim': [{'mean', ...}], 'rank': [...]}}`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        for ax, metric in zip(axes, ("ssim", "rank")):
            ax.plot(range(len(layers)), [p["mean"] for p in curve[metric]], "o-", ms=3, label=name)
    for ax, title in zip(axes, ("SSIM to the trained model's map",
                                "Spearman rank correlation (|·|)")):
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=45, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("re-initialized down to")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def checking_figure(rankings, path) -> Path:
    """Share of the flipped labels found against the share of the training subset checked.

    rankings: `{name: {'curve': [fraction checked when 1 %, 2 %, ..., 100 % are found]}}`, as
    `jfail.debugtests.influence.find_flipped_labels` returns them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    shares = np.linspace(0.01, 1.0, 100)
    for name, ranking in rankings.items():
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
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
