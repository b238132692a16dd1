"""Consistency models: parameterisation, level grids, losses and the multistep sampler.

Everything lives on the variance-exploding view x = x0 + sigma z ([EDM], the `processes.ve`
process, where the time is sigma), on levels sigma_min = sigma_1 < ... < sigma_N = sigma_max.
A consistency function f(x, sigma) maps any point of a probability-flow ODE trajectory to the
trajectory's point at sigma_min; `consistency_fn` builds it from any network so that
f(x, sigma_min) = x exactly.

The losses take the function as `f_apply(params, x, sigma)` with the online params and the target
(EMA) params passed explicitly: the target is evaluated under `stop_gradient`, so passing the same
params twice gives [iCT]'s theta^- = sg(theta). The EMA update itself is
`jdiff.training.optim.ema_update` (with [CM]'s decay mu; [iCT] uses mu = 0).

References:
  [CM] Song, Dhariwal, Chen, Sutskever. Consistency Models, ICML 2023: Sec. 3 (f = c_skip x +
    c_out F), App. C (c_skip, c_out), Alg. 1 (multistep sampling), Alg. 2 (consistency
    distillation), Alg. 3 (consistency training); the level grid is [EDM] eq. 5's.
  [iCT] Song, Dhariwal. Improved Techniques for Training Consistency Models, ICLR 2024, Sec. 3:
    lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i), pseudo-Huber with c = 0.00054 sqrt(d), the
    discretisation curriculum N(k), log-normal level sampling (P_mean = -1.1, P_std = 2.0).
  [EDM] Karras, Aittala, Aila, Laine 2022, Table 1 (c_in), eq. 5 (rho grid), Alg. 1 (Heun).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.samplers.driver import sample_loop

Array = jax.Array
# f(x [B, ...], sigma scalar or [B]) -> [B, ...]; and the same with explicit params first.
ConsistencyFn = Callable[[Array, Array], Array]
ConsistencyApply = Callable[[Any, Array, Array], Array]
# The teacher's EDM denoiser D(x_ve [B, ...], sigma scalar or [B]) -> x0_hat
# (`continuous.make_denoiser` of any VP model or process).
Denoiser = Callable[[Array, Array], Array]
SOLVERS = ("euler", "heun")
METRICS = ("pseudo_huber", "l2")
WEIGHTINGS = ("ict", "uniform")
LEVEL_SAMPLINGS = ("uniform", "log_normal")


def _b(a: Array, x: Array) -> Array:
  """A scalar or [B] value reshaped to broadcast against x [B, ...], float32."""
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


# ----------------------------------------------------------------------------- parameterisation


def cm_coefs(
  sigma: Array, *, sigma_min: float = 0.002, sigma_data: float = 0.5
) -> tuple[Array, Array, Array]:
  """(c_skip, c_out, c_in) at sigma (any shape), float32 ([CM] App. C, [iCT]; c_in from [EDM]).

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),
    c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2),   c_in = 1 / sqrt(sd^2 + sigma^2).

  At sigma = sigma_min, c_skip = 1 and c_out = 0 exactly (the boundary condition).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  sd2 = sigma_data**2
  r = jax.lax.rsqrt(sigma**2 + sd2)
  return sd2 / ((sigma - sigma_min) ** 2 + sd2), sigma_data * (sigma - sigma_min) * r, r


