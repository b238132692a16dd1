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

UniPC (`unipc_sample`): the multistep predictor UniP-p plus the corrector UniC, which reuses
the model call at the new point (the one the next step needs anyway) to correct that point
before stepping on, raising the order by one at no extra NFE ([UniPC] Alg. 1-3, B(h) =
e^h - 1 ('bh2') or h ('bh1')). UniP-2 with 'bh2' is exactly DPM-Solver++(2M).

SDE variants (eta > 0): the data-prediction SDE solver of [DPM-Solver++] Sec. 5 /
diffusers' 'sde-dpmsolver++': x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i
+ (1 - e^{-(1+eta) h}) D_i + ... + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z; eta = 1 is the SDE
of [DPM-Solver++], eta = 0 the ODE solver.

References:
  [DPM-Solver++] Lu, Zhou, Bao, Chen, Li, Zhu. DPM-Solver++: Fast Solver for Guided Sampling
    of Diffusion Probabilistic Models, 2022, Algorithm 2 (2M) and Sec. 5.
  [k-diffusion] Crowson, `sample_dpmpp_2m`, `sample_dpmpp_2m_sde`, `sample_dpmpp_3m_sde`.
  [UniPC] Zhao, Bai, Rao, Zhou, Lu. UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models, NeurIPS 2023, eqs. 8-9 (B(h)), Alg. 2 (UniC), Alg. 3
    (multistep UniP); diffusers' `UniPCMultistepScheduler`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdiff.samplers import sigma as sigma_lib
from jdiff.samplers.driver import sample_loop
from jdiff.samplers.grids import FINAL_SIGMAS, sigma_grid
from jdiff.samplers.karras import prepare
from jdiff.schedules import Schedule

Array = jax.Array
Denoiser = sigma_lib.Denoiser


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


def _lambda_step(sigma, sigma_next):
  """(h = lambda_next - lambda, safe sigma_next, is_last) with lambda = -log sigma."""
  last = sigma_next <= 0
  sn = jnp.where(last, 1.0, sigma_next)
  return jnp.log(sigma) - jnp.log(sn), sn, last


def dpmpp_2m_step(denoise: Denoiser, state: DPMState, sigma: Array, sigma_next: Array,
                  noise: Array | None = None, *, eta: float = 0.0,
                  s_noise: float = 1.0) -> DPMState:
  """One DPM-Solver++(2M) step ([DPM-Solver++] Alg. 2; eta > 0: its SDE variant). NFE 1.

  With r = h_{i-1} / h_i the 2nd-order term uses the midpoint form
  D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}.

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat`.
    state: the `DPMState` at sigma.
    sigma, sigma_next: scalars, sigma > sigma_next >= 0.
    noise: [B, ...] standard normal noise (required when eta > 0).
    eta: 0 for the ODE solver, 1 for DPM-Solver++(2M) SDE.
    s_noise: scale of the injected noise.

  Returns:
    the `DPMState` at sigma_next.
  """
  x = state.x
  denoised = denoise(x, sigma)
  h, sn, last = _lambda_step(sigma, sigma_next)
  eta_h = eta * h
  one_minus = -jnp.expm1(-h - eta_h)
  x_next = (sn / sigma * jnp.exp(-eta_h)).astype(x.dtype) * x + one_minus.astype(x.dtype) * denoised
  r = state.h_1 / h
  second = (0.5 * one_minus / r).astype(x.dtype) * (denoised - state.denoised_1)
  x_next = x_next + jnp.where(state.n > 0, second, 0.0).astype(x.dtype)
  if eta > 0:
    if noise is None:
      raise ValueError(f"dpmpp_2m_step with eta={eta} needs noise")
    std = sn * jnp.sqrt(-jnp.expm1(-2.0 * eta_h)) * s_noise
    x_next = x_next + std.astype(x.dtype) * noise.astype(x.dtype)
  x_next = jnp.where(last, denoised, x_next)
  return DPMState(x_next, denoised, state.denoised_1, h, state.h_1, state.n + 1)


