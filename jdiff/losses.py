"""Training losses: timestep sampling, the denoising loss, and the variational bound.

Every loss returns per-example values [B]; the caller reduces over the batch (and over
devices). The library only calls `model_fn(x_t, t, cond) -> Array`.

References:
  [DDPM] Ho et al. 2020, eq. 14 (L_simple) and eq. 5 (the bound).
  [IDDPM] Nichol & Dhariwal 2021, Sec. 3.3 (importance sampling), appendix (discretized decoder).
  [MinSNR] Hang et al. Efficient Diffusion Training via Min-SNR Weighting Strategy, 2023.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from jdiff import diffusion
from jdiff.diffusion import ModelFn
from jdiff.schedules import Schedule

Array = jax.Array

WEIGHTINGS = ("simple", "snr", "min_snr")


# ----------------------------------------------------------------------------- timesteps


def sample_timesteps(rng: Array, batch_size: int, num_steps: int) -> Array:
  """Uniform integer timesteps in [0, num_steps), int32 [batch_size]."""
  return jax.random.randint(rng, (batch_size,), 0, num_steps, dtype=jnp.int32)


class LossHistory(NamedTuple):
  """Per-timestep history of squared losses for importance sampling ([IDDPM] Sec. 3.3).

  Attributes:
    values: [T, K] the last K squared losses seen at each timestep (a ring buffer).
    counts: [T] int32, how many losses each timestep has seen.
  """

  values: Array
  counts: Array


def init_loss_history(num_steps: int, history: int = 10) -> LossHistory:
  return LossHistory(
    jnp.zeros((num_steps, history), jnp.float32), jnp.zeros((num_steps,), jnp.int32)
  )


def update_loss_history(hist: LossHistory, t: Array, losses: Array) -> LossHistory:
  """Pushes losses [B] observed at timesteps t [B] into the ring buffer, in batch order.

  The result equals pushing the examples one at a time: a timestep that appears n times in
  the batch gets n consecutive slots and n more counts; where n exceeds the history K, only
  its last K losses are kept (each slot is written once, so the scatter has no collisions).
  """
  k = hist.values.shape[1]
  same = t[:, None] == t[None, :]  # [B, B]
  earlier = jnp.tril(same, -1)  # j < i with t_j == t_i
  rank = jnp.sum(earlier, axis=1)  # position within its t
  later = jnp.sum(same, axis=1) - 1 - rank  # same t after i
  slot = (hist.counts[t] + rank) % k
  slot = jnp.where(later < k, slot, k)  # overwritten: dropped
  sq = jax.lax.stop_gradient(losses).astype(jnp.float32) ** 2
  values = hist.values.at[t, slot].set(sq, mode="drop")
  counts = hist.counts.at[t].add(1)
  return LossHistory(values, counts)


def importance_sample_timesteps(
  rng: Array, batch_size: int, hist: LossHistory, *, uniform_prob: float = 0.001
) -> tuple[Array, Array]:
  """Samples t with p_t ∝ sqrt(E[L_t^2]) once every timestep has a full history.

  Until then it samples uniformly ([IDDPM] Sec. 3.3). The returned weights 1 / (T p_t)
  make the weighted loss an unbiased estimate of the uniform-t average.

  Args:
    rng: PRNG key.
    batch_size: B.
    hist: the `LossHistory`.
    uniform_prob: mixing weight of the uniform distribution (keeps every p_t > 0).

  Returns:
    (t int32 [B], weights float32 [B]).
  """
  num_steps, k = hist.values.shape
  w = jnp.sqrt(jnp.mean(hist.values, axis=1))
  p = w / jnp.maximum(jnp.sum(w), 1e-30)
  p = p * (1.0 - uniform_prob) + uniform_prob / num_steps
  warm = jnp.all(hist.counts >= k)
  p = jnp.where(warm, p, jnp.full_like(p, 1.0 / num_steps))
  t = jax.random.choice(rng, num_steps, (batch_size,), p=p).astype(jnp.int32)
  return t, 1.0 / (num_steps * p[t])


# ----------------------------------------------------------------------------- denoising loss


def loss_weight(
  schedule: Schedule, t: Array, *, prediction: str, weighting: str, min_snr_gamma: float = 5.0
) -> Array:
  """Per-example weight on the MSE of `prediction`, float32 [B].

  Weightings are defined in x0-space, w(t) ||x0 - x0_hat||^2, and converted to the target
  used, since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and
  ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2:
    'simple': the plain MSE of the target (no reweighting, [DDPM] L_simple for eps).
    'snr': w = SNR (equal to L_simple for the eps target).
    'min_snr': w = min(SNR, gamma) ([MinSNR]).
  """
  diffusion.check_prediction(prediction)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
  if weighting == "simple":
    return jnp.ones(t.shape, jnp.float32)
  snr = schedule.snr[t]
  w_x0 = snr if weighting == "snr" else jnp.minimum(snr, min_snr_gamma)
  if prediction == "x0":
    return w_x0
  if prediction == "v":
    return w_x0 / (snr + 1.0)
  # eps: w_x0 / snr, written to stay finite at snr = 0 and snr = inf.
  return jnp.ones_like(snr) if weighting == "snr" else jnp.minimum(1.0, min_snr_gamma / snr)


def mean_flat(x: Array) -> Array:
  """Mean over all but the batch axis, in float32: [B, ...] -> [B]."""
  return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def sample_t_and_noise(
  rng: Array, x0: Array, num_steps: int, *, t: Array | None = None
) -> tuple[Array, Array]:
  """The training losses' draw: t int32 [B] (unless given) and noise [B, ...] of x0's dtype.

  Drawing them for a whole batch and passing slices as `t=` and `noise=` to the losses
  reproduces the whole-batch draw on microbatches (gradient accumulation).
  """
  t_rng, noise_rng = jax.random.split(rng)
  if t is None:
    t = sample_timesteps(t_rng, x0.shape[0], num_steps)
  return t, jax.random.normal(noise_rng, x0.shape, x0.dtype)


def _noise_and_predict(
  schedule: Schedule,
  model_fn: ModelFn,
  x0: Array,
  rng: Array,
  *,
  t: Array | None,
  cond: Array | None,
  noise: Array | None = None,
) -> tuple[Array, Array, Array]:
  """The training losses' common start: draw t and noise (unless given), call the model.

  Returns:
    (t int [B], noise [B, ...] of x0's dtype, model_fn(q_sample(x0, t, noise), t, cond)).
  """
  if noise is None:
    t, noise = sample_t_and_noise(rng, x0, schedule.num_steps, t=t)
  elif t is None:
    raise ValueError("denoising losses given `noise` also need `t`")
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  return t, noise, model_fn(x_t, t, cond)


def denoising_loss(
  schedule: Schedule,
  model_fn: ModelFn,
  x0: Array,
  rng: Array,
  *,
  cond: Array | None = None,
  t: Array | None = None,
  prediction: str = "eps",
  weighting: str = "simple",
  min_snr_gamma: float = 5.0,
  noise: Array | None = None,
) -> Array:
  """Per-example denoising loss, float32 [B] ([DDPM] eq. 14 and its reweightings).

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond) -> prediction`, same shape as x0.
    x0: [B, ...] clean data.
    rng: PRNG key for t (if not given) and the noise.
    cond: optional conditioning passed through to model_fn (e.g. labels [B]).
    t: optional int timesteps [B] (e.g. from `importance_sample_timesteps`).
    prediction: what the model predicts: 'eps', 'x0' or 'v'.
    weighting: 'simple', 'snr' or 'min_snr' (see `loss_weight`).
    min_snr_gamma: gamma of 'min_snr'.
    noise: optional noise [B, ...] (with `t`), e.g. a slice of `sample_t_and_noise`'s.

  Returns:
    float32 [B] weighted MSE per example (mean over non-batch dims).
  """
  t, noise, pred = _noise_and_predict(schedule, model_fn, x0, rng, t=t, cond=cond, noise=noise)
  if pred.shape != x0.shape:
    raise ValueError(
      f"model_fn returned shape {pred.shape}, expected {x0.shape}; for a "
      "learned-variance model use hybrid_loss"
    )
  target = diffusion.target_for(schedule, x0, t, noise, prediction=prediction)
  w = loss_weight(
    schedule, t, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
  )
  return w * mean_flat((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


# ----------------------------------------------------------------------------- the bound


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (float32)."""
  mean1, logvar1, mean2, logvar2 = (
    jnp.asarray(a, jnp.float32) for a in (mean1, logvar1, mean2, logvar2)
  )
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def discretized_gaussian_log_likelihood(
  x: Array, mean: Array, log_scale: Array, *, num_levels: int = 256
) -> Array:
  """log P(x) of data in [-1, 1] quantised to `num_levels` bins under N(mean, e^(2 log_scale)).

  The first and last bins extend to -inf and +inf ([DDPM] Sec. 3.3). Uses exact log-CDFs.

  Args:
    x: [B, ...] data on the grid -1 + 2k / (num_levels - 1).
    mean: [B, ...] decoder mean.
    log_scale: log standard deviation, broadcastable to x.
    num_levels: number of levels (256 for 8-bit images).

  Returns:
    float32 [B, ...] log-probabilities in nats.
  """
  x, mean, log_scale = (jnp.asarray(a, jnp.float32) for a in (x, mean, log_scale))
  half = 1.0 / (num_levels - 1)
  inv_std = jnp.exp(-log_scale)
  upper = (x - mean + half) * inv_std
  lower = (x - mean - half) * inv_std
  log_cdf_upper = log_ndtr(upper)
  log_sf_lower = log_ndtr(-lower)
  # log(Phi(u) - Phi(l)) = log(Phi(b) - Phi(a)), on the side of the mean where it is stable:
  # (a, b) = (-u, -l) for bins above the mean. One expression, not a jnp.where of two, so
  # the branch not taken cannot produce log(0) and turn the gradient into NaN.
  above = lower > 0
  a = jnp.where(above, -upper, lower)
  b = jnp.where(above, -lower, upper)
  log_cdf_b = log_ndtr(b)
  mid = log_cdf_b + jnp.log(-jnp.expm1(log_ndtr(a) - log_cdf_b))
  # The edge bins are those whose nearest grid level is -1 or 1: x beyond the midpoint to the
  # next level, +-(1 - half). (A fixed tolerance would swallow whole bins once 2 half < it.)
  return jnp.where(x < -1 + half, log_cdf_upper, jnp.where(x > 1 - half, log_sf_lower, mid))


def prior_bpd(schedule: Schedule, x0: Array) -> Array:
  """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, float32 [B]."""
  t = jnp.full((x0.shape[0],), schedule.num_steps - 1, jnp.int32)
  mean, _, logvar = diffusion.q_mean_variance(schedule, x0.astype(jnp.float32), t)
  return mean_flat(normal_kl(mean, logvar, 0.0, 0.0)) / math.log(2.0)


def vlb_term(
  schedule: Schedule,
  model_fn: ModelFn,
  x0: Array,
  t: Array,
  noise: Array,
  *,
  cond: Array | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  clip_x0: float | None = None,
  num_levels: int = 256,
) -> Array:
  """One term L_t of the bound at timesteps t, in bits/dim, float32 [B].

  For t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0: the discretized
  Gaussian decoder -log p(x_0 | x_1) ([DDPM] eq. 5), with x_t = q_sample(x0, t, noise).
  """
  x0 = x0.astype(jnp.float32)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  out = model_fn(x_t, t, cond).astype(jnp.float32)
  p, _ = diffusion.p_mean_variance(
    schedule, out, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0
  )
  q = diffusion.q_posterior(schedule, x0, x_t, t)
  kl = mean_flat(normal_kl(q.mean, q.log_variance, p.mean, p.log_variance)) / math.log(2.0)
  nll = -mean_flat(
    discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance, num_levels=num_levels)
  ) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


class BoundTerms(NamedTuple):
  """The bound's decomposition, each in bits/dim.

  Attributes:
    total: [B] prior + sum of all terms.
    prior: [B] KL(q(x_T | x_0) || N(0, I)).
    terms: [B, T] L_t for t = 0 (decoder NLL) .. T-1.
  """

  total: Array
  prior: Array
  terms: Array


def vlb_terms(
  schedule: Schedule, model_fn: ModelFn, x0: Array, rng: Array, ts: Array, **options
) -> Array:
  """The bound's terms L_t at the timesteps `ts` [K], float32 [B, K], one `lax.scan`.

  Term t draws its noise from `fold_in(rng, t)`, as `variational_bound` does, so summing
  the terms of any partition of 0..T-1 (e.g. chunks, with progress in between) gives the
  same bound. `options` are `vlb_term`'s (cond, prediction, variance, clip_x0, num_levels).
  """
  b = x0.shape[0]

  def body(_, t_scalar):
    noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, jnp.float32)
    t = jnp.full((b,), t_scalar, jnp.int32)
    return None, vlb_term(schedule, model_fn, x0, t, noise, **options)

  _, terms = jax.lax.scan(body, None, jnp.asarray(ts, jnp.int32))
  return terms.T


def variational_bound(
  schedule: Schedule, model_fn: ModelFn, x0: Array, rng: Array, **options
) -> BoundTerms:
  """The full variational bound -log p(x_0) <= L in bits/dim, all T terms ([DDPM] eq. 5).

  Costs T model calls per example, run with one `lax.scan` (compiles once).

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x0: [B, ...] data in [-1, 1] on the grid of `num_levels` levels.
    rng: PRNG key; term t uses fold_in(rng, t) for its noise.
    **options: `vlb_term`'s keyword options: `cond` (optional conditioning); `prediction`,
      `variance`, `clip_x0`, the reverse-process parameterisation (see
      `diffusion.p_mean_variance`); `num_levels`, the quantisation levels of the data (256
      for 8-bit images).

  Returns:
    `BoundTerms`.
  """
  ts = jnp.arange(schedule.num_steps, dtype=jnp.int32)
  terms = vlb_terms(schedule, model_fn, x0, rng, ts, **options)
  prior = prior_bpd(schedule, x0)
  return BoundTerms(prior + jnp.sum(terms, axis=1), prior, terms)


def hybrid_loss(
  schedule: Schedule,
  model_fn: ModelFn,
  x0: Array,
  rng: Array,
  *,
  cond: Array | None = None,
  t: Array | None = None,
  prediction: str = "eps",
  vlb_weight: float = 0.001,
  num_levels: int = 256,
  noise: Array | None = None,
) -> Array:
  """[IDDPM]'s L_hybrid = L_simple + lambda L_vlb for a learned-range variance model, [B].

  model_fn must return 2C channels: the prediction and the variance interpolation values.
  The L_vlb term sees a stop-gradient mean, so it only trains the variance (IDDPM Sec. 3.1).
  L_vlb is the bound term in bits/dim scaled by T (an unbiased estimate of the whole bound),
  so vlb_weight = 0.001 reproduces IDDPM's `RESCALED_MSE` hybrid objective.
  """
  t, noise, out = _noise_and_predict(schedule, model_fn, x0, rng, t=t, cond=cond, noise=noise)
  pred, var_values = diffusion.split_learned_variance(out, variance="learned_range")
  target = diffusion.target_for(schedule, x0, t, noise, prediction=prediction)
  simple = mean_flat((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
  frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
  vlb = vlb_term(
    schedule,
    lambda *_: frozen,
    x0,
    t,
    noise,
    prediction=prediction,
    variance="learned_range",
    num_levels=num_levels,
  )
  return simple + vlb_weight * schedule.num_steps * vlb
