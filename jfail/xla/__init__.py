"""jfail's XLA layer: `jit`, with the compiler options every jfail program is compiled with,
and the rewrites that keep gradients off XLA:CPU's slow paths.

- `jit(fn)`: `jax.jit` with `compiler_options()`, the options of `OPTIONS` the installed XLA
  accepts. On XLA:CPU (`CPU_OPTIONS`) the YNNPACK fusions are switched off: on convolutions they
  are several times slower than XLA's own Eigen kernels, with the same results to float32
  rounding. On XLA:GPU (`GPU_OPTIONS`) convolutions and the other kinds of work named are
  recorded into command buffers (CUDA graphs), so that a small float32 gradient is a few graph
  launches rather than hundreds of kernel launches. cuDNN's NCHW layout
  (`xla_gpu_force_conv_nchw`) is left out: it was faster still, but in one process the
  convolution algorithms autotuned for it gave gradients beyond the 1e-4 that jfail's
  attributions are held to.
- `cpu_friendly_gradients(fn)` (`jfail.xla.cpu_gradients`): `fn` with its slow convolutions and
  dense-layer products replaced on XLA:CPU; `on_cpu()` says whether that applies.
- `jfail.xla.jaxpr`: the jaxpr interpreter those rewrites and modified back-propagation share.

The timings behind these choices are in `benchmarks/results/xla_options.md` (CPU; GPU:
`benchmarks/results/xla_gpu_options_h200.md`) and `benchmarks/results/cpu_gradients.md`.

Each backend ignores the other's options; `compiler_options()` keeps those the installed XLA
accepts and applies them to the program being compiled, not to the process: other programs, the
user's included, keep XLA's defaults.

`jit` takes what `jax.jit` takes and is used the same way (`@jit`, `@jit(static_argnums=0)`,
`jit(fn)`). The `jax.jit` object is made at the first call (or first attribute access such as
`.lower`), so that importing jfail neither starts a backend nor fixes the options before the
user has configured JAX. JAX accepts compiler options on top-level programs only: called while
another function is being traced (inside the user's `jax.jit`, `vmap` or `grad`), a jfail
function is a plain `jax.jit` and becomes part of that program, compiled with its options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.extend import core as jax_core

from jfail.xla.cpu_gradients import cpu_friendly_gradients, on_cpu

__all__ = ["jit", "compiler_options", "OPTIONS", "cpu_friendly_gradients", "on_cpu"]

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
GPU_OPTIONS = {
    "xla_gpu_enable_command_buffer": (
        "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONVOLUTION,WHILE,CONDITIONAL,DYNAMIC_SLICE_FUSION"
    ),
}
OPTIONS = {**CPU_OPTIONS, **GPU_OPTIONS}


def jit(fun: Callable | None = None, /, **jit_kwargs):
    """`jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)`, made at first use.

    Args:
        fun: the function to compile; omitted, `jit` returns a decorator
            (`@jit(static_argnums=0)`).
        **jit_kwargs: what `jax.jit` takes (`static_argnums`, `donate_argnums` ...), except
            `compiler_options`.

    Returns:
        A callable used like `jax.jit(fun)` (calls, `.lower`, `.eval_shape` ...): compiled with
        jfail's options at the top level, a plain `jax.jit` while another function is traced.

    Raises:
        TypeError: if `compiler_options` is passed (they are jfail's own; call `jax.jit`).
    """
    if "compiler_options" in jit_kwargs:
        raise TypeError("jit: compiler_options are jfail's own; call jax.jit to pass others.")
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _DeferredJit(fun, jit_kwargs)


@functools.cache
def compiler_options() -> dict | None:
    """The options of `OPTIONS` the installed XLA accepts.

    Each option is checked once, alone, by compiling a one-operation program on JAX's default
    backend; the answer is remembered (`compiler_options.cache_clear()` forgets it).

    Returns:
        A dict of option name -> value, or None if XLA accepts none of them.
    """
    accepted = {name: value for name, value in OPTIONS.items() if _accepts({name: value})}
    return accepted or None


# --------------------------------------------------------------------------------------------
# Private helpers.


class _DeferredJit:
    """`jax.jit(fun)` with jfail's options at the top level, made at the first call or attribute
    lookup; a plain `jax.jit(fun)` while tracing."""

    def __init__(self, fun: Callable, jit_kwargs: dict):
        self._fun, self._jit_kwargs, self._jitted, self._plain = fun, jit_kwargs, None, None
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        if _under_a_trace():
            if self._plain is None:
                self._plain = jax.jit(self._fun, **self._jit_kwargs)
            return self._plain(*args, **kwargs)
        return (self._jitted or self._make())(*args, **kwargs)

    def __getattr__(self, name):  # lower, trace, eval_shape, clear_cache ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._jitted or self._make(), name)

    def _make(self):
        self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._jit_kwargs)
        return self._jitted


def _under_a_trace() -> bool:
    """Whether a function is being traced (jit, vmap, grad ...) rather than run eagerly."""
    with jax_core.take_current_trace() as trace:
        return type(trace).__name__ != "EvalTrace"


def _accepts(options: dict) -> bool:
    try:
        jax.jit(_probe, compiler_options=options).lower(1.0).compile()
    except (TypeError, ValueError, RuntimeError, jax.errors.JaxRuntimeError):
        return False
    return True


def _probe(x):
    return x + 1
