"""The one sampling driver: a `lax.scan` over a grid of (t, t_next) pairs.

Every sampler in jdiff is a small step function plus this driver. The step count is
the only clock: step i draws its randomness from `fold_in(rng, i)`, so a run is
reproducible and can be checked step by step against explicit noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Carry = Any
# step_fn(carry, i, t, t_next, key) -> carry; i, t, t_next are traced scalars.
StepFn = Callable[[Carry, Array, Array, Array, Array], Carry]


def sample_loop(
  step_fn: StepFn,
  carry: Carry,
  grid: Array,
  rng: Array,
  *,
  record: Callable[[Carry], Any] | None = None,
  inpaint=None,
  schedule=None,
  space: str = "vp",
) -> tuple[Carry, Any]:
  """Runs `carry = step_fn(carry, i, grid[i], grid[i + 1], fold_in(rng, i))` for all i.

  Args:
    step_fn: the sampler's step.
    carry: initial state, a pytree (often just x_T [B, ...]).
    grid: [N + 1] decreasing timesteps or noise levels; N steps are taken.
    rng: PRNG key; step i uses `jax.random.fold_in(rng, i)`.
    record: optional function of the carry whose values are stacked over steps
      (e.g. `lambda c: c` for the whole trajectory).
    inpaint: optional `editing.Inpaint` (known image, mask, RePaint jumps): the known pixels
      are replaced after every step; with jump_n > 1 the walk follows RePaint's schedule
      over the grid (`editing.repaint_indices`), upward pairs re-noising the sample.
    schedule: the `Schedule` (needed with `inpaint` in the 'vp' space).
    space: what the grid and carry hold: 'vp' (timesteps, x_t) or 've' (sigmas, x0 + sigma
      eps); see `jdiff.samplers.editing`.

  Returns:
    (final carry, stacked records [N, ...] or None).
  """
  grid = jnp.asarray(grid)
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f"grid must be 1-D with at least 2 entries, got shape {grid.shape}")
  if inpaint is not None:
    from jdiff.samplers import editing  # pylint: disable=g-import-not-at-top

    editing.check_inpaint(inpaint)
    if inpaint.jump_n > 1:
      if not isinstance(carry, jax.Array):
        raise ValueError(
          f"RePaint jumps (jump_n={inpaint.jump_n}) need a one-step sampler whose state is "
          f"the sample; this sampler carries {type(carry).__name__} (multistep history)"
        )
      grid = grid[editing.repaint_indices(grid.shape[0] - 1, inpaint.jump_length, inpaint.jump_n)]
    step_fn = editing.inpaint_step(step_fn, inpaint, schedule, space)
  n = grid.shape[0] - 1

  def body(c, i):
    c = step_fn(c, i, grid[i], grid[i + 1], jax.random.fold_in(rng, i))
    return c, (record(c) if record is not None else None)

  return jax.lax.scan(body, carry, jnp.arange(n, dtype=jnp.int32))


def batch_t(t: Array, x: Array) -> Array:
  """Broadcasts a scalar timestep to [B] (int32 for integer t, else float32)."""
  t = jnp.asarray(t)
  dtype = jnp.int32 if jnp.issubdtype(t.dtype, jnp.integer) else jnp.float32
  return jnp.broadcast_to(t.astype(dtype), (x.shape[0],))
