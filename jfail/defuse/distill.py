"""Distillation and sampling (seed 001, section 3.2 and Algorithm 2).

The unrestricted adversarial examples' latents are clustered by a Gaussian mixture with a
Dirichlet-process prior (scikit-learn's `BayesianGaussianMixture`, full covariances, defaults
otherwise, as appendix B.1 states); components whose weight exceeds `min_weight` are the failure
scenarios. Sampling a scenario draws `z ~ N(μ_j, τ·Σ_j)` and decodes it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jfail.defuse._batched import map_batches
from jfail.keys import as_key
from jfail.models.adapter import call_shape, in_trace
from jfail.xla import jit

__all__ = ["Scenarios", "distill", "sample_latents", "sample_scenarios"]


@dataclasses.dataclass(frozen=True)
class Scenarios:
    """Failure scenarios: the mixture components kept by `distill`, heaviest first.

    means: [S, Z]; covariances: [S, Z, Z]; weights: [S] mixture weights (of the whole mixture, so
    they sum to at most 1); components: [S] index of each scenario among the fitted components;
    assignments: [F] the scenario of every input latent (-1 for a dropped component);
    num_fitted: components the mixture was fitted with; converged: whether EM converged.
    """

    means: np.ndarray
    covariances: np.ndarray
    weights: np.ndarray
    components: np.ndarray
    assignments: np.ndarray
    num_fitted: int
    converged: bool

    def __len__(self) -> int:
        return len(self.means)


def distill(
    latents,
    *,
    key,
    max_components: int = 100,
    min_weight: float = 0.01,
    max_points: int = 50_000,
    max_iter: int = 100,
) -> Scenarios:
    """Fit the Dirichlet-process GMM to `latents: [F, Z]`; keep components with weight > min_weight.

    More than `max_points` latents are down-sampled uniformly at random (key-driven) before the
    fit; `assignments` still covers every input latent. `max_iter` is scikit-learn's default.

    Args:
        latents: `[F, Z]` finite latent codes of the failures (F >= 1).
        key: an int seed, `jax.random.key(seed)` or a raw uint32 key.
        max_components: the truncation of the Dirichlet process, at most `min(F, max_points)`.
        min_weight: components of this weight or less are dropped, in [0, 1).
        max_points: the most latents the mixture is fitted on.
        max_iter: the most EM iterations.

    Returns:
        `Scenarios`: the kept components' means `[S, Z]`, covariances `[S, Z, Z]` and weights
        `[S]`, heaviest first, and every latent's scenario `[F]` (-1 for a dropped component).

    Raises:
        ValueError: `latents` not `[F, Z]` or holding NaN/Inf, no latents, a setting out of range
            or `max_components` above the number of points fitted, or no component heavier than
            `min_weight`.
    """
    latents = _check_latents(latents, max_components, min_weight, max_points)
    fit_key, mixture_seed = jax.random.split(as_key(key))
    points = latents
    if len(latents) > max_points:
        chosen = np.asarray(jax.random.choice(fit_key, len(latents), (max_points,), replace=False))
        points = latents[np.sort(chosen)]
    mixture, kept = _fit_mixture(points, mixture_seed, max_components, min_weight, max_iter)
    return _scenarios(mixture, kept, mixture.predict(latents), max_components)


def _fit_mixture(points, mixture_seed, max_components, min_weight, max_iter):
    """The fitted `BayesianGaussianMixture` and its kept components, heaviest first."""
    from sklearn.mixture import BayesianGaussianMixture

    seed = int(jax.random.randint(mixture_seed, (), 0, 2**31 - 1))
    mixture = BayesianGaussianMixture(
        n_components=max_components,
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_process",
        max_iter=max_iter,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        mixture.fit(points)
    order = np.argsort(-mixture.weights_, kind="stable")
    kept = order[mixture.weights_[order] > min_weight]
    if len(kept) == 0:
        raise ValueError(
            f"no mixture component has weight above min_weight={min_weight}; the largest is "
            f"{mixture.weights_.max():.4g}. Lower min_weight or pass more failures."
        )
    return mixture, kept


def _scenarios(mixture, kept, predicted, max_components) -> Scenarios:
    """The kept components as `Scenarios`; `predicted`: [F] every latent's fitted component."""
    relabel = np.full(max_components, -1, np.int64)
    relabel[kept] = np.arange(len(kept))
    return Scenarios(
        means=mixture.means_[kept].astype(np.float32),
        covariances=mixture.covariances_[kept].astype(np.float32),
        weights=mixture.weights_[kept].astype(np.float32),
        components=kept.astype(np.int64),
        assignments=relabel[predicted],
        num_fitted=max_components,
        converged=bool(mixture.converged_),
    )


