"""Editing inside the one driver: SDEdit starts, inpainting by replacement, RePaint jumps.

Every sampler walks a decreasing grid of noise levels in one `lax.scan` (`driver.sample_loop`).
Editing enters there, not as a pipeline per task:

* **SDEdit / img2img** ([SDEdit]): `sdedit_grid` keeps the last `ceil(s N)` steps of the
  sampler's N-step grid and `noise_to_level` noises the image to the first kept level
  (q_sample), so NFE ~ s N for a strength s in (0, 1].
* **Inpainting by replacement** ([SDEdit] Sec. 4, [RePaint] eq. 8): after every step the
  known pixels are replaced by the known image noised to the step's new level.
* **RePaint** ([RePaint] Sec. 4.2, Alg. 1): the walk over the grid goes back up
  `jump_length` levels, `jump_n - 1` times at every `jump_length`-th level; an upward pair
  re-noises the sample with the forward process (no model call).

The mask and the known image are `Inpaint` fields (arrays: jit-able, shardable arguments);
the jump sizes are static (they fix the scan's length). Mask convention: 1 where the image
is to be generated (the hole), 0 where the pixels are known (as diffusers' inpainting).

Levels: timestep samplers ('vp') carry x_t = sqrt(ab) x0 + sqrt(1 - ab) eps over integer or
fractional t (t < 0: the data); sigma samplers ('ve') carry x0 + sigma eps over sigmas.

References:
  [SDEdit] Meng et al. SDEdit: Guided Image Synthesis and Editing with Stochastic
    Differential Equations, 2022.
  [RePaint] Lugmayr et al. RePaint: Inpainting using Denoising Diffusion Probabilistic
    Models, 2022 (Alg. 1; the jump schedule of its released `get_schedule_jump`).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import continuous
from jdiff.schedules import Schedule

Array = jax.Array
SPACES = ("vp", "ve")
_REPLACE_STREAM = 0x5EED  # fold_in constants: the replacement / jump noise of step i
_JUMP_STREAM = 0x7A3B


@flax.struct.dataclass
class Inpaint:
  """What the driver needs to inpaint.

  Attributes:
    known: [B, H, W, C] the known image (data space; only the mask's 0 pixels are used).
    mask: broadcastable to `known` ([B, H, W, 1], [H, W, 1], ...): 1 = generate, 0 = keep.
    jump_length: RePaint's jump length j (static); 1 with jump_n = 1 is plain replacement.
    jump_n: how often each jump point is visited (static; 1 = no resampling).
  """

  known: Array
  mask: Array
  jump_length: int = flax.struct.field(pytree_node=False, default=1)
  jump_n: int = flax.struct.field(pytree_node=False, default=1)


def check_inpaint(inpaint: Inpaint) -> None:
  """Raises ValueError naming a bad jump size, mask shape or mask value range (if concrete)."""
  if int(inpaint.jump_length) < 1 or int(inpaint.jump_n) < 1:
    raise ValueError(
      f"RePaint needs jump_length >= 1 and jump_n >= 1, got jump_length={inpaint.jump_length}, "
      f"jump_n={inpaint.jump_n}"
    )
  known, mask = inpaint.known, inpaint.mask
  try:
    jnp.broadcast_shapes(jnp.shape(mask), jnp.shape(known))
  except ValueError:
    raise ValueError(
      f"mask shape {jnp.shape(mask)} does not broadcast to the image shape {jnp.shape(known)}"
    ) from None
  if jnp.broadcast_shapes(jnp.shape(mask), jnp.shape(known)) != jnp.shape(known):
    raise ValueError(f"mask shape {jnp.shape(mask)} is larger than the image {jnp.shape(known)}")
  try:
    m = np.asarray(mask)
  except jax.errors.TracerArrayConversionError:
    return
  if m.size and (m.min() < 0 or m.max() > 1):
    raise ValueError(f"mask values must lie in [0, 1], got range [{m.min()}, {m.max()}]")


def repaint_indices(num_steps: int, jump_length: int, jump_n: int) -> np.ndarray:
  """The RePaint walk over grid indices 0..N (0: the noisiest level, N: the last).

  The released `get_schedule_jump` with p = steps left: going down one level at a time;
  at p in range(1, N - j + 1, j) (= its timesteps 0, j, 2j, ...) it goes back up j levels,
  jump_n - 1 times. Consecutive entries differ by +-1.

  Returns:
    int32 [L] starting with 0 and ending with N; the model is called L - 1 - (up moves)
    = N + (jump_n - 1) j |jump points| times by a one-call-per-step sampler.
  """
  n, j = int(num_steps), int(jump_length)
  jumps = {p: int(jump_n) - 1 for p in range(1, n - j + 1, j)}
  p, seq = n, [0]
  while p >= 1:
    p -= 1
    seq.append(n - p)
    if jumps.get(p, 0) > 0:
      jumps[p] -= 1
      for _ in range(j):
        p += 1
        seq.append(n - p)
  return np.asarray(seq, np.int32)


def num_model_steps(num_steps: int, jump_length: int = 1, jump_n: int = 1) -> int:
  """Downward steps of the RePaint walk (= NFE for one-call-per-step samplers)."""
  seq = repaint_indices(num_steps, jump_length, jump_n)
  return int(np.sum(np.diff(seq) > 0))


def sdedit_start_index(num_steps: int, strength: float) -> int:
  """Index k of the first kept level: the last ceil(s N) of N steps are run.

  k = N - ceil(s N) (up to 1e-9 of float rounding in s N), so s = 1 keeps the whole grid
  and any s > 0 runs at least one step.
  """
  if not 0.0 < float(strength) <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  n = int(num_steps)
  return n - min(n, max(1, math.ceil(float(strength) * n - 1e-9)))


def sdedit_grid(grid: Array, strength: float) -> Array:
  """The tail `grid[k:]` of a decreasing [N + 1] grid for strength s (`sdedit_start_index`)."""
  return grid[sdedit_start_index(grid.shape[0] - 1, strength) :]


def start_from(schedule: Schedule, space: str, x0: Array, level: Array, noise: Array) -> Array:
  """The sampler's `x_T` that starts it from x0 at the grid's first level (SDEdit).

  Every sampler takes x_T as the VP sample at its first level: q_sample(x0, t, noise) for
  'vp'; for 've' (x0 + sigma noise) / sqrt(1 + sigma^2), which the sigma samplers scale back
  by sqrt(1 + sigma_0^2).
  """
  x0 = x0.astype(noise.dtype)
  if space == "vp":
    return noise_to_level(schedule, "vp", x0, level, noise)
  s = jnp.asarray(level, jnp.float32)
  return ((x0 + s * noise) / jnp.sqrt(1.0 + s**2)).astype(noise.dtype)


def alpha_bar(schedule: Schedule, t: Array) -> Array:
  """alpha_bar at integer or fractional t, 1 for t < 0 (the clean data); float32."""
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0).astype(jnp.float32)
  ab = continuous.alpha_bar_at(schedule, jnp.maximum(t, 0.0))
  return jnp.where(t >= 0, ab, 1.0).astype(jnp.float32)


def noise_to_level(schedule: Schedule, space: str, x0: Array, level: Array, noise: Array) -> Array:
  """q_sample to a grid level: sqrt(ab) x0 + sqrt(1 - ab) n ('vp', t) or x0 + sigma n ('ve').

  Args:
    schedule: the `Schedule`.
    space: 'vp' (level is a timestep, int or float, < 0 = data) or 've' (level is sigma).
    x0: [B, ...] clean images.
    level: scalar grid level.
    noise: [B, ...] standard normal.
  """
  dt = x0.dtype
  if space == "ve":
    return x0 + jnp.asarray(level, jnp.float32).astype(dt) * noise.astype(dt)
  ab = alpha_bar(schedule, level)
  return jnp.sqrt(ab).astype(dt) * x0 + jnp.sqrt(1.0 - ab).astype(dt) * noise.astype(dt)


def renoise(schedule: Schedule, space: str, x: Array, level: Array, up: Array, noise: Array):
  """The forward process from one level up to a noisier one ([RePaint] eq. 1's jump).

  'vp': x_up = sqrt(ab_up / ab) x + sqrt(1 - ab_up / ab) n; 've': x + sqrt(s_up^2 - s^2) n.
  """
  dt = x.dtype
  if space == "ve":
    std = jnp.sqrt(jnp.maximum(jnp.asarray(up, jnp.float32) ** 2 - level**2, 0.0))
    return x + std.astype(dt) * noise.astype(dt)
  ratio = alpha_bar(schedule, up) / alpha_bar(schedule, level)
  return jnp.sqrt(ratio).astype(dt) * x + jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0)).astype(
    dt
  ) * noise.astype(dt)


def _get_x(carry):
  return carry if isinstance(carry, jax.Array | np.ndarray) else carry.x


def _set_x(carry, x):
  return x if isinstance(carry, jax.Array | np.ndarray) else carry._replace(x=x)


def inpaint_step(step_fn, inpaint: Inpaint, schedule: Schedule, space: str):
  """Wraps a driver step: replacement after each downward step, forward jumps upward.

  Args:
    step_fn: `step_fn(carry, i, t, t_next, key) -> carry` of a sampler.
    inpaint: the known image and mask.
    schedule: the `Schedule` (for the 'vp' levels).
    space: 'vp' or 've' (see the module docstring).

  Returns:
    The wrapped step. Replacement noise is `normal(fold_in(key, 0x5EED))`, jump noise
    `normal(fold_in(key, 0x7A3B))`, so a sampler's own draws from `key` are unchanged.
  """
  if space not in SPACES:
    raise ValueError(f"unknown space {space!r}; choose one of {SPACES}")
  jumps = inpaint.jump_n > 1

  def down(c, i, t, t_next, key):
    c = step_fn(c, i, t, t_next, key)
    x = _get_x(c)
    noise = jax.random.normal(jax.random.fold_in(key, _REPLACE_STREAM), x.shape, x.dtype)
    known = noise_to_level(schedule, space, inpaint.known.astype(x.dtype), t_next, noise)
    m = jnp.asarray(inpaint.mask, x.dtype)
    return _set_x(c, m * x + (1 - m) * known)

  def step(c, i, t, t_next, key):
    if not jumps:
      return down(c, i, t, t_next, key)

    def up(c):
      x = _get_x(c)
      noise = jax.random.normal(jax.random.fold_in(key, _JUMP_STREAM), x.shape, x.dtype)
      return _set_x(c, renoise(schedule, space, x, t, t_next, noise))

    return jax.lax.cond(t_next > t, up, lambda c: down(c, i, t, t_next, key), c)

  return step
