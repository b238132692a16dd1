"""Samplers: one step function each, driven by one `lax.scan` loop (`sample_loop`).

As k-diffusion's `sample_*(model, x, sigmas)`, every sampler is
`fn(denoise, x, grid, rng, *, inpaint=None, **its own options)`: it receives a ready
denoiser (`denoisers.make_denoiser`: guidance, thresholding composed once) and a ready grid.
Discrete-time samplers (DDPM, DDIM, predictor-corrector) walk timestep grids with a
`VPDenoiser`; the continuous ones (Euler, Heun, Euler-ancestral, EDM, DPM-Solver++, UniPC)
walk sigma grids with a `SigmaDenoiser`, which calls the model at fractional t.

One family per module: `ddpm`, `ddim`, `pc`, `euler` (Euler, Heun, Euler-ancestral, EDM),
`dpm_solver` (DPM-Solver++ 2M/3M and SDE), `unipc`; `grids` builds the timestep and sigma
grids, `driver` holds the scan, `editing` the inpainting / SDEdit hooks, `optimize` fits
few-step sigma grids to a model, and `registry` maps a sampler name to a `sample_fn`.
"""

from jdiff.samplers.ddim import ddim_sample, ddim_step
from jdiff.samplers.ddpm import ddpm_sample, ddpm_step
from jdiff.samplers.denoisers import SigmaDenoiser, VPDenoiser, make_denoiser
from jdiff.samplers.dpm_solver import (
  DPMState,
  dpmpp_2m_sample,
  dpmpp_2m_sde_sample,
  dpmpp_2m_step,
  dpmpp_3m_sample,
  dpmpp_3m_step,
)
from jdiff.samplers.driver import sample_loop
from jdiff.samplers.euler import (
  edm_sample,
  edm_stochastic_step,
  euler_ancestral_sample,
  euler_ancestral_step,
  euler_sample,
  euler_step,
  heun_sample,
  heun_step,
)
from jdiff.samplers.grids import (
  FINAL_SIGMAS,
  SIGMA_SPACINGS,
  karras_sigmas,
  sigma_grid,
  timestep_grid,
  ve_start,
)
from jdiff.samplers.optimize import OptimizedGrid, optimize_grid
from jdiff.samplers.pc import langevin_corrector_step, pc_sample, pc_step
from jdiff.samplers.unipc import UniPCState, unipc_init_state, unipc_sample, unipc_step