def dpmpp_3m_step(denoise: Denoiser, state: DPMState, sigma: Array, sigma_next: Array,
                  noise: Array | None = None, *, eta: float = 0.0, s_noise: float = 1.0,
                  max_order: Array | int = 3) -> DPMState:
  """One DPM-Solver++(3M) step (k-diffusion's `sample_dpmpp_3m_sde`; eta = 0: ODE). NFE 1.

  Uses the phi-functions phi_2 = (e^{-h} - 1)/h + 1, phi_3 = phi_2 / h - 1/2 of the
  exponential integrator with the divided differences of the last three predictions
  ([DPM-Solver++] Sec. 4 / App. for the multistep 3rd order).

  Args: as `dpmpp_2m_step`, plus
    max_order: int (may be traced), caps the order of this step (1, 2 or 3); the sampler
      passes N - i for `lower_order_final`.
  """
  x = state.x
  denoised = denoise(x, sigma)
  h, sn, last = _lambda_step(sigma, sigma_next)
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
  d2 = (d1_0 - d1_1) / (r0 + r1).astype(x.dtype)
  corr3 = phi_2.astype(x.dtype) * d1 - phi_3.astype(x.dtype) * d2
  corr2 = phi_2.astype(x.dtype) * d_2nd
  order = jnp.minimum(state.n + 1, max_order)
  corr = jnp.where(order >= 3, corr3, jnp.where(order == 2, corr2, 0.0))
  x_next = x_next + corr.astype(x.dtype)
  if eta > 0:
    if noise is None:
      raise ValueError(f"dpmpp_3m_step with eta={eta} needs noise")
    std = sn * jnp.sqrt(-jnp.expm1(-2.0 * h * eta)) * s_noise
    x_next = x_next + std.astype(x.dtype) * noise.astype(x.dtype)
  x_next = jnp.where(last, denoised, x_next)
  return DPMState(x_next, denoised, state.denoised_1, h, state.h_1, state.n + 1)


def _grid_and_start(schedule, x_T, *, num_steps, spacing, rho, grid, final_sigma):
  """(sigma grid, VE start); final_sigma='sigma_min' ends the grid at sigma_min (no 0)."""
  if final_sigma not in FINAL_SIGMAS:
    raise ValueError(f"unknown final_sigma {final_sigma!r}; choose one of {FINAL_SIGMAS}")
  if final_sigma == "zero" or grid is not None:
    if grid is not None and final_sigma != "zero":
      raise ValueError(f"final_sigma={final_sigma!r} applies to generated grids; an explicit "
                       "grid must end with 0")
    return prepare(schedule, x_T, num_steps=num_steps, spacing=spacing, rho=rho, grid=grid)
  grid = sigma_grid(schedule, num_steps, spacing=spacing, rho=rho, final=final_sigma)
  return grid, x_T * jnp.sqrt(1.0 + grid[0] ** 2).astype(x_T.dtype)


def _sample(step_fn, schedule, model_fn, x_T, rng, *, eta, s_noise, num_steps, spacing, rho,
            grid, cond, prediction, final_sigma="zero", lower_order_final=None):
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  denoise = sigma_lib.make_denoiser(schedule, model_fn, cond=cond, prediction=prediction)
  grid, x = _grid_and_start(schedule, x_T, num_steps=num_steps, spacing=spacing, rho=rho,
                            grid=grid, final_sigma=final_sigma)
  n_steps = grid.shape[0] - 1

  def step(state, i, s, s_next, key):
    noise = jax.random.normal(key, state.x.shape, state.x.dtype) if eta > 0 else None
    kw = {} if lower_order_final is None else dict(
        max_order=n_steps - i if lower_order_final else 3)
    return step_fn(denoise, state, s, s_next, noise, eta=eta, s_noise=s_noise, **kw)

  return sample_loop(step, init_state(x), grid, rng)[0].x


