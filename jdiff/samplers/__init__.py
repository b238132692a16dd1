"""Samplers: one step function each, driven by one `lax.scan` loop (`sample_loop`)."""

from jdiff.samplers.ddim import ddim_sample, ddim_step
from jdiff.samplers.ddpm import ddpm_sample, ddpm_step
from jdiff.samplers.driver import sample_loop
from jdiff.samplers.grids import timestep_grid
