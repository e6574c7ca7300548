"""An ImageNet-shaped image folder made from the images this machine has offline.

`make_image_folder(root, count)` writes `count` JPEGs of 224x224x3 into `NUM_CLASSES` class
folders (`root/c000/000000.jpg`, ...), image `i` in class `i % NUM_CLASSES`. Every image is a
random crop of a base image, resized to 224x224, maybe flipped, colour-jittered, tinted with its
class's colour and given a little noise, so no two files are alike. The base images come from
three families, by class: scikit-image's bundled images (`skimage.data`), Fashion-MNIST's test
images (through `jfail.data.load`, when installed; else the first family again) and
scikit-learn's 8x8 digits. Each image depends only on (seed, index), so a folder interrupted
while being written is completed by calling again, and `root/MANIFEST` records a finished one.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import numpy as np

NUM_CLASSES = 100
IMAGE_SIZE = 224
JPEG_QUALITY = 90
MANIFEST = "scale-folder.json"
FORMAT = "jfail-scale-folder-v1"
SKIMAGE_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry",
                  "hubble_deep_field", "coins", "moon", "page", "text", "clock", "grass",
                  "gravel", "brick", "colorwheel", "logo", "retina", "cat")

_BASES: dict[str, list[np.ndarray]] = {}


def default_folder(count: int, seed: int) -> str:
    """`$XDG_CACHE_HOME/jfail/scale-imagefolder-<count>-seed<seed>` (~/.cache when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "jfail", f"scale-imagefolder-{count}-seed{seed}")


def read_manifest(root: str) -> dict | None:
    try:
        with open(os.path.join(root, MANIFEST)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def make_image_folder(root: str, count: int, *, seed: int = 0, workers: int = 2) -> dict:
    """Writes (or completes) the folder; returns its manifest.

    Args:
      root: the folder (created).
      count: number of images, at least NUM_CLASSES.
      seed: the seed of every random choice.
      workers: processes encoding JPEGs.

    Returns:
      {"format", "count", "seed", "classes", "image_size", "bases", "bytes"}.

    Raises:
      ValueError: count below NUM_CLASSES, or root holding a different finished folder.
    """
    if count < NUM_CLASSES:
        raise ValueError(
            f"count must be at least {NUM_CLASSES} (one image per class), got {count}.")
    manifest = read_manifest(root)
    wanted = {"format": FORMAT, "count": count, "seed": seed, "classes": NUM_CLASSES,
              "image_size": IMAGE_SIZE}
    if manifest is not None:
        if {key: manifest.get(key) for key in wanted} != wanted:
            raise ValueError(f"{root} holds another image folder ({manifest}); give another "
                             "--data-dir or delete it.")
        return manifest
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(root, _class_name(label)), exist_ok=True)
    missing = [i for i in range(count) if not os.path.exists(_path(root, i))]
    chunks = [missing[start:start + 256] for start in range(0, len(missing), 256)]
    if chunks:
        with concurrent.futures.ProcessPoolExecutor(max(1, workers)) as pool:
            for _ in pool.map(_write_images, [(root, chunk, seed) for chunk in chunks]):
                pass
    total_bytes = sum(os.path.getsize(_path(root, i)) for i in range(count))
    manifest = {**wanted, "bases": {family: len(images) for family, images in _bases().items()},
                "bytes": total_bytes}
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle)
    os.replace(tmp, os.path.join(root, MANIFEST))
    return manifest


def _class_name(label: int) -> str:
    return f"c{label:03d}"


def _path(root: str, index: int) -> str:
    return os.path.join(root, _class_name(index % NUM_CLASSES), f"{index:06d}.jpg")


def _bases() -> dict[str, list[np.ndarray]]:
    """The base images by family, uint8 [H, W, 3] (loaded once per process)."""
    if _BASES:
        return _BASES
    import skimage.data

    photos = []
    for name in SKIMAGE_IMAGES:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # an image that needs a download: not on this machine
            continue
        photos.append(_rgb(image))
    _BASES["skimage"] = photos
    try:
        from jfail.data import load

        fashion = load("fashion_mnist", "test").images  # [N, 28, 28, 1] float in [0, 1]
        _BASES["fashion_mnist"] = [_rgb(np.round(image[..., 0] * 255).astype(np.uint8))
                                   for image in fashion[:2000]]
    except Exception:
        _BASES["fashion_mnist"] = []
    from sklearn.datasets import load_digits

    digits = load_digits().images  # [N, 8, 8] in 0..16
    _BASES["digits"] = [_rgb(np.round(image * 255 / 16).astype(np.uint8)) for image in digits]
    return _BASES


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _write_images(job) -> None:
    root, indices, seed = job
    for index in indices:
        path = _path(root, index)
        tmp = path + ".tmp.jpg"
        _make_image(index, seed).save(tmp, quality=JPEG_QUALITY)
        os.replace(tmp, path)


def _make_image(index: int, seed: int):
    from PIL import Image

    bases = _bases()
    label = index % NUM_CLASSES
    families = [name for name in ("skimage", "fashion_mnist", "digits") if bases[name]]
    family = families[label % len(families)]
    tint = np.random.default_rng([seed, 1, label]).uniform(0.6, 1.0, size=3)
    rng = np.random.default_rng([seed, 0, index])
    base = bases[family][rng.integers(len(bases[family]))]
    height, width = base.shape[:2]
    side = min(height, width) * rng.uniform(0.35 if min(height, width) > 64 else 0.6, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_h = int(min(height, max(2, side * np.sqrt(aspect))))
    crop_w = int(min(width, max(2, side / np.sqrt(aspect))))
    top = rng.integers(height - crop_h + 1)
    left = rng.integers(width - crop_w + 1)
    image = Image.fromarray(base[top:top + crop_h, left:left + crop_w])
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    array = np.asarray(image, np.float32)
    if rng.random() < 0.5:
        array = array[:, ::-1]
    mean = array.mean()
    array = (array - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.8, 1.2)
    array = array * tint * rng.uniform(0.85, 1.15, size=3)
    array = array + rng.normal(0.0, 4.0, size=array.shape)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
