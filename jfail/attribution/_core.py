"""What every attribution method shares: input checks, the model as a traced pytree, chunking.

Each method is a jitted kernel `kernel(model, x, target, key, **hparams) -> [b, H, W, C]` for one
chunk of examples. `run_chunked` splits the batch into chunks of `batch_size` (the last one
padded, so one program serves every chunk), and calls the jitted kernel with the model's array
leaves as traced arguments: weights are never baked into the program as constants, and new weights
of the same shapes reuse it. Noise keys are split per example as for the whole batch, so results
do not depend on `batch_size`. Shapes and dtypes are checked on the host first
(`check_host_inputs`); finiteness of the inputs and target ranges in the same program as the
attributions, and the attributions' own finiteness where they lie (`run_chunked`): a call with
one chunk is one program and one wait for the device. On an accelerator, where a small batch
takes well under a millisecond, each further dispatch or transfer is a visible share.

Inside the caller's own `jax.jit`, `vmap` or `grad` (any input, target or weight a tracer) a
method is its kernel: the whole batch in one traced computation, shapes checked, values not (a
traced value cannot be inspected; NaN inputs give NaN attributions and an out-of-range target
the logit JAX's clamped indexing picks). `batch_size` is ignored there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jfail.data.batching import pad_rows_repeating_last
from jfail.keys import as_key
from jfail.models.adapter import ModelCallError, StaticModel, call_shape, in_trace, split_model
from jfail.xla import jit, on_cpu

__all__ = [
    "ModelParts", "check_inputs", "check_host_inputs", "run_chunked", "split_model", "num_classes",
    "logits_shape", "map_over_samples", "pick_logits", "require_key", "check_positive_int",
    "sample_group_size", "cpu_group_size", "CPU_INPUTS_PER_STEP",
]

# Steps of at most 96 inputs keep a CPU's activations in cache; the timings behind the figure are
# in benchmarks/results/cpu_step_size.md.
CPU_INPUTS_PER_STEP = 96


class ModelParts(NamedTuple):
    """A model split for jit (`split_model`): its array leaves and the hashable rest."""

    dynamic: list
    static: StaticModel


def check_inputs(model: Callable, x, target) -> tuple[jax.Array, jax.Array]:
    """Validate `x: [B, H, W, C]` (float, finite) and `target` (None, an int, or `[B]` ints).

    Returns `(x, target)` as float32 `[B, H, W, C]` (float64 if `x` is and 64-bit types are
    enabled) and int32 `[B]`; `target=None` means the model's predicted class. Waits for the
    device once (finiteness, target range); methods that go straight on to `run_chunked` use
    `check_host_inputs`, whose device checks `run_chunked` makes inside the method's own
    program.
    """
    x, target, classes, parts = _checked_on_host(model, x, target)
    if parts is None:  # inside the caller's trace
        return x, target
    finite, low, high = jax.device_get(_input_summary(x, target))  # one transfer
    _raise_for_summary(finite, low, high, classes)
    return x, target


def check_host_inputs(
    model: Callable, x, target
) -> tuple[jax.Array, jax.Array, ModelParts | None]:
    """`check_inputs` without waiting for the device: shapes, dtypes and host-held targets are
    checked here; whether `x` is finite and a device-held target in range is checked by
    `run_chunked`, which computes both in the same program as the attributions.

    Returns:
      `(x, target, parts)`: `parts` is the model split for jit (None inside the caller's trace),
      to pass on as `run_chunked(..., parts=parts)` so that one call splits the model once.
    """
    x, target, _, parts = _checked_on_host(model, x, target)
    return x, target, parts


def num_classes(model: Callable, x: jax.Array) -> int:
    """Number of logits `model` returns for inputs shaped like `x`."""
    return logits_shape(*split_model(model, x), x).shape[-1]


def run_chunked(
    kernel: Callable,
    model: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array | None = None,
    batch_size: int | None = None,
    per_example: tuple = (),
    shared: tuple = (),
    nonfinite_errors: tuple = (),
    parts: ModelParts | None = None,
    **hparams,
) -> jax.Array:
    """`kernel(model, x, target, keys, *per_example, *shared, **hparams)` per `batch_size` chunk.

    x: `[B, H, W, C]`; target: `[B]`; keys: `[b]` per-example keys (None when `key` is None);
    per_example: extra `[B, ...]` arrays chunked along with x; shared: arrays every chunk gets
    whole (e.g. `[N, H, W, C]` baselines), traced like the weights. Hyperparameters must be
    hashable (they are static in the compiled program). Returns the concatenated `[B, ...]` output.

    The program that computes a chunk also reports whether its `x` is finite and its target's
    range; a NaN input or an out-of-range target raise a ValueError once the batch is done, so a
    call waits for the device once. Attributions that hold NaN or infinite values for finite
    inputs raise a ValueError too, which says whether the model's logits on `x` are the cause
    (they are computed only then). The attributions are checked on the host where they live in
    host memory (the CPU backend: no copy, and no step added to the program) and by a reduction
    inside the program elsewhere. A NaN logit that does not enter any attribution (a class no
    example targets) is not an error. `nonfinite_errors`: one entry per `per_example` then
    `shared` array, None or the error message raised when that array holds NaN or infinite
    values. `parts`: the model's split from `check_host_inputs` (split here when None). With
    one chunk the per-example keys are split inside that program.
    """
    batch = x.shape[0]
    if batch_size is None:
        batch_size = batch
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    if in_trace(key, per_example, shared) if parts is not None else in_trace(
            model, x, target, key, per_example, shared):
        keys = None if key is None else jax.random.split(as_key(key), batch)
        return kernel(model, x, target, keys, *per_example, *shared, **hparams)
    arrays = tuple(per_example) + tuple(shared)
    nonfinite_errors = tuple(nonfinite_errors) + (None,) * (len(arrays) - len(nonfinite_errors))
    if len(nonfinite_errors) != len(arrays):
        raise ValueError("nonfinite_errors has more entries than per_example and shared arrays.")
    shared = tuple(a if isinstance(a, (jax.Array, np.generic)) else jnp.asarray(a) for a in shared)
    chunk = min(batch_size, batch)
    split_inside = key is not None and chunk == batch
    keys = None if key is None else as_key(key)
    if key is not None and not split_inside:
        keys = jax.random.split(keys, batch)  # before chunking: results do not depend on chunks
    dynamic, static = parts if parts is not None else split_model(model, x)
    checked = tuple(message is not None for message in nonfinite_errors)
    on_host = _in_host_memory(x)
    call = _jitted(kernel, static, tuple(sorted(hparams.items())), split_inside, checked,
                   not on_host)
    outputs, summaries = [], []
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        args = [x, target, keys, *per_example]
        if chunk < batch:  # one chunk of the whole batch needs no slicing (keys: one key then)
            args = [None if a is None else pad_rows_repeating_last(a[start:stop], chunk)
                    for a in args]
        out, summary = call(dynamic, *args, *shared)
        outputs.append(out if chunk == batch else out[: stop - start])
        summaries.append(summary)
    summaries = np.stack(jax.device_get(summaries))  # [chunks, 5 + checked arrays]
    if on_host:  # the attributions' finiteness, read where they lie
        summaries[:, 4] = [np.isfinite(np.asarray(out)).all() for out in outputs]
    _raise_for_chunks(summaries, nonfinite_errors, lambda: _model_output(dynamic, static, x))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=0)


def require_key(name: str, key, drawn: str = "samples") -> None:
    """Raise a clear error when a method that draws random `drawn` got no PRNG key."""
    if key is None:
        raise ValueError(
            f"{name} draws random {drawn} and needs a PRNG key, e.g. key=jax.random.key(0)."
        )


def check_positive_int(name: str, what: str, value, minimum: int = 1) -> None:
    """Raise unless `value` is an integer (not a bool) of at least `minimum`."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: {what} must be an integer >= {minimum}, got {value!r}.")


