"""β-VAE training (seed 001, appendix B): Bernoulli reconstruction plus β·KL, KL annealed linearly.

The loss per image is `BCE(x, decoder(z)) summed over pixels + β·w(t)·KL(q(z|x) || N(0, I))` with
`w(t) = min(1, t / anneal_steps)` at optimization step `t`. Adam 1e-3 as in the paper. Training
checkpoints every epoch with orbax; a restarted run resumes and ends with the weights of an
uninterrupted run (the batch order of epoch e depends only on `(seed, e)`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jfail.data import batches, check_images, num_batches
from jfail.defuse._batched import map_batches
from jfail.logs import progress_disabled
from jfail.models.adapter import call_shape
from jfail.train.checkpoint import RunCheckpointer
from jfail.xla import cpu_friendly_gradients, jit

__all__ = ["VAEConfig", "VAEResult", "vae_loss", "train_vae", "encode"]

log = logging.getLogger("jfail.defuse")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """β-VAE optimization; defaults are seed 001's MNIST settings (appendix B.2)."""

    beta: float = 4.0  # B.2: β = 4
    learning_rate: float = 1e-3  # B.2: Adam 1e-3
    batch_size: int = 2048  # B.2
    epochs: int = 800  # B.2
    anneal_steps: int = 500  # B.2: KL annealed linearly over 500 steps
    seed: int = 0  # no paper value

    def __post_init__(self):
        for name in ("beta", "learning_rate", "batch_size", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps!r}")


class VAEResult(NamedTuple):
    """Trained variables (`{'params': ...}`) and the per-epoch history."""

    variables: Any
    history: list[dict]


def vae_loss(vae, variables, x, key, beta, kl_weight):
    """Mean over the batch of `(reconstruction + β·kl_weight·KL, reconstruction, KL)`.

    Args:
        vae: a module with `apply(variables, x, key) -> (logits, mu, logvar)`.
        variables: the module's variables (`{'params': ...}`).
        x: `[B, H, W, C]` in [0, 1] (Bernoulli targets).
        key: PRNG key that draws the reparameterized z.
        beta: the KL weight β.
        kl_weight: the annealing factor in [0, 1] multiplying β.

    Returns:
        `(loss, (reconstruction, kl))`, scalars averaged over the batch, as `jax.value_and_grad`
        with `has_aux=True` expects.
    """
    logits, mu, logvar = vae.apply(variables, x, key)
    reconstruction = optax.sigmoid_binary_cross_entropy(logits, x).reshape(len(x), -1).sum(-1)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mu**2 - 1.0 - logvar, axis=-1)
    loss = reconstruction + beta * kl_weight * kl
    return loss.mean(), (reconstruction.mean(), kl.mean())


