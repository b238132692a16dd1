"""jdiff: diffusion models in JAX/Flax.

The pure primitives are re-exported here; each lives in its home module:
  - `jdiff.schedules`: the `Schedule` pytree and its constructors (linear, cosine, ...);
  - `jdiff.diffusion`: the forward process q, the reverse step p, the one prediction
    conversion (`convert_prediction`, `to_x0_eps`), x0 clipping / dynamic thresholding
    (`threshold_x0`) and the `ModelFn` interface;
  - `jdiff.continuous`: the continuous-time view beside it: sigma <-> fractional timestep
    (`t_to_sigma`, `sigma_to_t`, `alpha_bar_at`) and the EDM-style denoiser of a model
    (`make_denoiser`), on which the sigma-grid samplers run;
  - `jdiff.losses`: timestep sampling, the denoising loss and the variational bound;
  - `jdiff.likelihood`: the probability-flow ODE likelihood;
  - `jdiff.processes`: continuous-time processes beside the discrete schedule (VP cosine /
    linear, VE / EDM, rectified flow), which every sigma-grid sampler runs on; `jdiff.flow`:
    flow-matching samplers in t and reflow pairs.
Samplers are in `jdiff.samplers`; models, training, data, kernels and config-driven runs in
the subpackages `jdiff.models`, `jdiff.training`, `jdiff.data`, `jdiff.ops` and `jdiff.runs`.
Importing jdiff imports no TensorFlow and initialises no device.
"""

from jdiff import (
  continuous,
  diffusion,
  flow,
  likelihood,
  losses,
  ops,
  processes,
  samplers,
  schedules,
)
from jdiff.continuous import alpha_bar_at, make_denoiser, sigma_min_max, sigma_to_t, t_to_sigma
from jdiff.diffusion import (
  convert_prediction,
  eps_from_score,
  eps_from_v,
  eps_from_x0,
  p_mean_variance,
  q_mean_variance,
  q_posterior,
  q_sample,
  score_from_eps,
  threshold_x0,
  to_x0_eps,
  v_from_x0_eps,
  x0_from_eps,
  x0_from_v,
)
from jdiff.likelihood import ode_bpd, ode_nll
from jdiff.losses import (
  denoising_loss,
  hybrid_loss,
  importance_sample_timesteps,
  sample_timesteps,
  variational_bound,
  vlb_term,
)
from jdiff.schedules import (
  Schedule,
  cosine,
  from_betas,
  get_schedule,
  linear,
  rescale_zero_terminal_snr,
  scaled_linear,
  sigmoid,
)

__version__ = "0.1.0"
