"""PRNG keys, one convention everywhere: every jfail function that draws takes a keyword-only
`key`, an int seed, a typed key (`jax.random.key`) or a raw uint32 key (`jax.random.PRNGKey`),
and the three give the same draws (`key=0` is `jax.random.key(0)`).

Host-side sampling whose shapes depend on the data (subsets of varying size, synthetic tables,
scikit-learn's estimators) draws from a NumPy generator determined by the same key
(`numpy_generator`, `host_seed`): `jax.random` would compile a program for every shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_key", "numpy_generator", "host_seed"]


def as_key(key, name: str = "key") -> jax.Array:
    """A typed PRNG key from an int seed, a typed key or a raw uint32 key.

    Args:
      key: an int (or 0-d integer array, traced too) seed, a typed key (returned as it is), or a
        raw uint32 key `[..., 2]` (wrapped).
      name: the argument's name in error messages.

    Returns:
      A typed key; `as_key(s)` equals `jax.random.key(s)`.

    Raises:
      ValueError: `key` is None (a method that draws needs one).
      TypeError: `key` is a bool, a string or any other type.

    Example:
      >>> import jax
      >>> k = as_key(0)
      >>> bool((jax.random.key_data(k) == jax.random.key_data(jax.random.key(0))).all())
      True
    """
    if key is None:
        raise ValueError(f"{name} is required: pass an int seed or a key, e.g. {name}=0 or "
                         f"{name}=jax.random.key(0).")
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int seed or a PRNG key, got the bool {key!r}.")
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if not hasattr(key, "dtype"):
        raise TypeError(f"{name} must be an int seed, jax.random.key(...) or a raw uint32 "
                        f"PRNGKey, got {type(key).__name__}.")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if jnp.issubdtype(key.dtype, jnp.integer) and jnp.ndim(key) == 0:
        return jax.random.key(key)
    if key.dtype == jnp.uint32 and jnp.ndim(key) >= 1 and key.shape[-1] == 2:
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise TypeError(f"{name} must be an int seed, jax.random.key(...) or a raw uint32 PRNGKey, "
                    f"got an array of dtype {key.dtype} and shape {tuple(key.shape)}.")


def numpy_generator(key, name: str = "key") -> np.random.Generator:
    """A NumPy generator determined by `key` (the same key, the same draws).

    Args:
      key: what `as_key` accepts: an int seed, a typed key or a raw uint32 key.
      name: the argument's name in error messages.

    Returns:
      A `np.random.Generator` seeded with the key's data.

    Raises:
      ValueError: `key` is None.
      TypeError: `key` is not a seed or a key (see `as_key`).
    """
    data = jax.random.key_data(as_key(key, name))
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def host_seed(key, name: str = "key") -> int:
    """An int seed for host libraries (scikit-learn) from `key`: an int seed as it is, a key a
    number determined by it.

    Args:
      key: what `as_key` accepts: an int seed, a typed key or a raw uint32 key.
      name: the argument's name in error messages.

    Returns:
      An int: `key` itself when it is an int, otherwise one in `[0, 2**31 - 1)`.

    Raises:
      ValueError: `key` is None.
      TypeError: `key` is not a seed or a key (see `as_key`).
    """
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return int(key)
    return int(numpy_generator(key, name).integers(2**31 - 1))
