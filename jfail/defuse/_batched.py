"""One jitted call of a model callable, applied over an array in batches."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jfail.models.cpu_gradients import cpu_friendly_gradients
from jfail.xla import jit


def map_batches(fn: Callable, x, batch_size: int) -> Any:
    """`fn(x)` computed `batch_size` rows at a time; the outputs (any pytree of `[b, ...]` arrays)
    are concatenated along the first axis as numpy arrays. `fn`'s weights are traced, so new weights
    of the same shapes reuse the compiled program."""
    parts = [jax.device_get(_call(fn, x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return jax.tree_util.tree_map(lambda *chunks: np.concatenate(chunks), *parts)


@jit
def _call(fn, x):
    return cpu_friendly_gradients(fn)(x)  # on CPU: a decoder's transposed convolutions by phases
