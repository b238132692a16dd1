"""From a sampler name to a pure `sample_fn(params, x_T, rng, labels) -> x_0`.

Each registered sampler belongs to a family that fixes which grids it accepts and its
default one ('auto'):

  family     samplers                          spacings                          default
  ancestral  ddpm (all T steps)                auto                              every t
  timestep   ddim, pc                          trailing, linspace                trailing
  sigma      euler, dpmpp_2m, dpmpp_3m, unipc  log_snr, karras, uniform,         log_snr
                                               trailing
             euler_a, dpmpp_2m_sde             (as above)                        trailing
             heun, edm                         log_snr, karras                   log_snr

The defaults are the grids whose 10- and 20-step samples came closest to a long DDIM run
(ODE or ancestral, by the sampler's kind) on the trained tiny and digits models
(tests/test_samplers_trained.py, BENCHMARKS.md): the Karras rho = 7 grid over-sharpens at
few steps on the cosine schedule, and the ancestral samplers match the ancestral chain best
on a grid uniform in t, as DDPM's.

Only grids that start at the last training timestep are accepted: x_T ~ N(0, I) is the
marginal there and nowhere below it on schedules such as cosine, so DDIM's 'leading' and
'quadratic' grids ([Lin24]: "flawed"; quadratic starts at 0.8 T) start from the wrong law.
They remain available from `ddim_sample` / `sigma_grid` directly. Heun's trapezoid (heun,
edm) is unstable on a step whose sigma ratio is ~100, which the grids uniform in t take
first on the cosine schedule (sigma(T-1) / sigma(T-2) ~ 30); the Karras rho = 7 grid
([EDM] eq. 5) and the log-SNR grid ([DPM-Solver] Sec. 3.3) take small first steps; and
heun and edm start their grids at EDM's sigma_max = 80 ([EDM] Table 1) rather than at the
schedule's ~2e4 (cosine, T = 1000): with the full range a 5- or 10-step grid still takes
steps that the trapezoid cannot follow (digits model, 10 steps: RMS 0.29 to a 200-step DDIM
solution from sigma(T-1), 0.06 from 80). Starting at 80 is starting at the last timestep up
to a signal of sqrt(alpha_bar) = 1/80 of the data, which x_T ~ N(0, I) leaves out.

References:
  [Lin24] Lin et al. Common Diffusion Noise Schedules and Sample Steps are Flawed, 2024.
  [EDM] Karras et al. 2022, eq. 5. [DPM-Solver] Lu et al. 2022, Sec. 3.3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax

from jdiff import conditioning, flow
from jdiff.models import guidance_schedules
from jdiff.models.bridge import make_model_fn
from jdiff.models.guidance import cfg_model_fn
from jdiff.samplers import ddim, ddpm, dpm_solver, editing, euler, pc, unipc
from jdiff.schedules import Schedule
from jdiff.training import grid_files

Array = jax.Array

AUTO = "auto"
TIMESTEP_GRIDS = ("trailing", "linspace")
SIGMA_GRIDS = ("log_snr", "karras", "uniform", "trailing")
HEUN_GRIDS = ("log_snr", "karras")
EDM_SIGMA_MAX = 80.0  # [EDM] Table 1; the grid of heun and edm starts there (see above)


class Sampler(NamedTuple):
  """A registry entry.

  Attributes:
    fn: `fn(schedule, model_fn, x_T, rng, *, cond, prediction, clip_x0, dynamic_percentile,
      **grid_and_eta_kwargs) -> x_0`.
    spacings: the grid names it accepts (besides 'auto').
    default_spacing: what 'auto' means (None: the sampler takes no spacing).
    default_eta: its stochasticity when eta is None (None: it takes no eta).
    fixed: other keyword arguments it is registered with.
  """

  fn: Callable
  spacings: tuple[str, ...]
  default_spacing: str | None
  default_eta: float | None = None
  fixed: tuple = ()


SAMPLERS: dict[str, Sampler] = {
  "ddpm": Sampler(ddpm.ddpm_sample, (), None),
  "ddim": Sampler(ddim.ddim_sample, TIMESTEP_GRIDS, "trailing", 0.0),
  "pc": Sampler(pc.pc_sample, TIMESTEP_GRIDS, "trailing", 1.0),
  "euler": Sampler(euler.euler_sample, SIGMA_GRIDS, "log_snr"),
  "heun": Sampler(euler.heun_sample, HEUN_GRIDS, "log_snr", fixed=(("sigma_max", EDM_SIGMA_MAX),)),
  "euler_a": Sampler(euler.euler_ancestral_sample, SIGMA_GRIDS, "trailing", 1.0),
  "edm": Sampler(
    euler.edm_sample,
    HEUN_GRIDS,
    "log_snr",
    fixed=(("s_churn", 10.0), ("sigma_max", EDM_SIGMA_MAX)),
  ),
  "dpmpp_2m": Sampler(dpm_solver.dpmpp_2m_sample, SIGMA_GRIDS, "log_snr"),
  "dpmpp_2m_sde": Sampler(dpm_solver.dpmpp_2m_sde_sample, SIGMA_GRIDS, "trailing", 1.0),
  "dpmpp_3m": Sampler(dpm_solver.dpmpp_3m_sample, SIGMA_GRIDS, "log_snr", 0.0),
  "unipc": Sampler(
    unipc.unipc_sample, SIGMA_GRIDS, "log_snr", fixed=(("final_sigma", "sigma_min"),)
  ),
  # Flow models only (objective 'flow'): Euler / Heun in t from t = 1 (jdiff.flow).
  "flow_euler": Sampler(flow.flow_euler_sample, (), None),
  "flow_heun": Sampler(flow.flow_heun_sample, (), None),
}
FLOW_SAMPLERS = ("flow_euler", "flow_heun")  # step in t on a flow process, not on a grid


def resolve_options(sampler: str, *, spacing: str = AUTO, eta: float | None = None) -> dict:
  """The grid and eta keyword arguments of `sampler`, 'auto' / None resolved; checks them.

  Raises:
    ValueError: an unknown sampler, a spacing it does not accept, or an eta it does not take,
      naming the sampler and the valid values.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
  spec = SAMPLERS[sampler]
  if spacing != AUTO and spacing not in spec.spacings:
    raise ValueError(
      f"sampler {sampler!r} does not accept spacing {spacing!r}; choose one of "
      f"{(AUTO,) + spec.spacings}"
    )
  if eta is not None and spec.default_eta is None:
    takes = sorted(k for k, s in SAMPLERS.items() if s.default_eta is not None)
    raise ValueError(
      f"sampler {sampler!r} is deterministic and takes no eta (got {eta}); eta applies to {takes}"
    )
  if eta is not None and eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  kw = dict(spec.fixed)
  if spec.default_spacing is not None:
    kw["spacing"] = spec.default_spacing if spacing == AUTO else spacing
  if spec.default_eta is not None:
    kw["eta"] = spec.default_eta if eta is None else eta
  return kw


