"""DPM-Solver++ multistep samplers (2M, 3M) and their SDE variants, data prediction.

The solvers integrate in lambda = log(alpha / sigma_vp) = -log sigma (half the log-SNR),
with the data prediction D = x0_hat, in the VE view x_ve = x_t / sqrt(alpha_bar) where the
exponential integrator reads ([DPM-Solver++] eq. 9 with alpha = 1):

  x_{i+1} = (sigma_{i+1} / sigma_i) x_i + (1 - e^{-h_i}) D_i + (higher-order terms),
  h_i = lambda_{i+1} - lambda_i.

The multistep history (the last two denoised predictions and step sizes) lives in the scan
carry (`DPMState`); the first step is 1st order (and the second 2nd order for 3M). A step to
sigma = 0 returns the denoised prediction itself (k-diffusion / diffusers' final step).
Every sampler makes one model call per step: NFE = num_steps.

Lower order at the end (`lower_order_final`, diffusers' default): step i of N uses order at
most N - i, so the second-to-last step of 3M is 2nd order. At few steps the last steps are
the largest in lambda and a 3rd-order extrapolation over them is unstable; for N >= 15 the
change is negligible ([DPM-Solver++] Sec. 6 / diffusers' `lower_order_final`).

SDE variants (eta > 0): the data-prediction SDE solver of [DPM-Solver++] Sec. 5 /
diffusers' 'sde-dpmsolver++': x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i
+ (1 - e^{-(1+eta) h}) D_i + ... + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z; eta = 1 is the SDE
of [DPM-Solver++], eta = 0 the ODE solver.

References:
  [DPM-Solver++] Lu, Zhou, Bao, Chen, Li, Zhu. DPM-Solver++: Fast Solver for Guided Sampling
    of Diffusion Probabilistic Models, 2022, Algorithm 2 (2M) and Sec. 5.
  [k-diffusion] Crowson, `sample_dpmpp_2m`, `sample_dpmpp_2m_sde`, `sample_dpmpp_3m_sde`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdiff import continuous
from jdiff.samplers.driver import sample_loop
from jdiff.samplers.grids import lambda_step

Array = jax.Array
Denoiser = continuous.Denoiser


class DPMState(NamedTuple):
  """Carry of the multistep solvers.

  Attributes:
    x: [B, ...] current VE sample.
    denoised_1, denoised_2: [B, ...] the previous two data predictions (newest first).
    h_1, h_2: float32 scalars, the previous two step sizes in lambda.
    n: int32 scalar, number of steps taken (how much history is valid).
  """

  x: Array
  denoised_1: Array
  denoised_2: Array
  h_1: Array
  h_2: Array
  n: Array


def init_state(x: Array) -> DPMState:
  """An empty history for the VE sample x [B, ...]."""
  z = jnp.zeros_like(x)
  return DPMState(x, z, z, jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))


def _solver_step(update, name, denoise, state, sigma, sigma_next, noise, *, eta, s_noise, **kw):
  """One multistep solver step around `update(state, denoised, h, sigma, sigma_next, eta=,
  **kw) -> x_next (deterministic part)`: the model call, the SDE noise, the jump to 0, the
  new history. NFE 1."""
  x = state.x
  denoised = denoise(x, sigma)
  h, sn, last = lambda_step(sigma, sigma_next)
  x_next = update(state, denoised, h, sigma, sn, eta=eta, **kw)
  if eta > 0:
    if noise is None:
      raise ValueError(f"{name} with eta={eta} needs noise")
    std = sn * jnp.sqrt(-jnp.expm1(-2.0 * (eta * h))) * s_noise
    x_next = x_next + std.astype(x.dtype) * noise.astype(x.dtype)
  x_next = jnp.where(last, denoised, x_next)
  return DPMState(x_next, denoised, state.denoised_1, h, state.h_1, state.n + 1)


def _update_2m(state: DPMState, denoised: Array, h, sigma, sn, *, eta: float) -> Array:
  x = state.x
  eta_h = eta * h
  one_minus = -jnp.expm1(-h - eta_h)
  x_next = (sn / sigma * jnp.exp(-eta_h)).astype(x.dtype) * x + one_minus.astype(x.dtype) * denoised
  r = state.h_1 / h
  second = (0.5 * one_minus / r).astype(x.dtype) * (denoised - state.denoised_1)
  return x_next + jnp.where(state.n > 0, second, 0.0).astype(x.dtype)


def _update_3m(state: DPMState, denoised: Array, h, sigma, sn, *, eta: float, max_order) -> Array:
  del sigma, sn  # e^{-(1 + eta) h} = (sn / sigma) e^{-eta h}, written in h alone
  x = state.x
  h_eta = h * (eta + 1.0)
  x_next = jnp.exp(-h_eta).astype(x.dtype) * x + (-jnp.expm1(-h_eta)).astype(x.dtype) * denoised
  phi_2 = jnp.expm1(-h_eta) / h_eta + 1.0
  phi_3 = phi_2 / h_eta - 0.5
  # 2nd order (one previous prediction).
  r = state.h_1 / h
  d_2nd = (denoised - state.denoised_1) / r.astype(x.dtype)
  # 3rd order (two previous predictions).
  r0, r1 = state.h_1 / h, state.h_2 / h
  d1_0 = (denoised - state.denoised_1) / r0.astype(x.dtype)
  d1_1 = (state.denoised_1 - state.denoised_2) / r1.astype(x.dtype)
  d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1)).astype(x.dtype)
  # h^2 D'': the second divided difference (d1_0 - d1_1) / (r0 + r1) is h^2 D'' / 2, hence
  # the 2. k-diffusion's and diffusers' 3M updates omit it, which leaves the method second
  # order (global error / 4 instead of / 8 when h halves; tests/test_samplers_fast.py).
  d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1).astype(x.dtype)
  corr3 = phi_2.astype(x.dtype) * d1 - phi_3.astype(x.dtype) * d2
  corr2 = phi_2.astype(x.dtype) * d_2nd
  order = jnp.minimum(state.n + 1, max_order)
  corr = jnp.where(order >= 3, corr3, jnp.where(order == 2, corr2, 0.0))
  return x_next + corr.astype(x.dtype)


def dpmpp_2m_step(denoise: Denoiser, state: DPMState, sigma, sigma_next, noise=None, **options):
  """One DPM-Solver++(2M) step ([DPM-Solver++] Alg. 2; eta > 0: its SDE variant). NFE 1.

  With r = h_{i-1} / h_i the 2nd-order term uses the midpoint form
  D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}.

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat`.
    state: the `DPMState` at sigma.
    sigma, sigma_next: scalars, sigma > sigma_next >= 0.
    noise: [B, ...] standard normal noise (required when eta > 0).
    **options: `eta` (0, the ODE solver; 1, DPM-Solver++(2M) SDE) and `s_noise` (1, the
      scale of the injected noise).

  Returns:
    the `DPMState` at sigma_next.
  """
  options = dict(eta=0.0, s_noise=1.0) | options
  return _solver_step(
    _update_2m, "dpmpp_2m_step", denoise, state, sigma, sigma_next, noise, **options
  )


def dpmpp_3m_step(denoise: Denoiser, state: DPMState, sigma, sigma_next, noise=None, **options):
  """One DPM-Solver++(3M) step (k-diffusion's `sample_dpmpp_3m_sde`; eta = 0: ODE). NFE 1.

  Uses the phi-functions phi_2 = (e^{-h} - 1)/h + 1, phi_3 = phi_2 / h - 1/2 of the
  exponential integrator with the divided differences of the last three predictions
  ([DPM-Solver++] Sec. 4 / App. for the multistep 3rd order).

  Args: as `dpmpp_2m_step`, plus the option
    max_order: int (may be traced; 3), caps the order of this step (1, 2 or 3); the sampler
      passes N - i for `lower_order_final`.
  """
  options = dict(eta=0.0, s_noise=1.0, max_order=3) | options
  return _solver_step(
    _update_3m, "dpmpp_3m_step", denoise, state, sigma, sigma_next, noise, **options
  )


def _multistep(
  step_fn, denoise, x, grid, rng, *, eta=0.0, s_noise=1.0, inpaint=None, order_cap=None
):
  """Runs a multistep solver over the grid; `order_cap(i, n)` caps the order of step i."""
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  n = grid.shape[0] - 1

  def step(state, i, s, s_next, key):
    noise = jax.random.normal(key, state.x.shape, state.x.dtype) if eta > 0 else None
    kw = {} if order_cap is None else dict(max_order=order_cap(i, n))
    return step_fn(denoise, state, s, s_next, noise, eta=eta, s_noise=s_noise, **kw)

  return sample_loop(step, init_state(x), grid, rng, inpaint=inpaint, space="ve")[0].x


def dpmpp_2m_sample(
  denoise: Denoiser,
  x: Array,
  grid: Array,
  rng: Array,
  *,
  eta: float = 0.0,
  s_noise: float = 1.0,
  inpaint=None,
) -> Array:
  """DPM-Solver++(2M) ([DPM-Solver++] Alg. 2). NFE = N.

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat` (`denoisers.make_denoiser`).
    x: [B, ...] VE sample at grid[0].
    grid: [N + 1] decreasing sigmas: ending with 0 (the jump to 0 returns the last data
      prediction) or with sigma_min (`grids.sigma_grid(final='sigma_min')`: every call a
      solver step, the sample at sigma_min is returned).
    rng: PRNG key (used only when eta > 0).
    eta: 0 for the ODE solver; > 0 injects noise (see `dpmpp_2m_sde_sample`).
    s_noise: noise scale for eta > 0.
    inpaint: optional `editing.Inpaint` (see `driver.sample_loop`).

  Returns:
    x_0 samples [B, ...].
  """
  return _multistep(dpmpp_2m_step, denoise, x, grid, rng, eta=eta, s_noise=s_noise, inpaint=inpaint)


def dpmpp_2m_sde_sample(
  denoise: Denoiser, x: Array, grid: Array, rng: Array, *, eta: float = 1.0, **kwargs
) -> Array:
  """DPM-Solver++(2M) SDE ([DPM-Solver++] Sec. 5): `dpmpp_2m_sample` with eta = 1. NFE = N."""
  return dpmpp_2m_sample(denoise, x, grid, rng, eta=eta, **kwargs)


def dpmpp_3m_sample(
  denoise: Denoiser, x: Array, grid: Array, rng: Array, *, lower_order_final=False, **options
) -> Array:
  """DPM-Solver++(3M); eta > 0 gives the 3M SDE variant. NFE = N.

  Args: as `dpmpp_2m_sample` (options eta, s_noise, inpaint), plus
    lower_order_final: step i of N uses order <= N - i (the second-to-last step is 2nd
      order), as diffusers' `lower_order_final` (their default for N < 15; here off by
      default, it lost at NFE 10 in experiments/benchmark_samplers.py).
  """
  cap = (lambda i, n: n - i) if lower_order_final else (lambda i, n: 3)
  return _multistep(dpmpp_3m_step, denoise, x, grid, rng, order_cap=cap, **options)