def consistency_fn(
  net: Callable[[Array, Array], Array], *, sigma_min: float = 0.002, sigma_data: float = 0.5
) -> ConsistencyFn:
  """Wraps a network F as f(x, sigma) = c_skip x + c_out F(c_in x, sigma) ([CM] Sec. 3, App. C).

  Args:
    net: `net(x_in [B, ...], sigma [B] float32) -> [B, ...]`, called on c_in(sigma) x (it makes
      its own noise embedding from sigma, e.g. ln(sigma) / 4); bind params / cond with partial.
    sigma_min: the boundary level, where f(x, sigma_min) = x exactly.
    sigma_data: the data's standard deviation (0.5 for images in [-1, 1]).

  Returns:
    `f(x [B, ...], sigma scalar or [B]) -> [B, ...]` of x's dtype.
  """

  def f(x: Array, sigma: Array) -> Array:
    sig = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c_skip, c_out, c_in = cm_coefs(sig, sigma_min=sigma_min, sigma_data=sigma_data)
    xf = x.astype(jnp.float32)
    out = net((_b(c_in, x) * xf).astype(x.dtype), sig).astype(jnp.float32)
    # c_out = 0 at sigma_min, but 0 * inf would still leak a non-finite network output.
    out = jnp.where(_b(c_out, x) == 0, 0.0, _b(c_out, x) * out)
    return (_b(c_skip, x) * xf + out).astype(x.dtype)

  return f


# ----------------------------------------------------------------------------- levels


def karras_levels(
  num_levels, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, size=None
) -> Array:
  """The [CM] / [EDM] eq. 5 levels, increasing: sigma_i = (smin^(1/rho) + i/(N-1)
  (smax^(1/rho) - smin^(1/rho)))^rho for i = 0..N-1 (sigma_0 = sigma_min, sigma_{N-1} = sigma_max).

  Args:
    num_levels: N >= 2, an int or a traced int (the [iCT] curriculum changes it during training).
    sigma_min, sigma_max, rho: the grid's end points and curvature.
    size: the returned length (default N; must be >= N, and is needed when N is traced). Entries
      i >= N repeat sigma_max.

  Returns:
    float32 [size].
  """
  if size is None:
    size = int(num_levels)
  if isinstance(num_levels, (int, np.integer)) and not 2 <= num_levels <= size:
    raise ValueError(f"need 2 <= num_levels <= size, got num_levels={num_levels}, size={size}")
  ramp = jnp.minimum(jnp.arange(size, dtype=jnp.float32) / (jnp.asarray(num_levels) - 1.0), 1.0)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (lo + ramp * (hi - lo)) ** rho


