"""What jfail's figures share: matplotlib loaded on first use with the Agg backend, saving a
figure, and the file-name stems figures are saved under.

matplotlib is slow to import and only the figure-writing steps need it, so `pyplot()` imports it
when a figure is drawn; the Agg backend renders to files without a display.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["pyplot", "save_figure", "word_slug", "character_slug"]


def pyplot():
    """`matplotlib.pyplot`, imported now, with the non-interactive Agg backend selected.

    Returns:
        The `matplotlib.pyplot` module.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Lay `fig` out tightly, write it to `path` (parent folders created), close it.

    Args:
        fig: a matplotlib figure.
        path: the file written; its suffix picks the format (`.png`, `.pdf`, ...).
        dpi: resolution in dots per inch.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def word_slug(text: str) -> str:
    """The words of `text`, lowercased, joined by single underscores; "→" reads as "to".

    A run of characters that are not letters or digits is one separator, so
    `"MNIST → Fashion-MNIST"` -> `"mnist_to_fashion_mnist"`.

    Args:
        text: any string.

    Returns:
        The slug, possibly empty.
    """
    text = text.replace("→", " to ").lower()
    return "_".join("".join(c if c.isalnum() else " " for c in text).split())


def character_slug(text: str) -> str:
    """`text` lowercased, every character that is not a letter or digit replaced by "_", and
    underscores stripped from both ends.

    One underscore per character, so `"T-shirt/top"` -> `"t_shirt_top"` but `"a - b"` ->
    `"a___b"` (`word_slug` gives `"a_b"`).

    Args:
        text: any string.

    Returns:
        The slug, as long as `text` less the stripped ends.
    """
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
