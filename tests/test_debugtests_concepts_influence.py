"""TCAV on a model with a known concept direction; influence functions against leave-one-out
retraining of logistic regression; self-influence finds flipped labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail.debugtests import (
    concept_activation_vector,
    directional_derivatives,
    fraction_checked_to_find,
    influence_scores,
    self_influence,
    tcav,
    tcav_score,
    top_fraction_flagged,
)

DIM = 8


# --- TCAV ------------------------------------------------------------------------------------


def _features(x):
    """Images [N, 2, 4] -> activations [N, 8]."""
    return 2.0 * x.reshape(x.shape[0], -1)


def _head_fn(u, w, acts):
    """Class 0's logit grows along u; along w it only curves (gradient sign follows a . w)."""
    along_u, along_w = acts @ u, acts @ w
    return jnp.stack([along_u + 0.5 * along_w**2, -along_u], axis=1)


def _toy_model():
    u, w = np.eye(DIM, dtype=np.float32)[:2]
    return u, w, jax.tree_util.Partial(_head_fn, jnp.asarray(u), jnp.asarray(w))


def _images(rng, count, shift=None):
    """Images whose activations are N(0, I) (+ shift): activations = 2 x."""
    acts = rng.standard_normal((count, DIM)).astype(np.float32)
    if shift is not None:
        acts = acts + np.asarray(shift)
    return (acts / 2.0).reshape(count, 2, 4)


def _tcav_data(seed):
    rng = np.random.default_rng(seed)
    u, w, head = _toy_model()
    x = _images(rng, 100)
    concept = _images(rng, 60, 4.0 * u)
    unrelated = _images(rng, 60, 4.0 * w)
    randoms = [_images(rng, 60) for _ in range(12)]
    return u, w, head, x, concept, unrelated, randoms


def test_cav_aligns_with_the_concept_direction_and_tcav_is_significant():
    u, w, head, x, concept, unrelated, randoms = _tcav_data(0)
    cav, accuracy = concept_activation_vector(_features(concept), _features(randoms[0]), key=0)
    assert cav.shape == (DIM,)
    cav = np.asarray(cav)
    np.testing.assert_allclose(np.linalg.norm(cav), 1.0, atol=1e-5)
    assert cav @ u > 0.9 and accuracy > 0.9
    derivatives = directional_derivatives(_features, head, x, 0, cav, batch_size=32)
    assert derivatives.shape == (100,)
    # gradient of logit 0 is u + (a . w) w; finite differences along the CAV agree.
    acts = 2.0 * x.reshape(100, -1)
    eps = 1e-2
    logit = lambda a: a @ u + 0.5 * (a @ w) ** 2  # noqa: E731
    numeric = (logit(acts + eps * cav) - logit(acts - eps * cav)) / (2 * eps)
    np.testing.assert_allclose(derivatives, numeric, atol=1e-2)
    assert tcav_score(_features, head, x, 0, cav) == 1.0
    assert tcav_score(_features, head, x, 1, cav) == 0.0  # logit 1 falls along u

    result = tcav(_features, head, x, 0, concept, randoms, key=jax.random.key(1))
    assert result.scores.shape == result.null_scores.shape == (12,)
    assert result.cavs.shape == (12, DIM) and np.all(result.cavs @ u > 0.8)
    assert result.mean > 0.95 and result.significant and result.p_value < 0.05


def test_unrelated_concept_scores_near_half_and_is_not_significant():
    u, w, head, x, concept, unrelated, randoms = _tcav_data(0)
    result = tcav(_features, head, x, 0, unrelated, randoms, key=jax.random.key(1), num_runs=8)
    assert result.scores.shape == (8,)
    assert np.all(result.cavs @ w > 0.8)  # the CAV finds w ...
    assert abs(result.mean - 0.5) < 0.15  # ... but the logit rises along it for half the inputs
    assert not result.significant and result.p_value > 0.05


