"""Pure train and eval steps (diffusion and stage-1 autoencoder).

jit, shardings and donation are applied by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jdiff import losses
from jdiff.models import autoencoder_losses as ae_losses
from jdiff.models.autoencoder import AutoencoderKL
from jdiff.models.bridge import make_model_fn
from jdiff.schedules import Schedule
from jdiff.training.optim import ema_decay_at, ema_update
from jdiff.training.state import AutoencoderState, TrainState

Array = jax.Array
PyTree = Any


def drop_labels(rng: Array, labels: Array, *, rate: float, null_label: int) -> Array:
  """Replaces each label by `null_label` with probability `rate` (classifier-free guidance)."""
  if not rate:
    return labels
  drop = jax.random.bernoulli(rng, rate, labels.shape)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def make_loss_fn(
  module,
  *,
  prediction: str = "eps",
  weighting: str = "simple",
  min_snr_gamma: float = 5.0,
  learn_sigma: bool = False,
  vlb_weight: float = 0.001,
) -> Callable:
  """Returns `loss_fn(params, schedule, x0, cond, rng, *, train) -> [B]` per-example losses."""

  def loss_fn(
    params, schedule: Schedule, x0: Array, cond: Array | None, rng: Array, *, train: bool
  ) -> Array:
    drop_rng, loss_rng = jax.random.split(rng)
    model_fn = make_model_fn(module, params, train=train, rng=drop_rng if train else None)
    if learn_sigma:
      return losses.hybrid_loss(
        schedule, model_fn, x0, loss_rng, cond=cond, prediction=prediction, vlb_weight=vlb_weight
      )
    return losses.denoising_loss(
      schedule,
      model_fn,
      x0,
      loss_rng,
      cond=cond,
      prediction=prediction,
      weighting=weighting,
      min_snr_gamma=min_snr_gamma,
    )

  return loss_fn


def make_train_step(
  module,
  optimizer: optax.GradientTransformation,
  *,
  ema_decay: float = 0.9999,
  ema_warmup: bool = False,
  label_dropout: float = 0.0,
  null_label: int | None = None,
  cond_fn: Callable | None = None,
  **loss_kwargs,
) -> Callable:
  """Returns the pure `train_step(state, batch, schedule, rng) -> (state, metrics)`.

  The step's randomness is `fold_in(rng, state.step)`: the same base rng and step give
  the same dropout masks, timesteps, noise and label drops, whatever the device count.

  Args:
    module: the network, called as `module(x, t, y, *, train)`.
    optimizer: the optax transformation (its learning rate is a function of the step).
    ema_decay: EMA decay (DDPM: 0.9999).
    ema_warmup: use min(decay, (1 + step) / (10 + step)).
    label_dropout: probability of replacing a label by `null_label` (CFG training).
    null_label: the model's reserved unconditional label; None for unconditional models.
    cond_fn: optional `cond_fn(images, rng) -> cond` for image-conditioned models (e.g.
      `conditioning.make_superres_cond_fn`); its rng is folded from the step's.
    **loss_kwargs: prediction, weighting, min_snr_gamma, learn_sigma, vlb_weight.

  Returns:
    train_step(state, batch {'image': [B, H, W, C], 'label': [B]}, schedule, rng).
  """
  loss_fn = make_loss_fn(module, **loss_kwargs)

  def train_step(state: TrainState, batch: dict, schedule: Schedule, rng: Array):
    rng = jax.random.fold_in(rng, state.step)
    label_rng, loss_rng = jax.random.split(rng)
    cond = None
    if null_label is not None:
      cond = drop_labels(label_rng, batch["label"], rate=label_dropout, null_label=null_label)
    if cond_fn is not None:
      cond = cond_fn(batch["image"], jax.random.fold_in(label_rng, 1))

    def mean_loss(params):
      return jnp.mean(loss_fn(params, schedule, batch["image"], cond, loss_rng, train=True))

    loss, grads = jax.value_and_grad(mean_loss)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, decay=ema_decay, warmup=ema_warmup)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      ema_params=ema_update(state.ema_params, params, decay),
      opt_state=opt_state,
    )
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_eval_step(
  module, *, conditional: bool = False, cond_fn: Callable | None = None, **loss_kwargs
) -> Callable:
  """Returns `eval_step(params, batch, schedule, rng) -> {'loss_sum', 'count'}`.

  Padded examples (batch['mask'] == 0) are excluded, so sums over an epoch are exact.
  """
  loss_fn = make_loss_fn(module, **loss_kwargs)

  def eval_step(params, batch: dict, schedule: Schedule, rng: Array):
    cond = batch["label"] if conditional else None
    if cond_fn is not None:
      cond = cond_fn(batch["image"], jax.random.fold_in(rng, 1))
    per_ex = loss_fn(params, schedule, batch["image"], cond, rng, train=False)
    mask = batch.get("mask", jnp.ones_like(per_ex)).astype(jnp.float32)
    return {"loss_sum": jnp.sum(per_ex * mask), "count": jnp.sum(mask)}

  return eval_step


def make_autoencoder_train_step(
  module: AutoencoderKL,
  optimizer: optax.GradientTransformation,
  *,
  recon_loss: str = "l1",
  kl_weight: float = 1e-6,
) -> Callable[[PyTree, PyTree, Array, Array], tuple[PyTree, PyTree, dict[str, Array]]]:
  """Returns a pure stage-1 train step (not jitted: jit it where you call it).

  train_step(params, opt_state, batch_images, rng) -> (params, opt_state, metrics)

  `params` is the `params` collection (`variables["params"]`); `batch_images` is
  [B, H, W, in_channels]; `rng` draws the posterior sample (derive it per step, e.g.
  `fold_in(base, step)`). Metrics are those of `autoencoder_loss` plus "grad_norm".

  Args:
    module: the AutoencoderKL.
    optimizer: an optax transformation, e.g. `optax.adam(4.5e-6 * batch)` (LDM's lr).
    recon_loss: "l1" or "l2", see `autoencoder_loss`.
    kl_weight: KL weight, see `autoencoder_loss`.
  """
  if not isinstance(module, AutoencoderKL):
    raise TypeError(f"module must be an AutoencoderKL, got {type(module).__name__}")
  if recon_loss not in ae_losses.RECON_LOSSES:
    raise ValueError(f"recon_loss must be one of {ae_losses.RECON_LOSSES}, got {recon_loss!r}")
  if kl_weight < 0:
    raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")

  def loss_fn(params, x, rng):
    recon, posterior = module.apply({"params": params}, x, rng, sample_posterior=True)
    return ae_losses.autoencoder_loss(
      recon, x, posterior, recon_loss=recon_loss, kl_weight=kl_weight
    )

  def train_step(params, opt_state, batch_images, rng):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch_images, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return params, opt_state, metrics

  return train_step


def make_autoencoder_state_step(
  module: AutoencoderKL,
  optimizer: optax.GradientTransformation,
  *,
  recon_loss: str = "l1",
  kl_weight: float = 1e-6,
) -> Callable:
  """`step(state, images [B, H, W, C], rng) -> (state, metrics)` on an `AutoencoderState`.

  The posterior sample's key is `fold_in(rng, state.step)` (the step is the only clock).
  """
  inner = make_autoencoder_train_step(module, optimizer, recon_loss=recon_loss, kl_weight=kl_weight)

  def step(state: AutoencoderState, images: Array, rng: Array):
    params, opt_state, metrics = inner(
      state.params, state.opt_state, images, jax.random.fold_in(rng, state.step)
    )
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
