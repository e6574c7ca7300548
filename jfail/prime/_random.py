"""Host-side randomness determined by a JAX key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def numpy_generator(key) -> np.random.Generator:
    """A numpy generator determined by `key` (same key, same draws): an int seed, a typed key or
    a raw uint32 key.

    Data-dependent host-side sampling (subsets of varying size, synthetic tables) is drawn in
    numpy: jax.random would compile a new program for every shape.
    """
    key = as_key(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def as_key(key, name: str = "key") -> jax.Array:
    """A typed PRNG key from `key`: a typed key (`jax.random.key`), a raw uint32 key
    (`jax.random.PRNGKey`) or an int seed.

    Raises:
      TypeError: `key` is none of these.
    """
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int seed or a PRNG key, got {key!r}.")
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if hasattr(key, "dtype") and np.shape(key) == (2,) and key.dtype == np.uint32:
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise TypeError(
        f"{name} must be an int seed, a jax.random.key(...) or a raw uint32 PRNGKey, got "
        f"{type(key).__name__} {getattr(key, 'shape', '')}."
    )


def host_seed(key, name: str = "key") -> int:
    """An int seed for host-side libraries (numpy, scikit-learn) from `key`: an int seed is used
    as it is; a key gives a number determined by it."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return int(key)
    return int(numpy_generator(as_key(key, name)).integers(2**31 - 1))
