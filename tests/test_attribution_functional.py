"""Every attribution method as a function of the model it is given: each model style with its
weights updated between calls, inside the caller's `jax.jit`, under `jax.vmap` over randomly
initialized weights, `jax.grad` through an input-gradient penalty, PRNG keys, clear errors for
bad inputs; SSIM and Spearman under jit and vmap."""

from __future__ import annotations

import functools
import inspect

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.tree_util import Partial

from jfail import attribution
from jfail.debugtests import spearman, ssim
from jfail.models import as_model
from jfail.models.adapter import ModelCallError
from jfail.xla import cpu_friendly_gradients

SIZE, CHANNELS, HIDDEN, CLASSES = 8, 3, 6, 3
EPS = 1e-5  # BatchNorm's epsilon in Flax linen and NNX

# Small sample counts; segments of 2x2 pixels so that LIME and KernelSHAP need no SLIC.
FAST = {
    "smoothgrad": {"num_samples": 3},
    "smoothgrad_squared": {"num_samples": 3},
    "vargrad": {"num_samples": 3},
    "integrated_gradients": {"steps": 4},
    "expected_gradients": {"num_samples": 3},
    "lime": {"num_samples": 24},
    "kernel_shap": {"num_samples": 48},  # every coalition of 1 and S - 1 segments, 16 drawn
}
# One method per code path (gradients, surrogates, propagation rules with the bias folded in,
# patterns) for the styles not run on all methods (every method reaches the model through
# _core.run_chunked); completeness_error and fit_patterns run on every style.
REPRESENTATIVE = ("gradient", "lime", "lrp_alpha_beta", "pattern_attribution")
ALL = tuple(attribution.METHODS)


@pytest.fixture(autouse=True, scope="module")
def _quick_compiling_prng():
    """The non-partitionable threefry compiles several times faster on CPU; every property
    tested here holds for any bit generator."""
    with jax.threefry_partitionable(False):
        yield


def _images(seed, batch):
    return np.asarray(jax.random.uniform(jax.random.key(seed), (batch, SIZE, SIZE, CHANNELS)))


X = _images(1, 2)
TRAIN = _images(2, 16)
TARGET = np.array([0, 2], np.int32)
SEGMENTS = np.broadcast_to(
    np.arange(SIZE)[:, None] // 2 * (SIZE // 2) + np.arange(SIZE)[None, :] // 2, (2, SIZE, SIZE)
).astype(np.int32)


def _kwargs(name, patterns=None):
    kwargs = attribution.method_kwargs(name, train_images=TRAIN, patterns=patterns,
                                       key=jax.random.key(3), num_baselines=4)
    kwargs.update(FAST.get(name, {}))
    if name in ("lime", "kernel_shap"):
        kwargs["segments"] = SEGMENTS
    return kwargs


def _call(name, model, patterns=None, x=X, target=TARGET, **extra):
    kwargs = {**_kwargs(name, patterns), **extra}
    return np.asarray(attribution.METHODS[name](model, x, target, **kwargs))


# --------------------------------------------------------------------------------------------
# One network in every style, built from one dict of weights: conv 3x3 -> BatchNorm (inference)
# -> ReLU -> dense -> ReLU -> dense.


def _params(seed):
    k = jax.random.split(jax.random.key(seed), 6)
    return {
        "conv": {"w": 0.5 * jax.random.normal(k[0], (3, 3, CHANNELS, 2)),
                 "b": jnp.full((2,), 0.05)},
        "bn": {"scale": 1.0 + 0.2 * jax.random.normal(k[1], (2,)), "bias": jnp.full((2,), 0.1),
               "mean": 0.1 * jax.random.normal(k[2], (2,)),
               "var": 0.5 + jax.random.uniform(k[3], (2,))},
        "hidden": {"w": 0.1 * jax.random.normal(k[4], (SIZE * SIZE * 2, HIDDEN)),
                   "b": jnp.full((HIDDEN,), 3.0)},
        "out": {"w": jax.random.normal(k[5], (HIDDEN, CLASSES)), "b": jnp.zeros(CLASSES)},
    }


