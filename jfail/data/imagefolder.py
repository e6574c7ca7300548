"""An image folder as a data set: one subfolder per class, PNG or JPEG files, read into memory.

    my_images/                    my_images/
      cat/0001.png       or         train/cat/...  train/dog/...
      dog/0001.jpg                  test/cat/...   test/dog/...

Labels are the class subfolders' sorted names (`cat` = 0, `dog` = 1). With `train/` and `test/`
subfolders those are the splits (both must hold the same classes); otherwise a fixed stratified
share of each class is the test split, as for mnist5k (`jfail.data.datasets.FIXED_SPLIT_SEED`).
Images are converted to grayscale (1 channel) when every file is grayscale, else to RGB (3
channels, alpha dropped), and resized (bilinear) to `image_size` when it is given; without it
every image must already have the same size.

`jfail.data.load("imagefolder:<path>")` calls `load_image_folder`, the one entry point, so the
in-memory reading here can be replaced by a streaming source without touching its callers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "image_folder_classes", "image_folder_shape", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File endings read as images (case-insensitive); other files are ignored."""

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def image_folder_classes(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names of the image folder at `path` (its sorted subfolders, or those of its
    `train/` subfolder), checking its layout without reading any image.

    Raises:
      ValueError: `path` is not a directory, has no class subfolders, a class has no image, or
        `train/` and `test/` hold different classes.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(path)!r} is not a directory; give a folder with one "
                         "subfolder of PNG or JPEG images per class.")
    parts = _split_roots(root)
    classes = None
    for split, folder in parts.items():
        names = tuple(sorted(entry.name for entry in folder.iterdir() if entry.is_dir()))
        if not names:
            raise ValueError(f"image folder {str(folder)!r} has no class subfolders; put the "
                             "images of each class in a subfolder named after the class.")
        for name in names:
            if not _image_files(folder / name):
                raise ValueError(f"class folder {str(folder / name)!r} holds no "
                                 f"{'/'.join(IMAGE_SUFFIXES)} image.")
        if classes is not None and names != classes:
            raise ValueError(f"{str(root)!r}: train/ has classes {list(classes)} but {split}/ "
                             f"has {list(names)}; both splits need the same class folders.")
        classes = names
    return classes


def image_folder_shape(path: str | os.PathLike, image_size: int | None = None
                       ) -> tuple[int, int, int]:
    """`(H, W, C)` of the images `load_image_folder(path, ..., image_size=image_size)` returns,
    from the files' headers (no pixel is decoded).

    Raises:
      ValueError: a bad layout (`image_folder_classes`), a file that is not a readable image, or
        images of different sizes without `image_size`.
    """
    files = [f for folder in _split_roots(Path(path)).values()
             for f in _labelled_files(folder, image_folder_classes(path))[0]]
    sizes, gray = set(), True
    for file in files:
        size, mode = _header(file)
        sizes.add(size)
        gray &= mode in _GRAY_MODES
    channels = 1 if gray else 3
    if image_size is not None:
        return (image_size, image_size, channels)
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        raise ValueError(f"image folder {str(path)!r} holds images of {len(sizes)} sizes ({shown}"
                         f"{', ...' if len(sizes) > 4 else ''}); add @S to the name to resize "
                         "them all to SxS, e.g. 'imagefolder:my_images@64', or give the model's "
                         "image_size.")
    width, height = sizes.pop()
    return (height, width, channels)


def load_image_folder(path: str | os.PathLike, split: str = "train", *,
                      image_size: int | None = None):
    """One split of an image folder as an in-memory `Dataset`.

    Args:
      path: the folder (see the module docstring for its layout).
      split: "train" or "test"; "all" too for a folder without `train/` and `test/`.
      image_size: resize every image to `[image_size, image_size]` (bilinear); None keeps the
        files' size, which must then be the same for all.

    Returns:
      `Dataset` with images `[N, H, W, C]` float32 in [0, 1] (C = 1 when every file is
      grayscale, else 3), labels `[N]` int32 (sorted class folder names), class_names.

    Raises:
      ValueError: a bad layout, an unreadable file, an unknown split, mixed sizes without
        `image_size`.
    """
    from jfail.data.datasets import Dataset, _check_split, _fixed_split, _take

    root = Path(path)
    classes = image_folder_classes(root)
    shape = image_folder_shape(root, image_size)
    roots = _split_roots(root)
    if "test" in roots:
        _check_split(f"imagefolder:{path}", split, ("train", "test"))
        images, labels = _read(roots[split], classes, shape)
        return _take(Dataset(images, labels, classes), slice(None))
    _check_split(f"imagefolder:{path}", split, ("train", "test", "all"))
    images, labels = _read(root, classes, shape)
    return _fixed_split(images, labels, classes, split)


def _split_roots(root: Path) -> dict[str, Path]:
    """`{"train": root/train, "test": root/test}` when both exist, else `{"all": root}`."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {"train": root / "train", "test": root / "test"}
    return {"all": root}


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _labelled_files(folder: Path, classes) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _image_files(folder / name)
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, np.int32)


def _header(file: Path) -> tuple[tuple[int, int], str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return image.size, image.mode
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{file} is not a readable PNG or JPEG image ({error}).") from error


def _read(folder: Path, classes, shape) -> tuple[np.ndarray, np.ndarray]:
    """images `[N, H, W, C]` uint8 and labels `[N]` of every image under `folder`."""
    files, labels = _labelled_files(folder, classes)
    images = np.stack([_pixels(f, shape) for f in files])
    return images, labels


def _pixels(file: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """One file as `shape` uint8 pixels."""
    from PIL import Image

    height, width, channels = shape
    with Image.open(file) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, np.uint8)
    return pixels.reshape(height, width, channels)
