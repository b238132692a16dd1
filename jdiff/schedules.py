"""Discrete-time variance schedules as pytrees.

A `Schedule` holds every per-timestep coefficient the primitives need, as float32
arrays of shape [T]. It is a pytree: pass it to jitted functions as an argument and
changing its *values* never retraces (only T, its shape, is static).

Coefficients are computed in float64 with NumPy at construction, then stored in
float32, so that e.g. `1 - alpha_bar` near t = 0 keeps its precision.

References:
  [DDPM] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models, 2020.
  [IDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models, 2021.
  [Chen23] Chen. On the Importance of Noise Scheduling for Diffusion Models, 2023.
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models, 2022.
  [Lin24] Lin et al. Common Diffusion Noise Schedules and Sample Steps are Flawed, 2024.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import continuous, diffusion

Array = jax.Array

# A zero-terminal-SNR schedule has alpha_bar = 0 at its last step (sigma = inf). There, and only
# there, alpha_bar is replaced by 2**-24 (sqrt 2**-12), as diffusers does, so that sigma_max
# stays finite; the model still sees the last timestep. Schedules with alpha_bar > 0 (plain
# cosine ends at ~2.4e-9) keep their exact sigma_max.
_ZERO_SNR_SQRT_ALPHA_BAR = 2.0**-12


class Schedule(NamedTuple):
  """Per-timestep coefficients of a discrete diffusion, each float32 of shape [T].

  Timesteps are 0-indexed: t = 0 is the first noising step (x_1 in the papers'
  1-indexed notation) and t = T-1 the last.

  Attributes:
    betas: beta_t.
    alphas_cumprod: alpha_bar_t = prod_{s<=t} (1 - beta_s).
    alphas_cumprod_prev: alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
    sqrt_alphas_cumprod: sqrt(alpha_bar_t).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha_bar_t).
    posterior_variance: beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t),
      the variance of q(x_{t-1} | x_t, x_0) ([DDPM] eq. 7).
    posterior_log_variance_clipped: log beta_tilde_t with the t = 0 entry (which is 0)
      replaced by beta_tilde_1, as in [IDDPM].
    posterior_mean_coef1: coefficient of x_0 in the posterior mean.
    posterior_mean_coef2: coefficient of x_t in the posterior mean.
  """

  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array

  @property
  def num_steps(self) -> int:
    """T, the number of diffusion steps (static: it is the arrays' shape)."""
    return self.betas.shape[-1]

  @property
  def snr(self) -> Array:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), [T]."""
    # From the float64-derived square roots: 1 - alpha_bar in float32 loses precision at t = 0.
    return (self.sqrt_alphas_cumprod / self.sqrt_one_minus_alphas_cumprod) ** 2

  @property
  def log_snr(self) -> Array:
    """log SNR, [T]; -inf where alpha_bar = 0 (zero terminal SNR)."""
    return 2.0 * (jnp.log(self.sqrt_alphas_cumprod) - jnp.log(self.sqrt_one_minus_alphas_cumprod))

  @property
  def sigmas(self) -> Array:
    """Noise levels of the variance-exploding view, sqrt((1 - alpha_bar) / alpha_bar), [T]."""
    return self.sqrt_one_minus_alphas_cumprod / self.sqrt_alphas_cumprod

  # --------------------------------------------------------------------------- noise protocol
  # The members a `Schedule` shares with `jdiff.processes.Process`; samplers, guidance and
  # training reach either one through these only (never a type test). Time t is the
  # fractional timestep in [0, T-1], which is also what the model is called at.

  @property
  def kind(self) -> str:
    """'discrete' (a `Process` says 'vp_cosine', 'vp_linear', 've' or 'flow')."""
    return "discrete"

  @property
  def t_min(self) -> int:
    """The smallest time, 0 (static)."""
    return 0

  @property
  def t_max(self) -> int:
    """The largest time, T-1 (static)."""
    return self.num_steps - 1

  @property
  def t_scale(self) -> float:
    """The model is called at t * t_scale: 1, the timestep itself."""
    return 1.0

  def log_sigmas(self) -> Array:
    """log sigma_t = log sqrt(1 - ab_t) - log sqrt(ab_t), float32 [T], increasing in t.

    Computed from the float64-derived square roots, so it stays accurate near t = 0 where
    1 - ab is small. A zero alpha_bar (zero terminal SNR) counts as 2**-24.
    """
    sqrt_ab = self.sqrt_alphas_cumprod
    sqrt_ab = jnp.where(sqrt_ab > 0, sqrt_ab, _ZERO_SNR_SQRT_ALPHA_BAR)
    return (jnp.log(self.sqrt_one_minus_alphas_cumprod) - jnp.log(sqrt_ab)).astype(jnp.float32)

  def sigma_min_max(self) -> tuple[Array, Array]:
    """(sigma at t = 0, sigma at t = T-1), float32 scalars: the sigma grids' range."""
    ls = self.log_sigmas()
    return jnp.exp(ls[0]), jnp.exp(ls[-1])

  def t_to_sigma(self, t: Array) -> Array:
    """sigma(t) at fractional timesteps (log-linear interpolation); 0 where t < 0.

    Args:
      t: timesteps of any shape, int or float, in [-1, T-1] (values above T-1 are clamped).

    Returns:
      float32 sigmas of t's shape.
    """
    t = jnp.asarray(t, jnp.float32)
    ls = self.log_sigmas()
    sig = jnp.exp(jnp.interp(t, jnp.arange(ls.shape[0], dtype=jnp.float32), ls))
    return jnp.where(t < 0, 0.0, sig)

  def sigma_to_t(self, sigma: Array) -> Array:
    """Fractional timestep t(sigma), the inverse of `t_to_sigma`; float32 of sigma's shape.

    Sigmas outside [sigma_min, sigma_max] are clamped to t = 0 or T-1; sigma = 0 gives -1.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    ls = self.log_sigmas()
    safe = jnp.where(sigma > 0, sigma, 1.0)
    t = jnp.interp(jnp.log(safe), ls, jnp.arange(ls.shape[0], dtype=jnp.float32))
    return jnp.where(sigma > 0, t, -1.0)

  def check_prediction(self, prediction: str) -> None:
    """Raises ValueError unless `prediction` is 'eps', 'x0' or 'v'."""
    diffusion.check_prediction(prediction)

  def make_denoiser(self, model_fn, **options):
    """The EDM denoiser D(x_ve [B, ...], sigma scalar or [B]) -> x0_hat of a model of this
    schedule: `jdiff.continuous.vp_denoiser`, which documents the options (cond, prediction,
    clip_x0, dynamic_percentile)."""
    return continuous.vp_denoiser(self, model_fn, **options)


def from_betas(betas) -> Schedule:
  """Builds a schedule from explicit betas.

  Args:
    betas: array-like [T] with 0 < beta_t <= 1 (beta_T = 1 is allowed: zero terminal SNR).

  Returns:
    The `Schedule`.

  Raises:
    ValueError: if betas is not 1-D, empty, or has values outside (0, 1].
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
    bad = betas[~((betas > 0) & (betas <= 1))]
    raise ValueError(f"betas must lie in (0, 1]; got offending values {bad[:5]}")
  if np.any(betas[:-1] >= 1):
    raise ValueError("only the last beta may equal 1 (zero terminal SNR)")
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # post_var[0] == 0 exactly; clip the log with the next value as in IDDPM.
  post_log_var = (
    np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    if len(betas) > 1
    else (np.log(np.maximum(post_var, 1e-20)))
  )
  coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
  coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
    betas=f32(betas),
    alphas_cumprod=f32(ac),
    alphas_cumprod_prev=f32(ac_prev),
    sqrt_alphas_cumprod=f32(np.sqrt(ac)),
    sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
    posterior_variance=f32(post_var),
    posterior_log_variance_clipped=f32(post_log_var),
    posterior_mean_coef1=f32(coef1),
    posterior_mean_coef2=f32(coef2),
  )


