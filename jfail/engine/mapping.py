"""Run a batch function over a whole source, on every device, into a resumable on-disk store.

`map_dataset` is the engine: it reads a source in global batches,
shards each batch over every device of every process, runs a jitted
`fn(images) -> pytree of [B, ...] arrays` and writes each output leaf to
a zarr array (tensorstore), chunk by chunk. A run that is killed continues,
when started again with the same arguments, at the first chunk that was not
finished, and ends with the same bytes as a run that was never stopped.

Layout of `out_dir`:

  engine.json          what was run: source, sizes, the output arrays (process 0 writes it)
  arrays/<name>/       one zarr array per output leaf, [N, ...]; <name> is the leaf's path
                       in the output pytree ("logits", "features/0"), "output" for a bare array
  done/<chunk>.json    one marker per finished chunk, written after its data is on disk

Chunks: each global batch of `batch_size` examples is split into one
block of rows per process (one block in a single-process run); that block
is one zarr chunk along axis 0, written by the process that computed it,
so processes never write the same chunk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jfail import jsonfile
from jfail.engine.distributed import BATCH_AXIS, batch_mesh
from jfail.logs import progress_disabled
from jfail.models.adapter import call_shape, traced_model
from jfail.xla import jit

log = logging.getLogger(__name__)

FORMAT = "jfail-engine-v1"
"""The `format` field of `engine.json`."""

METADATA_FILE = "engine.json"
ARRAYS_DIR = "arrays"
DONE_DIR = "done"

MAX_PENDING_WRITES = 2
"""Batches of outputs that may wait for the writer thread before the engine waits for it."""


class LazyArray:
    """An on-disk output array, read when indexed.

    `array[i:j]` (any NumPy basic index) reads just those elements into a
    NumPy array; `np.asarray(array)` reads it all.

    Attributes:
        name: the output leaf's name.
        shape: [N, ...] of the whole array.
        dtype: its NumPy dtype.
    """

    def __init__(self, name: str, store):
        self.name = name
        self._store = store
        self.shape = tuple(int(d) for d in store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)

    @property
    def ndim(self) -> int:
        """The number of dimensions, `len(shape)`."""
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self._store[index].read().result())

    def __array__(self, dtype=None, copy=None):
        array = self[...]
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyArray({self.name!r}, shape={self.shape}, dtype={self.dtype})"


@dataclasses.dataclass(frozen=True)
class MappedOutputs:
    """The outputs of a finished `map_dataset` run.

    Attributes:
        out_dir: where they are stored.
        num_examples: N, the length of every array.
        arrays: leaf name -> `LazyArray` [N, ...].
        tree: the arrays arranged like `fn`'s output pytree (None when
            opened with `open_outputs`, which does not know `fn`).
    """

    out_dir: str
    num_examples: int
    arrays: dict[str, LazyArray]
    tree: Any = None

    def __getitem__(self, name: str) -> LazyArray:
        try:
            return self.arrays[name]
        except KeyError:
            raise KeyError(f"no output {name!r}; the outputs are {sorted(self.arrays)}.") from None

    def read(self):
        """Every output as NumPy arrays: `fn`'s pytree when known, else a dict by name.

        Returns:
            `fn`'s output pytree with every leaf an `[N, ...]` NumPy array, or, when the tree
            is not known (`open_outputs`), a dict leaf name -> `[N, ...]` NumPy array.
        """
        import jax

        if self.tree is None:
            return {name: array[...] for name, array in self.arrays.items()}
        return jax.tree_util.tree_map(lambda array: array[...], self.tree,
                                      is_leaf=lambda leaf: isinstance(leaf, LazyArray))


def create_array(path: str | os.PathLike, shape, dtype, *, chunk_rows: int):
    """A new zarr array on disk (replacing one there), for outputs written by the caller.

    The same format as the engine's outputs, so `open_array` reads it as a
    `LazyArray`. Write rows with `array[i:j].write(values).result()`; a
    leading dimension may later be shrunk (`array.resize(exclusive_max=[F, ...],
    resize_metadata_only=True).result()`).

    Args:
        path: the array's folder.
        shape: [N, ...] (a capacity: only written chunks take disk space).
        dtype: a NumPy dtype (or `"bfloat16"`).
        chunk_rows: rows per chunk along axis 0.

    Returns:
        The open `tensorstore.TensorStore`.

    Raises:
        ValueError: `chunk_rows` is not a positive integer.
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
            or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}.")
    path = os.fspath(path)
    name = "bfloat16" if str(dtype) == "bfloat16" else np.dtype(dtype).name
    _create_array(path, {"shape": [int(d) for d in shape], "dtype": name}, int(chunk_rows))
    return _open_array(path)


