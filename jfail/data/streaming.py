"""Shuffled, sharded, resumable mini-batches from a source, on Grain.

`loader` is a `grain.DataLoader` over an `jfail.data.sources.ImageSource`:
the order is fixed by `key` (the same key, the same batches on every run),
each JAX process reads only its own share of every epoch
(`grain.sharding.ShardByJaxProcess`), and the iterator's position can be
saved and restored (`iterator.get_state()` / `iterator.set_state(state)`,
small JSON bytes), so a killed training run continues with exactly the
batches it would have seen. Reads run on `num_threads` threads, at most
`prefetch` batches ahead, so host memory is bounded by the batch size.
"""

from __future__ import annotations

from jfail.data.sources import ImageSource
from jfail.keys import host_seed


def loader(
    source: ImageSource,
    batch_size: int,
    *,
    key=0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_options=None,
    drop_remainder: bool = True,
    num_threads: int = 8,
    prefetch: int = 2,
    worker_count: int = 0,
):
    """A Grain data loader of mini-batches of `source`.

    Args:
        source: the examples (any random-access source).
        batch_size: examples per batch on this process.
        key: an int seed or a PRNG key fixing the shuffled order of every epoch.
        shuffle: False keeps the source's order.
        num_epochs: how many passes (None: forever).
        shard_options: a `grain.sharding.ShardOptions`; default
            `ShardByJaxProcess(drop_remainder=True)`: process p of P reads
            its own 1/P of the examples, all processes the same number.
        drop_remainder: drop the last, smaller batch of the stream.
        num_threads: threads decoding examples (per worker process).
        prefetch: batches read ahead of the consumer.
        worker_count: Grain worker processes (0: read in this process). Grain's
            per-example path costs of the order of a millisecond an example
            under load; workers spread that, and JPEG decoding, over cores
            (the source is pickled to them; jfail's sources are picklable).

    Returns:
        A `grain.DataLoader`; iterating it yields ``{"image": [B, H, W, C]
        float32, "label": [B] int32}`; its iterator has `get_state()`` /
        `set_state()`.

    Raises:
        ValueError: a batch size, thread count or prefetch depth below 1.
    """
    import grain

    for value, what in ((batch_size, "batch_size"), (num_threads, "num_threads"),
                        (prefetch, "prefetch")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        len(source), shard_options=shard_options, shuffle=shuffle, num_epochs=num_epochs,
        seed=host_seed(key) % 2**31 if shuffle else None,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)],
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=num_threads,
                                       prefetch_buffer_size=prefetch * batch_size),
    )
