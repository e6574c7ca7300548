"""Attribution methods of "Debugging Tests for Model Explanations" (seed 002, §2.2, appendix B).

Every method is `method(model, x, target, *, key=None, batch_size=None, **hparams)` and returns
raw signed attributions shaped like `x: [B, H, W, C]`; `target` is one class index per example
(`[B]`, an int for all, or None for the predicted class). `model(x) -> logits` is any JAX
callable; a pytree callable (`jax.tree_util.Partial(apply_fn, params)`, an NNX or Equinox
module) keeps its weights as traced arguments of the compiled program. Work is jitted per chunk
of `batch_size` examples and vmapped over examples and noise samples.

- Gradient family (`gradients.py`): `gradient`, `smoothgrad`, `smoothgrad_squared`, `vargrad`,
  `input_x_gradient`, `integrated_gradients`, `expected_gradients`.
- Surrogates (`surrogates.py`): `lime`, `kernel_shap` over SLIC superpixels.
- Modified back-propagation (`propagation.py`, by jaxpr rewriting): `guided_backprop`,
  `deconvnet`, `lrp_epsilon`, `lrp_z`, `lrp_alpha_beta`, `lrp_sequential_preset_flat`,
  `deep_taylor`, `pattern_net`, `pattern_attribution` (after `fit_patterns`).
- What the paper compares and shows (`postprocess.py`): `absolute`, `reduce_channels`,
  `normalize_unit` ([0, 1]), `normalize_signed` ([-1, 1]).

Inside the caller's `jax.jit`, `jax.vmap` or `jax.grad` every method is a pure function of its
inputs and the model's weights (e.g. `jax.vmap(lambda p: gradient(Partial(apply, p), x, t))`
over randomly initialized weights, or `jax.grad` of a penalty on `gradient` w.r.t. the weights);
LIME and KernelSHAP then need `segments`, computed outside. `fit_patterns` is a host function.
`key` (randomized methods) is keyword-only: a typed key, a raw `PRNGKey`, or an int seed, all
drawing the same.

On the host, bad inputs raise a ValueError that says what is wrong: an empty batch, images that
are not `[B, H, W, C]` floats, NaN inputs, targets outside the classes, a model that returns
NaN or infinite logits (found in the attribution's own program), and a
`jfail.models.ModelCallError` for images of the wrong size or channels.

`METHODS` maps each name to its function; `method_kwargs(name, train_images, patterns, key)`
gives the extra arguments a method needs (baselines, patterns, a key) so that code can loop over
all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jfail.attribution._core import require_key
from jfail.attribution._jaxpr import UnsupportedPrimitiveError
from jfail.attribution.gradients import (
    completeness_error,
    expected_gradients,
    gradient,
    input_x_gradient,
    integrated_gradients,
    smoothgrad,
    smoothgrad_squared,
    vargrad,
)
from jfail.attribution.postprocess import (
    absolute,
    normalize_signed,
    normalize_unit,
    reduce_channels,
)
from jfail.attribution.propagation import (
    deconvnet,
    deep_taylor,
    fit_patterns,
    guided_backprop,
    lrp_alpha_beta,
    lrp_epsilon,
    lrp_sequential_preset_flat,
    lrp_z,
    pattern_attribution,
    pattern_net,
    propagate,
)
from jfail.attribution.surrogates import kernel_shap, lime, segment, segments

METHODS: dict[str, Callable] = {
    "gradient": gradient,
    "smoothgrad": smoothgrad,
    "smoothgrad_squared": smoothgrad_squared,
    "vargrad": vargrad,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
    "expected_gradients": expected_gradients,
    "lime": lime,
    "kernel_shap": kernel_shap,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
    "lrp_epsilon": lrp_epsilon,
    "lrp_z": lrp_z,
    "lrp_alpha_beta": lrp_alpha_beta,
    "lrp_sequential_preset_flat": lrp_sequential_preset_flat,
    "pattern_net": pattern_net,
    "pattern_attribution": pattern_attribution,
    "deep_taylor": deep_taylor,
}

RANDOMIZED = ("smoothgrad", "smoothgrad_squared", "vargrad", "expected_gradients", "lime",
              "kernel_shap")
NEEDS_TRAINING_DATA = ("expected_gradients", "pattern_net", "pattern_attribution")


def method_kwargs(name: str, *, train_images=None, patterns=None, key=None,
                  num_baselines: int = 200) -> dict:
    """Extra keyword arguments `METHODS[name]` needs: a `key` for randomized methods, the
    paper's 200 training `baselines` for expected gradients, `patterns` for PatternNet/-Attribution.

    Args:
        name: a key of `METHODS`.
        train_images: training images `[N, H, W, C]`; the first `num_baselines` are the
            baselines of expected gradients (needed only for it).
        patterns: the result of `fit_patterns(model, train_images)` (needed only for
            PatternNet and PatternAttribution).
        key: a PRNG key (needed only for the methods in `RANDOMIZED`).
        num_baselines: how many training images expected gradients uses as baselines.

    Returns:
        dict of keyword arguments to pass to `METHODS[name]` (empty when it needs none).

    Raises:
        KeyError: if `name` is not a known method.
        ValueError: if a randomized method gets no `key`, expected gradients no
            `train_images`, or PatternNet / PatternAttribution no `patterns`.
    """
    if name not in METHODS:
        raise KeyError(f"unknown attribution method {name!r}; known: {sorted(METHODS)}")
    kwargs: dict = {}
    if name in RANDOMIZED:
        require_key(name, key)
        kwargs["key"] = key
    if name == "expected_gradients":
        if train_images is None:
            raise ValueError("expected_gradients needs train_images for its baselines.")
        kwargs["baselines"] = np.asarray(train_images[:num_baselines])
    if name in ("pattern_net", "pattern_attribution"):
        if patterns is None:
            raise ValueError(f"{name} needs patterns = fit_patterns(model, train_images).")
        kwargs["patterns"] = patterns
    return kwargs


__all__ = [
    "METHODS",
    "RANDOMIZED",
    "NEEDS_TRAINING_DATA",
    "method_kwargs",
    "UnsupportedPrimitiveError",
    "absolute",
    "completeness_error",
    "deconvnet",
    "deep_taylor",
    "expected_gradients",
    "fit_patterns",
    "gradient",
    "guided_backprop",
    "input_x_gradient",
    "integrated_gradients",
    "kernel_shap",
    "lime",
    "lrp_alpha_beta",
    "lrp_epsilon",
    "lrp_sequential_preset_flat",
    "lrp_z",
    "normalize_signed",
    "normalize_unit",
    "pattern_attribution",
    "pattern_net",
    "propagate",
    "reduce_channels",
    "segment",
    "segments",
    "smoothgrad",
    "smoothgrad_squared",
    "vargrad",
]
