"""DDPM / DDIM samplers driven by the exact denoiser of analytic data.

For Gaussian data every sampler step is affine in x_t, so the sampler's output law is exactly
Gaussian with a mean and variance we propagate here in float64 from the papers' update rules.
Samples are checked against that (5 standard errors, from the sample size), and the propagated
law against the data (a stated discretisation bias per sampler: the fixed-variance ancestral
chain and DDIM with skipped steps are not exact samplers of the data).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jdiff import diffusion, samplers, schedules
from jdiff.samplers import VPDenoiser
from jdiff.samplers.grids import ddpm_grid, timestep_grid
from tests import analytic

T = 1000
SCHED = schedules.linear(T)
MU, SIG = np.array([0.3, -0.2]), np.array([0.5, 0.8])
W, M, SD = [0.3, 0.7], [-0.6, 0.5], [0.1, 0.2]


@functools.partial(jax.jit, static_argnames=("kind", "variance", "eta", "steps", "spacing", "data"))
def _sample(
  s, x_T, rng, *, kind, variance="fixed_small", eta=0.0, steps=100, spacing="leading", data="gauss"
):
  if data == "gauss":
    f = analytic.gaussian_eps_fn(s, MU, SIG)
  elif data == "mix1d":
    f = analytic.mixture_eps_fn(s, W, M, SD)
  else:
    f = analytic.mixture_eps_fn(
      s, [0.5, 0.25, 0.25], [[0.6, 0.6], [-0.6, 0.0], [0.3, -0.7]], [0.1, 0.15, 0.1]
    )
  if kind == "ddpm":
    return samplers.ddpm_sample(
      VPDenoiser(s, f), x_T, ddpm_grid(s.num_steps), rng, variance=variance
    )
  grid = timestep_grid(s.num_steps, steps, spacing=spacing)
  return samplers.ddim_sample(VPDenoiser(s, f), x_T, grid, rng, eta=eta)


def _propagate(grid, mu, sig, *, kind, variance="fixed_small", eta=0.0):
  """Exact mean / variance of the sampler's output for x0 ~ N(mu, sig^2), x_T ~ N(0, 1)."""
  betas = np.linspace(1e-4, 0.02, T)
  ab = np.cumprod(1 - betas)
  m, v = np.zeros_like(mu), np.ones_like(mu)
  for t, tp in zip(grid[:-1], grid[1:]):
    a, ap = ab[t], (1.0 if tp < 0 else ab[tp])
    k = np.sqrt(a) * sig**2 / (a * sig**2 + 1 - a)  # E[x0|x_t] = k x_t + b
    b = mu * (1 - k * np.sqrt(a))
    if kind == "ddpm":  # [DDPM] eqs. 7 and 11
      c1, c2 = (1 - a / ap) * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(a / ap) / (1 - a)
      big = (1 - a / ap) if variance == "fixed_large" else (1 - a / ap) * (1 - ap) / (1 - a)
      A, B, var = c1 * k + c2, c1 * b, (big if t > 0 else 0.0)
    else:  # [DDIM] eqs. 12 and 16
      sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
      d = np.sqrt(max(1 - ap - sigma2, 0.0))
      A = np.sqrt(ap) * k + d * (1 - np.sqrt(a) * k) / np.sqrt(1 - a)
      B = np.sqrt(ap) * b - d * np.sqrt(a) * b / np.sqrt(1 - a)
      var = sigma2
    m, v = A * m + B, A * A * v + var
  return m, v


# (sampler config, allowed |relative variance bias| of the exact output law vs the data).
GAUSS_CASES = [
  (dict(kind="ddpm", variance="fixed_small"), 0.02),
  (dict(kind="ddpm", variance="fixed_large"), 0.005),
  (dict(kind="ddim", eta=0.0, steps=100, spacing="leading"), 0.06),
  (dict(kind="ddim", eta=0.0, steps=250, spacing="trailing"), 0.025),
  (dict(kind="ddim", eta=1.0, steps=250, spacing="linspace"), 0.06),
  (dict(kind="ddim", eta=1.0, steps=100, spacing="trailing"), 0.13),
]