def sample_group_size(sample_batch_size) -> int | None:
    """A checked `sample_batch_size` (None: chosen by `map_over_samples`) as a static int."""
    if sample_batch_size is None:
        return None
    check_positive_int("sample_batch_size", "sample_batch_size", sample_batch_size)
    return int(sample_batch_size)


def map_over_samples(fn, samples, group):
    """`fn` over the leading (sample) axis of the pytree `samples: [n, b, ...]` in groups of
    `group` samples (`group * b` model inputs per step).

    `fn` maps `[m, b, ...] -> [m, b, ...]`. The samples are padded to a multiple of `group`
    (repeating the last) and run through `jax.lax.map`. `group=None`: on CPU, `cpu_group_size`
    (at most `CPU_INPUTS_PER_STEP` inputs a step); elsewhere all samples at once.
    """
    leaves = jax.tree_util.tree_leaves(samples)
    count = leaves[0].shape[0]
    if group is None and on_cpu():
        group = cpu_group_size(count, leaves[0].shape[1] if leaves[0].ndim > 1 else 1)
    if group is None or group >= count:
        return fn(samples)
    groups = -(-count // group)
    missing = groups * group - count

    def to_groups(a):
        if missing:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], missing, axis=0)])
        return a.reshape((groups, group) + a.shape[1:])

    out = jax.lax.map(fn, jax.tree_util.tree_map(to_groups, samples))
    return jax.tree_util.tree_map(lambda a: a.reshape((groups * group,) + a.shape[2:])[:count], out)


