"""Guidance variants as pure `model_fn` wrappers: intervals and guidance-scale schedules.

`scheduled_cfg_model_fn(model_fn, scale_fn=..., null_cond=...)` is classifier-free guidance
(`guidance.cfg_model_fn`, rescale included) whose scale is a function of the noise level of
each example: `w_b = scale_fn(sigma_b)`. Where w_b = 1 the output is the conditional
prediction exactly (the unconditional branch is multiplied by 0), so a schedule that is 1
everywhere is the identity on the conditional model.

* `interval_scale(w, sigma_lo, sigma_hi)`: w on the closed range sigma_lo <= sigma <= sigma_hi,
  1 elsewhere ([Kyn24]: guidance in the middle of the noise range only; off at high noise,
  where it collapses diversity, and at low noise, where it does nothing useful).
* `schedule_scale(w, kind)`: 'constant' (w), 'linear' (1 + (w - 1) t / (T - 1): strongest at
  high noise, none at t = 0) and 'cosine' (1 + (w - 1) (1 - cos(pi t / (T - 1))) / 2), as the
  guidance schedules compared by [Wang24].

The noise level is sigma(t) = sqrt((1 - ab_t) / ab_t) at the model's integer or fractional t
(`continuous.t_to_sigma`), the same sigma the sigma-grid samplers step on.

References:
  [Kyn24] Kynkäänniemi et al. Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models, 2024 (Sec. 3, eq. 2).
  [Wang24] Wang et al. Analysis of Classifier-Free Guidance Weight Schedulers, 2024.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff import continuous
from jdiff.diffusion import ModelFn
from jdiff.models.guidance import cfg_model_fn
from jdiff.schedules import Schedule

Array = jax.Array
SCALE_SCHEDULES = ("constant", "linear", "cosine")
# scale_fn(sigma [B], t_frac [B] = t / (T - 1) in [0, 1]) -> w [B]
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
  """A guidance-scale schedule in t / (T - 1): 'constant', 'linear' or 'cosine' (see above)."""
  if kind not in SCALE_SCHEDULES:
    raise ValueError(f"unknown guidance schedule {kind!r}; choose one of {SCALE_SCHEDULES}")
  w = jnp.asarray(guidance_scale, jnp.float32)

  def fn(sigma: Array, t_frac: Array) -> Array:
    if kind == "constant":
      return jnp.broadcast_to(w, sigma.shape)
    ramp = t_frac if kind == "linear" else 0.5 * (1.0 - jnp.cos(jnp.pi * t_frac))
    return 1.0 + (w - 1.0) * ramp

  return fn


def scheduled_cfg_model_fn(
  model_fn: ModelFn,
  schedule: Schedule,
  *,
  scale_fn: ScaleFn,
  null_cond,
  guidance_rescale: float = 0.0,
  learn_sigma: bool = False,
) -> ModelFn:
  """CFG with a per-example scale w_b = scale_fn(sigma(t_b), t_b / (T - 1)).

  Args:
    model_fn: the conditional model (must accept the doubled batch, as `cfg_model_fn`).
    schedule: the `Schedule` (to map t to sigma).
    scale_fn: from `interval_scale` / `schedule_scale` or any pure function of the same form.
    null_cond, guidance_rescale, learn_sigma: as `guidance.cfg_model_fn`.

  Returns:
    `guided_fn(x [B, ...], t [B] or scalar, cond) -> [B, ...]`.
  """

  def guided_fn(x: Array, t: Array, cond: Array | None) -> Array:
    tb = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    t_f = tb.astype(jnp.float32)
    sigma = continuous.t_to_sigma(schedule, t_f)
    w = scale_fn(sigma, jnp.clip(t_f / max(schedule.num_steps - 1, 1), 0.0, 1.0))
    w = w.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return cfg_model_fn(
      model_fn,
      guidance_scale=w,
      null_cond=null_cond,
      guidance_rescale=guidance_rescale,
      learn_sigma=learn_sigma,
    )(x, tb, cond)

  return guided_fn
