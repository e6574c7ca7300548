"""Host-side randomness determined by a JAX key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def numpy_generator(key: jax.Array) -> np.random.Generator:
    """A numpy generator determined by `key` (same key, same draws).

    Data-dependent host-side sampling (subsets of varying size, synthetic tables) is drawn in
    numpy: jax.random would compile a new program for every shape.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