def test_tcav_rejects_bad_inputs():
    u, w, head, x, concept, unrelated, randoms = _tcav_data(0)
    acts, rand = _features(concept), _features(randoms[0])
    with pytest.raises(ValueError, match="differ in size"):
        concept_activation_vector(acts, rand[:, :4])
    with pytest.raises(ValueError, match="at least 3"):
        concept_activation_vector(acts[:2], rand)
    with pytest.raises(ValueError, match="classifier"):
        concept_activation_vector(acts, rand, classifier="svm")
    cav = np.ones(DIM, np.float32) / np.sqrt(DIM)
    with pytest.raises(ValueError, match="activations"):
        directional_derivatives(_features, head, x, 0, cav[:5])
    with pytest.raises(ValueError, match="target"):
        directional_derivatives(_features, head, x, 2, cav)
    with pytest.raises(ValueError, match="at least 2 random"):
        tcav(_features, head, x, 0, concept, randoms[:1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_runs"):
        tcav(_features, head, x, 0, concept, randoms[:3], key=jax.random.key(0), num_runs=4)


# --- influence -------------------------------------------------------------------------------

L2 = 0.05


def _logistic_loss(params, x, y):
    """Per-example loss of L2-regularized logistic regression, labels y in {0, 1}."""
    margin = (2.0 * y - 1.0) * (x @ params["w"] + params["b"])
    return jax.nn.softplus(-margin) + 0.5 * L2 * jnp.sum(params["w"] ** 2)


@jax.jit
def _fit(x, y, weights):
    """Minimize the weighted mean of `_logistic_loss` by Newton's method (convex: exact)."""
    design = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], axis=1)
    signs = 2.0 * y - 1.0
    weights = weights / jnp.sum(weights)
    ridge = L2 * jnp.ones(design.shape[1]).at[-1].set(0.0)  # no penalty on the bias

    def step(theta, _):
        prob = jax.nn.sigmoid(-signs * (design @ theta))  # 1 - p(correct label)
        grad = design.T @ (weights * -signs * prob) + ridge * theta
        hess = (design * (weights * prob * (1 - prob))[:, None]).T @ design + jnp.diag(ridge)
        return theta - jnp.linalg.solve(hess, grad), None

    theta, _ = jax.lax.scan(step, jnp.zeros(design.shape[1]), None, length=20)
    return theta


def _as_params(theta):
    return {"w": theta[:-1], "b": theta[-1]}


def _blobs(seed, count, dim=2, separation=3.0):
    """Two Gaussian blobs `[count, dim]` apart along feature 0, labels `[count]` in {0, 1}."""
    rng = np.random.default_rng(seed)
    y = (rng.random(count) < 0.5).astype(np.float32)
    x = rng.standard_normal((count, dim)).astype(np.float32)
    x[:, 0] += (2 * y - 1) * separation / 2
    return x, y


@jax.jit
def _descent_step(params, x, y):
    grads = jax.grad(lambda p: jnp.mean(_logistic_loss(p, x, y)))(params)
    return jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)


def test_influence_predicts_leave_one_out_retraining():
    x, y = _blobs(2, 60, dim=4, separation=1.5)  # overlapping classes: varied influence
    test_x, test_y = _blobs(3, 3, dim=4, separation=1.5)
    theta = _fit(x, y, np.ones(60, np.float32))
    params = _as_params(theta)
    scores = influence_scores(_logistic_loss, params, x, y, test_x, test_y, damping=0.0)
    assert scores.shape == (3, 60)

    @jax.jit
    def loss_change(theta, weights):  # test losses after retraining with `weights`, minus now
        test_losses = lambda t: _logistic_loss(_as_params(t), test_x, test_y)  # noqa: E731
        return test_losses(_fit(x, y, weights)) - test_losses(theta)

    masks = 1.0 - np.eye(60, dtype=np.float32)  # row i leaves training point i out
    actual = np.asarray(jax.vmap(loss_change, in_axes=(None, 0))(theta, masks))  # [60, 3]
    predicted = -np.asarray(scores).T / 60
    for j in range(3):
        assert np.corrcoef(predicted[:, j], actual[:, j])[0, 1] > 0.9
    # not only correlated: close in size (first order in 1/n, so a few percent off)
    assert np.linalg.norm(predicted - actual) < 0.25 * np.linalg.norm(actual)
    # batching changes nothing; damping shrinks the scores
    batched = influence_scores(_logistic_loss, params, x, y, test_x, test_y, damping=0.0,
                               batch_size=20)
    np.testing.assert_allclose(batched, scores, rtol=1e-4, atol=1e-6)
    damped = influence_scores(_logistic_loss, params, x, y, test_x, test_y, damping=1.0)
    assert np.abs(damped).sum() < np.abs(scores).sum()


def test_self_influence_finds_flipped_labels():
    x, y = _blobs(4, 200, dim=3, separation=5.0)
    mask = np.zeros(200, bool)
    mask[np.random.default_rng(5).choice(200, 10, replace=False)] = True  # 5 % flipped
    y = np.where(mask, 1 - y, y)
    params = _as_params(_fit(x, y, np.ones(200, np.float32)))

    koh_liang = self_influence(_logistic_loss, params, x, y)
    assert koh_liang.shape == (200,) and np.all(np.asarray(koh_liang) > 0)
    found = fraction_checked_to_find(koh_liang, mask)
    assert found["num_flagged"] == 10
    assert found["mean_fraction"] < 0.2 and found["fraction_to_find_all"] >= found["mean_fraction"]

    # TracIn over checkpoints of gradient descent
    current, checkpoints = _as_params(np.zeros(4, np.float32)), []
    for step in range(60):
        current = _descent_step(current, x, y)
        if step % 10 == 9:
            checkpoints.append(current)
    tracin = self_influence(_logistic_loss, None, x, y, method="tracin",
                            params_list=checkpoints, learning_rates=[0.5] * 6)
    assert tracin.shape == (200,)
    assert fraction_checked_to_find(tracin, mask)["mean_fraction"] < 0.2
    # one checkpoint, unit rate: squared per-example gradient norms
    single = self_influence(_logistic_loss, params, x, y, method="tracin")
    w, b = np.asarray(params["w"]), float(params["b"])
    signs = 2 * y - 1
    slope = -signs / (1 + np.exp(signs * (x @ w + b)))  # d softplus(-margin) / d logit
    expected = np.sum((slope[:, None] * x + L2 * w) ** 2, axis=1) + slope**2
    np.testing.assert_allclose(single, expected, rtol=1e-4)