def dpmpp_2m_sample(schedule: Schedule, model_fn, x_T: Array, rng: Array, *,
                    num_steps: int = 20, eta: float = 0.0, s_noise: float = 1.0,
                    spacing: str = "karras", rho: float = 7.0, grid: Array | None = None,
                    cond: Array | None = None, prediction: str = "eps",
                    final_sigma: str = "zero") -> Array:
  """DPM-Solver++(2M) ([DPM-Solver++] Alg. 2). NFE = num_steps.

  Args:
    schedule: the `Schedule` the model was trained with.
    model_fn: `model_fn(x_t, t, cond)`, called with float32 fractional t [B].
    x_T: [B, ...] standard normal starting noise.
    rng: PRNG key (used only when eta > 0).
    num_steps: number of sigma levels N.
    eta: 0 for the ODE solver; > 0 injects noise (see `dpmpp_2m_sde_sample`).
    s_noise: noise scale for eta > 0.
    spacing, rho: the sigma grid (see `grids.sigma_grid`).
    grid: explicit decreasing sigma grid ending with 0 (overrides num_steps / spacing).
    cond: conditioning passed to model_fn.
    prediction: 'eps', 'x0' or 'v'.
    final_sigma: 'zero' (N levels, then the jump to sigma = 0 returns the last data
      prediction) or 'sigma_min' (N + 1 levels down to sigma_min, every call a solver step,
      the sample at sigma_min is returned; see `grids.sigma_grid`).

  Returns:
    x_0 samples [B, ...].
  """
  return _sample(dpmpp_2m_step, schedule, model_fn, x_T, rng, eta=eta, s_noise=s_noise,
                 num_steps=num_steps, spacing=spacing, rho=rho, grid=grid, cond=cond,
                 prediction=prediction, final_sigma=final_sigma)


def dpmpp_2m_sde_sample(schedule: Schedule, model_fn, x_T: Array, rng: Array, *,
                        num_steps: int = 20, eta: float = 1.0, s_noise: float = 1.0,
                        spacing: str = "karras", rho: float = 7.0, grid: Array | None = None,
                        cond: Array | None = None, prediction: str = "eps",
                        final_sigma: str = "zero") -> Array:
  """DPM-Solver++(2M) SDE ([DPM-Solver++] Sec. 5; eta = 1). NFE = num_steps.

  Args: as `dpmpp_2m_sample`.
  """
  return _sample(dpmpp_2m_step, schedule, model_fn, x_T, rng, eta=eta, s_noise=s_noise,
                 num_steps=num_steps, spacing=spacing, rho=rho, grid=grid, cond=cond,
                 prediction=prediction, final_sigma=final_sigma)


def dpmpp_3m_sample(schedule: Schedule, model_fn, x_T: Array, rng: Array, *,
                    num_steps: int = 20, eta: float = 0.0, s_noise: float = 1.0,
                    spacing: str = "karras", rho: float = 7.0, grid: Array | None = None,
                    cond: Array | None = None, prediction: str = "eps",
                    final_sigma: str = "zero", lower_order_final: bool = False) -> Array:
  """DPM-Solver++(3M); eta > 0 gives the 3M SDE variant. NFE = num_steps.

  Args: as `dpmpp_2m_sample`, plus
    lower_order_final: step i of N uses order <= N - i (the second-to-last step is 2nd
      order), as diffusers' `lower_order_final` (their default for N < 15; here off by
      default, it lost at NFE 10 in experiments/benchmark_samplers.py).
  """
  return _sample(dpmpp_3m_step, schedule, model_fn, x_T, rng, eta=eta, s_noise=s_noise,
                 num_steps=num_steps, spacing=spacing, rho=rho, grid=grid, cond=cond,
                 prediction=prediction, final_sigma=final_sigma,
                 lower_order_final=bool(lower_order_final))


# ----------------------------------------------------------------------------- UniPC

UNIPC_VARIANTS = ("bh1", "bh2")


class UniPCState(NamedTuple):
  """Carry of `unipc_step` for predictor order p.

  Attributes:
    x: [B, ...] current VE sample, as predicted (not yet corrected).
    x_prev: [B, ...] the (corrected) sample at the previous level, the corrector's base.
    denoised: [p, B, ...] the previous p data predictions, newest first.
    h: [p] float32, the previous p step sizes in lambda, newest first.
    order_prev: int32 scalar, the order of the previous predictor step (the corrector's).
    n: int32 scalar, number of steps taken.
  """
  x: Array
  x_prev: Array
  denoised: Array
  h: Array
  order_prev: Array
  n: Array


def unipc_init_state(x: Array, *, order: int = 2) -> UniPCState:
  """An empty `UniPCState` for the VE sample x [B, ...] and predictor order `order`."""
  _check_unipc(order, "bh2")
  return UniPCState(x, x, jnp.zeros((order,) + x.shape, x.dtype),
                    jnp.ones((order,), jnp.float32), jnp.int32(0), jnp.int32(0))


