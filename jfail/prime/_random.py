"""Host-side randomness determined by a JAX key: `jfail.keys`, used by PRIME's modules."""

from jfail.keys import as_key, host_seed, numpy_generator

__all__ = ["as_key", "host_seed", "numpy_generator"]
