"""Continuous processes (`jdiff.processes`): closed-form coefficients, and every sigma-grid
sampler on every process with the exact model of Gaussian data.

For x0 ~ N(mu, v) per dimension, the PF-ODE in the VE view x = x0 + s eps maps x(s0) to
mu + (x(s0) - mu) sqrt(v) / sqrt(v + s0^2) exactly, so an ODE sampler started at x_T sqrt(1 +
s0^2) (jdiff's convention) has a known answer, and its error must fall at the sampler's order.
The exact model is given to each process in its own terms (its time, its scaling, its
prediction target), so these tests check the process's conversions end to end.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, processes, schedules
from jdiff.samplers import grids, registry

MU, V = 0.7, 0.3**2
PROCESSES = {
  "vp_cosine": (processes.vp_cosine(), "eps"),
  "vp_linear": (processes.vp_linear(), "v"),
  "ve": (processes.ve(), "x0"),
  "flow": (processes.flow(), "velocity"),
}


def exact_model(p, prediction):
  """model_fn(x_t, t * t_scale, cond) of the process predicting `prediction` exactly."""

  def model_fn(x_t, tm, cond):
    t = tm / p.t_scale
    a, s = processes.alpha_sigma(p, t)
    a, s = a[:, None], s[:, None]
    x0 = MU + a * V / (a**2 * V + s**2) * (x_t - a * MU)
    return processes.target(p, x0, t, (x_t - a * x0) / s, prediction=prediction)

  return model_fn


@pytest.mark.parametrize("name", list(PROCESSES))
def test_coefficients_and_time_maps(name):
  p, _ = PROCESSES[name]
  t = jnp.linspace(p.t_min, p.t_max, 9)
  a, s = processes.alpha_sigma(p, t)
  sig = processes.ve_sigma(p, t)
  np.testing.assert_allclose(sig, s / a, rtol=2e-5)
  np.testing.assert_allclose(processes.t_of_ve_sigma(p, sig), t, rtol=2e-5, atol=1e-6)
  lo, hi = processes.sigma_min_max(p)
  np.testing.assert_allclose([lo, hi], [0.002, 80.0], rtol=1e-4)
  if name.startswith("vp"):
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)
  # The 'velocity' target is d x_t / dt (central difference of the interpolant).
  x0, eps, h = 0.4, -1.1, 1e-3
  tt = jnp.array([0.2, 0.5]) if name != "ve" else jnp.array([0.5, 3.0])
  xt = lambda u: float(np.dot(np.asarray(processes.alpha_sigma(p, u)), [x0, eps]))
  fd = [(xt(u + h) - xt(u - h)) / (2 * h) for u in np.asarray(tt)]
  vel = processes.target(p, jnp.full((2, 1), x0), tt, jnp.full((2, 1), eps), prediction="velocity")
  np.testing.assert_allclose(vel[:, 0], fd, rtol=2e-3)


def test_closed_forms():
  cos = processes.vp_cosine()
  t = jnp.array([0.1, 0.5, 0.9])
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(processes.alpha_sigma(cos, t)[0] ** 2, f(t) / f(0.0), rtol=1e-5)
  lin = processes.vp_linear()
  np.testing.assert_allclose(
    processes.alpha_sigma(lin, t)[0] ** 2, np.exp(-(0.1 * t + 0.5 * 19.9 * t**2)), rtol=1e-5
  )
  fl = processes.flow()
  np.testing.assert_allclose(processes.ve_sigma(fl, t), t / (1 - t), rtol=1e-6)
  with pytest.raises(ValueError, match="sigma_max=200"):
    processes.vp_linear(sigma_max=200.0)
  with pytest.raises(ValueError, match="prediction 'v' needs a VP"):
    processes.check_prediction(fl, "v")


def test_training_time_samplers():
  key = jax.random.key(0)
  t = processes.sample_t(processes.ve(), key, (100000,))
  np.testing.assert_allclose([jnp.mean(jnp.log(t)), jnp.std(jnp.log(t))], [-1.2, 1.2], atol=0.02)
  t = processes.sample_t(processes.flow(p_mean=0.5, p_std=0.8), key, (100000,))
  logit = jnp.log(t) - jnp.log1p(-t)
  np.testing.assert_allclose([jnp.mean(logit), jnp.std(logit)], [0.5, 0.8], atol=0.02)
  t = processes.sample_t(processes.flow(t_sampler="uniform"), key, (100000,))
  assert 0 <= float(t.min()) and float(t.max()) <= 1 and abs(float(t.mean()) - 0.5) < 0.01
  cos = processes.vp_cosine()
  t = processes.sample_t(cos, key, (1000,))
  assert cos.t_min <= float(t.min()) and float(t.max()) <= cos.t_max


@pytest.mark.parametrize("name", list(PROCESSES))
def test_denoiser_is_the_exact_ve_denoiser(name):
  """continuous.make_denoiser dispatches to the process: D(x, s) = E[x0 | x0 + s n = x]."""
  p, pred = PROCESSES[name]
  d = continuous.make_denoiser(p, exact_model(p, pred), prediction=pred)
  x = jnp.linspace(-3, 3, 7)[:, None]
  for s in (0.01, 0.5, 10.0):
    np.testing.assert_allclose(d(x, s), MU + V / (V + s**2) * (x - MU), rtol=1e-4, atol=1e-5)


ODE_SAMPLERS = {
  # name: (sample fn, order, extra kwargs)
  "euler": ("euler", 1, {}),
  "heun": ("heun", 2, {}),
  "dpmpp_2m": ("dpmpp_2m", 2, {}),
  "dpmpp_3m": ("dpmpp_3m", 3, {}),
  "unipc": ("unipc", 3, {"final_sigma": "zero"}),
}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_ode_samplers_converge_at_their_order(name):
  p, pred = PROCESSES[name]
  model_fn = exact_model(p, pred)
  x_T = jax.random.normal(jax.random.key(0), (32, 1))
  s0 = float(processes.sigma_min_max(p)[1])
  want = MU + (x_T * math.sqrt(1 + s0**2) - MU) * math.sqrt(V) / math.sqrt(V + s0**2)
  for sampler, (fn, order, kw) in ODE_SAMPLERS.items():
    errs = []
    for n in (16, 32):
      out = jax.jit(
        lambda x, fn=fn, n=n, kw=kw: registry.sample(
          fn,
          p,
          model_fn,
          x,
          jax.random.key(1),
          num_steps=n,
          spacing="log_snr",
          prediction=pred,
          **kw,
        )
      )(x_T)
      errs.append(float(jnp.max(jnp.abs(out - want))))
    measured = math.log2(errs[0] / errs[1])
    assert measured > order - 0.35, (name, sampler, errs, measured)


STOCHASTIC = {
  "euler_a": lambda p, m, x, k, pred, n: registry.sample(
    "euler_a", p, m, x, k, num_steps=n, spacing="log_snr", prediction=pred
  ),
  "edm": lambda p, m, x, k, pred, n: registry.sample(
    "edm",
    p,
    m,
    x,
    k,
    num_steps=n,
    spacing="karras",
    s_churn=40.0,
    s_tmin=0.05,
    s_tmax=50.0,
    prediction=pred,
  ),
  "dpmpp_2m_sde": lambda p, m, x, k, pred, n: registry.sample(
    "dpmpp_2m_sde", p, m, x, k, num_steps=n, spacing="log_snr", prediction=pred
  ),
}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_stochastic_samplers_converge_to_the_exact_law(name):
  """The law's error (|mean - MU| + |std - sqrt(V)| of 20000 samples) at 40 steps is below half
  that at 10 (weak order >= 1), or already at the Monte Carlo floor (~4 standard errors)."""
  p, pred = PROCESSES[name]
  model_fn = exact_model(p, pred)
  x_T = jax.random.normal(jax.random.key(0), (20000, 1))
  for sampler, fn in STOCHASTIC.items():
    errs = []
    for n in (10, 40):
      out = jax.jit(lambda x, fn=fn, n=n: fn(p, model_fn, x, jax.random.key(1), pred, n))(x_T)
      errs.append(abs(float(jnp.mean(out)) - MU) + abs(float(jnp.std(out)) - math.sqrt(V)))
    assert errs[1] < max(errs[0] / 2, 0.01), (name, sampler, errs)


def test_process_grids():
  fl = processes.flow()
  g = grids.sigma_grid(fl, 4, spacing="uniform")
  t = np.linspace(fl.t_max, fl.t_min, 4)
  np.testing.assert_allclose(g[:-1], t / (1 - t), rtol=1e-5)
  np.testing.assert_allclose(grids.sigma_grid(fl, 4, spacing="trailing"), g)
  g = grids.sigma_grid(processes.ve(), 18, spacing="karras")
  np.testing.assert_allclose([g[0], g[-2], g[-1]], [80.0, 0.002, 0.0], rtol=1e-5)


# ----------------------------------------------------------------------------- noise protocol


NOISES = {"discrete": (schedules.cosine(100), "eps"), **PROCESSES}


@pytest.mark.parametrize("name", list(NOISES))
def test_schedule_and_process_share_one_protocol(name):
  """A `Schedule` and every `Process` answer the same members, and the module functions of
  `continuous` dispatch through them (no type test): sigma range, t <-> sigma, predictions,
  the denoiser."""
  noise, pred = NOISES[name]
  assert noise.kind == name
  lo, hi = noise.sigma_min_max()
  np.testing.assert_allclose([lo, hi], noise.t_to_sigma(jnp.array([noise.t_min, noise.t_max])))
  assert [float(v) for v in continuous.sigma_min_max(noise)] == [float(lo), float(hi)]
  t = jnp.linspace(noise.t_min, noise.t_max, 7)[1:-1]
  sig = continuous.t_to_sigma(noise, t)
  assert np.all(np.diff(np.asarray(sig)) > 0)
  np.testing.assert_allclose(continuous.sigma_to_t(noise, sig), t, rtol=1e-4, atol=2e-3)
  continuous.check_prediction(noise, pred)
  bad = "velocity" if name == "discrete" else "v" if name in ("ve", "flow") else "score"
  with pytest.raises(ValueError, match=repr(bad) if bad != "v" else "needs a VP process"):
    noise.check_prediction(bad)
  # The denoiser calls the model at t(sigma) * t_scale on x_ve scaled to x_t.
  seen = []

  def model_fn(x_t, tm, cond):
    seen.append(tm)
    return jnp.zeros_like(x_t)

  x = jnp.ones((2, 3))
  d = continuous.make_denoiser(noise, model_fn, prediction=pred)(x, sig[2])
  np.testing.assert_allclose(seen[0], [t[2] * noise.t_scale] * 2, rtol=1e-4, atol=2e-3)
  same = noise.make_denoiser(model_fn, prediction=pred)(x, sig[2])
  np.testing.assert_array_equal(d, same)
