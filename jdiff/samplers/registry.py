"""The sampler registry: from a name to a pure `sample_fn(params, x_T, rng, labels) -> x_0`.

A sample call composes, once and visibly: the network bound to its parameters -> guidance
-> the prediction half of a learned-variance model -> the denoiser (thresholding inside)
(`jdiff.samplers.denoisers`); the grid of the sampler's family; the start; then the sampler
`fn(denoise, x, grid, rng, *, inpaint, **its options)`.

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
import jax.numpy as jnp

from jdiff import conditioning, continuous, flow
from jdiff.distill.sampling import consistency_denoiser_sample
from jdiff.models.bridge import make_model_fn
from jdiff.samplers import ddim, ddpm, dpm_solver, editing, euler, grid_files, pc, unipc
from jdiff.samplers.denoisers import compose, eps_half, guidance_scale_fn, guided, make_denoiser
from jdiff.samplers.grids import ddpm_grid, sigma_grid, timestep_grid, ve_start
from jdiff.schedules import Schedule

Array = jax.Array

AUTO = "auto"
TIMESTEP_GRIDS = ("trailing", "linspace")
SIGMA_GRIDS = ("log_snr", "karras", "uniform", "trailing")
HEUN_GRIDS = ("log_snr", "karras")
EDM_SIGMA_MAX = 80.0  # [EDM] Table 1; the grid of heun and edm starts there (see above)
GRID_KEYS = ("spacing", "rho", "sigma_max", "final_sigma")  # options of the grid, not the step


class Sampler(NamedTuple):
  """A registry entry.

  Attributes:
    fn: `fn(denoise, x, grid, rng, *, inpaint, **options) -> x_0` ('flow': `fn(process,
      model_fn, x_T, rng, *, num_steps, shift, cond, prediction, clip_x0, ...)`).
    space: 'vp' (timestep grid, `VPDenoiser`), 've' (sigma grid, `SigmaDenoiser`, VE start)
      or 'flow' (steps in t on a flow process).
    spacings: the grid names it accepts (besides 'auto').
    default_spacing: what 'auto' means (None: the sampler takes no spacing).
    default_eta: its stochasticity when eta is None (None: it takes no eta).
    fixed: other options it is registered with (grid or sampler options).
  """

  fn: Callable
  space: str
  spacings: tuple[str, ...] = ()
  default_spacing: str | None = None
  default_eta: float | None = None
  fixed: tuple = ()


SAMPLERS: dict[str, Sampler] = {
  "ddpm": Sampler(ddpm.ddpm_sample, "vp"),
  "ddim": Sampler(ddim.ddim_sample, "vp", TIMESTEP_GRIDS, "trailing", 0.0),
  "pc": Sampler(pc.pc_sample, "vp", TIMESTEP_GRIDS, "trailing", 1.0),
  "euler": Sampler(euler.euler_sample, "ve", SIGMA_GRIDS, "log_snr"),
  "heun": Sampler(
    euler.heun_sample, "ve", HEUN_GRIDS, "log_snr", fixed=(("sigma_max", EDM_SIGMA_MAX),)
  ),
  "euler_a": Sampler(euler.euler_ancestral_sample, "ve", SIGMA_GRIDS, "trailing", 1.0),
  "edm": Sampler(
    euler.edm_sample,
    "ve",
    HEUN_GRIDS,
    "log_snr",
    fixed=(("s_churn", 10.0), ("sigma_max", EDM_SIGMA_MAX)),
  ),
  "dpmpp_2m": Sampler(dpm_solver.dpmpp_2m_sample, "ve", SIGMA_GRIDS, "log_snr"),
  "dpmpp_2m_sde": Sampler(dpm_solver.dpmpp_2m_sde_sample, "ve", SIGMA_GRIDS, "trailing", 1.0),
  "dpmpp_3m": Sampler(dpm_solver.dpmpp_3m_sample, "ve", SIGMA_GRIDS, "log_snr", 0.0),
  "unipc": Sampler(
    unipc.unipc_sample, "ve", SIGMA_GRIDS, "log_snr", fixed=(("final_sigma", "sigma_min"),)
  ),
  # Flow models only (objective 'flow'): Euler / Heun in t from t = 1 (jdiff.flow).
  "flow_euler": Sampler(flow.flow_euler_sample, "flow"),
  "flow_heun": Sampler(flow.flow_heun_sample, "flow"),
}
_CM_GRID = (("sigma_max", EDM_SIGMA_MAX), ("final_sigma", "sigma_min"))  # Karras, 80..sigma(0)
DISTILLED_SAMPLERS = {  # consistency models only ([CM] Alg. 1): not swept with SAMPLERS
  "consistency": Sampler(consistency_denoiser_sample, "ve", ("karras",), "karras", fixed=_CM_GRID)
}
ALL_SAMPLERS = {**SAMPLERS, **DISTILLED_SAMPLERS}
FLOW_SAMPLERS = tuple(k for k, s in SAMPLERS.items() if s.space == "flow")
SIGMA_SAMPLERS = tuple(k for k, s in SAMPLERS.items() if s.space == "ve")


def resolve_options(sampler: str, *, spacing: str = AUTO, eta: float | None = None) -> dict:
  """The grid and eta keyword arguments of `sampler`, 'auto' / None resolved; checks them.

  Raises:
    ValueError: an unknown sampler, a spacing it does not accept, or an eta it does not take,
      naming the sampler and the valid values.
  """
  if sampler not in ALL_SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(ALL_SAMPLERS)}")
  spec = ALL_SAMPLERS[sampler]
  if spacing != AUTO and spacing not in spec.spacings:
    raise ValueError(
      f"sampler {sampler!r} does not accept spacing {spacing!r}; choose one of "
      f"{(AUTO,) + spec.spacings}"
    )
  if eta is not None and spec.default_eta is None:
    takes = sorted(k for k, s in ALL_SAMPLERS.items() if s.default_eta is not None)
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


def split_options(kw: dict) -> tuple[dict, dict]:
  """(grid options, sampler options) of resolved options `kw`."""
  return {k: v for k, v in kw.items() if k in GRID_KEYS}, {
    k: v for k, v in kw.items() if k not in GRID_KEYS
  }


def make_grid(
  schedule,
  space: str,
  *,
  num_steps: int,
  grid: Array | None = None,
  spacing: str | None = None,
  rho: float = 7.0,
  sigma_max: float | None = None,
  final_sigma: str = "zero",
) -> Array:
  """The grid a sampler of `space` walks: explicit, or generated by `spacing`.

  'vp': `timestep_grid` (no spacing: DDPM's every timestep); 've': `sigma_grid` (with
  `rho`, `sigma_max` and `final_sigma`); an explicit sigma grid must end with 0.
  """
  if grid is not None:
    if space != "ve":
      return jnp.asarray(grid)
    if final_sigma != "zero":
      raise ValueError(
        f"final_sigma={final_sigma!r} applies to generated grids; an explicit grid must end with 0"
      )
    return continuous.check_sigma_grid(grid)
  if space == "vp":
    if spacing is None:
      return ddpm_grid(schedule.num_steps)
    return timestep_grid(schedule.num_steps, num_steps, spacing=spacing)
  return sigma_grid(
    schedule, num_steps, spacing=spacing, rho=rho, final=final_sigma, sigma_max=sigma_max
  )


def run(spec: Sampler, denoise, x_T: Array, grid: Array, rng: Array, *, inpaint=None, **options):
  """`spec.fn` from standard normal x_T (the VP sample at grid[0]; scaled to VE for 've')."""
  x = ve_start(x_T, grid) if spec.space == "ve" else x_T
  return spec.fn(denoise, x, grid, rng, inpaint=inpaint, **options)


def sample(
  sampler: str,
  schedule,
  model_fn,
  x_T: Array,
  rng: Array,
  *,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
  num_steps: int = 50,
  spacing: str = AUTO,
  eta: float | None = None,
  grid: Array | None = None,
  inpaint=None,
  **options,
) -> Array:
  """Samples with a registered sampler from a plain `model_fn(x_t, t, cond)`.

  Builds the denoiser and the grid once and runs the sampler. `options` override the
  registry's (e.g. `sigma_max=None` for heun's full range, `final_sigma='zero'` for unipc)
  and pass the sampler's own (`s_churn`, `order`, `variance`, `n_corrector`, `rho`, ...).

  Returns:
    x_0 [B, ...].
  """
  spec = ALL_SAMPLERS[sampler]
  kw = resolve_options(sampler, spacing=spacing, eta=eta) | options
  thresh = dict(prediction=prediction, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
  if spec.space == "flow":
    return spec.fn(schedule, model_fn, x_T, rng, num_steps=num_steps, cond=cond, **thresh, **kw)
  if grid is not None:
    kw = {k: v for k, v in kw.items() if k not in ("spacing", "final_sigma")}
  grid_kw, opts = split_options(kw)
  g = make_grid(schedule, spec.space, num_steps=num_steps, grid=grid, **grid_kw)
  denoise = make_denoiser(schedule, model_fn, space=spec.space, cond=cond, **thresh)
  return run(spec, denoise, x_T, g, rng, inpaint=inpaint, **opts)


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
    grid_file: a sigma grid record (`jdiff.samplers.grid_files.save_grid`, e.g. from
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
  spec = ALL_SAMPLERS[sampler]
  if sampler == "ddpm":
    kw["variance"] = variance
  grid = _explicit_grid(sampler, grid_file, grid, num_steps)
  if shift is not None:
    if spec.space != "flow":
      raise ValueError(f"shift={shift} applies to flow_euler / flow_heun, not {sampler!r}")
    kw["shift"] = shift
  _check_editing(sampler, schedule, strength)
  drop = ("final_sigma",) if strength < 1.0 else ()  # SDEdit's tail of the grid ends with 0
  if grid is not None:
    drop = ("spacing", "final_sigma")  # so does an explicit grid, which replaces the spacing
  kw = {k: v for k, v in kw.items() if k not in drop}
  grid_kw, options = split_options(kw)
  grid_of = lambda: make_grid(schedule, spec.space, num_steps=num_steps, grid=grid, **grid_kw)
  if strength < 1.0:  # the tail of the sampler's grid, made once here
    tail = editing.sdedit_grid(grid_of(), strength)
    grid_of = lambda: tail
  if learn_sigma is None:
    learn_sigma = bool(getattr(module, "learn_sigma", False))
  eps_only = learn_sigma and not (sampler == "ddpm" and variance == "learned_range")
  guide = None
  if null_label is not None:
    guide = functools.partial(
      guided,
      schedule=schedule,
      scale=guidance_scale,
      null_cond=null_label,
      rescale=guidance_rescale,
      learn_sigma=learn_sigma,
      scale_fn=guidance_scale_fn(
        guidance_scale, interval=guidance_interval, schedule=guidance_schedule
      ),
    )
  # The model-function chain, composed once per call: network -> guidance -> eps half.
  chain = compose(guide, eps_half if eps_only else None)
  image_channels = int(getattr(module, "image_cond_channels", 0) or 0)
  thresh = dict(prediction=prediction, clip_x0=clip_x0, dynamic_percentile=dynamic_threshold)

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
    model_fn = chain(make_model_fn(module, params, train=False))
    cond = None
    if null_label is not None:
      if labels is None:
        raise ValueError("a class-conditional model needs labels to sample")
      cond = labels
    if image_channels:
      cond = _image_cond(image_channels, image_cond, inpaint, x_T)
    if spec.space == "flow":
      if inpaint is not None or x0 is not None:
        raise ValueError(
          f"{'inpainting' if inpaint is not None else 'SDEdit (x0)'} is not supported by "
          f"{sampler!r}, which steps in t; use a sigma-grid sampler (euler, euler_a, heun, ...), "
          "which runs flow models through their denoiser"
        )
      return spec.fn(schedule, model_fn, x_T, rng, num_steps=num_steps, cond=cond, **thresh, **kw)
    denoise = make_denoiser(schedule, model_fn, space=spec.space, cond=cond, **thresh)
    g = grid_of()
    if x0 is not None:
      x_T = editing.start_from(schedule, spec.space, x0, g[0], x_T)
    elif strength < 1.0:
      raise ValueError(f"strength={strength} < 1 needs the image x0 to start from")
    return run(spec, denoise, x_T, g, rng, inpaint=inpaint, **options)

  return sample_fn


def _explicit_grid(sampler: str, grid_file: str, grid: Array | None, num_steps: int):
  """The sigma grid of `grid_file` or `grid` (None: the sampler's own); checks they apply."""
  if not grid_file and grid is None:
    return None
  timesteps = grid is not None and not grid_file and sampler in ("ddim", "pc")  # a PD student's
  if sampler not in SIGMA_SAMPLERS and not timesteps:
    raise ValueError(
      f"grid_file={grid_file!r} / grid: sampler {sampler!r} does not step on a sigma grid; "
      f"stored grids apply to {sorted(SIGMA_SAMPLERS)}"
    )
  if grid_file and grid is not None:
    raise ValueError(f"pass grid_file ({grid_file!r}) or grid, not both")
  if grid_file:
    return grid_files.load_grid(grid_file, sampler=sampler, num_steps=num_steps)["sigmas"]
  return grid


def _check_editing(sampler: str, schedule, strength: float) -> None:
  """Checks SDEdit's strength, and that a flow sampler gets a flow process and no SDEdit."""
  editing.sdedit_start_index(1, strength)  # validates strength
  if ALL_SAMPLERS[sampler].space != "flow":
    return
  if getattr(schedule, "kind", None) != "flow":
    raise ValueError(
      f"sampler {sampler!r} steps in t on a rectified-flow process (jdiff.processes.flow(), "
      f"config.objective='flow'), got a {type(schedule).__name__}; sample other models with "
      "the sigma-grid samplers (euler, heun, dpmpp_2m, unipc, ...)"
    )
  if strength < 1.0:
    raise ValueError(
      f"strength={strength} (SDEdit) is not supported by {sampler!r}, which steps in t; "
      "use a sigma-grid sampler (euler, heun, dpmpp_2m, unipc, ...), which runs flow models "
      "through their denoiser"
    )


def _image_cond(channels: int, image_cond: Array | None, inpaint, x_T: Array) -> Array:
  """The conditioning image of an image-conditioned model (a mask-conditioned one: from inpaint)."""
  if image_cond is None and inpaint is not None and channels == x_T.shape[-1] + 1:
    image_cond = conditioning.inpaint_cond(inpaint.known, inpaint.mask)
  if image_cond is None:
    raise ValueError(
      f"the model takes a conditioning image of {channels} channels "
      "(image_cond_channels); pass image_cond (or inpaint, for a mask-conditioned model)"
    )
  return image_cond
