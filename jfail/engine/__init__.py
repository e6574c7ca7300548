"""The data-set engine: a batch function over a whole source, on every device of every host.

- :func:`map_dataset` runs a jitted ``fn(images) -> pytree of [B, ...] arrays``
  over a source in globally sharded batches and writes the outputs to a
  chunked zarr store that a killed run resumes; :func:`open_outputs` reads a
  finished run back; :func:`create_array` and :func:`open_array` are the same
  on-disk arrays for outputs a caller writes itself (variable-length ones).
- :func:`initialize_distributed` joins a multi-host JAX run;
  :func:`batch_mesh` is the 1-D mesh of all devices the engine shards over.
"""

from jfail.engine.distributed import BATCH_AXIS, batch_mesh, initialize_distributed
from jfail.engine.mapping import (
    LazyArray,
    MappedOutputs,
    create_array,
    map_dataset,
    open_array,
    open_outputs,
)

__all__ = [
    "BATCH_AXIS",
    "LazyArray",
    "MappedOutputs",
    "batch_mesh",
    "create_array",
    "initialize_distributed",
    "map_dataset",
    "open_array",
    "open_outputs",
]
