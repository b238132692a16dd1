"""EDM on the embedded digits: the default U-Net, EDM preconditioning, loss and Heun sampler.

  python -m experiments.main --config=jdiff/configs/edm_digits.py --workdir=runs/edm_digits

The network is `models.edm.EDMPrecond` around the U-Net, trained on the VE process with
log-normal sigma (P_mean -1.2, P_std 1.2) and lambda(sigma) weighting ([EDM] Table 1); sampled
with EDM's deterministic sampler (Alg. 1, `heun`) on the rho = 7 Karras grid from sigma = 80
(--config.sample.sampler=edm for Alg. 2; EDM's defaults are 18 steps, NFE 35).
"""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.objective = "edm"
  c.sample.sampler = "heun"
  c.sample.spacing = "karras"
  c.sample.num_steps = 18
  return c
