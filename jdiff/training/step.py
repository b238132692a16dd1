"""Pure train and eval steps (diffusion and stage-1 autoencoder).

jit, shardings and donation are applied by the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jdiff import flow, losses, processes
from jdiff.models import autoencoder_losses as ae_losses
from jdiff.models.autoencoder import AutoencoderKL
from jdiff.models.bridge import make_model_fn
from jdiff.schedules import Schedule
from jdiff.training import partition
from jdiff.training.optim import ema_decay_at, ema_update
from jdiff.training.state import AutoencoderState, TrainState

Array = jax.Array
PyTree = Any


def drop_labels(rng: Array, labels: Array, *, rate: float, null_label) -> Array:
  """Replaces each label by `null_label` with probability `rate` (classifier-free guidance).

  labels: [B] class labels (null_label an int) or [B, ...] rows, e.g. token ids [B, L]
  (null_label a row of shape labels.shape[1:], the empty prompt); one draw per example.
  """
  if not rate:
    return labels
  drop = jax.random.bernoulli(rng, rate, labels.shape[:1])
  drop = drop.reshape(drop.shape + (1,) * (labels.ndim - 1))
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def make_loss_fn(
  module,
  *,
  prediction: str = "eps",
  weighting: str = "simple",
  min_snr_gamma: float = 5.0,
  learn_sigma: bool = False,
  vlb_weight: float = 0.001,
  sigma_data: float = 0.5,
  uncertainty: bool = False,
) -> Callable:
  """Returns `loss_fn(params, schedule, x0, cond, rng, *, train) -> [B]` per-example losses.

  `rng` splits into (dropout, loss) keys; the loss key draws t and the noise
  (`losses.sample_t_and_noise`) unless `t` and `noise` are given, and `dropout_rng`
  replaces the dropout key (gradient accumulation passes all three).

  A `processes.Process` in place of the schedule trains that process (`processes.process_loss`
  with `prediction`, `weighting` 'simple' / 'edm', `sigma_data` and EDM2's `uncertainty`);
  there `noise` alone fixes the noise of each x0 (reflow) and `t` is not used.
  """

  # The loss of each schedule type, its options bound once here.
  process_loss = functools.partial(
    processes.process_loss,
    prediction=prediction,
    weighting=weighting,
    sigma_data=sigma_data,
    uncertainty=uncertainty,
  )
  if learn_sigma:
    discrete_loss = functools.partial(
      losses.hybrid_loss, prediction=prediction, vlb_weight=vlb_weight
    )
  else:
    discrete_loss = functools.partial(
      losses.denoising_loss,
      prediction=prediction,
      weighting=weighting,
      min_snr_gamma=min_snr_gamma,
    )

  def loss_fn(
    params,
    schedule: Schedule,
    x0: Array,
    cond: Array | None,
    rng: Array,
    *,
    train: bool,
    t: Array | None = None,
    noise: Array | None = None,
    dropout_rng: Array | None = None,
  ) -> Array:
    drop_rng, loss_rng = jax.random.split(rng)
    if dropout_rng is not None:
      drop_rng = dropout_rng
    model_fn = make_model_fn(module, params, train=train, rng=drop_rng if train else None)
    if schedule.kind != "discrete":
      return process_loss(schedule, model_fn, x0, loss_rng, cond=cond, noise=noise)
    extra = {} if noise is None else {"t": t, "noise": noise}  # discrete path: both or none
    return discrete_loss(schedule, model_fn, x0, loss_rng, cond=cond, **extra)

  return loss_fn


def apply_gradients(
  state: TrainState, grads, optimizer, *, ema_decay: float, ema_warmup: bool
) -> TrainState:
  """One optimiser update of `state` by `grads`, its EMA at the decay of `state.step`, step + 1."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, decay=ema_decay, warmup=ema_warmup)
  return state.replace(
    step=state.step + 1,
    params=params,
    ema_params=ema_update(state.ema_params, params, decay),
    opt_state=opt_state,
  )


def make_train_step(
  module,
  optimizer: optax.GradientTransformation,
  *,
  ema_decay: float = 0.9999,
  ema_warmup: bool = False,
  label_dropout: float = 0.0,
  null_label: int | None = None,
  grad_accum_steps: int = 1,
  micro_sharding: Any = None,
  grad_shardings: Any = None,
  reflow: bool = False,
  cond_fn: Callable | None = None,
  label_fn: Callable | None = None,
  **loss_kwargs,
) -> Callable:
  """Returns the pure `train_step(state, batch, schedule, rng) -> (state, metrics)`.

  The step's randomness is `fold_in(rng, state.step)`: the same base rng and step give
  the same dropout masks, timesteps, noise and label drops, whatever the device count.

  Gradient accumulation (`grad_accum_steps = k > 1`) runs a `lax.scan` over k microbatches
  of B / k examples (microbatch i holds examples i, i + k, i + 2k, ..., so that each stays
  spread over the devices of a batch-sharded input) and applies one update with the mean
  gradient. The label drops, timesteps and noise are drawn for the whole batch exactly as
  with k = 1 and sliced, so without dropout the update equals the whole-batch update up to
  float rounding. Dropout masks are drawn per microbatch (key `fold_in(dropout key, i)`):
  same distribution, different masks.

  On a mesh with a 'data' axis of n > 1 devices (and B / n divisible by k) the microbatch
  loop runs per data-parallel group (`jax.shard_map` over 'data', other axes left to the
  compiler): each group accumulates the gradients of its own examples unreduced, and one
  all-reduce over 'data' follows the scan, instead of one per microbatch. The microbatches
  hold the same examples as above; dropout keys also fold in the group index (so masks then
  depend on n). Under FSDP the gradients are still reduced over 'fsdp' per microbatch, so
  that the accumulator stays sharded (1 / fsdp of the gradients per device).

  Args:
    module: the network, called as `module(x, t, y, *, train)`.
    optimizer: the optax transformation (its learning rate is a function of the step).
    ema_decay: EMA decay (DDPM: 0.9999).
    ema_warmup: use min(decay, (1 + step) / (10 + step)).
    label_dropout: probability of replacing a label by `null_label` (CFG training).
    null_label: the model's reserved unconditional label (or null row, e.g. the empty
      prompt's token ids [L]); None for unconditional models.
    grad_accum_steps: k, the number of microbatches per update (B must be divisible by k).
      The discrete (ddpm) objective only: a process draws its own noise levels.
    micro_sharding: optional sharding each microbatch is constrained to (the batch's).
    grad_shardings: optional shardings of the accumulated gradients (the params').
    reflow: batch images are reflow pairs [x0 | x1] (channel axis); x1 is the noise of x0.
    **loss_kwargs: prediction, weighting, min_snr_gamma, learn_sigma, vlb_weight, and for a
      process sigma_data and uncertainty.
    cond_fn: optional `cond_fn(images, rng) -> cond` for image-conditioned models (e.g.
      `conditioning.make_superres_cond_fn`); its rng is folded from the step's.
    label_fn: optional `label_fn(labels [B], rng) -> cond [B, ...]` turning the batch's
      labels into the model's condition before the drops (e.g. captions drawn per example:
      `jdiff.data.captions.caption_ids`); its rng is folded from the step's.

  Returns:
    train_step(state, batch {'image': [B, H, W, C], 'label': [B]}, schedule, rng).
  """
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")
  if grad_accum_steps > 1 and reflow:
    raise ValueError("grad_accum_steps > 1 is not supported with reflow pairs")
  loss_fn = make_loss_fn(module, **loss_kwargs)
  k = grad_accum_steps

  def constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

  data_axis = partition.data_axis(micro_sharding)
  act_sharding = micro_sharding if partition.fsdp_size(micro_sharding) > 1 else None

  def scan_micro(params, schedule, arrays, drop_rng, rng, group):
    """Sums the losses and gradients of k microbatches of `arrays` (x0, t, noise, cond)."""
    b = arrays["x0"].shape[0]

    def micro(a):  # [b, ...] -> [k, b / k, ...]; microbatch i = examples i, i + k, ...
      return a.reshape(b // k, k, *a.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
      i, parts = xs
      if group is None:
        parts = constrain(parts, micro_sharding)
        key = jax.random.fold_in(drop_rng, i)
      else:  # one dropout stream per data-parallel group
        key = jax.random.fold_in(jax.random.fold_in(drop_rng, i), group)

      def mean_loss(p):
        per_ex = loss_fn(
          p,
          schedule,
          parts["x0"],
          parts.get("cond"),
          rng,
          train=True,
          t=parts["t"],
          noise=parts["noise"],
          dropout_rng=key,
        )
        return jnp.mean(per_ex)

      act_sh = act_sharding if group is None else None
      with partition.batch_sharded_activations(act_sh, parts["x0"].shape[0]):
        loss_i, grads_i = jax.value_and_grad(mean_loss)(params)
      loss_sum, grad_sum = carry
      grad_sum = constrain(jax.tree.map(jnp.add, grad_sum, grads_i), grad_shardings)
      return (loss_sum + loss_i, grad_sum), None

    zeros = constrain(jax.tree.map(jnp.zeros_like, params), grad_shardings)
    xs = (jnp.arange(k), jax.tree.map(micro, arrays))
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
    return loss_sum, grad_sum

  def accumulate(params, x0: Array, cond: Array | None, schedule: Schedule, rng: Array):
    if schedule.kind != "discrete":
      raise ValueError(
        "grad_accum_steps > 1 needs the discrete (ddpm) objective; a process "
        f"({type(schedule).__name__}) draws its own noise levels"
      )
    b = x0.shape[0]
    if b % k:
      raise ValueError(f"batch size {b} is not divisible by grad_accum_steps={k}")
    drop_rng, draw_rng = jax.random.split(rng)  # as loss_fn splits its rng
    t, noise = losses.sample_t_and_noise(draw_rng, x0, schedule.num_steps)
    arrays = {"x0": x0, "t": t, "noise": noise}
    if cond is not None:
      arrays["cond"] = cond
    n = 1 if data_axis is None else micro_sharding.mesh.shape[data_axis]
    if n == 1 or b % (n * k):
      loss_sum, grad_sum = scan_micro(params, schedule, arrays, drop_rng, rng, None)
      return loss_sum / k, jax.tree.map(lambda g: g / k, grad_sum)

    # Each data-parallel group sums the gradients of its own examples over the k
    # microbatches, unreduced; one all-reduce over `data_axis` follows the scan. The local
    # microbatch i (local examples i, i + k, ...) holds the same examples as the global one
    # (global examples i, i + k, ...) because each group's b / n examples are contiguous
    # and b / n is a multiple of k.
    def per_group(params, schedule, arrays, drop_rng, rng):
      group = jax.lax.axis_index(data_axis)
      loss_sum, grad_sum = scan_micro(params, schedule, arrays, drop_rng, rng, group)
      loss_sum, grad_sum = jax.lax.psum((loss_sum, grad_sum), data_axis)
      return loss_sum / (k * n), jax.tree.map(lambda g: g / (k * n), grad_sum)

    batch_spec = P(data_axis)
    return jax.shard_map(
      per_group,
      mesh=micro_sharding.mesh,
      in_specs=(P(), P(), batch_spec, P(), P()),
      out_specs=(P(), P()),
      axis_names={data_axis},
      check_vma=False,
    )(params, schedule, arrays, drop_rng, rng)

  def train_step(state: TrainState, batch: dict, schedule: Schedule, rng: Array):
    rng = jax.random.fold_in(rng, state.step)
    label_rng, loss_rng = jax.random.split(rng)
    cond = None
    if null_label is not None:
      labels = batch["label"]
      if label_fn is not None:
        labels = label_fn(labels, jax.random.fold_in(label_rng, 2))
      cond = drop_labels(label_rng, labels, rate=label_dropout, null_label=null_label)
    if cond_fn is not None:
      cond = cond_fn(batch["image"], jax.random.fold_in(label_rng, 1))

    x0, noise = batch["image"], None
    if reflow:  # records are [x0 | x1] on the channel axis (jdiff.flow.reflow_pairs)
      x0, noise = flow.split_pairs(x0)

    if grad_accum_steps == 1:

      def mean_loss(params):
        per_ex = loss_fn(params, schedule, x0, cond, loss_rng, train=True, noise=noise)
        return jnp.mean(per_ex)

      with partition.batch_sharded_activations(act_sharding, x0.shape[0]):
        loss, grads = jax.value_and_grad(mean_loss)(state.params)
    else:
      loss, grads = accumulate(state.params, x0, cond, schedule, loss_rng)
    new_state = apply_gradients(state, grads, optimizer, ema_decay=ema_decay, ema_warmup=ema_warmup)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_eval_step(
  module,
  *,
  conditional: bool = False,
  cond_fn: Callable | None = None,
  label_fn: Callable | None = None,
  **loss_kwargs,
) -> Callable:
  """Returns `eval_step(params, batch, schedule, rng) -> {'loss_sum', 'count'}`.

  Padded examples (batch['mask'] == 0) are excluded, so sums over an epoch are exact.
  `cond_fn` and `label_fn` as `make_train_step`'s.
  """
  loss_fn = make_loss_fn(module, **loss_kwargs)

  def eval_step(params, batch: dict, schedule: Schedule, rng: Array):
    cond = batch["label"] if conditional else None
    if conditional and label_fn is not None:
      cond = label_fn(cond, jax.random.fold_in(rng, 2))
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


def make_autoencoder_state_step(module: AutoencoderKL, optimizer, **loss_options) -> Callable:
  """`step(state, images [B, H, W, C], rng) -> (state, metrics)` on an `AutoencoderState`.

  The posterior sample's key is `fold_in(rng, state.step)` (the step is the only clock).
  `loss_options` (recon_loss, kl_weight) are `make_autoencoder_train_step`'s.
  """
  inner = make_autoencoder_train_step(module, optimizer, **loss_options)

  def step(state: AutoencoderState, images: Array, rng: Array):
    params, opt_state, metrics = inner(
      state.params, state.opt_state, images, jax.random.fold_in(rng, state.step)
    )
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
