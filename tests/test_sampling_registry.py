"""Every sampler name the trainer accepts, wired through `make_sample_fn`, samples the data.

The "network" is a parameter-free flax module computing the exact eps of Gaussian data, so
this checks the registry's plumbing (prediction, spacing, num_steps, eta, guidance) against
the maths rather than against a trained model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import schedules
from jdiff import continuous
from jdiff.training.sampling import SAMPLERS, make_sample_fn
from tests import analytic

MU, STD = 0.3, 0.5
N = 2048


class ExactEps(nn.Module):
  """E[eps | x_t] for x0 ~ N(MU + shift * y, STD^2), at integer or fractional t."""
  schedule: schedules.Schedule
  shift: float = 0.0

  @nn.compact
  def __call__(self, x, t, y=None, *, train: bool):
    del train
    ab = continuous.alpha_bar_at(self.schedule, t.astype(jnp.float32))
    mu = MU if y is None else MU + self.shift * (y != 10).astype(jnp.float32)[:, None, None, None]
    return analytic.gaussian_eps_at_alpha_bar(ab, x, mu, STD)


SPACING = {"ddpm": "trailing", "ddim": "trailing", "pc": "trailing", "euler_a": "karras",
           "euler": "karras", "heun": "karras", "edm": "karras"}
STEPS = {"ddpm": 1000, "pc": 100, "euler_a": 100, "edm": 30, "heun": 30}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_registry_sampler_matches_gaussian_data(name):
  schedule = schedules.linear()
  fn = make_sample_fn(ExactEps(schedule), schedule, sampler=name,
                      num_steps=STEPS.get(name, 40), spacing=SPACING.get(name, "log_snr"),
                      eta=1.0 if name in ("euler_a", "pc") else 0.0, clip_x0=None)
  x_T = jax.random.normal(jax.random.key(0), (N, 2, 2, 1))
  x = np.asarray(jax.jit(fn)({}, x_T, jax.random.key(1), None))
  assert x.shape == x_T.shape and np.all(np.isfinite(x))
  # 5 standard errors on the mean and variance, plus each sampler's discretisation bias.
  se_mean, se_var = STD / np.sqrt(x.size), STD**2 * np.sqrt(2.0 / x.size)
  assert abs(x.mean() - MU) < 5 * se_mean + 0.01
  assert abs(x.var() - STD**2) < 5 * se_var + 0.06 * STD**2


def test_guidance_through_the_registry():
  """scale w moves the mean to MU + w * shift: uncond + w (cond - uncond) for Gaussian data."""
  schedule = schedules.linear()
  shift, w = 0.2, 2.5
  fn = make_sample_fn(ExactEps(schedule, shift=shift), schedule, sampler="dpmpp_2m",
                      num_steps=40, spacing="log_snr", clip_x0=None, guidance_scale=w,
                      null_label=10)
  x_T = jax.random.normal(jax.random.key(0), (N, 2, 2, 1))
  x = np.asarray(jax.jit(fn)({}, x_T, jax.random.key(1), jnp.zeros((N,), jnp.int32)))
  # With exact eps the guided ODE is the flow of N(MU + w * shift, STD^2) (eps is linear
  # in the mean), so samples follow that Gaussian.
  assert abs(x.mean() - (MU + w * shift)) < 5 * STD / np.sqrt(x.size) + 0.01
  with pytest.raises(ValueError, match="needs labels"):
    fn({}, x_T, jax.random.key(1), None)
