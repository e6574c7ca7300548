"""Attributions and the randomization tests' similarities over a data set never loaded whole.

Both run through `jfail.engine.map_dataset` (sharded over every device and host,
resumable): the attribution method is the engine's batch function. A randomized method draws
example `i`'s noise from `fold_in(key, i)` (`i` its position in the source), one example at a
time under `vmap`, so the stored maps do not depend on the batch size or the device count;
`attributions_to_store(...)[i]` equals ``method(model, x[i:i+1], t[i:i+1],
key=fold_in(key, i))``. A deterministic method runs on the whole batch and equals
`method(model, x, t)`.

`randomization_similarity_to_store` computes, per batch, the maps of a reference model
and of each randomized model (cascading or independent re-initialization, see
`jfail.debugtests.randomization`) with the same targets and keys, and stores only the
per-example SSIM and Spearman rank correlation [N, R]: the maps themselves never reach the host.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jfail.debugtests.metrics import spearman, ssim

__all__ = ["attributions_to_store", "paper_postprocess", "randomization_similarity_to_store"]

TARGETS = ("label", "prediction")


def paper_postprocess(maps):
    """What the paper compares: |maps| summed over channels, scaled to [0, 1] per example.

    [B, H, W, C] -> [B, H, W] (`normalize_unit(reduce_channels(absolute(maps)))`).

    Args:
        maps: `[B, H, W, C]` signed attribution maps.

    Returns:
        `[B, H, W]` maps in [0, 1].
    """
    from jfail.attribution import absolute, normalize_unit, reduce_channels

    return normalize_unit(reduce_channels(absolute(maps)))


def attributions_to_store(
    method: str | Callable,
    model: Callable,
    source,
    out_dir: str | os.PathLike,
    *,
    key=None,
    target: str = "label",
    postprocess: Callable | None = None,
    batch_size: int = 64,
    split: str = "train",
    progress: bool | None = None,
    **hparams,
):
    """The attribution maps of every image of a source, stored on disk.

    Args:
        method: a name in `jfail.attribution.METHODS` or a function
            `method(model, x, target, *, key=None, **hparams) -> [B, H, W, C]`.
        model: the classifier, any JAX callable `[B, H, W, C] -> logits [B, K]`.
        source: a `jfail.data.ImageSource` or a name for `jfail.data.open_source`.
        out_dir: a new or empty folder, or that of an interrupted run of the same call.
        key: a PRNG key or int seed, folded with each example's position (randomized methods
            need one; None runs the method on whole batches without a key).
        target: `"label"` (the source's labels) or `"prediction"` (the model's class).
        postprocess: applied to each batch's maps inside the program (e.g.
            `paper_postprocess`); None stores the raw maps.
        batch_size: examples per global batch, a multiple of the device count.
        split: the split, when `source` is a name.
        progress: show a progress bar (None: when stderr is a terminal).
        **hparams: the method's settings (`num_samples=`, `baselines=`, ...).

    Returns:
        `jfail.engine.MappedOutputs` with `"attributions"`: [N, H, W, C] (or what
        `postprocess` returns per example).

    Raises:
        ValueError: an unknown `target`; the engine's errors.
        KeyError: an unknown method name.
        ModelCallError: the model cannot take the source's images.
    """
    from jfail.engine import map_dataset

    attribute = _attribute(method, key, target, hparams)

    def fn(images, labels, indices):
        maps = attribute(model, images, _targets(model, images, labels, target), indices)
        return {"attributions": maps if postprocess is None else postprocess(maps)}

    return map_dataset(fn, source, out_dir, batch_size=batch_size, split=split,
                       progress=progress, with_labels=True)


def randomization_similarity_to_store(
    method: str | Callable,
    model: Callable,
    randomized: Sequence[Callable],
    source,
    out_dir: str | os.PathLike,
    *,
    key=None,
    target: str = "prediction",
    postprocess: Callable | None = paper_postprocess,
    batch_size: int = 64,
    split: str = "train",
    progress: bool | None = None,
    **hparams,
):
    """Similarity of each randomized model's maps to the model's, per example, stored on disk.

    For each batch: the maps of `model` and of every model in `randomized` (same targets, same
    per-example keys), post-processed, then `jfail.debugtests.ssim` and
    `jfail.debugtests.spearman(..., absolute=True)` of each randomized map against the
    reference map. Averages over the data set are `outputs["ssim"][...].mean(0)`.

    Args:
        method, key, postprocess, batch_size, split, progress, **hparams: as for
            `attributions_to_store` (`postprocess` defaults to `paper_postprocess`;
            SSIM needs maps of at least 11x11 pixels).
        model: the trained classifier, `[B, H, W, C] -> logits [B, K]`.
        randomized: R classifiers of the same inputs (e.g. `Partial(apply, params)` for each
            step of `cascading_randomization`).
        source: a `jfail.data.ImageSource` or a name for `jfail.data.open_source`.
        out_dir: a new or empty folder, or that of an interrupted run of the same call.
        target: `"prediction"` (the trained model's class, for every model, as the paper) or
            `"label"`.

    Returns:
        `jfail.engine.MappedOutputs` with `"ssim"` and `"spearman"`, [N, R] float32.

    Raises:
        ValueError: no randomized models, an unknown `target`, maps too small for SSIM; the
            engine's errors.
        KeyError: an unknown method name.
    """
    from jfail.engine import map_dataset

    randomized = tuple(randomized)
    if not randomized:
        raise ValueError("randomized must hold at least one model to compare with.")
    attribute = _attribute(method, key, target, hparams)
    postprocess = postprocess or (lambda maps: maps)

    def fn(images, labels, indices):
        targets = _targets(model, images, labels, target)
        reference = postprocess(attribute(model, images, targets, indices))
        similarities = {"ssim": [], "spearman": []}
        for other in randomized:
            maps = postprocess(attribute(other, images, targets, indices))
            similarities["ssim"].append(ssim(reference, maps))
            similarities["spearman"].append(spearman(reference, maps, absolute=True))
        return {name: jnp.stack(values, axis=1) for name, values in similarities.items()}

    return map_dataset(fn, source, out_dir, batch_size=batch_size, split=split,
                       progress=progress, with_labels=True)


def _attribute(method, key, target, hparams):
    """`attribute(model, images [B, ...], targets [B], indices [B]) -> maps`, per-example keys."""
    from jfail.attribution import METHODS
    from jfail.keys import as_key

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    if isinstance(method, str):
        if method not in METHODS:
            raise KeyError(f"unknown attribution method {method!r}; known: {sorted(METHODS)}")
        method = METHODS[method]
    if not callable(method):
        raise TypeError(f"method must be a name or a function, got {type(method).__name__}.")
    if key is None:
        return lambda model, images, targets, indices: method(model, images, targets, **hparams)
    key = as_key(key)

    def attribute(model, images, targets, indices):
        def one(image, label, index):
            return method(model, image[None], label[None], key=jax.random.fold_in(key, index),
                          **hparams)[0]

        return jax.vmap(one)(images, targets, indices)

    return attribute


def _targets(model, images, labels, target):
    if target == "label":
        return labels
    return jnp.argmax(model(images), axis=-1).astype(jnp.int32)
