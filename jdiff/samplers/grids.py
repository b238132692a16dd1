"""Timestep grids for the discrete-time samplers.

A grid is a decreasing int32 array of timesteps ending with -1, which stands for
"the clean data" (alpha_bar = 1).

References:
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models, 2021 (Sec. C.2).
  [Lin24] Lin et al. Common Diffusion Noise Schedules and Sample Steps are Flawed, 2024 (Table 2).
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp

SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def timestep_grid(num_train_steps: int, num_steps: int, *, spacing: str = "leading",
                  offset: int = 0) -> jnp.ndarray:
  """Picks `num_steps` of the `num_train_steps` timesteps, in decreasing order, then -1.

  Args:
    num_train_steps: T of the schedule.
    num_steps: number of sampling steps N, 1 <= N <= T.
    spacing: 'leading' (0, k, 2k, ... with k = T // N, plus `offset`; DDIM / diffusers),
      'trailing' (T-1, T-1-k, ...; [Lin24], reaches the last timestep),
      'linspace' (round(linspace(0, T-1, N))), or 'quadratic' ([DDIM]'s CIFAR grid).
    offset: added to 'leading' steps (Stable Diffusion uses 1).

  Returns:
    int32 [N + 1] decreasing timesteps ending with -1.
  """
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
  t_max = num_train_steps - 1
  if spacing == "leading":
    ts = np.arange(num_steps) * (num_train_steps // num_steps) + offset
  elif spacing == "trailing":
    ts = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, t_max, num_steps))
  else:
    ts = np.round(np.linspace(0, np.sqrt(t_max * 0.8), num_steps) ** 2)
  ts = np.unique(np.clip(ts.astype(np.int64), 0, t_max))[::-1]
  if ts.shape[0] != num_steps:
    raise ValueError(f"spacing {spacing!r} gives only {ts.shape[0]} distinct timesteps for "
                     f"num_steps={num_steps}, T={num_train_steps}")
  return jnp.asarray(np.concatenate([ts, [-1]]), jnp.int32)