def test_spurious_training_points_dominate_the_influence_on_a_background_input():
    """Feature 2 is a 'background' that only 20 class-1 training points carry, and they carry no
    object signal (feature 0): the model fits them by the background, and a background-only test
    input is explained mostly by them (10 % of the set, most of its top 5 %)."""
    x, y = _blobs(6, 200, dim=3, separation=3.0)
    spurious = np.zeros(200, bool)
    spurious[np.flatnonzero(y == 1)[:20]] = True
    x[spurious, 0] = np.random.default_rng(7).standard_normal(20)
    x[:, 2] = np.where(spurious, 3.0, 0.0)
    params = _as_params(_fit(x, y, np.ones(200, np.float32)))
    background = np.array([[0.0, 0.0, 3.0], [0.0, 0.5, 3.0]], np.float32)
    scores = influence_scores(_logistic_loss, params, x, y, background, np.ones(2, np.float32))
    fractions = top_fraction_flagged(scores, spurious, top=0.05)
    assert fractions.shape == (2,) and np.all(np.asarray(fractions) >= 0.7)


def test_rank_summaries_on_hand_made_cases():
    scores = jnp.array([0.9, 0.1, 0.5, 0.5, 0.3])
    flagged = jnp.array([False, False, True, False, True])
    found = fraction_checked_to_find(scores, flagged)
    # ranks: 0.9 -> 1, 0.5 and 0.5 -> 3 (ties count against), 0.3 -> 4
    assert found == {"fraction_to_find_all": 0.8, "mean_fraction": pytest.approx(0.7),
                     "num_flagged": 2}
    influence = jnp.array([[5.0, -6.0, 1.0, 0.0], [-1.0, 2.0, 3.0, -4.0]])
    marks = jnp.array([True, False, False, True])
    np.testing.assert_allclose(top_fraction_flagged(influence, marks, top=0.5), [0.5, 0.5])
    np.testing.assert_allclose(top_fraction_flagged(influence, marks, top=0.25), [0.0, 1.0])
    np.testing.assert_allclose(top_fraction_flagged(influence, marks, 0.25, by="harmful"), [1, 0])
    np.testing.assert_allclose(top_fraction_flagged(influence, marks, 0.25, by="helpful"), [0, 1])
    np.testing.assert_allclose(top_fraction_flagged(influence, marks, top=0.01), [0.0, 1.0])


def test_influence_rejects_bad_inputs():
    x, y = _blobs(7, 10)
    params = _as_params(jnp.zeros(3))
    with pytest.raises(ValueError, match="per-example"):
        influence_scores(lambda p, a, b: jnp.mean(_logistic_loss(p, a, b)), params, x, y, x, y)
    with pytest.raises(ValueError, match="one length"):
        influence_scores(_logistic_loss, params, x, y[:5], x, y)
    with pytest.raises(ValueError, match="damping"):
        influence_scores(_logistic_loss, params, x, y, x, y, damping=-1.0)
    with pytest.raises(ValueError, match="max_params"):
        influence_scores(_logistic_loss, params, x, y, x, y, max_params=2)
    with pytest.raises(ValueError, match="singular"):
        influence_scores(lambda p, a, b: a @ p["w"] + p["b"], params, x, y, x, y, damping=0.0)
    with pytest.raises(ValueError, match="method"):
        self_influence(_logistic_loss, params, x, y, method="loo")
    with pytest.raises(ValueError, match="tracin"):
        self_influence(_logistic_loss, params, x, y, params_list=[params])
    with pytest.raises(ValueError, match="learning_rates"):
        self_influence(_logistic_loss, params, x, y, method="tracin", params_list=[params],
                       learning_rates=[1.0, 1.0])
    with pytest.raises(ValueError, match="boolean"):
        fraction_checked_to_find(jnp.arange(3.0), jnp.array([0, 1, 0]))
    with pytest.raises(ValueError, match="no point is flagged"):
        fraction_checked_to_find(jnp.arange(3.0), jnp.zeros(3, bool))
    with pytest.raises(ValueError, match="non-finite"):
        fraction_checked_to_find(jnp.array([0.0, jnp.nan]), jnp.ones(2, bool))
    with pytest.raises(ValueError, match="n_train"):
        top_fraction_flagged(jnp.zeros((2, 4)), jnp.zeros(3, bool))
    with pytest.raises(ValueError, match="top"):
        top_fraction_flagged(jnp.zeros((2, 4)), jnp.zeros(4, bool), top=0.0)
    with pytest.raises(ValueError, match="by"):
        top_fraction_flagged(jnp.zeros((2, 4)), jnp.zeros(4, bool), by="largest")