def ict_num_levels(step, total_steps: int, *, s0: int = 10, s1: int = 1280) -> Array:
  """[iCT]'s discretisation curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, int32.

  K' = floor(K / (log2 floor(s1 / s0) + 1)) with K = total_steps; the defaults (10, 1280) double N
  every K / 8 steps from 11 to 1281 levels.
  """
  if not 1 <= s0 <= s1:
    raise ValueError(f"the iCT curriculum needs 1 <= s0 <= s1, got s0={s0}, s1={s1}")
  k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
  if k_prime < 1:
    raise ValueError(
      f"total_steps={total_steps} is too few for the iCT curriculum (s0={s0}, s1={s1})"
    )
  # Cap the exponent once s0 2^d >= s1 (so 2^d never overflows int32).
  d = jnp.minimum(jnp.asarray(step, jnp.int32) // k_prime, math.ceil(math.log2(s1 / s0)))
  n = s0 * jnp.left_shift(jnp.int32(1), d)
  return (jnp.minimum(n, s1) + 1).astype(jnp.int32)


def log_normal_level_probs(
  levels: Array, num_levels, *, p_mean: float = -1.1, p_std: float = 2.0
) -> Array:
  """[iCT]'s log-normal level probabilities over the pairs (sigma_i, sigma_{i+1}), i = 0..N-2:

    p(i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std))
                       - erf((ln sigma_i - P_mean) / (sqrt2 P_std)).

  Args:
    levels: float32 [size], increasing (`karras_levels`).
    num_levels: N (int or traced); pairs i >= N - 1 get probability 0.

  Returns:
    float32 [size - 1], summing to 1.
  """
  e = jax.scipy.special.erf((jnp.log(levels) - p_mean) / (math.sqrt(2.0) * p_std))
  p = jnp.where(jnp.arange(levels.shape[0] - 1) < jnp.asarray(num_levels) - 1, e[1:] - e[:-1], 0.0)
  return p / jnp.sum(p)


def sample_level_index(
  rng: Array, levels: Array, num_levels, batch: int, *, sampling: str, p_mean=-1.1, p_std=2.0
) -> Array:
  """Pair indices i [batch] int32 in [0, N - 2]: uniform ([CM]) or log-normal ([iCT])."""
  if sampling not in LEVEL_SAMPLINGS:
    raise ValueError(f"unknown level sampling {sampling!r}; choose one of {LEVEL_SAMPLINGS}")
  if sampling == "uniform":
    return jax.random.randint(rng, (batch,), 0, jnp.asarray(num_levels) - 1)
  probs = log_normal_level_probs(levels, num_levels, p_mean=p_mean, p_std=p_std)
  return jax.random.categorical(rng, jnp.log(probs), shape=(batch,)).astype(jnp.int32)


def sampling_levels(
  num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Array:
  """Default levels for the `num_steps`-step sampler: the top `num_steps` of the Karras grid of
  num_steps + 1 levels, decreasing from sigma_max (float32 [num_steps]).

  [CM] tunes its 2-step level by search; this is a reasonable default, not the paper's value.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  grid = karras_levels(num_steps + 1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  return grid[1:][::-1]


# ----------------------------------------------------------------------------- losses


def pseudo_huber(x: Array, y: Array, *, c: float | None = None) -> Array:
  """[iCT]'s d(x, y) = sqrt(||x - y||^2 + c^2) - c per example, float32 [B].

  c defaults to 0.00054 sqrt(d), d the number of dimensions of one example.
  """
  d = math.prod(x.shape[1:])
  c = 0.00054 * math.sqrt(d) if c is None else c
  sq = jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=tuple(range(1, x.ndim)))
  return jnp.sqrt(sq + c**2) - c


def _metric(x: Array, y: Array, metric: str) -> Array:
  if metric == "pseudo_huber":
    return pseudo_huber(x, y)
  return jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=tuple(range(1, x.ndim)))


def ode_step(denoise: Denoiser, x: Array, sigma: Array, sigma_next: Array, *, solver: str) -> Array:
  """One Euler or Heun step of the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma ([EDM] Alg. 1),
  per example: sigma, sigma_next [B] > 0. Float32 [B, ...]."""
  if solver not in SOLVERS:
    raise ValueError(f"unknown ODE solver {solver!r}; choose one of {SOLVERS}")
  x = x.astype(jnp.float32)
  h = _b(sigma_next - sigma, x)
  d = (x - denoise(x, sigma).astype(jnp.float32)) / _b(sigma, x)
  x_euler = x + h * d
  if solver == "euler":
    return x_euler
  d_next = (x_euler - denoise(x_euler, sigma_next).astype(jnp.float32)) / _b(sigma_next, x)
  return x + h * 0.5 * (d + d_next)


def _pair_loss(f_apply, params, target_params, x_hi, s_hi, x_lo, s_lo, *, metric, weighting):
  """lambda(sigma_lo) d(f_theta(x_hi, s_hi), f_theta-(x_lo, s_lo)), the target under sg."""
  if metric not in METRICS:
    raise ValueError(f"unknown consistency metric {metric!r}; choose one of {METRICS}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown consistency weighting {weighting!r}; choose one of {WEIGHTINGS}")
  online = f_apply(params, x_hi, s_hi)
  target = jax.lax.stop_gradient(f_apply(jax.lax.stop_gradient(target_params), x_lo, s_lo))
  w = 1.0 / (s_hi - s_lo) if weighting == "ict" else jnp.ones_like(s_hi)
  return w * _metric(online, target, metric)


def _draw(rng, x0, levels, num_levels, *, sampling, p_mean, p_std):
  """(sigma_i [B], sigma_{i+1} [B], z [B, ...]) for a random adjacent pair of levels."""
  i_rng, z_rng = jax.random.split(rng)
  i = sample_level_index(
    i_rng, levels, num_levels, x0.shape[0], sampling=sampling, p_mean=p_mean, p_std=p_std
  )
  z = jax.random.normal(z_rng, x0.shape, jnp.float32)
  return levels[i], levels[i + 1], z


def consistency_distillation_loss(
  f_apply: ConsistencyApply,
  params: Any,
  target_params: Any,
  teacher: Denoiser,
  x0: Array,
  rng: Array,
  *,
  num_levels: int = 18,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  solver: str = "heun",
  metric: str = "pseudo_huber",
  weighting: str = "ict",
  level_sampling: str = "uniform",
  p_mean: float = -1.1,
  p_std: float = 2.0,
) -> Array:
  """Per-example consistency distillation loss ([CM] Alg. 2), float32 [B].

  Draws a pair (sigma_i, sigma_{i+1}) of adjacent levels and z ~ N(0, I), x_{i+1} = x0 +
  sigma_{i+1} z, takes one teacher ODE step x^_i = Phi(x_{i+1}; sigma_{i+1} -> sigma_i) and returns
  lambda(sigma_i) d(f_theta(x_{i+1}, sigma_{i+1}), f_theta-(x^_i, sigma_i)).

  Args:
    f_apply: `f_apply(params, x [B, ...], sigma [B]) -> [B, ...]` (e.g. `consistency_fn` of a
      network with its params bound per call).
    params: the online (student) params; gradients flow only through these.
    target_params: the EMA target params theta^-.
    teacher: the teacher's denoiser D(x_ve, sigma) -> x0_hat (`continuous.make_denoiser`).
    x0: [B, ...] data.
    rng: PRNG key (levels and noise).
    num_levels: N, the number of levels ([CM]: 18 on CIFAR-10).
    sigma_min, sigma_max, rho: the Karras level grid.
    solver: the teacher's ODE step, 'euler' or 'heun' ([CM] uses Heun).
    metric: 'pseudo_huber' ([iCT]) or 'l2' (squared L2, summed over the example).
    weighting: 'ict' (lambda = 1 / (sigma_{i+1} - sigma_i)) or 'uniform' ([CM]: 1).
    level_sampling: 'uniform' ([CM]) or 'log_normal' ([iCT], with p_mean, p_std).

  Returns:
    float32 [B].
  """
  levels = karras_levels(num_levels, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  s_lo, s_hi, z = _draw(
    rng, x0, levels, num_levels, sampling=level_sampling, p_mean=p_mean, p_std=p_std
  )
  x_hi = x0.astype(jnp.float32) + _b(s_hi, z) * z
  x_lo = jax.lax.stop_gradient(ode_step(teacher, x_hi, s_hi, s_lo, solver=solver))
  return _pair_loss(
    f_apply, params, target_params, x_hi, s_hi, x_lo, s_lo, metric=metric, weighting=weighting
  )


def consistency_training_loss(
  f_apply: ConsistencyApply,
  params: Any,
  target_params: Any,
  x0: Array,
  rng: Array,
  *,
  step,
  total_steps: int,
  s0: int = 10,
  s1: int = 1280,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  metric: str = "pseudo_huber",
  weighting: str = "ict",
  level_sampling: str = "log_normal",
  p_mean: float = -1.1,
  p_std: float = 2.0,
) -> Array:
  """Per-example consistency training loss ([CM] Alg. 3 with [iCT]'s choices), float32 [B].

  No teacher: both points share one z, x_{i+1} = x0 + sigma_{i+1} z and x_i = x0 + sigma_i z, and
  the loss is lambda(sigma_i) d(f_theta(x_{i+1}, sigma_{i+1}), f_theta-(x_i, sigma_i)), with the
  number of levels N(step) from the [iCT] curriculum (`ict_num_levels`; jit-safe in `step`).

  Args:
    f_apply, params, target_params: as `consistency_distillation_loss` ([iCT]: target = params).
    x0: [B, ...] data.
    rng: PRNG key.
    step: the training step k (int or traced int32).
    total_steps: K, the run's planned number of steps.
    s0, s1: the curriculum's initial and final discretisation.
    sigma_min, sigma_max, rho, metric, weighting, level_sampling, p_mean, p_std: as
      `consistency_distillation_loss` (the defaults here are [iCT]'s).

  Returns:
    float32 [B].
  """
  n = ict_num_levels(step, total_steps, s0=s0, s1=s1)
  levels = karras_levels(n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, size=s1 + 1)
  s_lo, s_hi, z = _draw(rng, x0, levels, n, sampling=level_sampling, p_mean=p_mean, p_std=p_std)
  x = x0.astype(jnp.float32)
  return _pair_loss(
    f_apply,
    params,
    target_params,
    x + _b(s_hi, z) * z,
    s_hi,
    x + _b(s_lo, z) * z,
    s_lo,
    metric=metric,
    weighting=weighting,
  )


# ----------------------------------------------------------------------------- sampler


def consistency_step(
  f: ConsistencyFn, x: Array, sigma: Array, sigma_next: Array, noise: Array, *, sigma_min=0.002
) -> Array:
  """One step of [CM] Alg. 1: x0 = f(x, sigma), then x_next = x0 + sqrt(sigma_next^2 -
  sigma_min^2) noise (NFE 1). With sigma_next = sigma_min it returns f(x, sigma).

  Args:
    f: the consistency function `f(x, sigma)`.
    x: [B, ...] VE sample at sigma.
    sigma, sigma_next: scalars, sigma_next >= sigma_min.
    noise: [B, ...] standard normal noise.
    sigma_min: the consistency function's boundary level.

  Returns:
    [B, ...] sample at sigma_next, x's dtype.
  """
  x0 = f(x, sigma)
  # Both squares in float32, so that sigma_next = sigma_min gives exactly 0 noise.
  s_next, s_min = jnp.asarray(sigma_next, jnp.float32), jnp.asarray(sigma_min, jnp.float32)
  scale = jnp.sqrt(jnp.maximum(s_next**2 - s_min**2, 0.0))
  return (x0.astype(jnp.float32) + scale * noise.astype(jnp.float32)).astype(x.dtype)


def consistency_sample(
  f: ConsistencyFn, x_T: Array, levels: Array, rng: Array, *, sigma_min: float = 0.002
) -> Array:
  """Multistep consistency sampling ([CM] Alg. 1) with `len(levels)` model calls.

  x = f(levels[0] x_T, levels[0]); then for each next level tau: x = f(x + sqrt(tau^2 -
  sigma_min^2) z, tau). Runs on `sample_loop` over the grid [levels..., sigma_min]; step i draws
  its z from fold_in(rng, i).

  Args:
    f: the consistency function `f(x, sigma)`.
    x_T: [B, ...] standard normal noise (scaled by levels[0] = T here).
    levels: decreasing float [K] (T = levels[0] > ... > sigma_min), e.g. `sampling_levels(K)`.
    rng: PRNG key.
    sigma_min: the consistency function's boundary level.

  Returns:
    Samples [B, ...], x_T's dtype.
  """
  levels = jnp.asarray(levels, jnp.float32)
  if levels.ndim != 1 or levels.shape[0] < 1:
    raise ValueError(f"levels must be a non-empty 1-D array, got shape {levels.shape}")
  grid = jnp.concatenate([levels, jnp.full((1,), sigma_min, jnp.float32)])

  def step(x, i, sigma, sigma_next, key):
    del i
    noise = jax.random.normal(key, x.shape, x.dtype)
    return consistency_step(f, x, sigma, sigma_next, noise, sigma_min=sigma_min)

  x = (x_T.astype(jnp.float32) * levels[0]).astype(x_T.dtype)
  return sample_loop(step, x, grid, rng)[0]
