"""Barlow, PRIME and the debugging tests on the one model convention (any JAX callable, weights
read at the moment of the call) and one vocabulary (`errors` True = wrong, keyword-only `key`).

Every model is defined here, in each style: a closure over a dict of weights, a
`jax.tree_util.Partial`, a Flax NNX module, an Equinox module (per-example, channels first) and
Flax linen with BatchNorm in inference mode."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jfail import barlow, prime
from jfail.debugtests import cascading_randomization, independent_randomization
from jfail.models import as_model

SIZE = 8
CHANNELS = 4


def _images(count=4, seed=0):
    return np.random.default_rng(seed).uniform(size=(count, SIZE, SIZE, 1)).astype(np.float32)


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _kernel(seed):
    return jax.random.normal(jax.random.key(seed), (3, 3, 1, CHANNELS)) * 0.5


# ------------------------------------------------------------------------ models in every style


def _closure():
    weights = {"kernel": _kernel(1), "bias": jnp.linspace(-0.2, 0.2, CHANNELS)}

    def feature_map(x):
        return jax.nn.relu(_conv(x, weights["kernel"]) + weights["bias"])

    def update():
        weights["kernel"] = _kernel(2)

    return feature_map, update


def _partial():
    def apply(params, x):
        return jax.nn.relu(_conv(x, params["kernel"]) + params["bias"])

    params = {"kernel": _kernel(3), "bias": jnp.zeros(CHANNELS)}
    holder = {"fn": jax.tree_util.Partial(apply, params)}

    def update():
        holder["fn"] = jax.tree_util.Partial(apply, {**params, "kernel": _kernel(4)})

    return (lambda: holder["fn"]), update


class _NNXMap(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, CHANNELS, (3, 3), rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.conv(x))


class _EqxMap(eqx.Module):
    conv: eqx.nn.Conv2d

    def __call__(self, x):  # one example [C, H, W] -> [H, W, C']
        return jnp.moveaxis(jax.nn.relu(self.conv(x)), 0, -1)


class _LinenMap(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(CHANNELS, (3, 3))(x)
        return jax.nn.relu(nn.BatchNorm(use_running_average=True)(x))


def _styles():
    """name -> (get_model() -> feature map callable, update() changing its weights)."""
    closure, closure_update = _closure()
    partial, partial_update = _partial()

    nnx_model = _NNXMap(nnx.Rngs(0))

    def nnx_update():
        nnx_model.conv.kernel[...] = nnx_model.conv.kernel[...] + 0.5

    eqx_box = {"m": _EqxMap(eqx.nn.Conv2d(1, CHANNELS, 3, padding=1, key=jax.random.key(5)))}

    def eqx_update():
        m = eqx_box["m"]
        eqx_box["m"] = eqx.tree_at(lambda t: t.conv.weight, m, m.conv.weight * -1.0)

    module = _LinenMap()
    linen_box = {"v": module.init(jax.random.key(6), jnp.zeros((1, SIZE, SIZE, 1)))}

    def linen_update():
        v = linen_box["v"]
        stats = jax.tree_util.tree_map(lambda a: a + 0.3, v["batch_stats"])
        linen_box["v"] = {**v, "batch_stats": stats}

    return {
        "closure": (lambda: closure, closure_update),
        "partial": (partial, partial_update),
        "nnx": (lambda: nnx_model, nnx_update),
        "equinox": (lambda: as_model(eqx_box["m"], per_example=True, channels_first=True),
                    eqx_update),
        "linen": (lambda: jax.tree_util.Partial(module.apply, linen_box["v"]), linen_update),
    }


def _pooled(feature_map):
    return jax.tree_util.Partial(lambda fm, x: fm(x).mean(axis=(1, 2)), feature_map)


@pytest.mark.parametrize("style", ["closure", "partial", "nnx", "equinox", "linen"])
def test_features_heatmap_attack_follow_the_weights(style):
    get, update = _styles()[style]
    x = _images()
    index = np.array([0, 1, 2, 3])
    settings = dict(epsilon=1.0, step_size=0.1, steps=2)

    def run():
        fm = get()
        return (
            barlow.features(_pooled(fm), x, progress=False),
            barlow.heatmap(fm, x, index, progress=False),
            barlow.feature_attack(_pooled(fm), x, index, progress=False, **settings),
        )

    def eager():
        fm = get()
        return (
            np.asarray(fm(jnp.asarray(x)).mean(axis=(1, 2))),
            np.asarray(barlow.heatmap_batch(fm, jnp.asarray(x), index, size=(SIZE, SIZE))),
            np.asarray(barlow.attack_batch(_pooled(fm), jnp.asarray(x), index, 1.0, 0.1, steps=2)),
        )

    before = run()
    for got, want in zip(before, eager()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    update()
    after = run()
    for got, want in zip(after, eager()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(before[0], after[0])  # the drivers saw the new weights
    assert not np.allclose(before[1], after[1]) or not np.allclose(before[2], after[2])


def test_kernels_under_jit_equal_the_host_drivers():
    feature_map, _ = _closure()
    x = _images(6, seed=1)
    index = np.arange(6) % CHANNELS
    host = barlow.heatmap(feature_map, x, index, image_size=(5, 7), progress=False)
    jitted = jax.jit(
        lambda x, i: barlow.heatmap_batch(feature_map, x, i, size=(5, 7))
    )(jnp.asarray(x), jnp.asarray(index))
    np.testing.assert_allclose(np.asarray(jitted), host, atol=1e-6)
    # the driver itself inside the caller's jit runs the kernel
    inside = jax.jit(lambda x: barlow.heatmap(feature_map, x, 1))(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(inside), barlow.heatmap(feature_map, x, 1, progress=False), atol=1e-6
    )

    pooled = _pooled(feature_map)
    host = barlow.feature_attack(pooled, x, 2, epsilon=2.0, step_size=0.2, steps=3, progress=False)
    jitted = jax.jit(lambda x: barlow.attack_batch(pooled, x, 2, 2.0, 0.2, steps=3))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(jitted), host, atol=1e-5)
    # attacking increases the feature
    attacked_feature = np.asarray(pooled(jnp.asarray(host)))[:, 2]
    assert np.all(attacked_feature >= np.asarray(pooled(jnp.asarray(x)))[:, 2])
    # grad through the kernel
    grad = jax.grad(lambda x: barlow.heatmap_batch(feature_map, x, index, size=(SIZE, SIZE)).sum())
    assert np.isfinite(np.asarray(grad(jnp.asarray(x)))).all()

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 5)).astype(np.float32)
    errors = features[:, 3] + 0.3 * rng.normal(size=60) > 0.4
    host_mi = barlow.mutual_information(features, errors, key=7)
    jit_mi = jax.jit(lambda f, e: barlow.mutual_information_batch(f, e, key=7))(features, errors)
    np.testing.assert_allclose(np.asarray(jit_mi), host_mi, atol=1e-5)
    assert int(np.argmax(host_mi)) == 3
    # an int key and the typed key of the same seed agree
    np.testing.assert_array_equal(
        barlow.mutual_information(features, errors, key=jax.random.key(7)), host_mi
    )

    tags = rng.random((70, 6)) < 0.5
    correct = rng.random(70) < 0.7
    sets = np.array([[0, 1], [2, 2], [3, 5], [1, 4]], np.int32)
    sizes, hits = jax.jit(prime.count_tag_sets)(
        jnp.asarray(prime.pack_bits(tags.T)), jnp.asarray(prime.pack_bits(correct)),
        jnp.asarray(sets),
    )
    members = tags[:, sets[:, 0]] & tags[:, sets[:, 1]]
    np.testing.assert_array_equal(np.asarray(sizes), members.sum(0))
    np.testing.assert_array_equal(np.asarray(hits), (members & correct[:, None]).sum(0))


def test_heatmap_bad_inputs_raise_clear_errors():
    feature_map, _ = _closure()
    x = _images()
    with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
        barlow.heatmap(_pooled(feature_map), x, 0, progress=False)
    with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
        barlow.heatmap_batch(_pooled(feature_map), jnp.asarray(x), jnp.zeros(4, int), size=(8, 8))
    with pytest.raises(ValueError, match="feature_index"):
        barlow.heatmap(feature_map, x, CHANNELS, progress=False)
    with pytest.raises(ValueError, match="empty"):
        barlow.heatmap(feature_map, x[:0], 0, progress=False)
    with pytest.raises(ValueError, match="calling the model"):  # 3 channels for a 1-channel conv
        barlow.features(_pooled(feature_map), np.repeat(x, 3, axis=-1), progress=False)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        barlow.feature_attack(feature_map, x, 0, steps=1, progress=False)


def test_failure_trees_float_group_ids():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 6)).astype(np.float32)
    labels = np.repeat([0, 1], 200)
    errors = (features[:, 2] > 0.8) | (rng.random(400) < 0.03)
    as_int = barlow.failure_trees(features, errors, labels, num_features=3, progress=False)
    as_float = barlow.failure_trees(
        features, errors, labels.astype(np.float32), num_features=3, progress=False
    )
    assert list(as_float) == [0, 1] and list(as_int) == [0, 1]
    for g in (0, 1):
        assert as_float[g].top_leaf.rule == as_int[g].top_leaf.rule
        assert as_float[g].top_leaf.conditions[0].feature == 2
    with pytest.raises(ValueError, match="non-integer"):
        barlow.failure_trees(features, errors, labels + 0.5 * (np.arange(400) % 2), progress=False)
    # key is keyword-only and accepts an int or a key
    tree = barlow.failure_tree(features, errors, num_features=3, key=jax.random.key(1))
    assert tree.top_leaf.conditions[0].feature == 2
    with pytest.raises(TypeError):
        barlow.failure_tree(features, errors, num_features=3, seed=0)


def test_prime_errors_keyword_finds_planted_mode_and_old_call_raises():
    rng = np.random.default_rng(0)
    n, num_tags = 1200, 6
    tags = rng.random((n, num_tags)) < 0.4
    labels = np.repeat([0, 1], n // 2)
    in_mode = (labels == 0) & tags[:, 1] & tags[:, 4]
    errors = np.where(in_mode, rng.random(n) < 0.9, rng.random(n) < 0.05)
    modes = prime.find_failure_modes(tags, errors=errors, labels=labels, min_size=30, min_drop=0.3)
    assert (0, (1, 4)) in {(m.label, m.tag_indices) for m in modes}
    for mode in modes:
        members = (labels == mode.label) & tags[:, list(mode.tag_indices)].all(1)
        assert mode.accuracy == pytest.approx(1 - errors[members].mean())
    with pytest.raises(TypeError):
        prime.find_failure_modes(tags, ~errors, labels, min_size=30)  # the old (correct) order
    with pytest.raises(TypeError):
        prime.evaluate_on_heldout(modes, tags, ~errors, labels)
    held = prime.evaluate_on_heldout(modes, tags, errors=errors, labels=labels)
    assert held[0].accuracy == pytest.approx(modes[0].accuracy)
    with pytest.raises(ValueError, match="errors"):
        prime.find_failure_modes(tags, errors=errors[:-1], labels=labels, min_size=30)
    # key keyword-only, int or key alike
    a = prime.flip_tags(tags, 0.1, key=3)
    b = prime.flip_tags(tags, 0.1, key=jax.random.key(3))
    np.testing.assert_array_equal(a, b)


def test_cascading_order_comes_from_the_forward_pass_after_key_sorting():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(5, name="z_input")(x))
            x = nn.relu(nn.Dense(4, name="m_hidden")(x))
            return nn.Dense(3, name="a_output")(x)

    x = jnp.zeros((2, 6))
    trained = Net().init(jax.random.key(0), x)["params"]
    fresh = Net().init(jax.random.key(1), x)["params"]
    # an optax update / checkpoint restore returns the keys sorted by name
    trained = jax.tree_util.tree_map(lambda a: a - 0.01, dict(sorted(trained.items())))
    assert list(trained) == ["a_output", "m_hidden", "z_input"]
    apply_fn = lambda p, v: Net().apply({"params": p}, v)  # noqa: E731
    cascade = cascading_randomization(trained, fresh, apply_fn=apply_fn, x=x)
    assert [name for name, _ in cascade] == ["a_output", "m_hidden", "z_input"]
    first = cascade[0][1]
    assert np.array_equal(first["a_output"]["kernel"], fresh["a_output"]["kernel"])
    assert np.array_equal(first["z_input"]["kernel"], trained["z_input"]["kernel"])
    # reversed key order as well: still output first
    backwards = dict(reversed(list(trained.items())))
    order = [n for n, _ in cascading_randomization(backwards, fresh, apply_fn=apply_fn, x=x)]
    assert order == ["a_output", "m_hidden", "z_input"]
    with pytest.raises(ValueError, match="layer order"):
        cascading_randomization(trained, fresh)
    independent = independent_randomization(trained, fresh, apply_fn=apply_fn, x=x)
    assert [n for n, _ in independent] == ["a_output", "m_hidden", "z_input"]


def test_tcav_and_influence_see_updated_closure_weights():
    from jfail.debugtests import directional_derivatives, self_influence

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 12))
    body = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
    head_weights = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}

    def features(v):
        return jnp.tanh(v @ body["w"])

    def head(a):
        return a @ head_weights["w"]

    def loss(params, v, t):
        logits = features(v) @ params
        return -jax.nn.log_softmax(logits)[jnp.arange(v.shape[0]), t]

    cav = jnp.ones(4) / 2.0
    params = head_weights["w"]

    def reference():  # eager, from the weights held now
        grads = jax.vmap(jax.grad(lambda a: head(a[None])[0, 1]))(features(x))
        return np.asarray(grads @ cav)

    before = np.asarray(directional_derivatives(features, head, x, 1, cav))
    np.testing.assert_allclose(before, reference(), rtol=1e-5, atol=1e-6)
    influence_before = np.asarray(self_influence(loss, params, x, y))
    body["w"] = body["w"] * -2.0
    head_weights["w"] = head_weights["w"] + 1.0
    after = np.asarray(directional_derivatives(features, head, x, 1, cav))
    np.testing.assert_allclose(after, reference(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(before, after)
    influence_after = np.asarray(self_influence(loss, params, x, y))
    fresh_body = body["w"]
    fresh = np.asarray(self_influence(
        lambda p, v, t: -jax.nn.log_softmax(
            jnp.tanh(v @ fresh_body) @ p)[jnp.arange(v.shape[0]), t],
        params, x, y))
    np.testing.assert_allclose(influence_after, fresh, rtol=1e-4, atol=1e-6)
    assert not np.allclose(influence_before, influence_after)


class _CallableObject:  # neither a function nor a pytree
    def __init__(self, weights):
        self.weights = weights

    def __call__(self, x):
        return jax.nn.relu(_conv(x, self.weights["kernel"])).mean(axis=(1, 2))


def test_callable_objects_are_traced_with_their_current_weights():
    from jfail.debugtests import self_influence

    model = _CallableObject({"kernel": _kernel(8)})
    x = _images()
    before = barlow.features(model, x, progress=False)
    np.testing.assert_allclose(before, np.asarray(model(jnp.asarray(x))), rtol=1e-5, atol=1e-6)
    model.weights["kernel"] = _kernel(9)
    after = barlow.features(model, x, progress=False)
    np.testing.assert_allclose(after, np.asarray(model(jnp.asarray(x))), rtol=1e-5, atol=1e-6)
    assert not np.allclose(before, after)

    class Loss:
        def __init__(self, scale):
            self.scale = scale

        def __call__(self, params, v, t):
            return (v @ params * self.scale["s"] - t) ** 2

    v = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    t = jnp.arange(6.0)
    loss = Loss({"s": jnp.asarray(1.0)})
    w = jnp.ones(3)
    first = np.asarray(self_influence(loss, w, v, t, method="tracin"))
    loss.scale["s"] = jnp.asarray(2.0)
    second = np.asarray(self_influence(loss, w, v, t, method="tracin"))
    expected = np.asarray(jax.vmap(jax.grad(lambda p, a, b: (a @ p * 2.0 - b) ** 2),
                                   (None, 0, 0))(w, v, t))
    np.testing.assert_allclose(second, (expected ** 2).sum(1), rtol=1e-5)
    assert not np.allclose(first, second)
