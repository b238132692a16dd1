"""Guidance variants as pure `model_fn` wrappers: intervals and guidance-scale schedules.

`scheduled_cfg_model_fn(model_fn, scale_fn=..., null_cond=...)` is classifier-free guidance
(`guidance.cfg_model_fn`, rescale included) whose scale is a function of the noise level of
each example: `w_b = scale_fn(sigma_b, t_frac_b)`. Where w_b = 1 the output is the conditional
prediction exactly (the unconditional branch is multiplied by 0), so a schedule that is 1
everywhere is the identity on the conditional model.

* `interval_scale(w, sigma_lo, sigma_hi)`: w on the closed range sigma_lo <= sigma <= sigma_hi,
  1 elsewhere ([Kyn24]: guidance in the middle of the noise range only; off at high noise,
  where it collapses diversity, and at low noise, where it does nothing useful).
* `schedule_scale(w, kind)`: 'constant' (w), and the two increasing heuristic schedules of
  [Wang24], which start at the conditional model when sampling starts
  and rise as it proceeds. With f = t / T the fraction of the time still to go (1 at the first
  step, 0 at the clean end) and omega = w - 1 the guidance beyond the conditional model:

    linear:  w(t) = 1 + omega * 2 (1 - f)              (1, w, 2w - 1 at f = 1, 1/2, 0)
    cosine:  w(t) = 1 + omega * (1 + cos(pi f))        (1, w, 2w - 1 at f = 1, 1/2, 0)

  Both ramps average 1 over f, so a schedule applies on average the guidance of the constant w
  it is compared with, as in [Wang24].

Noise levels and times come from the noise protocol of the `Schedule` or `processes.Process`
the model was trained with: the model is called at t * t_scale, so t = t_model / t_scale,
sigma = `t_to_sigma(t)` (the VE sigma the sigma-grid samplers step on; for a discrete schedule
sqrt((1 - ab_t) / ab_t) at the integer or fractional timestep) and f = (t - t_min) / (t_max -
t_min), clipped to [0, 1] (t / (T - 1) for a `Schedule`; for the VE / EDM process t is sigma
itself, for flow the interpolation time).

References:
  [Kyn24] Kynkäänniemi et al. Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models, 2024 (Sec. 3, eq. 2).
  [Wang24] Wang, Dufour, Andreou, Cani, Fernandez Abrevaya, Picard, Kalogeiton. Analysis of
    Classifier-Free Guidance Weight Schedulers, TMLR 2024 (arXiv 2404.13040).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff.continuous import Noise
from jdiff.diffusion import ModelFn
from jdiff.models.guidance import cfg_model_fn

Array = jax.Array
SCALE_SCHEDULES = ("constant", "linear", "cosine")
# scale_fn(sigma [B], t_frac [B] in [0, 1]: 1 where sampling starts, 0 at the clean end) -> w [B]
ScaleFn = Callable[[Array, Array], Array]


def interval_scale(guidance_scale, sigma_lo: float, sigma_hi: float) -> ScaleFn:
  """w where sigma_lo <= sigma <= sigma_hi (both ends included), else 1 ([Kyn24] eq. 2)."""
  if not 0.0 <= float(sigma_lo) <= float(sigma_hi):
    raise ValueError(
      f"the guidance interval needs 0 <= sigma_lo <= sigma_hi, got ({sigma_lo}, {sigma_hi})"
    )

  def fn(sigma: Array, t_frac: Array) -> Array:
    del t_frac
    inside = (sigma >= sigma_lo) & (sigma <= sigma_hi)
    return jnp.where(inside, jnp.asarray(guidance_scale, jnp.float32), 1.0)

  return fn


def schedule_scale(guidance_scale, kind: str = "constant") -> ScaleFn:
  """A guidance-scale schedule in t_frac: 'constant', 'linear' or 'cosine' (see above)."""
  if kind not in SCALE_SCHEDULES:
    raise ValueError(f"unknown guidance schedule {kind!r}; choose one of {SCALE_SCHEDULES}")
  w = jnp.asarray(guidance_scale, jnp.float32)

  def fn(sigma: Array, t_frac: Array) -> Array:
    if kind == "constant":
      return jnp.broadcast_to(w, sigma.shape)
    ramp = 2.0 * (1.0 - t_frac) if kind == "linear" else 1.0 + jnp.cos(jnp.pi * t_frac)
    return 1.0 + (w - 1.0) * ramp

  return fn


def scheduled_cfg_model_fn(
  model_fn: ModelFn,
  noise: Noise,
  *,
  scale_fn: ScaleFn,
  null_cond,
  guidance_rescale: float = 0.0,
  learn_sigma: bool = False,
) -> ModelFn:
  """CFG with a per-example scale w_b = scale_fn(sigma(t_b), t_frac(t_b)) (module docstring).

  Args:
    model_fn: the conditional model (must accept the doubled batch, as `cfg_model_fn`).
    noise: the `Schedule` or `processes.Process` the model was trained with (maps the model's
      time to sigma and to t_frac).
    scale_fn: from `interval_scale` / `schedule_scale` or any pure function of the same form.
    null_cond, guidance_rescale, learn_sigma: as `guidance.cfg_model_fn`.

  Returns:
    `guided_fn(x [B, ...], t [B] or scalar, cond) -> [B, ...]`.
  """

  def guided_fn(x: Array, t: Array, cond: Array | None) -> Array:
    tb = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    t_own = tb.astype(jnp.float32) / noise.t_scale
    span = jnp.maximum(jnp.asarray(noise.t_max - noise.t_min, jnp.float32), 1e-12)
    t_frac = jnp.clip((t_own - noise.t_min) / span, 0.0, 1.0)
    w = scale_fn(noise.t_to_sigma(t_own), t_frac)
    w = w.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return cfg_model_fn(
      model_fn,
      guidance_scale=w,
      null_cond=null_cond,
      guidance_rescale=guidance_rescale,
      learn_sigma=learn_sigma,
    )(x, tb, cond)

  return guided_fn
