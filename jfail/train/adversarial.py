"""Projected gradient descent attacks under ℓ2 and ℓ∞, for adversarial training and evaluation.

Adversarial training (Madry et al.) replaces each training batch by its PGD attack against the
current weights; `TrainConfig(attack=Attack(...))` turns it on inside the jitted training step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jfail.data import Dataset
from jfail.models.cpu_gradients import cpu_friendly_gradients
from jfail.train.parallel import DataParallel
from jfail.xla import jit

__all__ = ["Attack", "pgd_attack", "robust_accuracy"]

NORMS = ("l2", "linf")


@dataclasses.dataclass(frozen=True)
class Attack:
    """A PGD attack: `steps` steps of `step_size` inside the `norm` ball of radius `epsilon`.

    `step_size=None` uses Madry et al.'s rule, 2.5 · ε / steps.
    """

    norm: str = "l2"
    epsilon: float = 1.0
    steps: int = 3
    step_size: float | None = None
    random_start: bool = True

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not self.epsilon > 0 or self.steps < 1:
            raise ValueError(
                f"epsilon must be > 0 and steps >= 1, got {self.epsilon!r} and {self.steps!r}"
            )

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps


def pgd_attack(model: Callable, x: jax.Array, labels: jax.Array, key: jax.Array, attack: Attack):
    """Maximize the cross-entropy of `model` within the ε-ball around `x`, staying in [0, 1].

    model: `model(x) -> logits`; x: `[B, H, W, C]` in [0, 1]; labels: `[B]` int.
    Returns the adversarial images `[B, H, W, C]`; every `‖x_adv − x‖ ≤ ε` in the attack's norm.
    """
    alpha = attack.alpha
    model = cpu_friendly_gradients(model)  # fast strided-convolution gradients on CPU

    def loss(x_adv):
        logits = model(x_adv)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    delta = _random_start(key, x, attack) if attack.random_start else jnp.zeros_like(x)

    def step(_, delta):
        grad = jax.grad(loss)(x + delta)
        if attack.norm == "linf":
            delta = delta + alpha * jnp.sign(grad)
        else:
            delta = delta + alpha * grad / (_l2_norm(grad) + 1e-12)
        return _project(x, delta, attack)

    # A loop, not unrolled: with `cpu_friendly_gradients` XLA:CPU runs the loop body's
    # convolutions as fast as top-level ones (10 steps on ResNet-18, batch 128: 560 ms either
    # way) and compiles it in 2.1 s instead of 3.3 s.
    delta = jax.lax.fori_loop(0, attack.steps, step, _project(x, delta, attack))
    return jax.lax.stop_gradient(x + delta)


def robust_accuracy(
    apply_fn: Callable,
    params: Any,
    state: Any,
    data: Dataset,
    attack: Attack,
    key: jax.Array,
    *,
    batch_size: int = 500,
    parallel: DataParallel | None = None,
) -> dict:
    """Clean and PGD accuracy of a model (eval mode) on `data`: `{'clean', 'robust', 'count'}`."""
    parallel = parallel or DataParallel()
    params, state = parallel.replicate((params, state))
    clean = robust = 0.0
    for chunk, start in enumerate(range(0, len(data.labels), batch_size)):
        (x, y, weight), _ = parallel.shard_batch(
            data.images[start : start + batch_size], data.labels[start : start + batch_size],
            with_weight=True,
        )
        c, r = _attack_counts(apply_fn, attack, params, state, x, y, weight,
                              jax.random.fold_in(key, chunk))
        clean, robust = clean + float(c), robust + float(r)
    n = len(data.labels)
    return {"clean": clean / n, "robust": robust / n, "count": n}


@jit(static_argnums=(0, 1))
def _attack_counts(apply_fn, attack, params, state, x, y, weight, key):
    model = lambda images: apply_fn(params, state, images, False)[0]  # noqa: E731
    x_adv = pgd_attack(model, x, y, key, attack)
    clean = jnp.sum((jnp.argmax(model(x), -1) == y) * weight)
    robust = jnp.sum((jnp.argmax(model(x_adv), -1) == y) * weight)
    return clean, robust


def _random_start(key, x, attack: Attack):
    if attack.norm == "linf":
        return jax.random.uniform(key, x.shape, x.dtype, -attack.epsilon, attack.epsilon)
    direction = jax.random.normal(key, x.shape, x.dtype)
    radius = jax.random.uniform(jax.random.fold_in(key, 1), (x.shape[0],) + (1,) * (x.ndim - 1))
    return attack.epsilon * radius * direction / (_l2_norm(direction) + 1e-12)


def _project(x, delta, attack: Attack):
    if attack.norm == "linf":
        delta = jnp.clip(delta, -attack.epsilon, attack.epsilon)
    else:
        delta = delta * jnp.minimum(1.0, attack.epsilon / (_l2_norm(delta) + 1e-12))
    # clipping to the image box can only shrink the perturbation, so the ball still holds
    return jnp.clip(x + delta, 0.0, 1.0) - x


def _l2_norm(v):
    return jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))