def _check_unipc(order, variant) -> None:
  if not isinstance(order, int) or not 1 <= order <= 3:
    raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
  if variant not in UNIPC_VARIANTS:
    raise ValueError(f"unknown UniPC variant {variant!r}; choose one of {UNIPC_VARIANTS}")


def _unipc_b(h: Array, k: int, variant: str) -> tuple[Array, Array]:
  """(B(h), b [k]) of [UniPC] eq. 8 for data prediction, with hh = -h.

  b_i = i! phi_{i+1}(hh) / B(h), where hh phi_1(hh) = e^hh - 1 and the phi-functions follow
  phi_{i+1}(hh) = (phi_i(hh) - 1 / i!) / hh (the recursion of the paper's code and diffusers).
  """
  hh = -h
  h_phi = jnp.expm1(hh) / hh - 1.0
  b_h = hh if variant == "bh1" else jnp.expm1(hh)
  b, fact = [], 1.0
  for i in range(1, k + 1):
    b.append(h_phi * fact / b_h)
    fact *= i + 1
    h_phi = h_phi / hh - 1.0 / fact
  return b_h, jnp.stack(b) if b else jnp.zeros((0,), jnp.float32)


def _masked_solve(rks: Array, b: Array, active: Array) -> Array:
  """Solves sum_k rks_k^i rho_k = b_i (i < active) for the first `active` rho, others 0.

  The inactive rows and columns are replaced by the identity (rhs 0), so one fixed-size
  solve serves every order a traced step may take (warm-up, lower order at the end).
  """
  k = rks.shape[0]
  rows, row = [], jnp.ones_like(rks)
  for _ in range(k):  # Vandermonde rows rks^i by products (rks < 0 allowed).
    rows.append(row)
    row = row * rks
  idx = jnp.arange(k)
  mask = (idx[:, None] < active) & (idx[None, :] < active)
  r = jnp.where(mask, jnp.stack(rows), jnp.eye(k, dtype=rks.dtype))
  return jnp.linalg.solve(r, jnp.where(idx < active, b, 0.0))


def _weighted(rho: Array, d: Array) -> Array:
  """sum_k rho_k d_k for rho [k], d [k, B, ...]."""
  return jnp.tensordot(rho.astype(d.dtype), d, axes=1)


def unipc_step(denoise: Denoiser, state: UniPCState, sigma: Array, sigma_next: Array, *,
               variant: str = "bh2", corrector: bool = True,
               max_order: Array | int = 3) -> UniPCState:
  """One UniPC step: UniC-q corrects x at sigma, then UniP-p predicts x at sigma_next. NFE 1.

  The model is called once, at the predicted x; that prediction D drives both the corrector
  of x (order q = the previous step's order, [UniPC] Alg. 2) and the predictor from the
  corrected x (order p = min(order, steps taken + 1, max_order), Alg. 3). With r_k the
  previous lambda offsets over the step h and D_k the divided differences (D_k - D) / r_k,

    x_next = (sigma_next / sigma) x + (1 - e^{-h}) D - B(h) sum_k rho_k D_k,

  rho solving the Vandermonde system R rho = b of eq. 8 (rho = 1/2 for p = 2 and q = 1, as
  the paper's code). A step to sigma = 0 returns D.

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat`.
    state: the `UniPCState` at sigma (its `denoised.shape[0]` is the predictor order).
    sigma, sigma_next: scalars, sigma > sigma_next >= 0.
    variant: 'bh2' (B(h) = e^h - 1) or 'bh1' (B(h) = h).
    corrector: apply UniC (False gives the plain multistep UniP).
    max_order: caps the predictor order of this step (may be traced).

  Returns:
    the `UniPCState` at sigma_next.
  """
  p = state.denoised.shape[0]
  _check_unipc(p, variant)
  x, ds, hs = state.x, state.denoised, state.h
  dt = x.dtype
  denoised = denoise(x, sigma)

  if corrector:  # UniC over the previous step h_1 = hs[0], from x_prev with base ds[0].
    h1 = hs[0]
    offs = jnp.cumsum(hs[1:])                                    # lambda_{-1} - lambda_{-1-k}
    rks = jnp.concatenate([jnp.ones((1,), jnp.float32), -offs / h1])
    diffs = jnp.concatenate([(denoised - ds[0])[None],
                             (ds[1:] - ds[:1]) / (-offs / h1).astype(dt).reshape(
                                 (-1,) + (1,) * x.ndim)])
    b_h, b = _unipc_b(h1, p, variant)
    rho = _masked_solve(rks, b, state.order_prev)
    rho = jnp.where(state.order_prev == 1, jnp.zeros_like(rho).at[0].set(0.5), rho)
    x_c = (jnp.exp(-h1).astype(dt) * state.x_prev + (-jnp.expm1(-h1)).astype(dt) * ds[0]
           - b_h.astype(dt) * _weighted(rho, diffs))
    x = jnp.where(state.n > 0, x_c, x)

  h, sn, last = _lambda_step(sigma, sigma_next)
  h = jnp.where(last, 1.0, h)
  order = jnp.minimum(jnp.minimum(state.n + 1, max_order), p)
  x_next = jnp.exp(-h).astype(dt) * x + (-jnp.expm1(-h)).astype(dt) * denoised
  if p > 1:
    offs = jnp.cumsum(hs[:p - 1])                                # lambda - lambda_{-k}
    rks = -offs / h
    diffs = (ds[:p - 1] - denoised[None]) / rks.astype(dt).reshape((-1,) + (1,) * x.ndim)
    b_h, b = _unipc_b(h, p - 1, variant)
    rho = _masked_solve(rks, b, order - 1)
    rho = jnp.where(order == 2, jnp.zeros_like(rho).at[0].set(0.5), rho)
    x_next = x_next - b_h.astype(dt) * _weighted(rho, diffs)
  x_next = jnp.where(last, denoised, x_next)
  new_ds = jnp.concatenate([denoised[None], ds[:-1]])
  new_hs = jnp.concatenate([h[None], hs[:-1]])
  return UniPCState(x_next, x, new_ds, new_hs, order.astype(jnp.int32), state.n + 1)