def train_vae(
    vae,
    images: np.ndarray,
    config: VAEConfig = VAEConfig(),
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> VAEResult:
    """Train `vae` (a `jfail.models.BetaVAE` or any module with `__call__(x, key) -> (logits, mu,
    logvar)`) on `images: [N, H, W, C]` in [0, 1]; resumes from `checkpoint_dir` when it holds a
    run.

    `on_epoch_end(epoch, record)` is called after each epoch with its history record
    (`loss`, the β-weighted loss; `reconstruction`; `kl`; `seconds`), e.g. the writer of
    `jfail.train.summaries.epoch_summaries` for TensorBoard curves.

    Args:
        vae: the module to train.
        images: `[N, H, W, C]` float in [0, 1].
        config: the optimization settings (`VAEConfig`).
        checkpoint_dir: a folder to checkpoint each epoch to and resume from; None for none.
        progress: show a progress bar (None: when stderr is a terminal).
        on_epoch_end: called as `on_epoch_end(epoch, record)` after each epoch.

    Returns:
        `VAEResult`: the trained variables and one history record per epoch.

    Raises:
        TypeError: `images` is not a numpy or jax array.
        ValueError: `images` is not a non-empty `[N, H, W, C]` float batch of finite values in
            [0, 1].
        FloatingPointError: the loss became NaN or infinite.
    """
    check_images(images, name="images")
    images = np.asarray(images, np.float32)
    if images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"images must lie in [0, 1] for the Bernoulli likelihood, got [{images.min():.3g}, "
            f"{images.max():.3g}]"
        )
    key = jax.random.key(config.seed)
    init_key, noise_key = jax.random.split(key)
    variables = vae.init(init_key, jnp.zeros((1, *images.shape[1:]), jnp.float32), init_key)
    step_fn, tx = _make_step(vae, config.learning_rate, config.beta, config.anneal_steps)
    train_state = (variables, tx.init(variables), jnp.zeros((), jnp.int32))
    history: list[dict] = []
    first_epoch = 0
    checkpointer = RunCheckpointer(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpointer is not None and checkpointer.latest_step() is not None:
        train_state, record = checkpointer.restore(train_state)
        history, first_epoch = record["history"], record["epoch"] + 1
        log.info("resumed β-VAE training at epoch %d", first_epoch)

    per_epoch = num_batches(len(images), config.batch_size)
    bar = tqdm(
        total=(config.epochs - first_epoch) * per_epoch,
        desc="β-VAE",
        disable=progress_disabled(progress),
        leave=False,
    )
    for epoch in range(first_epoch, config.epochs):
        started = time.perf_counter()
        sums = np.zeros(3)
        for batch in batches(images, images[:, 0, 0, 0], config.batch_size, key=key,
                             epochs=1, first_epoch=epoch):
            train_state, metrics = step_fn(
                train_state, batch.images, jax.random.fold_in(noise_key, batch.step)
            )
            metrics = np.asarray(jax.device_get(metrics))
            if not np.all(np.isfinite(metrics)):
                raise FloatingPointError(f"β-VAE loss became {metrics[0]} at step {batch.step}")
            sums += metrics * len(batch.images)
            bar.update()
            bar.set_postfix(loss=f"{metrics[0]:.1f}")
        loss, reconstruction, kl = sums / len(images)
        record = {"epoch": epoch, "loss": loss, "reconstruction": reconstruction, "kl": kl,
                  "seconds": time.perf_counter() - started}
        history.append(record)
        log.info("β-VAE epoch %d: loss %.2f, reconstruction %.2f, KL %.2f", epoch, loss,
                 reconstruction, kl)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if checkpointer is not None:
            checkpointer.save(epoch, train_state, {"epoch": epoch, "history": history})
    bar.close()
    if checkpointer is not None:
        checkpointer.close()
    return VAEResult(jax.device_get(train_state[0]), history)


def encode(encoder, images, *, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's `(mu, logvar)` of every image, `batch_size` images per jitted call.

    Args:
        encoder: any JAX callable `encoder(x [n, H, W, C]) -> (mu [n, Z], logvar [n, Z])` (a
            closure, `functools.partial`, `jax.tree_util.Partial`, a Flax NNX or Equinox
            module, ...); the weights it holds now are traced arguments of the compiled
            program.
        images: [N, H, W, C].
        batch_size: images per jitted call.

    Returns:
        `(mu [N, Z], logvar [N, Z])` as NumPy arrays.

    Raises:
        ValueError: `images` is empty or not `[N, H, W, C]`, the encoder does not return a pair of
            `[n, Z]` arrays, or it returned NaN or infinite values.
        ModelCallError: the encoder cannot take images of this size or channels.
    """
    if not callable(encoder):
        raise TypeError(f"encoder must be a callable JAX model, got {type(encoder).__name__}.")
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    if len(images) == 0:
        raise ValueError(f"images is empty (shape {images.shape}); pass at least one image.")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(
            f"images must be floating point, got {images.dtype}; convert integer images first, "
            "e.g. images.astype(np.float32) / 255."
        )
    out = call_shape(encoder, jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype))
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(getattr(a, "ndim", None) == 2 and a.shape[0] == 1 for a in out)
            and out[0].shape == out[1].shape):
        got = jax.tree_util.tree_map(lambda a: tuple(a.shape), out)
        raise ValueError(
            f"encoder(x [n, H, W, C]) must return (mu [n, Z], logvar [n, Z]), got shapes {got} "
            "for n = 1."
        )
    mu, logvar = map_batches(encoder, images, batch_size, name="encoder")
    return mu, logvar


@functools.lru_cache(maxsize=4)
def _make_step(vae, learning_rate: float, beta: float, anneal_steps: int):
    """The jitted step and its optimizer, cached so repeated runs of one model compile once."""
    tx = optax.adam(learning_rate)
    loss_fn = cpu_friendly_gradients(vae_loss)  # fast strided-convolution gradients on CPU

    @jit
    def step(train_state, x, key):
        variables, opt_state, t = train_state
        kl_weight = jnp.minimum(1.0, t / anneal_steps) if anneal_steps else jnp.float32(1.0)
        (loss, (reconstruction, kl)), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            vae, variables, x, key, beta, kl_weight
        )
        updates, opt_state = tx.update(grads, opt_state, variables)
        variables = optax.apply_updates(variables, updates)
        return (variables, opt_state, t + 1), jnp.stack([loss, reconstruction, kl])

    return step, tx