def _eps_half(model_fn: Callable) -> Callable:
  """The first C output channels of a learned-variance model (eps / x0 / v, not the variance)."""

  def eps_fn(x, t, cond):
    out = model_fn(x, t, cond)
    return out[..., : x.shape[-1]]

  return eps_fn


def make_sample_fn(
  module,
  schedule: Schedule,
  *,
  sampler: str = "ddim",
  num_steps: int = 50,
  eta: float | None = None,
  spacing: str = AUTO,
  clip_x0: float | None = 1.0,
  dynamic_threshold: float | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  learn_sigma: bool | None = None,
  guidance_scale: float = 1.0,
  guidance_rescale: float = 0.0,
  null_label: int | None = None,
  grid_file: str = "",
  grid: Array | None = None,
  shift: float | None = None,
  strength: float = 1.0,
  guidance_interval: tuple[float, float] | None = None,
  guidance_schedule: str = "constant",
) -> Callable:
  """Returns the pure `sample_fn(params, x_T, rng, labels) -> x_0 [B, H, W, C]`.

  Args:
    module: the network.
    schedule: the training schedule.
    sampler: a name in `SAMPLERS`: 'ddpm', 'ddim', 'pc', 'euler', 'heun', 'euler_a', 'edm'
      (S_churn = 10), 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m' or 'unipc' (UniPC-2, final
      sigma_min).
    num_steps: sampling steps (ignored by 'ddpm', which takes all T).
    eta: stochasticity of 'ddim' (default 0), 'pc' and 'euler_a' (1: ancestral),
      'dpmpp_2m_sde' (1) and 'dpmpp_3m' (0; > 0 is the 3M SDE); None = that default. The
      other samplers are deterministic and reject an eta.
    spacing: the grid (module docstring): 'auto' is the sampler's default ('trailing' for
      ddim, pc, euler_a and dpmpp_2m_sde, 'log_snr' for euler, heun, edm, dpmpp_2m,
      dpmpp_3m and unipc); others: 'linspace' for ddim / pc, 'log_snr' / 'karras' /
      'uniform' / 'trailing' for the sigma-grid samplers (heun and edm: 'log_snr' and
      'karras' only). A name the sampler does not accept is a ValueError naming the
      sampler and the valid values.
    clip_x0: clip predicted x0 to [-clip_x0, clip_x0] (1.0 for images in [-1, 1]); None
      disables. Every sampler applies it to its data prediction (inside the denoiser for the
      sigma-grid samplers).
    dynamic_threshold: Imagen's dynamic thresholding percentile p in (0, 1] (None: off); the
      threshold is floored at clip_x0 (1 when None). See `diffusion.threshold_x0`.
    prediction: what the model predicts.
    variance: reverse-process variance for 'ddpm'.
    learn_sigma: the model outputs 2C channels (prediction, variance); None reads the
      module's `learn_sigma`. Only 'ddpm' with variance='learned_range' uses the variance
      half; every other sampler sees the first C channels.
    guidance_scale: classifier-free guidance scale for class-conditional models
      (1 = plain conditional sampling); only the prediction half of a learned-variance model
      is guided, as GLIDE / ADM do.
    guidance_rescale: guidance rescale phi.
    null_label: the model's null label; None for unconditional models.
    grid_file: a sigma grid record (`jdiff.training.grid_files.save_grid`, e.g. from
      experiments/optimize_grid.py) made for this sampler and num_steps; the sampler then
      steps along its sigmas instead of `spacing`'s grid (the grid ends with 0, so unipc's
      final step is the jump to 0). "" = off. Sigma-grid samplers only.
    grid: an explicit sigma grid [num_steps + 1] ending with 0 instead of a file (may be
      traced: `jdiff.samplers.optimize` fits it through this function).
    shift: SD3's time shift of 'flow_euler' / 'flow_heun' (None: 1, uniform in t).

  `schedule` may be a `jdiff.processes.Process` (objective edm / flow): the sigma-grid
  samplers and the flow samplers take it; 'ddpm', 'ddim' and 'pc' need a discrete schedule.
    strength: SDEdit strength s in (0, 1] (`editing.sdedit_start_index`): with an image x0
      passed to `sample_fn`, only the last ceil(s N) steps of the sampler's N-step grid run,
      from x0 noised to the first of them (`x_T` is that noise). unipc then ends its grid
      with 0 (explicit grids always do).
    guidance_interval: (sigma_lo, sigma_hi): guide only where sigma_lo <= sigma(t) <=
      sigma_hi ([Kyn24]; `guidance_schedules.interval_scale`); None = everywhere.
    guidance_schedule: 'constant', 'linear' or 'cosine' in t (`schedule_scale`).

  The returned `sample_fn(params, x_T, rng, labels=None, *, x0=None, inpaint=None,
  image_cond=None)` also takes, as traced arguments: `x0` [B, H, W, C], the image SDEdit
  starts from (with `strength`); `inpaint`, an `editing.Inpaint` (known image, mask, RePaint
  jumps) for replacement / RePaint, which for a model with `image_cond_channels = C + 1`
  is also given to the model as [known (1 - mask), mask] (a mask-conditioned model);
  `image_cond`, the conditioning image of an image-conditioned model (SR3).

  Raises:
    FileNotFoundError / ValueError: the grid file is missing, malformed, or was made for
      another sampler or number of steps (the message names the file).
  """
  kw = resolve_options(sampler, spacing=spacing, eta=eta)
  spec = SAMPLERS[sampler]
  if sampler == "ddpm":
    kw["variance"] = variance
  else:
    kw["num_steps"] = num_steps
  if grid_file or grid is not None:
    on_sigmas = sorted(k for k, s in SAMPLERS.items() if s.spacings in (SIGMA_GRIDS, HEUN_GRIDS))
    if sampler not in on_sigmas:
      raise ValueError(
        f"grid_file={grid_file!r} / grid: sampler {sampler!r} does not step on a sigma grid; "
        f"stored grids apply to {on_sigmas}"
      )
    if grid_file and grid is not None:
      raise ValueError(f"pass grid_file ({grid_file!r}) or grid, not both")
    if grid_file:
      grid = grid_files.load_grid(grid_file, sampler=sampler, num_steps=num_steps)["sigmas"]
    for key in ("spacing", "num_steps", "final_sigma"):
      kw.pop(key, None)
    kw["grid"] = grid
  if shift is not None:
    if sampler not in FLOW_SAMPLERS:
      raise ValueError(f"shift={shift} applies to flow_euler / flow_heun, not {sampler!r}")
    kw["shift"] = shift
  if learn_sigma is None:
    learn_sigma = bool(getattr(module, "learn_sigma", False))
  eps_only = learn_sigma and not (sampler == "ddpm" and variance == "learned_range")
  editing.sdedit_start_index(1, strength)  # validates strength
  flow_sampler = sampler in FLOW_SAMPLERS
  if flow_sampler and schedule.kind != "flow":
    raise ValueError(
      f"sampler {sampler!r} steps in t on a rectified-flow process (jdiff.processes.flow(), "
      f"config.objective='flow'), got a {type(schedule).__name__}; sample other models with "
      "the sigma-grid samplers (euler, heun, dpmpp_2m, unipc, ...)"
    )
  if flow_sampler and strength < 1.0:
    raise ValueError(
      f"strength={strength} (SDEdit) is not supported by {sampler!r}, which steps in t; "
      "use a sigma-grid sampler (euler, heun, dpmpp_2m, unipc, ...), which runs flow models "
      "through their denoiser"
    )
  space = "vp" if spec.spacings in ((), TIMESTEP_GRIDS) else "ve"
  start_grid = None
  if not flow_sampler:
    start_grid = editing.sdedit_grid(
      editing.sampler_grid(schedule, kw, num_steps=num_steps, space=space), strength
    )
  if strength < 1.0:
    for key in ("spacing", "num_steps", "final_sigma"):
      kw.pop(key, None)
    kw["grid"] = start_grid
  run = functools.partial(
    spec.fn, prediction=prediction, clip_x0=clip_x0, dynamic_percentile=dynamic_threshold, **kw
  )
  scale_fn = None
  if guidance_interval is not None or guidance_schedule != "constant":
    scale_fn = guidance_schedules.schedule_scale(guidance_scale, guidance_schedule)
    if guidance_interval is not None:
      scale_fn = guidance_schedules.interval_scale(guidance_scale, *guidance_interval)
      if guidance_schedule != "constant":
        raise ValueError(
          f"use a guidance_interval {guidance_interval} or a guidance_schedule "
          f"{guidance_schedule!r}, not both"
        )
  image_channels = int(getattr(module, "image_cond_channels", 0) or 0)

  def sample_fn(
    params,
    x_T: Array,
    rng: Array,
    labels: Array | None = None,
    *,
    x0: Array | None = None,
    inpaint: editing.Inpaint | None = None,
    image_cond: Array | None = None,
  ) -> Array:
    model_fn = make_model_fn(module, params, train=False)
    cond = None
    if null_label is not None:
      if labels is None:
        raise ValueError("a class-conditional model needs labels to sample")
      cond = labels
      if scale_fn is not None:
        model_fn = guidance_schedules.scheduled_cfg_model_fn(
          model_fn,
          schedule,
          scale_fn=scale_fn,
          null_cond=null_label,
          guidance_rescale=guidance_rescale,
          learn_sigma=learn_sigma,
        )
      elif guidance_scale != 1.0:
        model_fn = cfg_model_fn(
          model_fn,
          guidance_scale=guidance_scale,
          null_cond=null_label,
          guidance_rescale=guidance_rescale,
          learn_sigma=learn_sigma,
        )
    if image_channels:
      if image_cond is None and inpaint is not None and image_channels == x_T.shape[-1] + 1:
        image_cond = conditioning.inpaint_cond(inpaint.known, inpaint.mask)
      if image_cond is None:
        raise ValueError(
          f"the model takes a conditioning image of {image_channels} channels "
          "(image_cond_channels); pass image_cond (or inpaint, for a mask-conditioned model)"
        )
      cond = image_cond
    if eps_only:
      model_fn = _eps_half(model_fn)
    if x0 is not None:
      x_T = editing.start_from(schedule, space, x0, start_grid[0], x_T)
    elif strength < 1.0:
      raise ValueError(f"strength={strength} < 1 needs the image x0 to start from")
    if inpaint is not None and flow_sampler:
      raise ValueError(
        f"inpainting is not supported by {sampler!r}, which steps in t; use a sigma-grid "
        "sampler (euler, euler_a, heun, ...), which runs flow models through their denoiser"
      )
    extra = {} if inpaint is None else {"inpaint": inpaint}
    return run(schedule, model_fn, x_T, rng, cond=cond, **extra)

  return sample_fn
