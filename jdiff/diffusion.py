"""The forward process q and the Gaussian reverse-step parameterisation p.

All functions are pure, take the `Schedule` first, accept data of any shape
[B, ...] with integer timesteps t of shape [B] (0-indexed), and return arrays of
the input's dtype (float32 or bfloat16): the per-timestep coefficients are gathered
in float32 and cast to the data dtype.

References:
  [DDPM] Ho et al. 2020, eqs. 4, 6, 7, 11.
  [IDDPM] Nichol & Dhariwal 2021, eqs. 13, 15 (learned variance interpolation).
  [Progressive Distillation] Salimans & Ho 2022, Sec. 4 (v-prediction).
  [Score SDE] Song et al. 2021 (score = -eps / sigma).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # annotations only: schedules.py builds on this module's maths
  from jdiff.schedules import Schedule

Array = jax.Array
# The one interface between the library and a network: model_fn(x_t [B, ...], t [B], cond)
# -> prediction [B, ...] (eps, x0 or v; twice the channels for learned-variance models).
ModelFn = Callable[[Array, Array, Array | None], Array]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def gather(coef: Array, t: Array, x: Array) -> Array:
  """coef[t] reshaped to broadcast against x and cast to x's dtype.

  Args:
    coef: [T] per-timestep coefficient.
    t: [B] integer timesteps.
    x: [B, ...] data.

  Returns:
    [B, 1, ..., 1] array of x.dtype.
  """
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f"timesteps t must be integers, got dtype {t.dtype}")
  if t.ndim != 1 or (x.ndim and t.shape[0] != x.shape[0]):
    raise ValueError(f"t must have shape [B] matching x's batch; got t {t.shape}, x {x.shape}")
  out = coef[t].astype(x.dtype)
  return out.reshape(t.shape + (1,) * (x.ndim - 1))


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


# ----------------------------------------------------------------------------- q(x_t | x_0)


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """Samples x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) ([DDPM] eq. 4).

  Args:
    schedule: the `Schedule`.
    x0: [B, ...] clean data.
    t: [B] integer timesteps.
    noise: [B, ...] standard normal noise (explicit, for reproducibility).

  Returns:
    x_t, [B, ...], dtype of x0.
  """
  if noise.shape != x0.shape:
    raise ValueError(f"noise shape {noise.shape} != x0 shape {x0.shape}")
  a, s = _coefs(schedule, t, x0)
  return a * x0 + s * noise.astype(x0.dtype)


def q_mean_variance(schedule: Schedule, x0: Array, t: Array) -> tuple[Array, Array, Array]:
  """Mean, variance and log-variance of q(x_t | x_0); variances broadcast as [B, 1, ...]."""
  mean = gather(schedule.sqrt_alphas_cumprod, t, x0) * x0
  # 1 - ab in float32 loses precision at small t: use sqrt(1 - ab) (derived in float64)
  # there, and log1p(-ab) where ab is small.
  ab, sqrt_1m_ab = schedule.alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod
  var = gather(sqrt_1m_ab**2, t, x0)
  logvar = gather(jnp.where(ab < 0.5, jnp.log1p(-ab), 2.0 * jnp.log(sqrt_1m_ab)), t, x0)
  return mean, var, logvar


class Gaussian(NamedTuple):
  """A diagonal Gaussian step distribution; variance terms broadcast against the mean."""

  mean: Array
  variance: Array
  log_variance: Array


def q_posterior(schedule: Schedule, x0: Array, x_t: Array, t: Array) -> Gaussian:
  """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) ([DDPM] eqs. 6-7).

  Args:
    schedule: the `Schedule`.
    x0: [B, ...] clean data (or a prediction of it).
    x_t: [B, ...] noisy data at t.
    t: [B] integer timesteps.

  Returns:
    `Gaussian(mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...])`; the
    log-variance is IDDPM's clipped one (finite at t = 0).
  """
  mean = (
    gather(schedule.posterior_mean_coef1, t, x_t) * x0.astype(x_t.dtype)
    + gather(schedule.posterior_mean_coef2, t, x_t) * x_t
  )
  return Gaussian(
    mean,
    gather(schedule.posterior_variance, t, x_t),
    gather(schedule.posterior_log_variance_clipped, t, x_t),
  )


# ----------------------------------------------------------------------------- conversions


def convert_prediction(
  sqrt_ab: Array, sqrt_1m_ab: Array, x_t: Array, pred: Array, *, prediction: str = "eps"
) -> tuple[Array, Array]:
  """The one conversion of a model prediction into (x0_hat, eps_hat) at explicit coefficients.

  With a = sqrt(ab) and s = sqrt(1 - ab): x_t = a x0 + s eps and v = a eps - s x0, so
    eps: x0 = (x_t - s eps) / a;   x0: eps = (x_t - a x0) / s;   v: x0 = a x_t - s v,
    eps = s x_t + a v.
  Computes in the dtype the arguments promote to (no casts): callers choose it. Passing both
  square roots, rather than ab, lets each caller compute s without the cancellation of 1 - ab
  near ab = 1 (the schedule derives it in float64; the continuous view from sigma).

  Args:
    sqrt_ab: sqrt(alpha_bar), broadcastable against x_t (e.g. scalar or [B, 1, ..., 1]).
    sqrt_1m_ab: sqrt(1 - alpha_bar), same shape; 0 means no noise (then eps_hat is 0 for an
      x0 prediction, where it is undefined).
    x_t: [B, ...] VP-noisy input.
    pred: [B, ...] model output of kind `prediction`.
    prediction: 'eps', 'x0' or 'v'.

  Returns:
    (x0_hat, eps_hat), each [B, ...].
  """
  check_prediction(prediction)
  a, s = sqrt_ab, sqrt_1m_ab
  if prediction == "eps":
    return (x_t - s * pred) / a, pred
  if prediction == "x0":
    return pred, jnp.where(s > 0, (x_t - a * pred) / jnp.where(s > 0, s, 1), 0)
  return a * x_t - s * pred, s * x_t + a * pred


def _coefs(schedule: Schedule, t: Array, x: Array) -> tuple[Array, Array]:
  """(sqrt(ab_t), sqrt(1 - ab_t)) gathered at integer t, [B, 1, ..., 1] of x's dtype."""
  return (
    gather(schedule.sqrt_alphas_cumprod, t, x),
    gather(schedule.sqrt_one_minus_alphas_cumprod, t, x),
  )


