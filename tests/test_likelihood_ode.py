"""Tests of the probability-flow ODE likelihood (`jdiff.likelihood`) against exact densities.

With the exact (analytic) eps of Gaussian or Gaussian-mixture data, the ODE NLL of x at the
first noise level t_min equals -log q_{t_min}(x) exactly, up to (i) the N(0, I) prior used in
place of the true marginal at t = T-1 (alpha_bar ~ 4e-5 for the linear schedule: ~1e-4 nats)
and (ii) solver / float32 error. Tolerance: 0.02 nats per example (3-D data).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, likelihood, schedules
from tests import analytic

SCHED = schedules.linear(1000)
MU, S = 0.3, 0.5
W, MEANS, STDS = [0.4, 0.6], [[-0.5, 0.2, 0.0], [0.4, -0.3, 0.5]], [0.3, 0.5]
AB0 = float(1.0 / (1.0 + continuous.sigma_min_max(SCHED)[0] ** 2))
TOL = 0.02


def gauss_model(x, t, cond=None):
  return analytic.gaussian_eps_at_alpha_bar(continuous.alpha_bar_at(SCHED, t), x, MU, S)


def mixture_model(x, t, cond=None):
  return analytic.mixture_eps_at_alpha_bar(continuous.alpha_bar_at(SCHED, t), x, W, MEANS, STDS)


def exact_gauss_nll(x):
  return -analytic.gaussian_log_prob(x, math.sqrt(AB0) * MU, math.sqrt(AB0 * S**2 + 1 - AB0))


X = jax.random.normal(jax.random.PRNGKey(0), (32, 3)) * S + MU


def _nll(model, x, **kw):
  return jax.jit(lambda x, k: likelihood.ode_nll(SCHED, model, x, k, **kw))(
    x, jax.random.PRNGKey(7)
  )


@pytest.mark.parametrize(
  "kw",
  [
    dict(divergence="exact", solver="rk4", num_steps=40),
    dict(divergence="exact", solver="dopri5"),
    dict(divergence="hutchinson", solver="dopri5"),
  ],
)
def test_gaussian_exact_nll(kw):
  res = _nll(gauss_model, X, **kw)
  np.testing.assert_allclose(res.nll, exact_gauss_nll(X), atol=TOL)
  np.testing.assert_allclose(res.bpd, res.nll / (3 * math.log(2)), rtol=1e-6)
  if kw["solver"] == "rk4":
    assert int(res.nfe) == 160
  else:
    assert 7 <= int(res.nfe) < 1 + 6 * 500


def test_mixture_exact_trace_adaptive():
  """A non-diagonal Jacobian: exact trace + DOPRI5 against the exact mixture marginal."""
  want = -np.asarray(analytic.mixture_marginal_log_prob(AB0, X, W, MEANS, STDS))
  res = _nll(mixture_model, X, divergence="exact", solver="dopri5", rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(res.nll, want, atol=TOL)


def test_hutchinson_gaussian_probe_unbiased_on_mixture():
  """Hutchinson with Gaussian probes: the mean over probes matches the exact trace's NLL."""
  x = jnp.tile(X[:2], (128, 1))  # 128 independent probes for each of two points
  exact = _nll(mixture_model, X[:2], divergence="exact", solver="rk4", num_steps=20).nll
  est = _nll(mixture_model, x, noise="gaussian", solver="rk4", num_steps=20).nll
  est = np.asarray(est).reshape(128, 2)
  se = est.std(0) / math.sqrt(128)
  assert np.all(np.abs(est.mean(0) - np.asarray(exact)) < 4 * se + 1e-3), (est.mean(0), exact, se)
  assert np.all(est.std(0) > 0)


def test_rk4_converges():
  errs = [
    float(
      jnp.max(
        jnp.abs(
          _nll(gauss_model, X, divergence="exact", solver="rk4", num_steps=n).nll
          - exact_gauss_nll(X)
        )
      )
    )
    for n in (2, 20)
  ]
  assert errs[1] < errs[0] and errs[1] < TOL, errs


def test_dequantised_bpd():
  k = jax.random.randint(jax.random.PRNGKey(1), (8, 3), 0, 256).astype(jnp.uint8)
  u = jax.random.uniform(jax.random.PRNGKey(2), (8, 3))
  res = jax.jit(
    lambda k, u: likelihood.ode_bpd(
      SCHED,
      gauss_model,
      k,
      jax.random.PRNGKey(3),
      u=u,
      divergence="exact",
      solver="rk4",
      num_steps=40,
    )
  )(k, u)
  x = likelihood.dequantize(k, u)
  np.testing.assert_allclose(
    x, 2 * (np.asarray(k, np.float64) + np.asarray(u)) / 256 - 1, atol=1e-6
  )
  # -log P(k) <= -log p(x) - D log(2/256): 7 bits/dim on top of the continuous bpd.
  want_nll = exact_gauss_nll(x) + 3 * math.log(128)
  np.testing.assert_allclose(res.nll, want_nll, atol=TOL)
  np.testing.assert_allclose(res.bpd, want_nll / (3 * math.log(2)), atol=TOL / 2)
  with pytest.raises(TypeError, match="integer"):
    likelihood.ode_bpd(SCHED, gauss_model, x, jax.random.PRNGKey(0))


def test_errors():
  with pytest.raises(ValueError, match="solver"):
    likelihood.ode_nll(SCHED, gauss_model, X, jax.random.PRNGKey(0), solver="euler")
  with pytest.raises(ValueError, match="t_min"):
    likelihood.ode_nll(SCHED, gauss_model, X, jax.random.PRNGKey(0), t_min=-1.0)
