"""Few-step generation: progressive distillation and consistency models (the pure layer).

`progressive` computes [PD]'s two-teacher-step target and loss on a discrete schedule;
`consistency` holds the consistency parameterisation, the Karras level grid with [iCT]'s
curriculum and log-normal level sampling, the pseudo-Huber metric, the distillation and
training losses and [CM]'s multistep sampler (a step function on `samplers.sample_loop`).

References:
  [PD] Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models, 2022.
  [CM] Song, Dhariwal, Chen, Sutskever. Consistency Models, 2023.
  [iCT] Song, Dhariwal. Improved Techniques for Training Consistency Models, 2024.
"""

from jdiff.distill.consistency import (
  cm_coefs,
  consistency_distillation_loss,
  consistency_fn,
  consistency_sample,
  consistency_step,
  consistency_training_loss,
  ict_num_levels,
  karras_levels,
  log_normal_level_probs,
  ode_step,
  pseudo_huber,
  sample_level_index,
  sampling_levels,
)
from jdiff.distill.progressive import check_num_steps, pd_loss, pd_target, student_grid, time_of
from jdiff.distill.sampling import consistency_denoiser_sample, denoiser_consistency_fn
