"""Flow matching samplers in t, and rectified flow's reflow pairs.

A flow model of `processes.flow` predicts the velocity u = eps - x0 of x_t = (1 - t) x0 + t eps
([RF] eq. 1, [FM]); its probability-flow ODE is dx/dt = u(x, t), from t = 1 (x = eps ~ N(0, I),
exactly) to t = 0. `flow_euler_sample` and `flow_heun_sample` integrate it on a grid uniform
in t, optionally shifted towards t = 1 by SD3's t' = k t / (1 + (k - 1) t) ([SD3] eq. 23).
Euler in t is DDIM (each step keeps x0_hat and eps_hat and moves t), and so it equals the
`euler` sigma-grid sampler on the same times; Heun in t is not Heun in sigma. Every other
sampler reaches a flow model through its denoiser (`processes.make_denoiser`), started at
t_max < 1 where sigma = t / (1 - t) is finite.

The velocity is taken from any prediction the model makes (`processes.to_x0`):
u = (x_t - x0_hat) / t, with x0_hat clipped / thresholded first when asked (so a clipped
sample moves towards the clipped data prediction, as in the other samplers).

Reflow ([RF] Sec. 2.3, Alg. 1): draw noise x1, solve the ODE of a trained flow to x0, and train
a new flow on the coupled pairs, x_t = (1 - t) x0 + t x1; its paths are straighter, so fewer
steps suffice. `reflow_pairs` makes the pairs; `processes.process_loss(..., noise=x1)` trains
on them.

References:
  [RF] Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with
    Rectified Flow, ICLR 2023. [FM] Lipman et al. Flow Matching for Generative Modeling, 2023.
  [SD3] Esser et al. Scaling Rectified Flow Transformers for High-Resolution Image Synthesis,
    2024, eq. 23 (time shift).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff import diffusion, processes
from jdiff.samplers.driver import sample_loop

Array = jax.Array
# velocity(x_t [B, ...], t scalar) -> u [B, ...]
Velocity = Callable[[Array, Array], Array]


def time_grid(num_steps: int, *, shift: float = 1.0) -> Array:
  """Decreasing times [N + 1] from 1 to 0, uniform, then SD3-shifted by `shift` (1: none)."""
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  if not shift > 0:
    raise ValueError(f"shift must be positive, got {shift}")
  t = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def make_velocity(
  p: processes.Process,
  model_fn: diffusion.ModelFn,
  *,
  cond: Array | None = None,
  prediction: str = "velocity",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> Velocity:
  """The ODE velocity u(x_t, t) of a flow model (any prediction), t > 0."""
  if p.kind != "flow":
    raise ValueError(f"the flow samplers integrate a 'flow' process, got {p.kind!r}")
  p.check_prediction(prediction)
  diffusion.check_threshold(clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
  direct = prediction == "velocity" and clip_x0 is None and dynamic_percentile is None

  def velocity(x: Array, t: Array) -> Array:
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    out = model_fn(x, tb * p.t_scale, cond)
    if direct:
      return out.astype(x.dtype)
    x0 = processes.to_x0(p, x, tb, out, prediction=prediction)
    x0 = diffusion.threshold_x0(x0, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
    return ((x.astype(jnp.float32) - x0) / t).astype(x.dtype)

  return velocity


def euler_step(velocity: Velocity, x: Array, t: Array, t_next: Array) -> Array:
  """x + (t_next - t) u(x, t). NFE 1."""
  return x + (t_next - t).astype(x.dtype) * velocity(x, t)


def heun_step(velocity: Velocity, x: Array, t: Array, t_next: Array) -> Array:
  """Heun's trapezoid in t; the step to t = 0 is Euler (as [EDM] Alg. 1). NFE 2, or 1 at the end."""
  dt = (t_next - t).astype(x.dtype)
  u = velocity(x, t)
  x_euler = x + dt * u

  def correct(_):
    return x + dt * 0.5 * (u + velocity(x_euler, jnp.where(t_next > 0, t_next, 1.0)))

  return jax.lax.cond(t_next > 0, correct, lambda _: x_euler, None)


def flow_sample(
  step: Callable,
  p: processes.Process,
  model_fn: diffusion.ModelFn,
  x_T: Array,
  rng: Array,
  *,
  num_steps: int,
  shift: float = 1.0,
  cond: Array | None = None,
  prediction: str = "velocity",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> Array:
  """Integrates the flow ODE in t from t = 1 (x = x_T) to 0 with `step` on `time_grid`.

  Args:
    step: `euler_step` or `heun_step`.
    p: a `processes.flow` process.
    model_fn: `model_fn(x_t, t * t_scale, cond)`.
    x_T: [B, ...] standard normal noise (the exact law at t = 1).
    rng: unused (deterministic); kept for the samplers' common signature.
    num_steps: N.
    shift: SD3's time shift (1: uniform in t).
    cond, prediction, clip_x0, dynamic_percentile: as the other samplers.

  Returns:
    x_0 [B, ...].
  """
  velocity = make_velocity(
    p,
    model_fn,
    cond=cond,
    prediction=prediction,
    clip_x0=clip_x0,
    dynamic_percentile=dynamic_percentile,
  )
  grid = time_grid(num_steps, shift=shift)
  return sample_loop(lambda x, i, t, tn, key: step(velocity, x, t, tn), x_T, grid, rng)[0]


def flow_euler_sample(p, model_fn, x_T: Array, rng: Array, *, num_steps: int = 50, **options):
  """Euler in t from t = 1 to 0 (`euler_step`). NFE = num_steps. Args: as `flow_sample`."""
  return flow_sample(euler_step, p, model_fn, x_T, rng, num_steps=num_steps, **options)


def flow_heun_sample(p, model_fn, x_T: Array, rng: Array, *, num_steps: int = 25, **options):
  """Heun in t from t = 1 to 0 (`heun_step`). NFE = 2 num_steps - 1. Args: as `flow_sample`."""
  return flow_sample(heun_step, p, model_fn, x_T, rng, num_steps=num_steps, **options)


def reflow_pairs(sample: Callable[[Array, Array], Array], x1: Array, rng: Array) -> Array:
  """A reflow training record: [x0 | x1] on the channel axis, x0 = sample(x1, rng).

  Args:
    sample: a deterministic flow sampler of the teacher, `sample(x_T, rng) -> x_0`.
    x1: [B, H, W, C] noise.
    rng: the sampler's key.

  Returns:
    [B, H, W, 2C]: the teacher's sample, then the noise it came from (the layout the
    reflow input pipeline and `split_pairs` use).
  """
  return jnp.concatenate([sample(x1, rng).astype(x1.dtype), x1], axis=-1)


def split_pairs(pairs: Array) -> tuple[Array, Array]:
  """(x0, x1) of `reflow_pairs`' [B, ..., 2C] records."""
  c = pairs.shape[-1] // 2
  return pairs[..., :c], pairs[..., c:]
