"""Samplers: one step function each, driven by one `lax.scan` loop (`sample_loop`).

Discrete-time samplers (DDPM, DDIM, predictor-corrector) walk integer timestep grids;
the continuous ones (Euler, Heun, Euler-ancestral, EDM, DPM-Solver++, UniPC) walk sigma
grids and call the model at fractional t through `jdiff.continuous.make_denoiser`.

One family per module: `ddpm`, `ddim`, `pc`, `euler` (Euler, Heun, Euler-ancestral, EDM),
`dpm_solver` (DPM-Solver++ 2M/3M and SDE), `unipc`; `grids` builds the timestep and sigma
grids, `driver` holds the scan and `optimize` fits few-step sigma grids to a model.
"""

from jdiff.samplers.ddim import ddim_sample, ddim_step
from jdiff.samplers.ddpm import ddpm_sample, ddpm_step
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
)
from jdiff.samplers.optimize import OptimizedGrid, optimize_grid
from jdiff.samplers.pc import langevin_corrector_step, pc_sample, pc_step
from jdiff.samplers.unipc import UniPCState, unipc_init_state, unipc_sample, unipc_step
