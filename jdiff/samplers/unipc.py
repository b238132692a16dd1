"""UniPC: the unified predictor-corrector multistep sampler, data prediction.

UniPC (`unipc_sample`): the multistep predictor UniP-p plus the corrector UniC, which reuses
the model call at the new point (the one the next step needs anyway) to correct that point
before stepping on, raising the order by one at no extra NFE ([UniPC] Alg. 1-3, B(h) =
e^h - 1 ('bh2') or h ('bh1')). UniP-2 with 'bh2' is exactly DPM-Solver++(2M).

References:
  [UniPC] Zhao, Bai, Rao, Zhou, Lu. UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models, NeurIPS 2023, eqs. 8-9 (B(h)), Alg. 2 (UniC), Alg. 3
    (multistep UniP); diffusers' `UniPCMultistepScheduler`.
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
  return UniPCState(
    x,
    x,
    jnp.zeros((order,) + x.shape, x.dtype),
    jnp.ones((order,), jnp.float32),
    jnp.int32(0),
    jnp.int32(0),
  )


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


def unipc_step(
  denoise: Denoiser,
  state: UniPCState,
  sigma: Array,
  sigma_next: Array,
  *,
  variant: str = "bh2",
  corrector: bool = True,
  max_order: Array | int = 3,
) -> UniPCState:
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
    offs = jnp.cumsum(hs[1:])  # lambda_{-1} - lambda_{-1-k}
    rks = jnp.concatenate([jnp.ones((1,), jnp.float32), -offs / h1])
    diffs = jnp.concatenate(
      [
        (denoised - ds[0])[None],
        (ds[1:] - ds[:1]) / (-offs / h1).astype(dt).reshape((-1,) + (1,) * x.ndim),
      ]
    )
    b_h, b = _unipc_b(h1, p, variant)
    rho = _masked_solve(rks, b, state.order_prev)
    rho = jnp.where(state.order_prev == 1, jnp.zeros_like(rho).at[0].set(0.5), rho)
    x_c = (
      jnp.exp(-h1).astype(dt) * state.x_prev
      + (-jnp.expm1(-h1)).astype(dt) * ds[0]
      - b_h.astype(dt) * _weighted(rho, diffs)
    )
    x = jnp.where(state.n > 0, x_c, x)

  h, sn, last = lambda_step(sigma, sigma_next)
  h = jnp.where(last, 1.0, h)
  order = jnp.minimum(jnp.minimum(state.n + 1, max_order), p)
  x_next = jnp.exp(-h).astype(dt) * x + (-jnp.expm1(-h)).astype(dt) * denoised
  if p > 1:
    offs = jnp.cumsum(hs[: p - 1])  # lambda - lambda_{-k}
    rks = -offs / h
    diffs = (ds[: p - 1] - denoised[None]) / rks.astype(dt).reshape((-1,) + (1,) * x.ndim)
    b_h, b = _unipc_b(h, p - 1, variant)
    rho = _masked_solve(rks, b, order - 1)
    rho = jnp.where(order == 2, jnp.zeros_like(rho).at[0].set(0.5), rho)
    x_next = x_next - b_h.astype(dt) * _weighted(rho, diffs)
  x_next = jnp.where(last, denoised, x_next)
  new_ds = jnp.concatenate([denoised[None], ds[:-1]])
  new_hs = jnp.concatenate([h[None], hs[:-1]])
  return UniPCState(x_next, x, new_ds, new_hs, order.astype(jnp.int32), state.n + 1)


def unipc_sample(
  denoise: Denoiser,
  x: Array,
  grid: Array,
  rng: Array,
  *,
  order: int = 2,
  variant: str = "bh2",
  corrector: bool = True,
  lower_order_final: bool = True,
  inpaint=None,
) -> Array:
  """UniPC ([UniPC] Alg. 3 with UniC): multistep UniP-p + UniC, data prediction.

  Deterministic. NFE = N on a grid ending with 0. A grid ending at sigma_min > 0
  (`grids.sigma_grid(final='sigma_min')`) gets one step more, to 0, which returns the
  denoiser's x0 at sigma_min (NFE N + 1): the sample lands on the clean, thresholded data
  prediction instead of x at sigma_min, which still holds sigma_min noise and the
  extrapolation's overshoot (values beyond the clip range).

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat` (`denoisers.make_denoiser`).
    x: [B, ...] VE sample at grid[0].
    grid: [N + 1] decreasing sigmas ending with 0 or with sigma_min.
    rng: PRNG key (unused: the sampler is deterministic).
    order: predictor order p in {1, 2, 3} (the corrector adds one).
    variant: 'bh2' (B(h) = e^h - 1, the paper's choice for guided / few-step sampling) or
      'bh1' (B(h) = h).
    corrector: apply UniC (False: plain UniP; order 2 'bh2' is then DPM-Solver++(2M)).
    lower_order_final: step i of N uses order <= N - i, as diffusers.
    inpaint: optional `editing.Inpaint` (see `driver.sample_loop`).

  Returns:
    x_0 samples [B, ...].
  """
  _check_unipc(order, variant)
  n_steps = grid.shape[0] - 1

  def step(state, i, s, s_next, key):
    del key
    max_order = n_steps - i if lower_order_final else order
    return unipc_step(
      denoise, state, s, s_next, variant=variant, corrector=corrector, max_order=max_order
    )

  state = sample_loop(
    step, unipc_init_state(x, order=order), grid, rng, inpaint=inpaint, space="ve"
  )
  # The step sigma_min -> 0 returns D(x, sigma_min), the inpainted pixels replaced at 0. The
  # grid may be traced (jit), so whether it ends above 0 is decided by `lax.cond`.
  to_zero = jnp.stack([grid[-1], jnp.zeros((), grid.dtype)])
  state = jax.lax.cond(
    grid[-1] > 0,
    lambda st: sample_loop(step, st, to_zero, rng, inpaint=inpaint, space="ve")[0],
    lambda st: st,
    state[0],
  )
  return state.x
