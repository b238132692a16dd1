"""jdiff: diffusion models in JAX/Flax.

Pure primitives (schedules, the forward process, losses, samplers) are re-exported
here; models, training and data live in the subpackages `jdiff.models`,
`jdiff.training` and `jdiff.data`. Importing jdiff imports no TensorFlow and
initialises no device.
"""

from jdiff import continuous, diffusion, likelihood, losses, ops, samplers, schedules
from jdiff.diffusion import (eps_from_score, eps_from_v, eps_from_x0, p_mean_variance,
                             q_mean_variance, q_posterior, q_sample, score_from_eps,
                             to_x0_eps, v_from_x0_eps, x0_from_eps, x0_from_v)
from jdiff.likelihood import ode_bpd, ode_nll
from jdiff.losses import (denoising_loss, hybrid_loss, importance_sample_timesteps,
                          sample_timesteps, variational_bound, vlb_term)
from jdiff.schedules import (Schedule, cosine, from_betas, get_schedule, linear,
                             rescale_zero_terminal_snr, scaled_linear, sigmoid)

__version__ = "0.1.0"
