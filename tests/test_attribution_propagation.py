"""Modified back-propagation (Guided Backprop, DeconvNet, LRP, DeepTaylor, PatternNet): the rules'
defining properties on models written here, BatchNorm folding, and agreement with Captum."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jfail.attribution import _core
from jfail.attribution._jaxpr import UnsupportedPrimitiveError
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
)

jax.config.update("jax_enable_x64", False)


def _conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cnn_apply(params, x):
    """conv-relu-conv(stride 2)-relu-maxpool-flatten-dense-relu-dense, biases optional."""
    h = jax.nn.relu(_conv(x, params["c1"]) + params.get("b1", 0.0))
    h = jax.nn.relu(_conv(h, params["c2"], 2) + params.get("b2", 0.0))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["d1"] + params.get("b3", 0.0))
    return h @ params["d2"] + params.get("b4", 0.0)


def _cnn(seed=0, bias=False, size=8):
    keys = jax.random.split(jax.random.key(seed), 8)
    flat = 4 * (size // 4) ** 2
    params = {
        "c1": 0.5 * jax.random.normal(keys[0], (3, 3, 1, 4)),
        "c2": 0.4 * jax.random.normal(keys[1], (3, 3, 4, 4)),
        "d1": 0.4 * jax.random.normal(keys[2], (flat, 6)),
        "d2": 0.5 * jax.random.normal(keys[3], (6, 3)),
    }
    if bias:
        params.update(b1=0.1 * jax.random.normal(keys[4], (4,)),
                      b2=0.1 * jax.random.normal(keys[5], (4,)),
                      b3=0.1 * jax.random.normal(keys[6], (6,)),
                      b4=0.1 * jax.random.normal(keys[7], (3,)))
    return jax.tree_util.Partial(_cnn_apply, params)


def _images(n=3, size=8, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 1))


def _target_logit(model, x, target):
    return np.asarray(model(x)[jnp.arange(len(target)), target])


def _input_x_gradient(model, x, target):
    grad = jax.vmap(jax.grad(lambda xi, ti: model(xi[None])[0, ti]))(x, target)
    return np.asarray(x * grad)


TARGET = jnp.array([0, 1, 2])


def test_lrp_z_equals_input_times_gradient_on_a_relu_net():
    for bias in (False, True):
        model, x = _cnn(bias=bias), _images()
        np.testing.assert_allclose(lrp_z(model, x, TARGET), _input_x_gradient(model, x, TARGET),
                                   atol=1e-6)


def test_lrp_epsilon_and_z_plus_conserve_relevance_on_bias_free_nets():
    model, x = _cnn(), _images()
    logit = _target_logit(model, x, TARGET)
    np.testing.assert_allclose(lrp_epsilon(model, x, TARGET).sum((1, 2, 3)), logit, rtol=1e-4)
    np.testing.assert_allclose(deep_taylor(model, x, TARGET).sum((1, 2, 3)), logit, rtol=1e-4)
    # A large ε absorbs relevance: the sum shrinks towards zero.
    damped = np.abs(np.asarray(lrp_epsilon(model, x, TARGET, epsilon=10.0).sum((1, 2, 3))))
    assert np.all(damped < np.abs(logit))


def test_alpha_beta_matches_its_formula_on_a_linear_model():
    w = jax.random.normal(jax.random.key(0), (64, 3))
    model = jax.tree_util.Partial(lambda p, x: x.reshape(x.shape[0], -1) @ p, w)
    x = _images()
    contributions = np.asarray(x.reshape(3, -1))[:, :, None] * np.asarray(w)[None]  # [B, D, K]
    c = contributions[np.arange(3), :, np.asarray(TARGET)]                          # [B, D]
    z = c.sum(1, keepdims=True)
    positive, negative = np.maximum(c, 0), np.minimum(c, 0)
    expected = z * (2 * positive / positive.sum(1, keepdims=True)
                    - negative / negative.sum(1, keepdims=True))
    got = lrp_alpha_beta(model, x, TARGET, alpha=2.0, beta=1.0)
    np.testing.assert_allclose(np.asarray(got).reshape(3, -1), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum((1, 2, 3)), z[:, 0], rtol=1e-4)


def test_alpha_one_beta_zero_is_nonnegative_on_nonnegative_inputs():
    model, x = _cnn(bias=True), _images()
    positive_target = jnp.argmax(model(x), -1)
    relevance = lrp_alpha_beta(model, x, positive_target, bias=False)
    assert float(relevance.min()) >= -1e-7
    with pytest.raises(ValueError, match="α − β = 1"):
        lrp_alpha_beta(model, x, TARGET, alpha=2.0, beta=0.5)


def _mlp_apply(params, x):
    return jax.nn.relu(x.reshape(x.shape[0], -1) @ params[0]) @ params[1]


def _two_layer_mlp():
    """16 inputs, 5 hidden ReLUs, 3 logits, no biases: (weights, model)."""
    w1 = jax.random.normal(jax.random.key(0), (16, 5))
    w2 = jax.random.normal(jax.random.key(1), (5, 3))
    return (w1, w2), jax.tree_util.Partial(_mlp_apply, (w1, w2))


def test_guided_backprop_and_deconvnet_match_the_hand_written_rules():
    (w1, w2), model = _two_layer_mlp()
    x = jax.random.normal(jax.random.key(2), (4, 4, 4, 1))
    target = jnp.array([0, 1, 2, 0])
    pre = x.reshape(4, -1) @ w1                       # [B, 5]
    upstream = w2[:, target].T                        # [B, 5]: d logit / d hidden
    guided = jnp.where((pre > 0) & (upstream > 0), upstream, 0.0) @ w1.T
    deconv = jnp.maximum(upstream, 0.0) @ w1.T
    np.testing.assert_allclose(guided_backprop(model, x, target).reshape(4, -1), guided, atol=1e-5)
    np.testing.assert_allclose(deconvnet(model, x, target).reshape(4, -1), deconv, atol=1e-5)


class _ConvBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=True, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
        x = x.mean((1, 2))
        return nn.Dense(3, name="dense")(x)


def test_batchnorm_is_folded_into_the_preceding_layer():
    module = _ConvBatchNorm()
    x = _images()
    variables = module.init(jax.random.key(0), x)
    keys = jax.random.split(jax.random.key(5), 4)
    variables = {
        "params": {**variables["params"],
                   "bn": {"scale": jnp.array([1.5, -0.7, 0.3, 2.0]),
                          "bias": 0.3 * jax.random.normal(keys[0], (4,))}},
        "batch_stats": {"bn": {"mean": 0.2 * jax.random.normal(keys[1], (4,)),
                               "var": 0.5 + jax.random.uniform(keys[2], (4,))}},
    }
    model = jax.tree_util.Partial(lambda v, images: module.apply(v, images), variables)
    # The same network with BatchNorm folded by hand into the convolution.
    p, stats = variables["params"], variables["batch_stats"]["bn"]
    scale = p["bn"]["scale"] / jnp.sqrt(stats["var"] + 1e-5)
    kernel = p["conv"]["kernel"] * scale
    bias = (p["conv"]["bias"] - stats["mean"]) * scale + p["bn"]["bias"]

    def folded_apply(q, images):
        h = jax.nn.relu(_conv(images, q[0]) + q[1]).mean((1, 2))
        return h @ q[2] + q[3]

    folded = jax.tree_util.Partial(folded_apply, (kernel, bias, p["dense"]["kernel"],
                                                  p["dense"]["bias"]))
    np.testing.assert_allclose(model(x), folded(x), atol=1e-5)
    for method, kwargs in ((lrp_epsilon, {"epsilon": 0.01}), (lrp_alpha_beta, {}),
                           (deep_taylor, {}), (lrp_sequential_preset_flat, {})):
        np.testing.assert_allclose(method(model, x, TARGET, **kwargs),
                                   method(folded, x, TARGET, **kwargs), atol=1e-5,
                                   err_msg=method.__name__)


def test_flat_input_rule_spreads_relevance_uniformly():
    _, model = _two_layer_mlp()
    x = jax.random.uniform(jax.random.key(2), (3, 4, 4, 1))
    relevance = np.asarray(lrp_sequential_preset_flat(model, x, TARGET, epsilon=0.0))
    # One dense input layer: every pixel gets the same share of the hidden layer's relevance.
    np.testing.assert_allclose(relevance, relevance[:, :1, :1, :1] * np.ones_like(relevance),
                               rtol=1e-5)
    np.testing.assert_allclose(relevance.sum((1, 2, 3)), _target_logit(model, x, TARGET),
                               rtol=1e-4)


def test_bounded_deep_taylor_conserves_and_uses_the_bounds():
    model, x = _cnn(), _images()
    bounded = deep_taylor(model, x, TARGET, low=0.0, high=1.0)
    np.testing.assert_allclose(bounded.sum((1, 2, 3)), _target_logit(model, x, TARGET), rtol=1e-4)
    assert not np.allclose(bounded, deep_taylor(model, x, TARGET))
    with pytest.raises(ValueError, match="both low and high"):
        deep_taylor(model, x, TARGET, low=0.0)


def test_patterns_recover_the_signal_direction_of_a_linear_model():
    """Kindermans et al.'s example: x = a·s + d·n; the filter w ignores the distractor d."""
    signal_direction = jnp.array([1.0, 0.0, 0.0, 0.0])
    distractor = jnp.array([1.0, 1.0, 0.0, 0.0])
    w = jnp.array([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # wᵀd = 0, wᵀa = ±1
    model = jax.tree_util.Partial(lambda p, x: x.reshape(x.shape[0], -1) @ p, w)
    key_s, key_n = jax.random.split(jax.random.key(0))
    s = jax.random.normal(key_s, (4000, 1))
    n = jax.random.normal(key_n, (4000, 1))
    data = (s * signal_direction + n * distractor).reshape(4000, 2, 2, 1)
    (pattern,) = fit_patterns(model, np.asarray(data), batch_size=1000)
    np.testing.assert_allclose(pattern[:, 0], signal_direction, atol=0.05)
    np.testing.assert_allclose(pattern[:, 1], -signal_direction, atol=0.05)
    x = data[:2]
    net = pattern_net(model, x, jnp.array([0, 0]), patterns=(pattern,))
    np.testing.assert_allclose(net.reshape(2, -1), np.tile(pattern[:, 0], (2, 1)), atol=1e-6)
    attribution = pattern_attribution(model, x, jnp.array([0, 0]), patterns=(pattern,))
    np.testing.assert_allclose(attribution.reshape(2, -1), np.tile(w[:, 0] * pattern[:, 0], (2, 1)),
                               atol=1e-6)


def test_patterns_of_a_cnn_and_their_validation():
    model, x = _cnn(bias=True), _images()
    patterns = fit_patterns(model, np.asarray(_images(64, seed=7)), batch_size=32)
    assert [p.shape for p in patterns] == [(3, 3, 1, 4), (3, 3, 4, 4), (16, 6), (6, 3)]
    # Each unit's pattern has unit "gain": w_kᵀ a_k = 1 wherever the unit was ever active.
    gains = (patterns[2] * model.args[0]["d1"]).sum(0)
    np.testing.assert_allclose(gains[np.abs(gains) > 0], 1.0, rtol=1e-3)
    assert pattern_net(model, x, TARGET, patterns=patterns).shape == x.shape
    with pytest.raises(ValueError, match="patterns"):
        pattern_net(model, x, TARGET, patterns=patterns[:2])
    with pytest.raises(ValueError, match="another model"):
        pattern_net(model, x, TARGET, patterns=patterns[::-1])


def test_unsupported_primitive_is_named_and_gradient_methods_still_work():
    model = jax.tree_util.Partial(lambda w, x: jnp.tanh(x.reshape(x.shape[0], -1) @ w),
                                  jnp.ones((64, 3)))
    x = _images()
    with pytest.raises(UnsupportedPrimitiveError, match="'tanh'"):
        lrp_epsilon(model, x, TARGET)
    assert guided_backprop(model, x, TARGET).shape == x.shape


def test_weights_are_traced_arguments_not_constants():
    x = _images()
    first, second = _cnn(seed=0), _cnn(seed=3)
    a = lrp_epsilon(first, x, TARGET)
    dynamic, static = _core.split_model(first)
    compiled = _core._jitted(
        __import__("jfail.attribution.propagation", fromlist=["x"])._propagation_kernel, static,
        tuple(sorted({"rules": _rules_of_lrp_epsilon()}.items())), False, (),
        not _core._in_host_memory(x),
    )
    before = compiled._cache_size()
    b = lrp_epsilon(second, x, TARGET)
    assert compiled._cache_size() == before == 1
    assert not np.allclose(a, b)


def _rules_of_lrp_epsilon():
    from jfail.attribution._jaxpr import Epsilon, Rules
    rule = Epsilon(1e-7)
    return Rules(dense=rule, conv=rule, residual_epsilon=1e-7, strict=True, relevance=True)


# --------------------------------------------------------------------------------------------
# Agreement with Captum on the same weights.


def _torch_pair(seed=0, strided_kernel=3):
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    torch.manual_seed(seed)

    class Reference(tnn.Module):
        """Layers as modules (Captum hooks them); the flatten is functional, as LRP needs."""

        def __init__(self):
            super().__init__()
            self.features = tnn.Sequential(
                tnn.Conv2d(1, 4, 3, padding=1), tnn.ReLU(),
                tnn.Conv2d(4, 6, strided_kernel, stride=2, padding=1), tnn.ReLU(),
                tnn.MaxPool2d(2),
            )
            self.classifier = tnn.Sequential(tnn.Linear(6 * 3 * 3, 8), tnn.ReLU(), tnn.Linear(8, 3))

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    reference = Reference().eval()
    weights = [p.detach().numpy().astype(np.float32) for p in reference.parameters()]

    def apply(w, x):
        """The same network in JAX: NHWC input, NCHW inside so the flatten order matches."""
        h = jnp.transpose(x, (0, 3, 1, 2))
        conv = lambda v, k, b, s: lax.conv_general_dilated(  # noqa: E731
            v, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
        ) + b[None, :, None, None]
        h = jax.nn.relu(conv(h, w[0], w[1], 1))
        h = jax.nn.relu(conv(h, w[2], w[3], 2))
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        h = h.reshape(h.shape[0], -1)
        h = jax.nn.relu(h @ w[4].T + w[5])
        return h @ w[6].T + w[7]

    return reference, jax.tree_util.Partial(apply, [jnp.asarray(w) for w in weights])


@pytest.mark.parametrize("strided_kernel", [3, 4])  # 4: space-to-depth backward on CPU
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "lrp_epsilon"])
def test_agrees_with_captum(method, strided_kernel):
    torch = pytest.importorskip("torch")
    captum_attr = pytest.importorskip("captum.attr")
    reference, model = _torch_pair(strided_kernel=strided_kernel)
    x = np.asarray(jax.random.uniform(jax.random.key(4), (4, 12, 12, 1)))
    target = np.array([0, 1, 2, 1])
    inputs = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    if method == "lrp_epsilon":
        from captum.attr._utils.lrp_rules import EpsilonRule  # noqa: PLC2701 (no public path)
        for layer in reference.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.MaxPool2d)):
                layer.rule = EpsilonRule(epsilon=1e-6)
        expected = captum_attr.LRP(reference).attribute(inputs, target=torch.tensor(target))
        got = lrp_epsilon(model, x, target, epsilon=1e-6)
    else:
        analyzer = {"guided_backprop": captum_attr.GuidedBackprop,
                    "deconvnet": captum_attr.Deconvolution}[method](reference)
        expected = analyzer.attribute(inputs, target=torch.tensor(target))
        got = {"guided_backprop": guided_backprop, "deconvnet": deconvnet}[method](model, x, target)
    expected = expected.detach().numpy().transpose(0, 2, 3, 1)
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(np.asarray(got) - expected).max() <= 1e-4 * scale


def test_bad_hyperparameters_and_pattern_data_are_refused():
    model, x = _cnn(), _images()
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        lrp_epsilon(model, x, TARGET, epsilon=-1.0)
    with pytest.raises(ValueError, match="low < high"):
        deep_taylor(model, x, TARGET, low=1.0, high=0.0)
    with pytest.raises(ValueError, match="must be float"):
        fit_patterns(model, np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fit_patterns(model, np.zeros((4, 8, 8, 1), np.float32), batch_size=0)