def sample_latents(scenarios: Scenarios, *, key, num_samples: int = 256, tau: float = 0.5):
    """`z ~ N(μ_j, τ·Σ_j)`: [S, num_samples, Z], `num_samples` per scenario.

    τ scales the covariance (seed 001 uses τ = 0.5 for MNIST, 0.01 for SVHN and German signs).
    Usable inside `jax.jit` (with the scenarios' arrays as values or tracers; `num_samples` stays
    a Python int).

    Args:
        scenarios: the `Scenarios` of `distill` (means `[S, Z]`, covariances `[S, Z, Z]`).
        key: an int seed, `jax.random.key(seed)` or a raw uint32 key.
        num_samples: samples per scenario, a positive integer.
        tau: the covariance scale τ, positive.

    Returns:
        `[S, num_samples, Z]` JAX array of latents.

    Raises:
        ValueError: `num_samples` not a positive integer, `tau` not positive, scenarios without
            `[S, Z]` means and `[S, Z, Z]` covariances, or no scenario.
    """
    if not (isinstance(num_samples, (int, np.integer)) and num_samples > 0):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(tau, (int, float, np.number)) and not tau > 0:
        raise ValueError(f"tau must be positive, got {tau!r}")
    means, covariances = jnp.asarray(scenarios.means), jnp.asarray(scenarios.covariances)
    if means.ndim != 2 or covariances.shape != (*means.shape, means.shape[-1]):
        raise ValueError(
            f"scenarios must hold means [S, Z] and covariances [S, Z, Z], got {means.shape} and "
            f"{covariances.shape}."
        )
    if means.shape[0] == 0:
        raise ValueError("scenarios is empty: there is no scenario to sample.")
    return _sample_latents(means, covariances, as_key(key), int(num_samples), tau)


def sample_scenarios(
    decoder: Callable,
    scenarios: Scenarios,
    *,
    key,
    num_samples: int = 256,
    tau: float = 0.5,
    batch_size: int = 4096,
) -> tuple[jax.Array, np.ndarray]:
    """Sample and decode every scenario.

    Args:
        decoder: any JAX callable `decoder(z [n, Z]) -> images [n, H, W, C]`; the weights it holds
            now decode the samples.
        scenarios: the `Scenarios` of `distill`.
        key: an int seed, `jax.random.key(seed)` or a raw uint32 key.
        num_samples: samples per scenario; tau: the covariance scale (`sample_latents`);
        batch_size: decodes per jitted call.

    Returns:
        `(z [S, n, Z], images [S, n, H, W, C])` (images as NumPy).

    Raises:
        ModelCallError: the decoder cannot take the scenarios' `[n, Z]` latents.
        ValueError: the decoder's output is not `[n, H, W, C]`, or holds NaN or infinite values.
    """
    if not callable(decoder):
        raise TypeError(f"decoder must be a callable JAX model, got {type(decoder).__name__}.")
    z = sample_latents(scenarios, key=key, num_samples=num_samples, tau=tau)
    if in_trace(decoder, z):
        raise TypeError(
            "sample_scenarios runs on the host; inside jax.jit call sample_latents and the "
            "decoder yourself."
        )
    flat = z.reshape(-1, z.shape[-1])
    shape = call_shape(decoder, jax.ShapeDtypeStruct((1, flat.shape[1]), flat.dtype))
    if getattr(shape, "ndim", None) != 4 or shape.shape[0] != 1:
        raise ValueError(
            f"decoder(z [n, {flat.shape[1]}]) must return images [n, H, W, C], got "
            f"{getattr(shape, 'shape', type(shape).__name__)} for n = 1."
        )
    images = map_batches(decoder, np.asarray(flat), batch_size, name="decoder")
    return z, images.reshape(*z.shape[:2], *images.shape[1:])


@jit(static_argnums=3)
def _sample_latents(means, covariances, key, num_samples, tau):
    # a tiny ridge keeps the Cholesky factor real for a covariance that lost rank in float32
    ridge = 1e-6 * jnp.eye(means.shape[-1], dtype=means.dtype)
    chol = jnp.linalg.cholesky(tau * covariances + ridge)
    noise = jax.random.normal(key, (means.shape[0], num_samples, means.shape[-1]), means.dtype)
    return means[:, None, :] + jnp.einsum("sij,snj->sni", chol, noise)


def _check_latents(latents, max_components, min_weight, max_points) -> np.ndarray:
    latents = np.asarray(latents, np.float64)
    if latents.ndim != 2:
        raise ValueError(f"latents must be [F, Z], got shape {latents.shape}")
    if len(latents) and not np.all(np.isfinite(latents)):
        bad = int(np.sum(~np.all(np.isfinite(latents), axis=1)))
        raise ValueError(f"{bad} latents hold NaN or infinite values; check the encoder output")
    _check_settings(len(latents), max_components, min_weight, max_points)
    return latents


def _check_settings(num_latents, max_components, min_weight, max_points) -> None:
    if num_latents == 0:
        raise ValueError(
            "no failures to distil: identification kept no misclassified draw. Raise num_draws, "
            "widen the noise, or check that the classifier makes mistakes near the data."
        )
    if not (isinstance(max_components, (int, np.integer)) and max_components > 0):
        raise ValueError(f"max_components must be a positive integer, got {max_components!r}")
    if not (isinstance(max_points, (int, np.integer)) and max_points > 0):
        raise ValueError(f"max_points must be a positive integer, got {max_points!r}")
    if not 0 <= min_weight < 1:
        raise ValueError(f"min_weight must be in [0, 1), got {min_weight!r}")
    if min(num_latents, max_points) < max_components:
        raise ValueError(
            f"{min(num_latents, max_points)} failures are fewer than max_components="
            f"{max_components}; the mixture needs at least one point per component. Lower "
            "max_components or identify more failures."
        )
