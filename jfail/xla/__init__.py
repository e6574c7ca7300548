"""`jit`: `jax.jit` with the XLA compiler options every jfail program is compiled with.

XLA:CPU (jaxlib 0.10) hands convolutions, matrix products and the element-wise work around them
to the YNNPACK library ("ynn fusions") by default. On convolutions that path is several times
slower than XLA's own Eigen kernels: the 4x4/2 convolution of the Defuse CNN's second layer
(batch 200, 14x14x64 -> 7x7x64) took 33 ms with it and 12.6 ms without (PyTorch: 12.8 ms), and a
whole input gradient of the Defuse CNN 73-88 ms against 51-58 ms (ResNet-18: 584 against 367 ms),
with no change in the result beyond float32 rounding; matrix products measured the same either
way. `CPU_OPTIONS` switches those fusions off.

XLA:GPU (jaxlib 0.11) runs a small float32 gradient as hundreds of kernel launches. `GPU_OPTIONS`
names the kinds of work XLA records into command buffers (CUDA graphs), convolutions included,
so that fewer launches are left. On an H200 that made the jitted input gradient of the
attribution benchmark's models 0.72-0.92x as long (`benchmarks/results/xla_gpu_options_h200.md`;
0.94-0.99x in an earlier run), with the same result up to 2.2e-7. Forcing cuDNN's NCHW layout
as well (`xla_gpu_force_conv_nchw`, which removes about 100 layout kernels per ResNet-18
gradient) was faster still, 0.59-0.76x (0.71-0.81x), and the H200 attribution table was
measured with it; but in one of the two processes the convolution algorithms that XLA's
autotuner then picked gave gradients 8.2e-4 (max relative difference) away from the default
layout's, over the 1e-4 that jfail's attributions are held to, so it is left out.

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
from typing import Callable

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

    With `fun` omitted, returns a decorator (`@jit(static_argnums=0)`).
    """
    if "compiler_options" in jit_kwargs:
        raise TypeError("jit: compiler_options are jfail's own; call jax.jit to pass others.")
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _DeferredJit(fun, jit_kwargs)


@functools.lru_cache(maxsize=None)
def compiler_options() -> dict | None:
    """The options of `OPTIONS` the installed XLA accepts (each checked once, alone, by compiling
    a one-operation program), or None if it accepts none of them."""
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