@pytest.mark.parametrize("cfg,bias", GAUSS_CASES, ids=lambda c: str(c))
def test_gaussian_data_moments(cfg, bias):
  n = 4096
  x_T = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  x = np.asarray(_sample(SCHED, x_T, jax.random.PRNGKey(1), **cfg), np.float64)
  assert np.all(np.isfinite(x))
  if cfg["kind"] == "ddpm":
    grid = np.arange(T - 1, -2, -1)
  else:
    grid = np.asarray(timestep_grid(T, cfg["steps"], spacing=cfg["spacing"]))
  kw = {k: cfg[k] for k in ("variance", "eta") if k in cfg}
  m, v = _propagate(grid, MU, SIG, kind=cfg["kind"], **kw)
  # Samples vs the exact output law: 5 standard errors.
  np.testing.assert_array_less(np.abs(x.mean(0) - m), 5 * np.sqrt(v / n))
  np.testing.assert_array_less(np.abs(x.var(0) - v), 5 * v * np.sqrt(2.0 / n))
  # Exact output law vs the data: the sampler's discretisation bias.
  np.testing.assert_array_less(np.abs(m - MU), 2e-3)
  np.testing.assert_array_less(np.abs(v / SIG**2 - 1), bias)
  # And directly vs the data, with statistical + bias tolerance.
  np.testing.assert_array_less(np.abs(x.mean(0) - MU), 5 * np.sqrt(v / n) + 2e-3)
  np.testing.assert_array_less(np.abs(x.var(0) / SIG**2 - 1), 5 * np.sqrt(2.0 / n) + bias)


@pytest.mark.parametrize(
  "cfg",
  [
    dict(kind="ddpm", variance="fixed_large"),
    dict(kind="ddpm", variance="fixed_small"),
    dict(kind="ddim", eta=0.0, steps=250, spacing="trailing"),
  ],
  ids=str,
)
def test_mixture_1d(cfg):
  n = 4096
  x_T = jax.random.normal(jax.random.PRNGKey(2), (n, 1))
  x = np.asarray(_sample(SCHED, x_T, jax.random.PRNGKey(3), data="mix1d", **cfg), np.float64)[:, 0]
  # Mixture weight: components are ~4 std apart, so x < -0.2 identifies the first (the
  # misclassified mass is < 1e-3).
  frac = np.mean(x < -0.2)
  assert abs(frac - W[0]) < 5 * math.sqrt(W[0] * (1 - W[0]) / n) + 1e-3
  ks = stats.kstest(x, lambda z: analytic.mixture_cdf_1d(z, W, M, SD))
  # With n = 4096 the KS test detects a CDF error of ~0.03; the samplers' own bias (measured
  # with 2e5 samples) is below 0.007.
  assert ks.pvalue > 1e-3, ks
  ref, _ = analytic.mixture_sample(jax.random.PRNGKey(4), n, W, M, SD)
  assert stats.wasserstein_distance(x, np.asarray(ref)) < 0.02


def test_mixture_2d_ancestral():
  n = 2048
  means = np.array([[0.6, 0.6], [-0.6, 0.0], [0.3, -0.7]])
  x_T = jax.random.normal(jax.random.PRNGKey(5), (n, 2))
  x = np.asarray(
    _sample(SCHED, x_T, jax.random.PRNGKey(6), kind="ddpm", variance="fixed_large", data="mix2d"),
    np.float64,
  )
  comp = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  for k, (w, sd) in enumerate(zip([0.5, 0.25, 0.25], [0.1, 0.15, 0.1])):
    frac = np.mean(comp == k)
    assert abs(frac - w) < 5 * math.sqrt(w * (1 - w) / n)
    xk = x[comp == k]
    np.testing.assert_array_less(np.abs(xk.mean(0) - means[k]), 5 * sd / math.sqrt(len(xk)))
    np.testing.assert_array_less(np.abs(xk.std(0) / sd - 1), 5 / math.sqrt(2 * len(xk)) + 0.02)


# ----------------------------------------------------------------------------- steps


