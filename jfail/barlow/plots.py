"""The paper's per-feature panel (appendix F): four rows of images saved as a PNG.

Rows, top to bottom: the most activating images, their heatmaps over them, feature attacks, and
failures from the leaf. Drawn on a matplotlib `Figure` with the Agg canvas, so no global backend
is touched and no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_feature_panel"]

ROW_TITLES = ("most activating", "heatmap", "feature attack", "failures in the leaf")


def plot_feature_panel(
    images_top,
    heatmaps,
    attacked,
    failures,
    title: str,
    path: str | Path,
    *,
    row_titles: Sequence[str] = ROW_TITLES,
    heatmap_alpha: float = 0.5,
    image_inches: float = 1.3,
    dpi: int = 100,
) -> Path:
    """Saves the panel of one feature to `path` (PNG) and returns the path.

    C is 1 (grey) or 3 (RGB); values outside [0, 1] are clipped.

    Args:
      images_top: `[K, H, W, C]` most activating images in [0, 1].
      heatmaps: `[K, H, W]` in [0, 1] (drawn over `images_top`).
      attacked: `[K2, H, W, C]` feature attacks.
      failures: `[K3, H, W, C]` misclassified images from the leaf (may be empty).
      title: the figure's title.
      path: the PNG written (parent folders created).
      row_titles: the labels of the four rows.
      heatmap_alpha: the heatmaps' opacity over the images.
      image_inches: the size of one image in the figure, in inches.
      dpi: resolution in dots per inch.

    Returns:
      `path` as a `Path`.

    Raises:
      ValueError: an image batch that is not `[K, H, W, C]` with C 1 or 3, an empty
        `images_top` or `attacked`, heatmaps that are not one `[H, W]` map per image of
        `images_top`, or `row_titles` that do not name 4 rows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib is slow to import
    from matplotlib.figure import Figure

    rows = [
        _images(images_top, "images_top"),
        None,
        _images(attacked, "attacked"),
        _images(failures, "failures", allow_empty=True),
    ]
    heatmaps = np.asarray(heatmaps, np.float32)
    if heatmaps.ndim != 3 or heatmaps.shape[0] != rows[0].shape[0]:
        raise ValueError(
            f"heatmaps must be [K, H, W] with one map per image of images_top "
            f"({rows[0].shape[0]}), got shape {heatmaps.shape}."
        )
    if len(row_titles) != 4:
        raise ValueError(f"row_titles must name the 4 rows, got {len(row_titles)}.")
    columns = max(len(r) for r in rows if r is not None)
    figure = Figure(figsize=(image_inches * columns + 1.2, image_inches * 4 + 0.6), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(4, columns, squeeze=False)
    for row, row_axes in enumerate(axes):
        for column, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if column == 0:
                ax.set_ylabel(row_titles[row], fontsize=8)
            source = rows[0] if row == 1 else rows[row]
            if column >= len(source):
                continue
            _show(ax, source[column])
            if row == 1:
                ax.imshow(
                    heatmaps[column],
                    cmap="jet",
                    alpha=heatmap_alpha,
                    vmin=0.0,
                    vmax=1.0,
                    extent=(-0.5, source.shape[2] - 0.5, source.shape[1] - 0.5, -0.5),
                )
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _images(images, name: str, *, allow_empty: bool = False) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be [K, H, W, C] with C = 1 or 3, got shape {images.shape}.")
    if len(images) == 0 and not allow_empty:
        raise ValueError(f"{name} is empty.")
    return np.clip(images, 0.0, 1.0)


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image)
