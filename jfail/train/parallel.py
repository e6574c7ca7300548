"""Data parallelism over all local devices with `jax.sharding`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jfail.data.batching import pad_rows_with_zeros

__all__ = ["DataParallel"]


class DataParallel:
    """A one-axis mesh (`'data'`) over `devices` (default: all): batches split, weights replicated.

    On one device this is a no-op placement; with
    `XLA_FLAGS=--xla_force_host_platform_device_count=8` it splits each batch over eight CPU
    devices, and XLA inserts the gradient all-reduce.
    """

    def __init__(self, devices: Sequence[jax.Device] | None = None):
        devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.num_devices = len(devices)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    def replicate(self, tree: Any) -> Any:
        """Place every leaf of `tree` on all devices."""
        return jax.device_put(tree, self.replicated)

    def shard_batch(self, *arrays: np.ndarray, with_weight: bool = False) -> tuple[tuple, int]:
        """Pad the leading axis to a multiple of the device count and split it over devices.

        Returns `(sharded arrays [+ weight], n)` where `weight` is 1 for the `n` real rows and 0
        for padding.
        """
        n = len(arrays[0])
        padded = -(-n // self.num_devices) * self.num_devices
        out = [pad_rows_with_zeros(np.asarray(a), padded) for a in arrays]
        if with_weight:
            weight = np.zeros(padded, np.float32)
            weight[:n] = 1.0
            out.append(weight)
        return tuple(jax.device_put(a, self.batch_sharding) for a in out), n

    def to_host(self, array: jax.Array) -> np.ndarray:
        """The whole of a batch-sharded `array` as a NumPy array, in every process: on many
        hosts each process holds only its own rows, so they are gathered first."""
        if array.is_fully_addressable:
            return np.asarray(array)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
