"""Many hosts: JAX's multi-controller runtime and the 1-D batch mesh the engine shards over.

Every host runs the same program; `initialize_distributed` connects
them (once, before any JAX computation), after which `jax.devices()` lists
the devices of every host and `jax.process_index()` says which host this
is. `batch_mesh` lays all those devices on one `"batch"` axis, host
after host, so each host owns one contiguous block of rows of every global
batch and reads only those examples.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"
"""Name of the one axis of `batch_mesh`."""


class NoClusterError(RuntimeError):
    """`initialize_distributed` without arguments found no multi-process launch in the
    environment: a plain single-process run, which needs no initialization."""


def is_writer() -> bool:
    """Whether this process writes a run's shared files (logs, configs, results, reports).

    True in a process that has not joined a multi-host run, and in process 0
    of one; every other process writes only what the engine needs (its own
    shards). Never starts JAX's backends in a process that has joined no run.

    Returns:
        True in a single-process run and in process 0 of a multi-host run, else False.
    """
    import jax

    if not jax.distributed.is_initialized():
        return True
    return jax.process_index() == 0


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    timeout_s: int = 300,
) -> tuple[int, int]:
    """Joins this process to a multi-host JAX run (`jax.distributed.initialize`).

    Call it first thing in every process, before any JAX computation. With
    no arguments JAX detects the cluster from the environment (Cloud TPU
    pods, SLURM, Open MPI, Kubernetes jobs); on any other cluster give all
    three of `coordinator`, `num_processes` and `process_id`. On CPU
    hosts JAX's collectives go through Gloo (the default of
    `jax_cpu_collectives_implementation`). Calling it again in an
    initialized process does nothing.

    Args:
        coordinator: `"host:port"` of process 0, reachable from every process.
        num_processes: how many processes take part.
        process_id: this process's number in `[0, num_processes)`.
        local_device_ids: restrict this process to these local devices.
        timeout_s: how long to wait for every process to join.

    Returns:
        `(process_index, process_count)` of this process.

    Raises:
        ValueError: arguments that do not fit together (a process id outside
            the range, a coordinator without a port, only some of the three).
        NoClusterError: called without arguments and JAX found no cluster in
            the environment (a plain single-process run).
        RuntimeError: JAX could not join the cluster, or was already in use
            before this call; the message says what to do.
    """
    import jax

    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "Give all of coordinator=, num_processes= and process_id= (an explicit cluster), or "
            "none of them (JAX detects TPU pods, SLURM, Open MPI and Kubernetes jobs)."
        )
    if all(given):
        if not isinstance(coordinator, str) or coordinator.rpartition(":")[2].isdigit() is False:
            raise ValueError(f"coordinator must be 'host:port', got {coordinator!r}.")
        if (isinstance(num_processes, bool) or not isinstance(num_processes, int)
                or num_processes < 1):
            raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}.")
        if (isinstance(process_id, bool) or not isinstance(process_id, int)
                or not 0 <= process_id < num_processes):
            raise ValueError(
                f"process_id must be an integer in [0, {num_processes}), got {process_id!r}.")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
            local_device_ids=local_device_ids, initialization_timeout=timeout_s,
        )
    except (ValueError, RuntimeError) as error:
        if "before any JAX" in str(error):
            raise RuntimeError(
                "initialize_distributed must run before any JAX computation (arrays, jit calls, "
                "even jax.devices()): call it first thing in every process."
            ) from error
        if all(given):
            raise RuntimeError(
                f"Could not join the JAX run coordinated by {coordinator} as process {process_id} "
                f"of {num_processes}: {error}. initialize_distributed must run before any JAX "
                "computation, and every process must reach the coordinator."
            ) from error
        no_coordinator = isinstance(error, ValueError) and "coordinator_address" in str(error)
        raise (NoClusterError if no_coordinator else RuntimeError)(
            f"JAX found no cluster to join ({error}). On a TPU pod, SLURM, Open MPI or Kubernetes "
            "job run inside the job; elsewhere pass coordinator='host:port', num_processes= and "
            "process_id= (and call initialize_distributed before any JAX computation)."
        ) from error
    log.info("joined a JAX run as process %d of %d (%d local devices, %d in all)",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return jax.process_index(), jax.process_count()


def batch_mesh(devices=None):
    """A 1-D mesh over `devices` (default every device of every process), host by host.

    Args:
        devices: the devices, or None for `jax.devices()`.

    Returns:
        A `jax.sharding.Mesh` with one axis, `BATCH_AXIS`; devices sorted
        by (process index, id), so each process's devices are adjacent.
    """
    import jax
    from jax.sharding import Mesh

    devices = jax.devices() if devices is None else list(devices)
    ordered = sorted(devices, key=lambda device: (device.process_index, device.id))
    return Mesh(np.asarray(ordered), (BATCH_AXIS,))