def open_array(path: str | os.PathLike, name: str | None = None) -> LazyArray:
    """A zarr array written by `create_array` (or an engine output), read lazily.

    Args:
        path: the array's folder.
        name: the name the `LazyArray` carries; None for the folder's base name.

    Returns:
        A `LazyArray` `[N, ...]` over the stored array.

    Raises:
        FileNotFoundError: there is no array at `path`.
    """
    path = os.fspath(path)
    try:
        store = _open_array(path)
    except ValueError as error:  # tensorstore reports a missing array as a ValueError
        raise FileNotFoundError(f"{path} holds no array: {error}") from None
    return LazyArray(name or os.path.basename(path), store)


def map_dataset(
    fn: Callable,
    source,
    out_dir: str | os.PathLike,
    *,
    batch_size: int,
    split: str = "train",
    prefetch: int = 2,
    num_threads: int = 8,
    progress: bool | None = None,
    devices=None,
    with_labels: bool = False,
) -> MappedOutputs:
    """Applies `fn` to every example of `source` in sharded batches and stores the outputs.

    Every global batch of `batch_size` examples becomes one `jax.Array`
    [B, H, W, C] sharded along B over all `devices` (a 1-D mesh, see
    `jfail.engine.batch_mesh`); each process reads only its own rows
    of it. The last batch is padded with copies of the last example, and
    the padding's outputs are dropped. Outputs go to `out_dir` (layout in
    the module doc) from a writer thread while the devices compute the next
    batches, each chunk followed by a marker once it is on disk; a
    run started again over the same `out_dir` with the same arguments
    skips the finished chunks and gives the same bytes as one uninterrupted
    run (`fn` must be the same deterministic function: the engine cannot
    check that). Host memory holds about `prefetch` + 2 batches of inputs
    and outputs (inputs: `prefetch` + 2; outputs: MAX_PENDING_WRITES + 1),
    whatever the size of the data set.

    In a multi-host run (`jfail.engine.initialize_distributed`) every
    process calls this with the same arguments and `out_dir` on a file
    system they share; process 0 writes the metadata and shows progress.

    Args:
        fn: `fn(images) -> pytree of arrays` with images [B, H, W, C]
            float32 in [0, 1] and every output leaf [B, ...] (logits [B, K],
            features [B, D], attributions [B, H, W, C], ...): any JAX callable
            (closure, `Partial`, NNX or Equinox module). It is jitted with its
            weights, as they are at this call, as traced arguments replicated
            on every device (`jfail.models.adapter.traced_model`), not as
            constants baked into the program.
        source: an `jfail.data.ImageSource`, or a name for
            `jfail.data.open_source` (`"imagefolder:/data/pets@64"`).
        out_dir: the folder of the outputs; a new or empty folder, or that of
            an earlier run with the same arguments (which is then continued).
        batch_size: examples per global batch, a multiple of the number of devices.
        split: the split, when `source` is a name.
        prefetch: batches read ahead of the devices, per process (each on its
            own thread).
        num_threads: threads reading and decoding the examples of one batch, per process.
        progress: show a progress bar with throughput and time left (None: when
            stderr is a terminal).
        devices: the devices to shard over (default: every device of every process).
        with_labels: call `fn(images, labels, indices)` instead, with labels [B]
            int32 (the source's labels) and indices [B] int32 (each example's
            position in the source; padding rows repeat the last position), sharded
            like the images: for functions that need the true class (errors,
            attribution targets) or a per-example PRNG key
            (`jax.random.fold_in(key, index)`, which does not depend on the batch size).

    Returns:
        `MappedOutputs`, reading the stored arrays lazily.

    Raises:
        ValueError: a batch size that is not a positive multiple of the device
            count, an output leaf without the batch axis, an `out_dir` that
            holds something else or a run with other arguments.
        TypeError: `fn` is not callable.
        jfail.models.ModelCallError: `fn` cannot be called on a batch of the source's images.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jfail.data.sources import ImageSource, open_source

    if not callable(fn):
        raise TypeError(f"fn must be a function of a batch of images, got {type(fn).__name__}.")
    if isinstance(source, str):
        source = open_source(source, split)
    if not isinstance(source, ImageSource):
        raise TypeError(
            f"source must be a jfail.data.ImageSource or a data set name, got "
            f"{type(source).__name__}; wrap arrays in jfail.data.ArraySource.")
    for value, what in ((batch_size, "batch_size"), (prefetch, "prefetch"),
                        (num_threads, "num_threads")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    mesh = batch_mesh(devices)
    num_devices = mesh.devices.size
    if batch_size % num_devices:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the {num_devices} devices it is split "
            f"over; use {max(num_devices, batch_size // num_devices * num_devices)}.")
    num_examples = len(source)
    if not num_examples:
        raise ValueError(f"{source.name!r} has no examples.")

    sharding = NamedSharding(mesh, P(BATCH_AXIS))
    batch_shape = (batch_size, *source.image_shape)
    inputs = _input_specs(batch_shape, with_labels)
    outputs, treedef = _output_specs(fn, inputs)
    lo, hi = _local_rows(sharding, batch_shape)
    rows = hi - lo
    num_processes = jax.process_count()
    if rows * num_processes != batch_size:
        raise ValueError(
            f"every process must hold the same number of the {num_devices} devices; this one "
            f"holds {rows * num_devices // batch_size}.")
    num_batches = math.ceil(num_examples / batch_size)
    meta = {
        "format": FORMAT,
        "source": source.name,
        "source_fingerprint": _fingerprint(source),
        "num_examples": num_examples,
        "image_shape": list(source.image_shape),
        "batch_size": batch_size,
        "num_processes": num_processes,
        "chunk_rows": rows,
        "num_chunks": num_batches * num_processes,
        **({"inputs": "images, labels, indices"} if with_labels else {}),
        "outputs": [{"name": name, "shape": [num_examples, *shape[1:]], "dtype": dtype.name}
                    for name, (shape, dtype) in outputs.items()],
    }
    out_dir = os.fspath(out_dir)
    first_batch = _agree(lambda: _prepare(out_dir, meta, num_batches), out_dir)
    stores = {name: _open_array(_array_path(out_dir, name)) for name in outputs}
    arrays = {name: LazyArray(name, store) for name, store in stores.items()}
    tree = jax.tree_util.tree_unflatten(treedef, list(arrays.values()))
    result = MappedOutputs(out_dir, num_examples, arrays, tree)
    if first_batch >= num_batches:
        return result
    if first_batch:
        log.info("%s: %d of %d batches already done in %s; continuing", source.name,
                 first_batch, num_batches, out_dir)

    replicated = NamedSharding(mesh, P())
    model = _replicate(traced_model(fn, *inputs), replicated)
    compiled = jit(_apply, in_shardings=(replicated, *[sharding] * len(inputs)),
                   out_shardings=sharding)
    local_batches = _local_batches(source, batch_size, lo, rows, first_batch, num_batches,
                                   prefetch, num_threads, with_labels)
    bar = tqdm(total=num_examples, initial=min(first_batch * batch_size, num_examples),
               desc=f"map {source.name}", unit="img", dynamic_ncols=True,
               disable=progress_disabled(progress) or jax.process_index() != 0)
    # One writer thread copies each batch's outputs to the host, writes them and then the
    # chunk's marker, in batch order, while the devices compute the next batches; at most
    # MAX_PENDING_WRITES batches of outputs wait for it.
    writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jfail-write")
    pending = collections.deque()
    try:
        for batch_index, local_inputs in enumerate(local_batches, start=first_batch):
            arrays = [jax.make_array_from_process_local_data(sharding, local, spec.shape)
                      for local, spec in zip(local_inputs, inputs)]
            output = compiled(model, *arrays)  # dispatched, not waited for
            pending.append(writer.submit(_write_batch, batch_index, output, stores, out_dir,
                                         batch_size, lo, rows, num_examples, bar))
            while len(pending) > MAX_PENDING_WRITES or (pending and pending[0].done()):
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        writer.shutdown(wait=True)
        local_batches.close()
        bar.close()
    _barrier("jfail-engine-finished")
    return result


def open_outputs(out_dir: str | os.PathLike) -> MappedOutputs:
    """Opens the outputs of a finished `map_dataset` run.

    Args:
        out_dir: the run's folder.

    Returns:
        `MappedOutputs` with `tree=None` (arrays by name).

    Raises:
        FileNotFoundError: `out_dir` holds no engine run.
        ValueError: the run is not finished (the message says how far it got).
    """
    out_dir = os.fspath(out_dir)
    meta = _read_meta(out_dir)
    if meta is None:
        raise FileNotFoundError(f"{out_dir} holds no map_dataset run (no {METADATA_FILE}).")
    done = len(_done_chunks(out_dir))
    if done < meta["num_chunks"]:
        raise ValueError(
            f"the run in {out_dir} is not finished: {done} of {meta['num_chunks']} chunks are "
            "done. Run map_dataset again with the same arguments to finish it.")
    arrays = {}
    for output in meta["outputs"]:
        name = output["name"]
        arrays[name] = LazyArray(name, _open_array(_array_path(out_dir, name)))
    return MappedOutputs(out_dir, meta["num_examples"], arrays)


def _fingerprint(source) -> str:
    """A digest of the first and last examples, so a rerun over other data is refused."""
    import hashlib

    digest = hashlib.sha256()
    for index in sorted({0, len(source) - 1}):
        example = source[index]
        digest.update(np.ascontiguousarray(example["image"], np.float32).tobytes())
        digest.update(np.int64(example["label"]).tobytes())
    return digest.hexdigest()[:16]


def _apply(model, *inputs):
    return model(*inputs)


def _input_specs(batch_shape, with_labels: bool) -> tuple:
    """The shapes of fn's arguments for one global batch: images, then labels and indices."""
    import jax

    images = jax.ShapeDtypeStruct(batch_shape, np.float32)
    if not with_labels:
        return (images,)
    per_example = jax.ShapeDtypeStruct(batch_shape[:1], np.int32)
    return images, per_example, per_example


