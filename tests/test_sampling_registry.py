"""Every sampler name the trainer accepts, wired through `make_sample_fn`, samples the data.

The "network" is a parameter-free flax module computing the exact eps of Gaussian data (or
of a point mass), so this checks the registry's plumbing (prediction, spacing, num_steps,
eta, guidance, thresholding, learned variance) against the maths rather than against a
trained model (tests/test_samplers_trained.py does that).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, diffusion, schedules
from jdiff.runs.sample_options import sample_options, validate_sample_config
from jdiff.samplers import grids
from jdiff.samplers.registry import FLOW_SAMPLERS, SAMPLERS, make_sample_fn, resolve_options
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


SPACING = {
  "ddpm": "auto",
  "ddim": "trailing",
  "pc": "trailing",
  "euler_a": "karras",
  "euler": "karras",
  "heun": "karras",
  "edm": "karras",
}
STEPS = {"ddpm": 1000, "pc": 100, "euler_a": 100, "edm": 30, "heun": 30}


# The flow samplers step in t on a flow process, not on a Schedule: tests/test_flow.py.
DDPM_SAMPLERS = sorted(set(SAMPLERS) - set(FLOW_SAMPLERS))


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
def test_registry_sampler_matches_gaussian_data(name):
  schedule = schedules.linear()
  fn = make_sample_fn(
    ExactEps(schedule),
    schedule,
    sampler=name,
    num_steps=STEPS.get(name, 40),
    spacing=SPACING.get(name, "log_snr"),
    clip_x0=None,
  )
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
  fn = make_sample_fn(
    ExactEps(schedule, shift=shift),
    schedule,
    sampler="dpmpp_2m",
    num_steps=40,
    spacing="log_snr",
    clip_x0=None,
    guidance_scale=w,
    null_label=10,
  )
  x_T = jax.random.normal(jax.random.key(0), (N, 2, 2, 1))
  x = np.asarray(jax.jit(fn)({}, x_T, jax.random.key(1), jnp.zeros((N,), jnp.int32)))
  # With exact eps the guided ODE is the flow of N(MU + w * shift, STD^2) (eps is linear
  # in the mean), so samples follow that Gaussian.
  assert abs(x.mean() - (MU + w * shift)) < 5 * STD / np.sqrt(x.size) + 0.01
  with pytest.raises(ValueError, match="needs labels"):
    fn({}, x_T, jax.random.key(1), None)


def test_auto_spacing_and_eta_per_family():
  want = {
    "ddpm": {},
    "ddim": dict(spacing="trailing", eta=0.0),
    "pc": dict(spacing="trailing", eta=1.0),
    "euler": dict(spacing="log_snr"),
    "heun": dict(spacing="log_snr", sigma_max=80.0),
    "euler_a": dict(spacing="trailing", eta=1.0),
    "edm": dict(spacing="log_snr", s_churn=10.0, sigma_max=80.0),
    "dpmpp_2m": dict(spacing="log_snr"),
    "dpmpp_2m_sde": dict(spacing="trailing", eta=1.0),
    "dpmpp_3m": dict(spacing="log_snr", eta=0.0),
    "unipc": dict(spacing="log_snr", final_sigma="sigma_min"),
    "flow_euler": {},
    "flow_heun": {},
  }
  assert set(want) == set(SAMPLERS)
  for name, kw in want.items():
    assert resolve_options(name) == kw, name
  assert resolve_options("ddim", spacing="linspace", eta=0.5) == dict(spacing="linspace", eta=0.5)
  with pytest.raises(ValueError, match=r"'euler' does not accept spacing 'leading'.*'karras'"):
    make_sample_fn(
      ExactEps(schedules.linear()), schedules.linear(), sampler="euler", spacing="leading"
    )
  with pytest.raises(ValueError, match=r"'ddim' does not accept spacing 'karras'.*'trailing'"):
    resolve_options("ddim", spacing="karras")
  with pytest.raises(ValueError, match=r"'ddim' does not accept spacing 'leading'"):
    resolve_options("ddim", spacing="leading")
  with pytest.raises(ValueError, match=r"'heun' does not accept spacing 'trailing'.*'log_snr'"):
    resolve_options("heun", spacing="trailing")
  with pytest.raises(ValueError, match=r"'ddpm' does not accept spacing 'trailing'.*'auto'"):
    resolve_options("ddpm", spacing="trailing")
  with pytest.raises(ValueError, match=r"'heun' is deterministic and takes no eta"):
    resolve_options("heun", eta=0.0)
  with pytest.raises(ValueError, match="unknown sampler 'magic'"):
    resolve_options("magic")


class PointMass(nn.Module):
  """The exact prediction for data that are one fixed image X0 (learned-variance optional).

  x0_hat = X0 at every t, so every sampler ends at threshold(X0) exactly: the thresholded
  data prediction is constant, and each sampler's last step returns it.
  """

  schedule: schedules.Schedule
  target: np.ndarray
  learn_sigma: bool = False

  @nn.compact
  def __call__(self, x, t, y=None, *, train: bool):
    del y, train
    ab = continuous.alpha_bar_at(self.schedule, t.astype(jnp.float32))[:, None, None, None]
    eps = (x - jnp.sqrt(ab) * self.target) / jnp.sqrt(1.0 - ab)
    # A variance half that would wreck any sampler that read it as eps.
    return jnp.concatenate([eps, 1e3 * jnp.ones_like(eps)], -1) if self.learn_sigma else eps


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
def test_thresholding_exact_on_a_point_mass(name):
  """Static clipping and dynamic thresholding give threshold(X0) from every sampler."""
  schedule = schedules.cosine(50)
  target = np.linspace(-2.0, 2.0, 2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
  target[1] *= 0.5  # second image: within [-1, 1] over 3/4 of its pixels
  x_T = jax.random.normal(jax.random.key(0), target.shape)
  q = 0.9
  s = np.maximum(np.quantile(np.abs(target).reshape(2, -1), q, axis=1), 1.0)[:, None, None, None]
  want = {"clip": np.clip(target, -1.0, 1.0), "dynamic": np.clip(target, -s, s) / s}
  # unipc too: its grid ends at sigma_min, and its last step lands on D.
  # The learned-variance case also checks that only the eps half reaches the sampler.
  for kind, learn_sigma, kw in (
    ("clip", False, dict(clip_x0=1.0)),
    ("dynamic", True, dict(clip_x0=1.0, dynamic_threshold=q)),
  ):
    fn = make_sample_fn(
      PointMass(schedule, target, learn_sigma), schedule, sampler=name, num_steps=6, **kw
    )
    x = np.asarray(jax.jit(fn)({}, x_T, jax.random.key(1), None))
    np.testing.assert_allclose(x, want[kind], atol=2e-5, err_msg=kind)
    assert np.abs(x - target).max() > 0.1  # the thresholding did something


def test_threshold_x0_matches_numpy():
  x = np.random.default_rng(0).normal(0.0, 1.5, (3, 5, 5, 2)).astype(np.float32)
  for p in (0.5, 0.95, 1.0):
    s = np.maximum(np.quantile(np.abs(x).reshape(3, -1), p, axis=1), 1.0)[:, None, None, None]
    np.testing.assert_allclose(
      diffusion.threshold_x0(jnp.asarray(x), dynamic_percentile=p),
      np.clip(x, -s, s) / s,
      rtol=1e-5,
      atol=1e-6,
    )


def test_sample_config_validation():
  from jdiff.configs import default  # pylint: disable=g-import-not-at-top

  c = default.get_config()
  validate_sample_config(c.sample, latent=False)
  opts = sample_options(c.sample)
  assert opts["spacing"] == "auto" and opts["eta"] is None and opts["dynamic_threshold"] is None
  assert opts["clip_x0"] == 1.0
  with pytest.raises(ValueError, match="clip_x0 must be 0 for latent"):
    validate_sample_config(c.sample, latent=True)
  c.sample.clip_x0 = 0.0
  validate_sample_config(c.sample, latent=True)
  c.sample.dynamic_threshold = 0.995
  validate_sample_config(c.sample, latent=False)
  assert sample_options(c.sample)["dynamic_threshold"] == 0.995
  with pytest.raises(ValueError, match="dynamic_threshold must be 0 for latent"):
    validate_sample_config(c.sample, latent=True)
  c.sample.dynamic_threshold = 1.5
  with pytest.raises(ValueError, match="dynamic_threshold must be a percentile.*1.5"):
    validate_sample_config(c.sample, latent=False)
  c.sample.dynamic_threshold = 0.0
  c.sample.sampler, c.sample.spacing = "dpmpp_2m", "leading"
  with pytest.raises(ValueError, match=r"config.sample: sampler 'dpmpp_2m' does not accept"):
    validate_sample_config(c.sample, latent=False)


def test_guided_learned_variance_model_guides_the_eps_half_only(monkeypatch):
  """make_sample_fn passes learn_sigma to cfg_model_fn (through `denoisers.guided`), and the
  sampler sees C channels."""
  from jdiff.samplers import denoisers as sampling  # pylint: disable=g-import-not-at-top

  seen = {}
  real = sampling.cfg_model_fn

  def spy(*args, **kwargs):
    seen.update(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(sampling, "cfg_model_fn", spy)
  schedule = schedules.cosine(50)
  target = np.full((1, 4, 4, 1), 0.5, np.float32)  # broadcasts over the doubled CFG batch
  fn = make_sample_fn(
    PointMass(schedule, target, learn_sigma=True),
    schedule,
    sampler="ddim",
    num_steps=4,
    guidance_scale=3.0,
    null_label=10,
  )
  x = fn(
    {},
    jax.random.normal(jax.random.key(0), (2, 4, 4, 1)),
    jax.random.key(1),
    jnp.zeros((2,), jnp.int32),
  )
  assert seen["learn_sigma"] is True and seen["guidance_scale"] == 3.0
  # cond = uncond for this model, so guidance leaves the data prediction X0 unchanged.
  np.testing.assert_allclose(np.asarray(x), np.broadcast_to(target, x.shape), atol=1e-5)


def test_sigma_max_starts_the_grid_clamped_to_the_schedule():
  sched = schedules.cosine()
  s_min, s_max = (float(v) for v in continuous.sigma_min_max(sched))
  g = np.asarray(grids.sigma_grid(sched, 5, spacing="log_snr", sigma_max=80.0))
  np.testing.assert_allclose(g[:-1], np.geomspace(80.0, s_min, 5), rtol=1e-5)
  g = np.asarray(grids.sigma_grid(sched, 5, spacing="karras", sigma_max=1e9))
  np.testing.assert_allclose(g[0], s_max, rtol=1e-6)
  with pytest.raises(ValueError, match=r"'karras' and 'log_snr' grids only.*'uniform'"):
    grids.sigma_grid(sched, 5, spacing="uniform", sigma_max=80.0)
