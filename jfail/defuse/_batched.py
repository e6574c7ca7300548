"""What Defuse's host drivers share: PRNG keys, and one jitted call of a model over an array in
batches with the model's weights as traced arguments."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jfail.models.adapter import call_shape, split_model
from jfail.xla import cpu_friendly_gradients, jit


def map_batches(fn: Callable, x, batch_size: int, *, name: str = "model") -> Any:
    """`fn(x)` computed `batch_size` rows at a time; the outputs (any pytree of `[b, ...]` arrays)
    are concatenated along the first axis as numpy arrays.

    `fn` may be any JAX callable: the arrays it reads now are traced arguments of one compiled
    program (new weights of the same shapes reuse it). The last chunk is padded by repeating its
    last row, so every chunk has the compiled shape.

    Args:
        fn: any JAX callable `fn(x [b, ...]) -> pytree of [b, ...] arrays`.
        x: `[N, ...]` inputs, N >= 1.
        batch_size: rows per call, a positive integer.
        name: what the messages call `fn`.

    Returns:
        `fn`'s output pytree with every leaf a `[N, ...]` numpy array.

    Raises:
        ValueError: `x` is empty, `batch_size` is not a positive integer, `fn` does not return
            one row per input, or `fn` returned NaN or infinite values (`name` names the model in
            the message).
        ModelCallError: `fn` cannot be called on rows shaped like `x`'s.
    """
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if len(x) == 0:
        raise ValueError(
            f"the {name}'s input is empty (shape {np.shape(x)}); pass at least one row."
        )
    chunk = min(int(batch_size), len(x))
    spec = jax.ShapeDtypeStruct((chunk, *x.shape[1:]), x.dtype)
    out = call_shape(fn, spec)
    for leaf in jax.tree_util.tree_leaves(out):
        if not leaf.shape or leaf.shape[0] != chunk:
            raise ValueError(
                f"the {name} must return arrays with one row per input ({chunk}), got shapes "
                f"{[tuple(a.shape) for a in jax.tree_util.tree_leaves(out)]}."
            )
    dynamic, static = split_model(fn, spec)
    parts = []
    for start in range(0, len(x), chunk):
        part = np.asarray(x[start : start + chunk])
        size = len(part)
        if size < chunk:
            part = np.concatenate([part, np.repeat(part[-1:], chunk - size, axis=0)])
        values = jax.device_get(_call(dynamic, static, part))
        parts.append(jax.tree_util.tree_map(lambda a, n=size: a[:n], values))
    result = jax.tree_util.tree_map(lambda *chunks: np.concatenate(chunks), *parts)
    for leaf in jax.tree_util.tree_leaves(result):
        if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            bad = int(np.sum(~np.all(np.isfinite(leaf.reshape(len(leaf), -1)), axis=1)))
            raise ValueError(
                f"the {name} returned NaN or infinite values for {bad} of {len(leaf)} inputs; "
                "check its weights and inputs."
            )
    return result


@functools.partial(jit, static_argnums=1)
def _call(dynamic, static, x):
    fn = static.rebuild(dynamic)
    return cpu_friendly_gradients(fn)(x)  # on CPU: a decoder's transposed convolutions by phases