def _replicate(model, replicated):
    """The model's arrays as global arrays with a full copy on every device of every process."""
    import jax

    def place(leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # a typed PRNG key
            return jax.random.wrap_key_data(place(jax.random.key_data(leaf)),
                                            impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

    return jax.tree_util.tree_map(place, model)


def _output_specs(fn, inputs):
    """({leaf name: (shape, dtype)} of fn's output for one batch, its treedef); checks the
    batch axis. A call that fails is a ModelCallError naming the input shape."""
    import jax

    batch_shape = inputs[0].shape
    structure = call_shape(fn, *inputs)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(structure)
    if not leaves:
        raise ValueError("fn returned no arrays; it must return a pytree of [B, ...] arrays.")
    specs = {}
    for path, leaf in leaves:
        name = _leaf_name(path)
        if not leaf.shape or leaf.shape[0] != batch_shape[0]:
            raise ValueError(
                f"output {name!r} of fn has shape {tuple(leaf.shape)} for a batch of "
                f"{batch_shape[0]} images; every output needs the batch axis first ([B, ...]).")
        if name in specs:
            raise ValueError(f"two outputs of fn are both called {name!r}; rename one.")
        specs[name] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return specs, treedef


def _leaf_name(path) -> str:
    import jax

    name = jax.tree_util.keystr(path, simple=True, separator="/") if path else "output"
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", name).strip("/")
    return re.sub(r"(^|/)\.+", r"\1_", name) or "output"


def _local_rows(sharding, batch_shape) -> tuple[int, int]:
    """[lo, hi): the rows of every global batch that this process's devices hold."""
    spans = sorted((index[0].start or 0, index[0].stop or batch_shape[0])
                   for index in sharding.addressable_devices_indices_map(batch_shape).values())
    lo, hi = spans[0][0], spans[-1][1]
    if sum(stop - start for start, stop in spans) != hi - lo:
        raise ValueError("this process's devices do not hold one contiguous block of the batch.")
    return lo, hi


def _prepare(out_dir: str, meta: dict, num_batches: int) -> int:
    """Process 0: create or check out_dir; returns the first batch not finished everywhere."""
    existing = _read_meta(out_dir)
    if existing is None:
        # Arrays and an empty done/ without engine.json: a run killed while creating them.
        if os.path.isdir(out_dir) and (set(os.listdir(out_dir)) - {ARRAYS_DIR, DONE_DIR}
                                       or _done_chunks(out_dir)):
            raise ValueError(
                f"{out_dir} is not empty and holds no map_dataset run; give a new or empty folder.")
        os.makedirs(os.path.join(out_dir, DONE_DIR), exist_ok=True)
        for output in meta["outputs"]:
            _create_array(_array_path(out_dir, output["name"]), output, meta["chunk_rows"])
        _write_durably(os.path.join(out_dir, METADATA_FILE), jsonfile.dumps(meta))
        return 0
    differences = [key for key in meta if existing.get(key) != meta[key]]
    if differences:
        details = "; ".join(f"{key}: {existing.get(key)!r} there, {meta[key]!r} now"
                            for key in differences)
        raise ValueError(
            f"{out_dir} holds a map_dataset run with other arguments ({details}). Continue it "
            "with the same source, batch size, process count and fn, or give a new folder.")
    done = _done_chunks(out_dir)
    per_batch = meta["num_processes"]
    for batch in range(num_batches):
        if any(batch * per_batch + p not in done for p in range(per_batch)):
            return batch
    return num_batches


def _agree(prepare: Callable[[], int], out_dir: str) -> int:
    """Runs `prepare` on process 0 and gives every process its answer (or a failure)."""
    import jax

    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    answer, failure = -1, None
    if jax.process_index() == 0:
        try:
            answer = prepare()
        except Exception as error:  # told to the others, then raised here
            failure = error
    answer = int(multihost_utils.broadcast_one_to_all(np.int64(answer)))
    if failure is not None:
        raise failure
    if answer < 0:
        raise ValueError(f"process 0 could not prepare {out_dir}; see its error.")
    return answer


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _local_batches(source, batch_size, lo, rows, first_batch, num_batches, prefetch,
                   num_threads, with_labels=False):
    """Yields this process's rows of every batch from first_batch on: a tuple of the images
    [rows, H, W, C] float32 and, with_labels, the labels and positions [rows] int32.

    Grain reads whole batches ahead (at most `prefetch` of them, each on its own thread); the
    rows of one batch are read and decoded by a pool of `num_threads` threads. Grain's own
    per-example prefetching costs about a millisecond per example, too much for small images.
    """
    import grain

    last = len(source) - 1
    pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="jfail-read")

    def read_row(position: int):
        example = source[position]
        return np.asarray(example["image"], np.float32), example["label"]

    def read_batch(batch: int) -> tuple:
        positions = [min(position, last) for position in
                     range(batch * batch_size + lo, batch * batch_size + lo + rows)]
        examples = list(pool.map(read_row, positions))
        images = np.stack([image for image, _ in examples])
        if not with_labels:
            return (images,)
        labels = np.asarray([label for _, label in examples], np.int32)
        return images, labels, np.asarray(positions, np.int32)

    dataset = grain.MapDataset.range(first_batch, num_batches).map(read_batch)
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    try:
        yield from dataset.to_iter_dataset(options)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _write_batch(batch_index, output, stores, out_dir, batch_size, lo, rows, num_examples, bar):
    """Writes this process's rows of one batch's outputs, then the chunk's marker."""
    import jax

    start = batch_index * batch_size + lo
    stop = min(start + rows, num_examples)
    writes = []
    for name, leaf in zip(stores, jax.tree_util.tree_leaves(output)):
        shards = sorted(leaf.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        local = np.concatenate([np.asarray(shard.data) for shard in shards])
        if stop > start:
            writes.append(stores[name][start:stop].write(local[: stop - start]))
    for write in writes:
        write.result()
    _write_durably(os.path.join(out_dir, DONE_DIR, f"{start // rows:09d}.json"),
                   jsonfile.dumps({"rows": [start, max(start, stop)]}))
    bar.update(max(0, min(batch_size, num_examples - batch_index * batch_size)))


def _done_chunks(out_dir: str) -> set[int]:
    done = set()
    try:
        names = os.listdir(os.path.join(out_dir, DONE_DIR))
    except FileNotFoundError:
        return done
    for name in names:
        stem, dot, ending = name.partition(".")
        if ending == "json" and stem.isdigit():
            done.add(int(stem))
    return done


def _read_meta(out_dir: str) -> dict | None:
    import json

    path = os.path.join(out_dir, METADATA_FILE)
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable: {error}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file.")
    return meta


def _array_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, ARRAYS_DIR, *name.split("/"))


def _create_array(path: str, output: dict, chunk_rows: int) -> None:
    import tensorstore as ts

    shape = output["shape"]
    chunks = [chunk_rows, *(max(1, d) for d in shape[1:])]
    ts.open({
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {"shape": shape, "chunks": chunks, "dtype": _zarr_dtype(output["dtype"])},
        "context": {"file_io_sync": True},
    }, create=True, delete_existing=True).result()


def _open_array(path: str):
    import tensorstore as ts

    return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path},
                    "context": {"file_io_sync": True}}, open=True).result()


def _zarr_dtype(name: str) -> str:
    return "bfloat16" if name == "bfloat16" else np.dtype(name).str


def _write_durably(path: str, text: str) -> None:
    """Writes `text` to `path` atomically and flushed to disk (temporary file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