def _check_steps(num_steps: int) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
    raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")


def betas_from_alpha_bar(alpha_bar: np.ndarray, *, max_beta: float = 0.999) -> np.ndarray:
  """betas_t = 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i), clipped at max_beta ([IDDPM] eq. 17).

  Args:
    alpha_bar: float64 [T + 1], alpha_bar on the grid t_i = i / T (alpha_bar[0] ~ 1).
    max_beta: upper clip, avoiding a singularity at the end of the schedule.

  Returns:
    float64 betas [T].
  """
  return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def linear(num_steps: int = 1000, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """[DDPM]'s linear betas from beta_start to beta_end (defaults for T = 1000).

  The endpoints are scaled by 1000 / T so that other T give the same process ([IDDPM]).
  """
  _check_steps(num_steps)
  scale = 1000.0 / num_steps
  return from_betas(np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64))


def scaled_linear(
  num_steps: int = 1000, *, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Schedule:
  """Stable Diffusion's schedule [LDM]: betas linear in sqrt(beta)."""
  _check_steps(num_steps)
  return from_betas(np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2)


def cosine(num_steps: int = 1000, *, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """[IDDPM]'s cosine schedule: alpha_bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2."""
  _check_steps(num_steps)
  t = np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float64)
  f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
  return from_betas(betas_from_alpha_bar(f / f[0], max_beta=max_beta))


def sigmoid(
  num_steps: int = 1000,
  *,
  start: float = -3.0,
  end: float = 3.0,
  tau: float = 1.0,
  max_beta: float = 0.999,
) -> Schedule:
  """[Chen23]'s sigmoid schedule (Algorithm 1): alpha_bar(t) from a shifted, scaled sigmoid.

  alpha_bar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start),
  with v_x = sigmoid(x / tau), on t in [0, 1].
  """
  _check_steps(num_steps)
  if not end > start:
    raise ValueError(f"sigmoid schedule needs end > start, got start={start}, end={end}")
  if tau <= 0:
    raise ValueError(f"tau must be positive, got {tau}")
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  t = np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float64)
  v_start, v_end = sig(start / tau), sig(end / tau)
  ab = (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)
  return from_betas(betas_from_alpha_bar(ab, max_beta=max_beta))


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
  """Shifts and scales sqrt(alpha_bar) so that the last step has SNR exactly 0 ([Lin24] Alg. 1).

  The first step keeps its sqrt(alpha_bar). Use with v- or x0-prediction: at SNR 0 an
  eps-prediction carries no information about x_0.
  """
  # Recompute alpha_bar in float64 from the stored betas.
  ab64 = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))
  sqrt_ab = np.sqrt(ab64)
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  ab = sqrt_ab**2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return from_betas(1.0 - alphas)


_CONSTRUCTORS = {
  "linear": linear,
  "scaled_linear": scaled_linear,
  "cosine": cosine,
  "sigmoid": sigmoid,
}


def get_schedule(
  name: str, num_steps: int = 1000, *, zero_terminal_snr: bool = False, **kwargs
) -> Schedule:
  """Builds a named schedule (for configs): 'linear', 'scaled_linear', 'cosine' or 'sigmoid'."""
  if name not in _CONSTRUCTORS:
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(_CONSTRUCTORS)}")
  schedule = _CONSTRUCTORS[name](num_steps, **kwargs)
  return rescale_zero_terminal_snr(schedule) if zero_terminal_snr else schedule