def x0_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
  """x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)."""
  return convert_prediction(*_coefs(schedule, t, x_t), x_t, eps, prediction="eps")[0]


def eps_from_x0(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
  """eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab)."""
  return convert_prediction(*_coefs(schedule, t, x_t), x_t, x0, prediction="x0")[1]


def v_from_x0_eps(schedule: Schedule, x0: Array, t: Array, eps: Array) -> Array:
  """The v target: v = sqrt(ab) eps - sqrt(1 - ab) x_0 ([Progressive Distillation] Sec. 4)."""
  a, s = _coefs(schedule, t, x0)
  return a * eps - s * x0


def x0_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
  """x_0 = sqrt(ab) x_t - sqrt(1 - ab) v."""
  return convert_prediction(*_coefs(schedule, t, x_t), x_t, v, prediction="v")[0]


def eps_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
  """eps = sqrt(1 - ab) x_t + sqrt(ab) v."""
  return convert_prediction(*_coefs(schedule, t, x_t), x_t, v, prediction="v")[1]


def score_from_eps(schedule: Schedule, t: Array, eps: Array) -> Array:
  """Score of q(x_t): grad log q(x_t) = -eps / sqrt(1 - ab) ([Score SDE])."""
  return -eps / gather(schedule.sqrt_one_minus_alphas_cumprod, t, eps)


def eps_from_score(schedule: Schedule, t: Array, score: Array) -> Array:
  """Inverse of `score_from_eps`."""
  return -score * gather(schedule.sqrt_one_minus_alphas_cumprod, t, score)


def to_x0_eps(
  schedule: Schedule, x_t: Array, t: Array, pred: Array, *, prediction: str = "eps"
) -> tuple[Array, Array]:
  """Converts a model prediction of any kind into the pair (x0_hat, eps_hat).

  `convert_prediction` at the schedule's float64-derived sqrt(ab_t), sqrt(1 - ab_t), cast to
  x_t's dtype (so bfloat16 stays bfloat16).

  Args:
    schedule: the `Schedule`.
    x_t: [B, ...] noisy input.
    t: [B] integer timesteps.
    pred: [B, ...] model output of kind `prediction`.
    prediction: 'eps', 'x0' or 'v'.

  Returns:
    (x0_hat, eps_hat), each [B, ...].
  """
  return convert_prediction(*_coefs(schedule, t, x_t), x_t, pred, prediction=prediction)


def target_for(schedule: Schedule, x0: Array, t: Array, noise: Array, *, prediction: str) -> Array:
  """The regression target of the given prediction kind for (x0, t, noise)."""
  check_prediction(prediction)
  if prediction == "eps":
    return noise.astype(x0.dtype)
  if prediction == "x0":
    return x0
  return v_from_x0_eps(schedule, x0, t, noise.astype(x0.dtype))


# ----------------------------------------------------------------------------- p(x_{t-1} | x_t)


def split_learned_variance(model_out: Array, *, variance: str) -> tuple[Array, Array | None]:
  """Splits a [B, ..., 2C] output into (prediction, variance values) for 'learned_range'."""
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
  if variance != "learned_range":
    return model_out, None
  if model_out.shape[-1] % 2:
    raise ValueError(
      f"variance='learned_range' needs a model output with 2C channels, got {model_out.shape[-1]}"
    )
  pred, var_values = jnp.split(model_out, 2, axis=-1)
  return pred, var_values


def p_mean_variance(
  schedule: Schedule,
  model_out: Array,
  x_t: Array,
  t: Array,
  *,
  prediction: str = "eps",
  variance: str = "fixed_small",
  clip_x0: float | None = None,
) -> tuple[Gaussian, Array]:
  """The reverse step p(x_{t-1} | x_t) from a model output ([DDPM] eq. 11, [IDDPM] eq. 15).

  Args:
    schedule: the `Schedule`.
    model_out: [B, ..., C] (or [B, ..., 2C] for 'learned_range', the second half in [-1, 1]
      interpolating the log-variance between beta_tilde and beta).
    x_t: [B, ..., C] noisy input.
    t: [B] integer timesteps.
    prediction: what the model predicts: 'eps', 'x0' or 'v'.
    variance: 'fixed_small' (beta_tilde), 'fixed_large' (beta, with beta_tilde_1 at t = 0),
      or 'learned_range'.
    clip_x0: if set, x0_hat is clipped to [-clip_x0, clip_x0] before forming the mean.

  Returns:
    (`Gaussian` of x_{t-1}, x0_hat [B, ...]).
  """
  pred, var_values = split_learned_variance(model_out, variance=variance)
  x0, _ = to_x0_eps(schedule, x_t, t, pred, prediction=prediction)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
  mean = q_posterior(schedule, x0, x_t, t).mean
  min_log = gather(schedule.posterior_log_variance_clipped, t, x_t)
  if variance == "fixed_small":
    log_var = min_log
  elif variance == "fixed_large":
    large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
    log_var = gather(jnp.log(large), t, x_t)
  else:
    # [IDDPM] eq. 15 interpolates up to log beta_t at every t, t = 0 included.
    max_log = gather(jnp.log(schedule.betas), t, x_t)
    frac = (var_values.astype(jnp.float32) + 1.0) / 2.0
    log_var = (
      frac * max_log.astype(jnp.float32) + (1.0 - frac) * min_log.astype(jnp.float32)
    ).astype(x_t.dtype)
  return Gaussian(mean, jnp.exp(log_var), log_var), x0


def check_threshold(
  *, clip_x0: float | None = None, dynamic_percentile: float | None = None
) -> None:
  """Raises ValueError unless clip_x0 > 0 (or None) and dynamic_percentile in (0, 1] (or None)."""
  if clip_x0 is not None and not clip_x0 > 0:
    raise ValueError(f"clip_x0 must be positive, got {clip_x0}")
  if dynamic_percentile is not None and not 0.0 < dynamic_percentile <= 1.0:
    raise ValueError(f"dynamic_percentile must be in (0, 1], got {dynamic_percentile}")


def threshold_x0(
  x0: Array, *, clip_x0: float | None = None, dynamic_percentile: float | None = None
) -> Array:
  """Static clipping or dynamic thresholding of a data prediction.

  Dynamic thresholding ([Imagen] Sec. 2.3): per example, s is the `dynamic_percentile`
  quantile of |x0_hat|, floored at the data range c = `clip_x0` (1 when None); x0_hat is
  clipped to [-s, s] and rescaled by c / s. Where s = c this is plain clipping to [-c, c], so
  predictions inside the range pass unchanged; saturated pixels are pushed inwards.

  Args:
    x0: [B, ...] data prediction.
    clip_x0: data range c: clip to [-c, c] (None: no static clipping).
    dynamic_percentile: p in (0, 1] for dynamic thresholding (None: off).

  Returns:
    [B, ...] thresholded x0, x0's dtype.

  References:
    [Imagen] Saharia et al. Photorealistic Text-to-Image Diffusion Models with Deep Language
      Understanding, NeurIPS 2022, Sec. 2.3.
  """
  check_threshold(clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
  if dynamic_percentile is None:
    return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)
  c = 1.0 if clip_x0 is None else float(clip_x0)
  flat = jnp.abs(x0.astype(jnp.float32)).reshape(x0.shape[0], -1)
  s = jnp.maximum(jnp.quantile(flat, dynamic_percentile, axis=1), c)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (jnp.clip(x0.astype(jnp.float32), -s, s) * (c / s)).astype(x0.dtype)
