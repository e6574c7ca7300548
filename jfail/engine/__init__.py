"""The data-set engine: a batch function over a whole source, on every device of every host.

- `map_dataset` runs a jitted `fn(images) -> pytree of [B, ...] arrays`
  over a source in globally sharded batches and writes the outputs to a
  chunked zarr store that a killed run resumes; `open_outputs` reads a
  finished run back; `create_array` and `open_array` are the same
  on-disk arrays for outputs a caller writes itself (variable-length ones).
- `initialize_distributed` joins a multi-host JAX run; `is_writer`
  says whether this process writes the run's shared files (process 0 does);
  `batch_mesh` is the 1-D mesh of all devices the engine shards over.
"""

from jfail.engine.distributed import (
    BATCH_AXIS,
    NoClusterError,
    batch_mesh,
    initialize_distributed,
    is_writer,
)
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
    "NoClusterError",
    "batch_mesh",
    "create_array",
    "initialize_distributed",
    "is_writer",
    "map_dataset",
    "open_array",
    "open_outputs",
]
