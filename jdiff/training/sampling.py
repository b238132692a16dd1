"""From a config's sampler name to a pure `sample_fn(params, x_T, rng, labels) -> x_0`."""

from __future__ import annotations

from typing import Callable

import jax

from jdiff.models.bridge import make_model_fn
from jdiff.samplers import ddim, ddpm, dpm_solver, euler, pc, unipc
from jdiff.schedules import Schedule

Array = jax.Array


def _ddpm(schedule, model_fn, x_T, rng, *, cond, prediction, variance, clip_x0, num_steps, eta,
          spacing):
  del num_steps, eta, spacing  # ancestral sampling always takes all T steps
  return ddpm.ddpm_sample(schedule, model_fn, x_T, rng, cond=cond, prediction=prediction,
                          variance=variance, clip_x0=clip_x0)


def _ddim(schedule, model_fn, x_T, rng, *, cond, prediction, variance, clip_x0, num_steps, eta,
          spacing):
  del variance
  return ddim.ddim_sample(schedule, model_fn, x_T, rng, num_steps=num_steps, eta=eta,
                          spacing=spacing, cond=cond, prediction=prediction, clip_x0=clip_x0)


def _continuous(fn, *, takes_eta: bool = False, **fixed):
  """Adapter for the sigma-grid samplers (no x0 clipping, no variance choice); `eta` is
  passed only to the stochastic ones that take it."""

  def run(schedule, model_fn, x_T, rng, *, cond, prediction, variance, clip_x0, num_steps, eta,
          spacing):
    del variance, clip_x0
    extra = {"eta": eta} if takes_eta else {}
    return fn(schedule, model_fn, x_T, rng, num_steps=num_steps, spacing=spacing, cond=cond,
              prediction=prediction, **fixed, **extra)

  return run


SAMPLERS: dict[str, Callable] = {
    "ddpm": _ddpm,
    "ddim": _ddim,
    "euler": _continuous(euler.euler_sample),
    "heun": _continuous(euler.heun_sample),
    "euler_a": _continuous(euler.euler_ancestral_sample, takes_eta=True),
    "edm": _continuous(euler.edm_sample, s_churn=10.0),
    "dpmpp_2m": _continuous(dpm_solver.dpmpp_2m_sample),
    "dpmpp_2m_sde": _continuous(dpm_solver.dpmpp_2m_sde_sample),
    "dpmpp_3m": _continuous(dpm_solver.dpmpp_3m_sample),
    "pc": _continuous(pc.pc_sample, takes_eta=True),
    "unipc": _continuous(unipc.unipc_sample, final_sigma="sigma_min"),
}


def make_sample_fn(module, schedule: Schedule, *, sampler: str = "ddim", num_steps: int = 50,
                   eta: float = 0.0, spacing: str = "trailing", clip_x0: float | None = 1.0,
                   prediction: str = "eps", variance: str = "fixed_small",
                   guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                   null_label: int | None = None) -> Callable:
  """Returns the pure `sample_fn(params, x_T, rng, labels) -> x_0 [B, H, W, C]`.

  Args:
    module: the network.
    schedule: the training schedule.
    sampler: a name in `SAMPLERS`: 'ddpm', 'ddim', 'euler', 'heun', 'euler_a', 'edm'
      (S_churn = 10), 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m', 'unipc' (UniPC-2, final sigma_min)
      or 'pc'.
    num_steps: sampling steps (ignored by 'ddpm', which takes all T).
    eta: stochasticity of 'ddim', 'euler_a' and 'pc' (0 = deterministic for ddim).
    spacing: timestep spacing ('leading', 'trailing', 'linspace', 'quadratic') for the
      discrete samplers; sigma spacing ('karras', 'log_snr', 'uniform', 'trailing',
      'quadratic') for the continuous ones.
    clip_x0: clip predicted x0 (1.0 for images in [-1, 1]); None disables.
    prediction: what the model predicts.
    variance: reverse-process variance for 'ddpm'.
    guidance_scale: classifier-free guidance scale for class-conditional models
      (1 = plain conditional sampling).
    guidance_rescale: guidance rescale phi.
    null_label: the model's null label; None for unconditional models.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
  run = SAMPLERS[sampler]

  def sample_fn(params, x_T: Array, rng: Array, labels: Array | None = None) -> Array:
    model_fn = make_model_fn(module, params, train=False)
    cond = None
    if null_label is not None:
      if labels is None:
        raise ValueError("a class-conditional model needs labels to sample")
      cond = labels
      if guidance_scale != 1.0:
        from jdiff.models.guidance import cfg_model_fn  # pylint: disable=g-import-not-at-top
        model_fn = cfg_model_fn(model_fn, guidance_scale=guidance_scale, null_cond=null_label,
                                guidance_rescale=guidance_rescale)
    return run(schedule, model_fn, x_T, rng, cond=cond, prediction=prediction,
               variance=variance, clip_x0=clip_x0, num_steps=num_steps, eta=eta,
               spacing=spacing)

  return sample_fn