def test_ddpm_step_matches_posterior():
  s = schedules.cosine(50)
  f = analytic.gaussian_eps_fn(s, 0.1, 0.4)
  x_t = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
  noise = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  for t in (0, 1, 25, 49):
    tb = jnp.full((3,), t, jnp.int32)
    eps = f(x_t, tb, None)
    x0 = diffusion.x0_from_eps(s, x_t, tb, eps)
    post = diffusion.q_posterior(s, x0, x_t, tb)
    for variance, var in (("fixed_small", s.posterior_variance[t]), ("fixed_large", s.betas[t])):
      x_prev, x0_hat = samplers.ddpm_step(VPDenoiser(s, f), x_t, t, noise, variance=variance)
      expected = post.mean + (0.0 if t == 0 else jnp.sqrt(var)) * noise
      np.testing.assert_allclose(x_prev, expected, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(x0_hat, x0, rtol=1e-5, atol=1e-5)


def test_ddim_step_special_cases():
  s = schedules.linear(100)
  f = analytic.gaussian_eps_fn(s, 0.1, 0.4)
  x_t = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
  noise = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  for t in (1, 50, 99):
    # eta = 1 on consecutive steps is the ancestral step with beta_tilde ([DDIM] Sec. 4.1).
    a, _ = samplers.ddim_step(VPDenoiser(s, f), x_t, t, t - 1, noise, eta=1.0)
    b, _ = samplers.ddpm_step(VPDenoiser(s, f), x_t, t, noise, variance="fixed_small")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # eta = 0 is deterministic: noise is ignored.
    c, _ = samplers.ddim_step(VPDenoiser(s, f), x_t, t, t - 1, noise, eta=0.0)
    d, _ = samplers.ddim_step(VPDenoiser(s, f), x_t, t, t - 1, 0 * noise, eta=0.0)
    np.testing.assert_array_equal(c, d)
    # t_prev = -1 lands on x0_hat.
    e, x0 = samplers.ddim_step(VPDenoiser(s, f), x_t, t, -1, noise, eta=1.0)
    np.testing.assert_allclose(e, x0, rtol=1e-6)
  # Predictions of each kind give the same step.
  t, tp = 60, 30
  outs = [
    samplers.ddim_step(VPDenoiser(s, g, prediction=k), x_t, t, tp, noise, eta=0.5)[0]
    for g, k in (
      (f, "eps"),
      (analytic.gaussian_x0_fn(s, 0.1, 0.4), "x0"),
      (analytic.gaussian_v_fn(s, 0.1, 0.4), "v"),
    )
  ]
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outs[2], outs[0], rtol=1e-4, atol=1e-4)


def test_samplers_replay_step_by_step():
  """The driver folds the step index into the rng: a manual loop reproduces the samples."""
  s = schedules.linear(20)
  f = analytic.mixture_eps_fn(s, W, M, SD)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (5, 1))
  rng = jax.random.PRNGKey(7)
  out = samplers.ddpm_sample(VPDenoiser(s, f), x_T, ddpm_grid(20), rng, variance="fixed_large")
  x = x_T
  for i, t in enumerate(range(19, -1, -1)):
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    x, _ = samplers.ddpm_step(VPDenoiser(s, f), x, t, noise, variance="fixed_large")
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)
  grid = np.asarray(timestep_grid(20, 5, spacing="trailing"))
  out = samplers.ddim_sample(VPDenoiser(s, f), x_T, jnp.asarray(grid), rng, eta=0.7)
  x = x_T
  for i, (t, tp) in enumerate(zip(grid[:-1], grid[1:])):
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    x, _ = samplers.ddim_step(VPDenoiser(s, f), x, int(t), int(tp), noise, eta=0.7)
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)


def test_sample_loop_records_and_rejects_bad_grid():
  step = lambda c, i, t, tn, key: c + t - tn
  final, rec = samplers.sample_loop(
    step, jnp.zeros(()), jnp.array([9, 5, 2, -1]), jax.random.PRNGKey(0), record=lambda c: c
  )
  assert float(final) == 10.0
  np.testing.assert_array_equal(rec, [4, 7, 10])
  with pytest.raises(ValueError, match=r"\(1,\)"):
    samplers.sample_loop(step, jnp.zeros(()), jnp.array([3]), jax.random.PRNGKey(0))