def _batch_norm(h, bn):
    return (h - bn["mean"]) * jax.lax.rsqrt(bn["var"] + EPS) * bn["scale"] + bn["bias"]


def _apply(params, x):
    h = jax.lax.conv_general_dilated(x, params["conv"]["w"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(_batch_norm(h + params["conv"]["b"], params["bn"])).reshape(x.shape[0], -1)
    h = jax.nn.relu(h @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def _closure(seed):
    weights = dict(_params(seed))

    def model(x):
        return _apply(weights, x)

    def update(seed):
        weights.update(_params(seed))  # the same function object now reads other arrays
        return model

    return model, update


class _NNXNet(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(CHANNELS, 2, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(2, use_running_average=True, rngs=rngs)
        self.hidden = nnx.Linear(SIZE * SIZE * 2, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.conv(x))).reshape(x.shape[0], -1)
        return self.out(nnx.relu(self.hidden(h)))

    def load(self, p):
        for layer, name in ((self.conv, "conv"), (self.hidden, "hidden"), (self.out, "out")):
            layer.kernel[...] = p[name]["w"]
            layer.bias[...] = p[name]["b"]
        for field in ("scale", "bias", "mean", "var"):
            getattr(self.bn, field)[...] = p["bn"][field]


def _nnx(seed):
    module = _NNXNet()
    module.load(_params(seed))

    def update(seed):
        module.load(_params(seed))  # in place
        return module

    return module, update


class _EqxNet(eqx.Module):
    """Per example, channels first: `[C, H, W] -> [K]`."""

    conv: eqx.nn.Conv2d
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear
    bn: dict

    def __init__(self, p):
        key = jax.random.key(0)
        conv = eqx.nn.Conv2d(CHANNELS, 2, 3, padding=1, key=key)
        weight, bias = p["conv"]["w"].transpose(3, 2, 0, 1), p["conv"]["b"][:, None, None]
        self.conv = eqx.tree_at(lambda c: (c.weight, c.bias), conv, (weight, bias))
        linear = functools.partial(eqx.nn.Linear, key=key)
        self.hidden = eqx.tree_at(lambda d: (d.weight, d.bias), linear(SIZE * SIZE * 2, HIDDEN),
                                  (p["hidden"]["w"].T, p["hidden"]["b"]))
        self.out = eqx.tree_at(lambda d: (d.weight, d.bias), linear(HIDDEN, CLASSES),
                               (p["out"]["w"].T, p["out"]["b"]))
        self.bn = p["bn"]

    def __call__(self, x):
        bn = jax.tree_util.tree_map(lambda a: a[:, None, None], self.bn)  # channels first
        h = jnp.moveaxis(jax.nn.relu(_batch_norm(self.conv(x), bn)), 0, -1)  # ReLU, then HWC
        return self.out(jax.nn.relu(self.hidden(h.reshape(-1))))


def _equinox(seed):
    def build(seed):  # immutable: an update is a new module
        return as_model(_EqxNet(_params(seed)), per_example=True, channels_first=True)

    return build(seed), build


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(2, (3, 3), name="conv")(x))
        h = nn.relu(h).reshape(x.shape[0], -1)
        return nn.Dense(CLASSES, name="out")(nn.relu(nn.Dense(HIDDEN, name="hidden")(h)))


def _linen_variables(p):
    dense = {name: {"kernel": p[name]["w"], "bias": p[name]["b"]}
             for name in ("conv", "hidden", "out")}
    return {"params": {**dense, "bn": {"scale": p["bn"]["scale"], "bias": p["bn"]["bias"]}},
            "batch_stats": {"bn": {"mean": p["bn"]["mean"], "var": p["bn"]["var"]}}}


def _linen(seed):
    variables = _linen_variables(_params(seed))
    model = Partial(_LinenNet().apply, variables)

    def update(seed):
        variables.update(_linen_variables(_params(seed)))  # the Partial holds the same dict
        return model

    return model, update


STYLES = {"closure": (_closure, ALL), "nnx": (_nnx, REPRESENTATIVE),
          "equinox": (_equinox, REPRESENTATIVE), "linen_batchnorm": (_linen, REPRESENTATIVE)}


@functools.cache
def _patterns(seed):
    return attribution.fit_patterns(Partial(_apply, _params(seed)), TRAIN)


@functools.cache
def _reference(name, seed):
    """The method on `Partial(_apply, params)`, a pytree whose weights are its leaves."""
    return _call(name, Partial(_apply, _params(seed)), _patterns(seed))


def _assert_same_patterns(style, patterns, reference):
    assert len(patterns) == len(reference) == 3
    for got, want in zip(patterns, reference):
        if style == "equinox":  # Equinox lays weights out as [O, I, H, W] and [out, in]
            got = got.transpose(2, 3, 1, 0) if got.ndim == 4 else got.T
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_methods_see_the_weights_the_model_holds_at_each_call(style):
    make, methods = STYLES[style]
    model, update = make(0)
    patterns = attribution.fit_patterns(model, TRAIN)
    _assert_same_patterns(style, patterns, _patterns(0))
    before = {name: _call(name, model, patterns) for name in methods}
    model = update(1)
    patterns = attribution.fit_patterns(model, TRAIN)
    _assert_same_patterns(style, patterns, _patterns(1))
    for name in methods:
        after = _call(name, model, patterns)
        np.testing.assert_allclose(before[name], _reference(name, 0), rtol=2e-4, atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(after, _reference(name, 1), rtol=2e-4, atol=1e-5, err_msg=name)
        assert not np.allclose(after, before[name]), name
    # The plain gradient against jax.grad of the updated model, called eagerly; completeness.
    expected = jax.grad(lambda x: model(x)[jnp.arange(2), TARGET].sum())(jnp.asarray(X))
    np.testing.assert_allclose(_call("gradient", model), expected, rtol=1e-5, atol=1e-6)
    ig = _reference("integrated_gradients", 1)
    gap = attribution.completeness_error(model, X, TARGET, ig)
    np.testing.assert_allclose(  # a relative gap: float differences of the logits, amplified
        gap, attribution.completeness_error(Partial(_apply, _params(1)), X, TARGET, ig),
        rtol=1e-3, atol=1e-5)


def test_every_method_inside_jit_and_vmap_over_five_random_inits():
    """The randomization test the JAX way: one traced computation over five weight draws equals
    five host calls (and so the eager path)."""
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[_params(s) for s in range(5)])
    patterns = _patterns(0)
    for name in ALL:
        kwargs = _kwargs(name, patterns)

        @jax.jit
        def over_inits(stacked, x, kwargs=kwargs, method=attribution.METHODS[name]):
            return jax.vmap(lambda p: method(Partial(_apply, p), x, TARGET, **kwargs))(stacked)

        traced = np.asarray(over_inits(stacked, jnp.asarray(X)))
        for seed in range(5):
            eager = _reference(name, 0) if seed == 0 else _call(
                name, Partial(_apply, _params(seed)), patterns)
            # Batching reorders float sums; KernelSHAP's least squares amplifies that a little.
            atol = 1e-5 if name == "kernel_shap" else 1e-6
            np.testing.assert_allclose(traced[seed], eager, rtol=1e-5, atol=atol,
                                       err_msg=f"{name} {seed}")
    ig = _reference("integrated_gradients", 0)
    gap = jax.jit(lambda p, x: attribution.completeness_error(Partial(_apply, p), x, TARGET, ig))
    np.testing.assert_allclose(
        gap(_params(0), X),
        attribution.completeness_error(Partial(_apply, _params(0)), X, TARGET, ig), rtol=1e-5)


def test_modules_and_closures_inside_the_callers_jit():
    for style in ("closure", "nnx", "equinox"):
        model = STYLES[style][0](0)[0]
        for name in ("gradient", "lrp_epsilon"):
            if style == "closure":  # a closure is no jit argument: its weights are constants
                method = attribution.METHODS[name]
                traced = jax.jit(lambda x, method=method, model=model: method(model, x, TARGET))(X)
            else:
                traced = jax.jit(lambda m, x, name=name: attribution.METHODS[name](m, x, TARGET))(
                    model, X)
            np.testing.assert_allclose(traced, _reference(name, 0), rtol=2e-4, atol=1e-5,
                                       err_msg=f"{style} {name}")


def test_grad_of_an_input_gradient_penalty_matches_finite_differences():
    """Right for the right reasons: d/dparams of a penalty on input-gradient attributions, in
    float64 on a smooth network (CPU's rewritten convolution and dense VJPs differentiated)."""
    mask = np.zeros((2, SIZE, SIZE, CHANNELS))
    mask[:, :, : SIZE // 2] = 1.0  # the "wrong reason": the left half of the image

    def smooth(p, x):
        h = jax.lax.conv_general_dilated(x, p["conv"]["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.softplus(h + p["conv"]["b"]).reshape(x.shape[0], -1)
        return jnp.tanh(h @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["out"]["w"]

    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), _params(0))
        x = jnp.asarray(X, jnp.float64)

        def loss(p):
            model = Partial(smooth, p)
            return jnp.sum(mask * attribution.gradient(model, x, TARGET) ** 2)

        if jax.default_backend() == "cpu":  # the gradients run through the rewritten VJPs
            rewritten = cpu_friendly_gradients(Partial(smooth, params))
            assert str(jax.make_jaxpr(rewritten)(x)).count("custom_vjp_call") == 3  # conv, 2 dense
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        assert grads["conv"]["w"].dtype == jnp.float64
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        direction = jax.random.normal(jax.random.key(5), flat.shape, jnp.float64)
        step = 1e-4
        evaluate = jax.jit(loss)
        numeric = (evaluate(unravel(flat + step * direction))
                   - evaluate(unravel(flat - step * direction))) / (2 * step)
        analytic = jax.flatten_util.ravel_pytree(grads)[0] @ direction
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4)  # O(step^2) truncation
        np.testing.assert_allclose(value, evaluate(params), rtol=1e-12)


def test_keys_are_keyword_only_and_seeds_typed_and_raw_keys_agree():
    for name, method in attribution.METHODS.items():
        parameter = inspect.signature(method).parameters["key"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
    model = Partial(_apply, _params(0))
    for name in attribution.RANDOMIZED:
        by_seed = _call(name, model, key=0)
        np.testing.assert_array_equal(by_seed, _call(name, model, key=jax.random.key(0)))
        np.testing.assert_array_equal(by_seed, _call(name, model, key=jax.random.PRNGKey(0)))
        assert not np.allclose(by_seed, _call(name, model, key=1)), name
        with pytest.raises(TypeError, match="key"):
            _call(name, model, key="0")


def test_bad_inputs_raise_clear_errors():
    model = Partial(_apply, _params(0))
    patterns = _patterns(0)
    empty = np.zeros((0, SIZE, SIZE, CHANNELS), np.float32)
    for name in ALL:
        with pytest.raises(ValueError, match="empty batch"):
            _call(name, model, patterns, x=empty, target=np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="empty batch"):
        attribution.completeness_error(model, empty, np.zeros(0, np.int32), empty)
    with pytest.raises(ValueError, match="empty batch"):
        attribution.fit_patterns(model, empty)
    # Wrong channels or size: one ModelCallError, whatever the style and library.
    linen = _linen(0)[0]
    wrong_channels = _images(4, 2)[..., :2]
    wrong_size = np.zeros((2, SIZE + 2, SIZE + 2, CHANNELS), np.float32)
    for candidate in (linen, STYLES["nnx"][0](0)[0], STYLES["closure"][0](0)[0]):
        for bad in (wrong_channels, wrong_size):
            labels = np.zeros(bad.shape[:3], np.int32)
            for name, extra in (("gradient", {}), ("lime", {"key": 0, "segments": labels}),
                                ("lrp_epsilon", {})):
                with pytest.raises(ModelCallError, match="shape"):
                    attribution.METHODS[name](candidate, bad, 0, **extra)
            with pytest.raises(ModelCallError, match="shape"):
                attribution.fit_patterns(candidate, bad)
    # A diverged model (NaN weights): its NaN attributions raise, and say why.
    params = _params(0)
    broken = {**params, "hidden": {"w": params["hidden"]["w"] * jnp.nan,
                                   "b": params["hidden"]["b"]}}
    for name in ("gradient", "smoothgrad", "lime", "kernel_shap", "lrp_epsilon"):
        with pytest.raises(ValueError, match="non-finite logits"):
            _call(name, Partial(_apply, broken))
    with pytest.raises(ValueError, match="non-finite logits"):
        attribution.completeness_error(Partial(_apply, broken), X, TARGET, X)
    # A NaN logit of a class no example targets enters no gradient: no error, the same values
    # (LRP's relevance of that logit is 0 x NaN, so LRP raises).
    untargeted = {**params, "out": {"w": params["out"]["w"], "b": jnp.array([0.0, jnp.nan, 0.0])}}
    with pytest.raises(ValueError, match="non-finite logits"):
        _call("lrp_epsilon", Partial(_apply, untargeted))
    for name in ("gradient", "integrated_gradients"):
        np.testing.assert_allclose(_call(name, Partial(_apply, untargeted)),
                                   _call(name, Partial(_apply, params)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# SSIM and Spearman.


def test_ssim_and_spearman_under_jit_and_vmap():
    rng = np.random.default_rng(0)
    a = rng.random((3, 4, 12, 12)).astype(np.float32)  # 3 models, 4 maps each
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    for metric in (ssim, spearman):
        looped = np.stack([np.asarray(metric(a[i], b[i])) for i in range(3)])
        np.testing.assert_allclose(jax.jit(jax.vmap(metric))(a, b), looped, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jax.jit(metric)(a[0], b[0]), looped[0], rtol=1e-5, atol=1e-6)
    # A traced data range: SSIM of maps on [0, 2] with range 2 is SSIM of the halves on [0, 1].
    halved = jax.jit(lambda r: ssim(2 * a[0], 2 * b[0], data_range=r))(2.0)
    np.testing.assert_allclose(halved, ssim(a[0], b[0]), rtol=1e-5)
    # Known values: a rank-preserving transform has Spearman 1, a reversal -1.
    np.testing.assert_allclose(jax.jit(spearman)(a[0], np.exp(3 * a[0])), 1.0, atol=1e-6)
    np.testing.assert_allclose(jax.jit(spearman)(a[0], -a[0] ** 3), -1.0, atol=1e-6)


def test_attributions_are_checked_inside_the_program_off_the_host(monkeypatch):
    # Off the CPU backend the attributions' finiteness is a reduction in their own program; the
    # same errors, and the same values, as the host's check.
    from jfail.attribution import _core
    params = _params(0)
    broken = {**params, "hidden": {"w": params["hidden"]["w"] * jnp.nan,
                                   "b": params["hidden"]["b"]}}
    on_host = _call("gradient", Partial(_apply, params))
    monkeypatch.setattr(_core, "_in_host_memory", lambda x: False)
    np.testing.assert_array_equal(_call("gradient", Partial(_apply, params)), on_host)
    with pytest.raises(ValueError, match="non-finite logits"):
        _call("gradient", Partial(_apply, broken))
