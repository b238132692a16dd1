"""Optimised sigma grids for few-step sampling, fitted to one model and one sampler.

Given a sampler that takes an explicit sigma grid, a model and a calibration batch of
starting noises x_T, `optimize_grid` finds the N + 1-point grid

  sigma_max = s_0 > s_1 > ... > s_{N-1} > s_N = 0,   s_{N-1} >= sigma_min,

whose N-step samples come closest, in mean squared error, to a reference solution from the
same x_T (the caller's choice; e.g. the same sampler's 200-step solution on the log-SNR grid,
which on a deterministic sampler is the ODE solution up to a negligible error).

The objective is the direct discretisation error of the sampler against its own many-step
solution, as in the "optimised steps" family of methods (e.g. Xue et al. 2024, "Accelerating
Diffusion Sampling with Optimized Time Steps"; Watson et al. 2021 fit grids to a different
target). It is NOT the objective of Align Your Steps (Sabour et al. 2024), which minimises a
KL-divergence upper bound (KLUB) between the discretised and the true SDE path measures; only
the search method below resembles AYS's (iterative coordinate refinement of one point at a
time between its neighbours). A grid fitted this way is specific to the sampler, the NFE and
the model it was fitted on.

Search: the interior points are parameterised by their log-sigma. Each sweep visits
s_1 .. s_{N-1} in turn and evaluates K candidate positions of that point (the current one
and K - 1 others on a window around it, in fractions of the log-sigma interval between its
neighbours; the window halves every sweep) as one jitted, vmapped call, and keeps the best.
The loss on the calibration batch therefore never increases, and the grid stays strictly
decreasing by construction.

Storage beside the model (`<workdir>/grids/<sampler>_nfe<NFE>.json`, which `sample.grid_file`
points `samplers.registry.make_sample_fn` to) is `jdiff.samplers.grid_files`: this module is
pure and writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

OBJECTIVE = "mse_to_reference"
# Samplers whose model calls are 2N - 1 for N steps (Heun's trapezoid, no correction at 0).
_TWO_CALL_SAMPLERS = ("heun", "edm")


class OptimizedGrid(NamedTuple):
  """Result of `optimize_grid`.

  Attributes:
    grid: float32 [N + 1] host array, strictly decreasing, ending with 0.
    loss_init: the calibration loss of the initial grid.
    loss: the calibration loss of `grid`.
    history: the loss after each sweep.
  """

  grid: np.ndarray
  loss_init: float
  loss: float
  history: tuple[float, ...]


def log_snr_init(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
  """The grid uniform in log sigma from sigma_max to sigma_min, then 0: float32 [N + 1]."""
  if num_steps < 2:
    raise ValueError(f"an optimised grid needs num_steps >= 2 (interior points), got {num_steps}")
  sig = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))
  return np.concatenate([sig, [0.0]]).astype(np.float32)


def mse_loss(sample_fn: Callable[[Array, Array], Array], x_T: Array, reference: Array):
  """`loss(grid) = mean((sample_fn(grid, x_T) - reference)^2)`, a scalar per grid [N + 1]."""

  def loss(grid: Array) -> Array:
    x = sample_fn(grid, x_T)
    return jnp.mean((x.astype(jnp.float32) - reference.astype(jnp.float32)) ** 2)

  return loss


def optimize_grid(
  loss_fn: Callable[[Array], Array],
  init_grid,
  *,
  sigma_min: float,
  sweeps: int = 4,
  candidates: int = 9,
  min_gap: float = 0.02,
) -> OptimizedGrid:
  """Coordinate refinement of the interior points of a sigma grid (module docstring).

  Args:
    loss_fn: `loss_fn(grid [N + 1]) -> scalar`, traceable (it is vmapped over candidate
      grids and jitted once); e.g. `mse_loss(sampler, x_T, reference)`.
    init_grid: [N + 1] strictly decreasing grid ending with 0, N >= 2; its first point
      (sigma_max) and the final 0 stay fixed.
    sigma_min: lower bound of s_{N-1} (the smallest noise level the model was trained at).
    sweeps: passes over the interior points; the search window halves after each.
    candidates: K positions tried per point and visit (the current one included), >= 2.
    min_gap: candidates stay this fraction of the log-sigma interval away from the
      neighbours, so the grid is strictly decreasing.

  Returns:
    `OptimizedGrid` (its loss is <= the initial loss).
  """
  g = np.asarray(init_grid, np.float64)
  n = g.shape[0] - 1
  if g.ndim != 1 or n < 2 or g[-1] != 0.0 or np.any(np.diff(g) >= 0):
    raise ValueError(f"init_grid must be strictly decreasing, end with 0, N >= 2; got {g}")
  if not 0.0 < sigma_min <= g[n - 1] * (1.0 + 1e-6):
    raise ValueError(f"sigma_min={sigma_min} must be in (0, init_grid[N-1]={g[n - 1]}]")
  if sweeps < 1 or candidates < 2:
    raise ValueError(f"need sweeps >= 1 and candidates >= 2, got {sweeps}, {candidates}")
  batched = jax.jit(jax.vmap(loss_fn))
  logs = np.log(g[:-1])  # [N]: log s_0 .. log s_{N-1}
  log_floor = math.log(sigma_min)
  offsets = np.linspace(-1.0, 1.0, candidates - 1)

  def grids_of(log_rows: np.ndarray) -> jnp.ndarray:
    k = log_rows.shape[0]
    return jnp.asarray(np.concatenate([np.exp(log_rows), np.zeros((k, 1))], 1), jnp.float32)

  loss_init = float(batched(grids_of(logs[None]))[0])
  loss, history = loss_init, []
  for sweep in range(sweeps):
    width = 0.5**sweep
    for i in range(1, n):
      hi = logs[i - 1]
      lo = logs[i + 1] if i + 1 < n else log_floor
      frac = (logs[i] - lo) / (hi - lo)
      fracs = np.clip(frac + 0.5 * width * offsets, min_gap, 1.0 - min_gap)
      rows = np.repeat(logs[None], candidates, 0)
      rows[1:, i] = lo + fracs * (hi - lo)  # row 0 keeps the current position
      losses = np.asarray(batched(grids_of(rows)), np.float64)
      losses = np.where(np.isfinite(losses), losses, np.inf)
      best = int(np.argmin(losses))
      if losses[best] < loss:
        logs, loss = rows[best], float(losses[best])
    history.append(loss)
  grid = np.asarray(grids_of(logs[None])[0])
  return OptimizedGrid(grid, loss_init, loss, tuple(history))


def nfe_of(sampler: str, num_steps: int) -> int:
  """Model calls of `sampler` on a grid of `num_steps` steps ending with 0."""
  return 2 * num_steps - 1 if sampler in _TWO_CALL_SAMPLERS else num_steps