def unipc_sample(schedule: Schedule, model_fn, x_T: Array, rng: Array, *,
                 num_steps: int = 20, order: int = 2, variant: str = "bh2",
                 corrector: bool = True, lower_order_final: bool = True,
                 spacing: str = "log_snr", rho: float = 7.0, grid: Array | None = None,
                 cond: Array | None = None, prediction: str = "eps",
                 final_sigma: str = "zero") -> Array:
  """UniPC ([UniPC] Alg. 3 with UniC): multistep UniP-p + UniC, data prediction. NFE = N.

  Deterministic. The default
  log-SNR grid is the one [DPM-Solver] Sec. 3.3 recommends for exponential integrators.

  Args:
    schedule: the `Schedule` the model was trained with.
    model_fn: `model_fn(x_t, t, cond)`, called with float32 fractional t [B].
    x_T: [B, ...] standard normal starting noise.
    rng: PRNG key (unused: the sampler is deterministic).
    num_steps: number of sigma levels N.
    order: predictor order p in {1, 2, 3} (the corrector adds one).
    variant: 'bh2' (B(h) = e^h - 1, the paper's choice for guided / few-step sampling) or
      'bh1' (B(h) = h).
    corrector: apply UniC (False: plain UniP; order 2 'bh2' is then DPM-Solver++(2M)).
    lower_order_final: step i of N uses order <= N - i, as diffusers.
    spacing, rho: the sigma grid (see `grids.sigma_grid`).
    grid: explicit decreasing sigma grid ending with 0 (overrides num_steps / spacing).
    cond: conditioning passed to model_fn.
    prediction: 'eps', 'x0' or 'v'.
    final_sigma: 'zero' or 'sigma_min', as `dpmpp_2m_sample` (with 'sigma_min' the last
      predicted sample is returned uncorrected: correcting it would cost one more call).

  Returns:
    x_0 samples [B, ...].
  """
  _check_unipc(order, variant)
  denoise = sigma_lib.make_denoiser(schedule, model_fn, cond=cond, prediction=prediction)
  grid, x = _grid_and_start(schedule, x_T, num_steps=num_steps, spacing=spacing, rho=rho,
                            grid=grid, final_sigma=final_sigma)
  n_steps = grid.shape[0] - 1

  def step(state, i, s, s_next, key):
    del key
    return unipc_step(denoise, state, s, s_next, variant=variant, corrector=corrector,
                      max_order=n_steps - i if lower_order_final else order)

  return sample_loop(step, unipc_init_state(x, order=order), grid, rng)[0].x
