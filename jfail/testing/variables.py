"""Random Flax variables for tests and benchmarks, drawn without running a module's initializers.

    variables = random_variables(DefuseCNN(10), jax.random.key(0), jnp.zeros((1, 28, 28, 1)))

`module.init` traces and compiles every initializer, which takes seconds on a small CPU; here
only the shapes are traced and all values come from one normal draw, so a test or benchmark that
needs a network with some weights pays one small compiled sampler.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["random_variables"]

_RANDOM_BLOCK = 1 << 16


@jax.jit
def _normal_block(key, index):
    return jax.random.normal(jax.random.fold_in(key, index), (_RANDOM_BLOCK,), jnp.float32)


def random_variables(module, key, *init_args, **init_kwargs) -> dict:
    """Random Flax variables for `module` without running its initializers.

    Only the shapes of `module.init(key, *init_args, **init_kwargs)` are traced
    (`jax.eval_shape`); kernels are `N(0, 1 / fan_in)` (LeCun normal, Flax's default scale,
    fan-in = every axis but the last), every other leaf `N(0, 0.1^2)` (non-zero biases, so that
    copying them is checked too).

    Args:
        module: a Flax linen module.
        key: a `jax.random.key`.
        *init_args: example inputs for `module.init` (e.g. `jnp.zeros((1, 28, 28, 1))`).
        **init_kwargs: keyword arguments of `module.init` (e.g. `method="decode"`).

    Returns:
        The variables in Flax's `{'params': ...}` layout, as float32 numpy arrays.
    """
    shapes = jax.eval_shape(lambda k: module.init(k, *init_args, **init_kwargs), key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [leaf.size for _, leaf in leaves]
    # fixed-size blocks, so that every call reuses one compiled sampler
    blocks = -(-sum(sizes) // _RANDOM_BLOCK)
    flat = np.concatenate([np.asarray(_normal_block(key, i)) for i in range(blocks)])
    values, start = [], 0
    for (path, leaf), size in zip(leaves, sizes):
        value = flat[start : start + size].reshape(leaf.shape)
        start += size
        if getattr(path[-1], "key", None) == "kernel":
            value = value / np.sqrt(math.prod(leaf.shape[:-1]))
        else:
            value = 0.1 * value
        values.append(value.astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, values)