def cpu_group_size(count: int, inputs_per_sample: int) -> int:
    """Samples per `jax.lax.map` step on CPU for `count` samples of `inputs_per_sample` model
    inputs each: at most `CPU_INPUTS_PER_STEP` inputs a step (one sample where a sample alone
    has more), at least a third of that, and of those sizes the one that pads the fewest
    samples, then takes the fewest steps."""
    largest = max(1, CPU_INPUTS_PER_STEP // inputs_per_sample)
    if largest >= count:
        return count

    def padding_then_steps(group):
        steps = -(-count // group)
        return steps * group - count, steps

    return min(range(-(-largest // 3), largest + 1), key=padding_then_steps)


def pick_logits(logits, target):
    """`logits[i, target[i]]` for `logits: [N, K]`, `target: [N]` -> `[N]`."""
    return jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]


# --------------------------------------------------------------------------------------------
# Private helpers.


@functools.lru_cache(maxsize=256)
def _jitted(kernel, static, hparams, split_key: bool = False, checked: tuple = (),
            check_output: bool = True):
    """The jitted chunk program: `(attributions, summary)`, summary an int32 vector `[x finite,
    lowest target, highest target, number of classes, attributions finite (1 when not
    `check_output`), one finiteness flag per array of checked]` (`checked`: static flags over
    per_example + shared), one transfer for all."""

    def run(dynamic, x, target, keys, *arrays):  # arrays: the per-example chunks, then shared
        model = static.rebuild(dynamic)
        if split_key:
            keys = jax.random.split(keys, x.shape[0])
        out = kernel(model, x, target, keys, *arrays, **dict(hparams))
        classes = jax.eval_shape(model, x).shape[-1]  # a constant of the program
        out_finite = jnp.all(jnp.isfinite(out)) if check_output else True
        finite = [jnp.all(jnp.isfinite(a)) for a, check in zip(arrays, checked) if check]
        flags = [*_input_summary(x, target), classes, out_finite, *finite]
        return out, jnp.stack([jnp.asarray(flag, jnp.int32) for flag in flags])

    return jit(run)


def _in_host_memory(x) -> bool:
    """Whether arrays computed from `x` lie in host memory (the CPU backend)."""
    devices = x.devices() if isinstance(x, jax.Array) else {jax.devices()[0]}
    return all(device.platform == "cpu" for device in devices)


@jit(static_argnums=1)
def _model_output(dynamic, static, x):
    return static.rebuild(dynamic)(x)


def logits_shape(dynamic, static, x):
    """`jax.eval_shape` of the model `static.rebuild(dynamic)` (from `split_model`) on `x`, a
    ModelCallError where it cannot be called on `x`; remembered per model structure and shapes:
    jit's own `eval_shape` re-checks every weight per call (0.06 ms for the Defuse CNN, 0.36 ms
    for ResNet-18)."""
    avals = tuple(None if leaf is None else (leaf.shape, leaf.dtype) for leaf in dynamic)
    try:
        return _cached_logits_shape(static, avals, x.shape, x.dtype)
    except ModelCallError:
        raise
    except Exception as error:  # noqa: BLE001 - a library's error becomes one jfail error
        raise ModelCallError.wrap(static.rebuild(dynamic), (x,), error) from error


@functools.lru_cache(maxsize=256)
def _cached_logits_shape(static, avals, x_shape, x_dtype):
    dynamic = [None if aval is None else jax.ShapeDtypeStruct(*aval) for aval in avals]
    return _model_output.eval_shape(dynamic, static, jax.ShapeDtypeStruct(x_shape, x_dtype))


def _checked_on_host(model: Callable, x, target):
    """The checks that need no device result: `(x float32 or float64, target int32,
    number of classes, the model's split or None inside the caller's trace)`."""
    if not callable(model):
        raise TypeError(f"model must be a callable model(x) -> logits, got {type(model).__name__}.")
    x_array = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x_array.ndim != 4:
        raise ValueError(f"x must be a batch of images [B, H, W, C], got shape {x_array.shape}.")
    if x_array.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {x_array.shape}); pass at least one image.")
    if not jnp.issubdtype(x_array.dtype, jnp.floating):
        raise TypeError(
            f"x must hold floating-point images, got dtype {x_array.dtype}; convert integer "
            "images first, e.g. x.astype(np.float32) / 255."
        )
    # float32, or float64 where the caller enabled it and passed it (e.g. for finite differences)
    dtype = jax.dtypes.canonicalize_dtype(np.float64) if x_array.dtype == np.float64 else np.float32
    x = x_array if x_array.dtype == dtype and isinstance(x_array, jax.Array) else jnp.asarray(
        x_array, dtype)
    traced = in_trace(model, x, target)
    if traced:
        logits = call_shape(model, x)
    else:
        dynamic, static = split_model(model, x)
        logits = logits_shape(dynamic, static, x)
    if len(getattr(logits, "shape", ())) != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"model(x) must return logits [B, classes] = [{x.shape[0]}, K], got "
            f"{getattr(logits, 'shape', type(logits).__name__)}."
        )
    classes = logits.shape[1]
    if target is None:
        logits = model(x) if traced else _model_output(dynamic, static, x)
        target = jnp.argmax(logits, axis=-1)
    target = target if isinstance(target, jax.Array) else np.asarray(target)
    if target.ndim == 0:
        target = (jnp if isinstance(target, jax.Array) else np).full((x.shape[0],), target)
    if target.shape != (x.shape[0],):
        raise ValueError(
            f"target must be one class index per example, shape ({x.shape[0]},), got shape "
            f"{target.shape}."
        )
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if not isinstance(target, jax.Array) and target.size:  # on the host, before int32 wraps any
        _check_target_range(target.min(), target.max(), classes)
    if not (isinstance(target, jax.Array) and target.dtype == jnp.int32):
        target = jnp.asarray(target, jnp.int32)
    return x, target, classes, None if traced else ModelParts(dynamic, static)


def _raise_for_summary(finite, low, high, classes: int) -> None:
    if not finite:
        raise ValueError("x contains NaN or infinite values.")
    _check_target_range(low, high, classes)


def _raise_for_chunks(summaries, nonfinite_errors, logits: Callable) -> None:
    """Raise for the first problem any chunk's summary shows (see `_jitted`); `logits()`
    computes the model's logits on the batch, to say why attributions are not finite."""
    low, high, classes = summaries[:, 1].min(), summaries[:, 2].max(), int(summaries[0, 3])
    _raise_for_summary(summaries[:, 0].all(), low, high, classes)
    messages = [message for message in nonfinite_errors if message is not None]
    for index, message in enumerate(messages):
        if not summaries[:, 5 + index].all():
            raise ValueError(message)
    if summaries[:, 4].all():
        return
    if not np.isfinite(np.asarray(logits())).all():
        raise ValueError(
            "the model returned non-finite logits (NaN or infinite) for finite inputs x, so the "
            "attributions are meaningless; check the model's weights (e.g. a diverged training "
            "run) and its input normalization."
        )
    raise ValueError(
        "the attributions hold NaN or infinite values although x and the model's logits are "
        "finite: the method overflowed (check its hyperparameters, e.g. a propagation rule's "
        "epsilon, and the scale of x)."
    )


def _check_target_range(low, high, classes: int) -> None:
    if low < 0 or high >= classes:
        raise ValueError(f"target indices must lie in [0, {classes}), got range [{low}, {high}].")


@jit
def _input_summary(x, target):
    """Whether `x` is all finite, and the smallest and largest target (0 and 0 when empty)."""
    if target.size == 0:
        return jnp.all(jnp.isfinite(x)), jnp.int32(0), jnp.int32(0)
    return jnp.all(jnp.isfinite(x)), jnp.min(target), jnp.max(target)
