"""ADM's `timestep_respacing`: ancestral sampling on a sub-sequence of the training timesteps.

ADM samples with `SpacedDiffusion`: the kept timesteps t_0 < ... < t_{N-1} form a new
N-step chain with betas 1 - alpha_bar(t_i) / alpha_bar(t_{i-1}), whose posterior
variances (and the learned variance's interpolation range between them and these betas)
are the new chain's; the network is called with the original timestep t_i. `adm_sample`
is that sampler: jdiff's ancestral `ddpm_sample` on the respaced schedule, through a
`model_fn` that maps step i to t_i.

  ts = space_timesteps(1000, "250")                      # ADM's --timestep_respacing 250
  x0 = adm_sample(schedule, model_fn, x_T, rng, timesteps=ts, variance="learned_range",
                  clip_x0=1.0)

References:
  [IDDPM] Nichol, Dhariwal 2021, Sec. 4 (`respace.space_timesteps`, `SpacedDiffusion`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.pretrained.mapping import PretrainedError
from jdiff.samplers.ddpm import ddpm_sample
from jdiff.samplers.denoisers import VPDenoiser
from jdiff.samplers.grids import ddpm_grid
from jdiff.schedules import Schedule

Array = jax.Array


def space_timesteps(num_timesteps: int, section_counts: str) -> np.ndarray:
  """The kept timesteps of ADM's `timestep_respacing`, increasing, int64 [N].

  'ddimN': every k-th timestep from 0, k the integer stride giving exactly N. Otherwise
  comma-separated counts, one per equal section of [0, T) (the first T mod S sections one
  longer), each section's count spread evenly over it: start + round(i (size - 1) /
  (count - 1)), with Python's round (half to even).

  Raises:
    PretrainedError: no integer stride gives N, or a section is shorter than its count.
  """
  text = str(section_counts)
  if text.startswith("ddim"):
    want = int(text[4:])
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == want:
        return np.arange(0, num_timesteps, stride, dtype=np.int64)
    raise PretrainedError(
      f"timestep_respacing={text!r}: no integer stride gives exactly {want} of "
      f"{num_timesteps} steps"
    )
  counts = [int(c) for c in text.split(",")]
  per, extra = divmod(num_timesteps, len(counts))
  start, out = 0, []
  for i, count in enumerate(counts):
    size = per + (i < extra)
    if count > size:
      raise PretrainedError(
        f"timestep_respacing={text!r}: section {i} has {size} steps, cannot take {count}"
      )
    # ADM's running float sum, kept as is: at exact halves its rounding can differ from
    # round(i * stride)'s.
    stride = (size - 1) / (count - 1) if count > 1 else 1
    cur, taken = 0.0, []
    for _ in range(count):
      taken.append(start + round(cur))
      cur += stride
    out += taken
    start += size
  return np.asarray(sorted(set(out)), np.int64)


def respaced_schedule(schedule: Schedule, timesteps) -> Schedule:
  """The N-step chain through `timesteps` (increasing): beta_i = 1 - ab(t_i) / ab(t_{i-1})."""
  ts = np.asarray(timesteps, np.int64)
  ab = np.asarray(schedule.alphas_cumprod, np.float64)[ts]
  return schedules.from_betas(1.0 - ab / np.concatenate([[1.0], ab[:-1]]))


def respaced_model_fn(model_fn, timesteps):
  """`model_fn` called with the original timestep t_i at respaced step i."""
  table = jnp.asarray(np.asarray(timesteps, np.int32))

  def fn(x, t, cond):
    return model_fn(x, table[t], cond)

  return fn


def adm_sample(
  schedule: Schedule,
  model_fn,
  x_T: Array,
  rng: Array,
  *,
  timesteps,
  cond: Array | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> Array:
  """ADM's `p_sample_loop` on a respaced chain: N ancestral steps from x_T to x_0.

  Args:
    schedule: the training `Schedule` (T steps).
    model_fn: `model_fn(x_t, t, cond)` with training timesteps t.
    x_T: [B, ...] starting noise.
    rng: PRNG key; step i (from the noisiest) uses fold_in(rng, i).
    timesteps: the kept timesteps, increasing (`space_timesteps`).
    cond, prediction, variance, clip_x0, dynamic_percentile: see `ddpm.ddpm_step`;
      'learned_range' interpolates between the respaced chain's posterior variance and
      its betas, as ADM's SpacedDiffusion does.

  Returns:
    x_0 samples [B, ...].
  """
  respaced = respaced_schedule(schedule, timesteps)
  denoise = VPDenoiser(
    respaced,
    respaced_model_fn(model_fn, timesteps),
    cond=cond,
    prediction=prediction,
    clip_x0=clip_x0,
    dynamic_percentile=dynamic_percentile,
  )
  return ddpm_sample(denoise, x_T, ddpm_grid(respaced.num_steps), rng, variance=variance)
