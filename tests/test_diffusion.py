"""The forward process, the posterior and the prediction conversions against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import diffusion, schedules
from tests import analytic

SCHED = schedules.linear(1000)


def _f64(schedule):
  """alpha_bar and betas recomputed in float64 from the stored betas."""
  betas = np.asarray(schedule.betas, np.float64)
  return betas, np.cumprod(1.0 - betas)


def test_q_sample_moments():
  # x0 fixed per row, fresh noise: empirical mean / variance of x_t at several t.
  n = 20000
  ts = np.array([0, 10, 250, 700, 999])
  x0 = jnp.linspace(-1.0, 1.0, len(ts))
  x0b = jnp.repeat(x0[:, None], n, axis=1)  # [5, n]
  t = jnp.asarray(ts, jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(0), x0b.shape)
  x_t = np.asarray(diffusion.q_sample(SCHED, x0b, t, noise), np.float64)
  _, ab = _f64(SCHED)
  mean = np.sqrt(ab[ts]) * np.asarray(x0)
  var = 1.0 - ab[ts]
  # Standard errors: sqrt(var / n) for the mean, var * sqrt(2 / n) for the variance; 5 sigma.
  np.testing.assert_array_less(np.abs(x_t.mean(1) - mean), 5 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(x_t.var(1) - var), 5 * var * np.sqrt(2.0 / n))
  m, v, logv = diffusion.q_mean_variance(SCHED, x0b, t)
  np.testing.assert_allclose(m[:, 0], mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(v[:, 0], var, rtol=1e-5)
  np.testing.assert_allclose(logv[:, 0], np.log(var), rtol=1e-5)


@pytest.mark.parametrize(
  "make",
  [
    lambda: schedules.linear(1000),
    lambda: schedules.cosine(200),
    lambda: schedules.rescale_zero_terminal_snr(schedules.scaled_linear(100)),
  ],
)
def test_posterior_matches_bayes(make):
  """q(x_{t-1} | x_t, x_0) ∝ q(x_{t-1} | x_0) q(x_t | x_{t-1}), a product of Gaussians."""
  s = make()
  betas, ab = _f64(s)
  num = s.num_steps
  ts = np.array([1, 2, num // 3, num // 2, num - 2, num - 1])
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(len(ts), 3))
  x_t = rng.normal(size=(len(ts), 3))
  ab_prev = ab[ts - 1]
  alpha = 1.0 - betas[ts]
  # As a function of x_{t-1}: N(sqrt(ab_prev) x0, 1 - ab_prev) * N(x_t / sqrt(alpha), beta / alpha).
  prec = 1.0 / (1.0 - ab_prev) + alpha / betas[ts]
  var = 1.0 / prec
  mean = var[:, None] * (
    np.sqrt(ab_prev)[:, None] * x0 / (1.0 - ab_prev)[:, None]
    + np.sqrt(alpha)[:, None] * x_t / betas[ts][:, None]
  )
  post = diffusion.q_posterior(
    s, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(ts, jnp.int32)
  )
  np.testing.assert_allclose(post.mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(post.variance[:, 0], var, rtol=1e-4)
  np.testing.assert_allclose(post.log_variance[:, 0], np.log(var), rtol=1e-4, atol=1e-5)
  # t = 0: q(x_{-1} | x_0) is a point mass at x_0, so the posterior is x_0 with variance 0;
  # its log-variance is IDDPM's clipped one (that of t = 1).
  t0 = jnp.zeros((2,), jnp.int32)
  post0 = diffusion.q_posterior(
    s, jnp.asarray(x0[:2], jnp.float32), jnp.asarray(x_t[:2], jnp.float32), t0
  )
  np.testing.assert_allclose(post0.mean, x0[:2], rtol=1e-5, atol=1e-6)
  assert float(post0.variance.max()) == 0.0
  np.testing.assert_allclose(post0.log_variance[:, 0], np.log(var[0]), rtol=1e-4)


def test_posterior_monte_carlo():
  """Sampling x_{t-1} ~ q(x_{t-1}|x0), then x_t ~ q(x_t|x_{t-1}): regress x_{t-1} on x_t."""
  n, t = 200000, 300
  s = SCHED
  x0 = 0.7
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  x_prev = diffusion.q_sample(
    s, jnp.full((n, 1), x0), jnp.full((n,), t - 1, jnp.int32), jax.random.normal(k1, (n, 1))
  )
  x_t = jnp.sqrt(1 - s.betas[t]) * x_prev + jnp.sqrt(s.betas[t]) * jax.random.normal(k2, (n, 1))
  post = diffusion.q_posterior(s, jnp.full((n, 1), x0), x_t, jnp.full((n,), t, jnp.int32))
  resid = np.asarray(x_prev - post.mean, np.float64)[:, 0]
  var = float(s.posterior_variance[t])
  assert abs(resid.mean()) < 5 * np.sqrt(var / n)
  assert abs(resid.var() - var) < 5 * var * np.sqrt(2.0 / n)
  # The residual is uncorrelated with x_t (the mean is the conditional expectation).
  assert abs(np.mean(resid * np.asarray(x_t)[:, 0])) < 5 * np.sqrt(var / n) * 1.1


@pytest.mark.parametrize("shape", [(8,), (8, 3), (4, 5, 5, 2)])
def test_conversions_round_trip(shape):
  rng = jax.random.PRNGKey(3)
  k0, k1, k2 = jax.random.split(rng, 3)
  x0 = jax.random.normal(k0, shape)
  eps = jax.random.normal(k1, shape)
  t = jax.random.randint(k2, (shape[0],), 0, 1000)

  @jax.jit
  def convert(s, x0, t, eps):
    x_t = diffusion.q_sample(s, x0, t, eps)
    v = diffusion.v_from_x0_eps(s, x0, t, eps)
    out = dict(
      x0_from_eps=diffusion.x0_from_eps(s, x_t, t, eps),
      eps_from_x0=diffusion.eps_from_x0(s, x_t, t, x0),
      x0_from_v=diffusion.x0_from_v(s, x_t, t, v),
      eps_from_v=diffusion.eps_from_v(s, x_t, t, v),
      eps_from_score=diffusion.eps_from_score(s, t, diffusion.score_from_eps(s, t, eps)),
      v=v,
    )
    for kind, pred in (("eps", eps), ("x0", x0), ("v", v)):
      out["pair_" + kind] = diffusion.to_x0_eps(s, x_t, t, pred, prediction=kind)
      out["target_" + kind] = diffusion.target_for(s, x0, t, eps, prediction=kind)
    return out

  out = convert(SCHED, x0, t, eps)
  tol = dict(rtol=1e-4, atol=2e-3)  # x0 from eps divides by sqrt(ab) ~ 6e-3 at t = 999.
  np.testing.assert_allclose(out["x0_from_eps"], x0, **tol)
  np.testing.assert_allclose(out["eps_from_x0"], eps, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(out["x0_from_v"], x0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["eps_from_v"], eps, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["eps_from_score"], eps, rtol=1e-5, atol=1e-6)
  for kind, pred in (("eps", eps), ("x0", x0), ("v", out["v"])):
    x0_hat, eps_hat = out["pair_" + kind]
    np.testing.assert_allclose(x0_hat, x0, **tol)
    np.testing.assert_allclose(eps_hat, eps, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(out["target_" + kind], pred, rtol=1e-6, atol=1e-6)


def test_v_is_the_angular_velocity():
  """[Progressive Distillation] Sec. 4: with x_phi = cos(phi) x0 + sin(phi) eps, v = dx/dphi."""
  x0 = jnp.array([[0.3, -1.2]])
  eps = jnp.array([[1.1, 0.4]])
  for ti in (0, 100, 500, 999):
    t = jnp.array([ti], jnp.int32)
    phi = jnp.arccos(SCHED.sqrt_alphas_cumprod[ti])
    _, dx = jax.jvp(lambda p: jnp.cos(p) * x0 + jnp.sin(p) * eps, (phi,), (1.0,))
    np.testing.assert_allclose(diffusion.v_from_x0_eps(SCHED, x0, t, eps), dx, rtol=1e-5, atol=1e-6)


def test_score_is_grad_log_marginal():
  """score_from_eps(E[eps|x_t]) equals autodiff of the exact log q_t(x_t) of a mixture."""
  w, m, sd = [0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.2, 0.4]
  x_t = jax.random.normal(jax.random.PRNGKey(4), (6, 2))
  t = jnp.array([0, 5, 100, 400, 800, 999], jnp.int32)

  @jax.jit
  def both(s, x_t, t):
    eps = analytic.mixture_eps_fn(s, w, m, sd)(x_t, t, None)
    grad = jax.vmap(
      jax.grad(lambda x, a: analytic.mixture_marginal_log_prob(a, x[None], w, m, sd)[0])
    )(x_t, s.alphas_cumprod[t])
    return diffusion.score_from_eps(s, t, eps), grad

  score, grad = both(SCHED, x_t, t)
  np.testing.assert_allclose(score, grad, rtol=2e-4, atol=1e-3)


def test_p_mean_variance_variances():
  s = SCHED
  b, c = 6, 2
  t = jnp.array([0, 1, 2, 10, 500, 999], jnp.int32)
  x_t = jax.random.normal(jax.random.PRNGKey(5), (b, c))
  eps = jax.random.normal(jax.random.PRNGKey(6), (b, c))
  betas, ab = _f64(s)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  beta_tilde = betas * (1 - ab_prev) / (1 - ab)
  tn = np.asarray(t)
  small = np.where(tn == 0, beta_tilde[1], beta_tilde[tn])
  large = np.where(tn == 0, beta_tilde[1], betas[tn])
  for variance, expected in (("fixed_small", small), ("fixed_large", large)):
    p, x0 = diffusion.p_mean_variance(s, eps, x_t, t, variance=variance)
    np.testing.assert_allclose(p.variance[:, 0], expected, rtol=1e-4)
    np.testing.assert_allclose(p.log_variance[:, 0], np.log(expected), rtol=1e-5)
    np.testing.assert_allclose(p.mean, diffusion.q_posterior(s, x0, x_t, t).mean, rtol=1e-6)
    np.testing.assert_allclose(x0, diffusion.x0_from_eps(s, x_t, t, eps), rtol=1e-6)
  # learned_range: [IDDPM] eq. 15, Sigma = exp(v log beta + (1 - v) log beta_tilde), with the
  # network output in [-1, 1] mapped to v = (out + 1) / 2 and beta_tilde clipped at t = 0.
  for out_v in (-1.0, 0.0, 0.6, 1.0):
    frac = (out_v + 1) / 2
    model_out = jnp.concatenate([eps, jnp.full((b, c), out_v)], axis=-1)
    p, _ = diffusion.p_mean_variance(s, model_out, x_t, t, variance="learned_range")
    expected = frac * np.log(betas[tn]) + (1 - frac) * np.log(small)
    np.testing.assert_allclose(p.log_variance[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_p_mean_variance_predictions_and_clip():
  s = SCHED
  k0, k1 = jax.random.split(jax.random.PRNGKey(7))
  x0 = 1.5 * jax.random.normal(k0, (5, 3))
  eps = jax.random.normal(k1, (5, 3))
  t = jnp.array([3, 50, 200, 600, 900], jnp.int32)
  x_t = diffusion.q_sample(s, x0, t, eps)
  v = diffusion.v_from_x0_eps(s, x0, t, eps)
  ref = diffusion.q_posterior(s, x0, x_t, t).mean
  for kind, pred in (("eps", eps), ("x0", x0), ("v", v)):
    p, x0_hat = diffusion.p_mean_variance(s, pred, x_t, t, prediction=kind)
    np.testing.assert_allclose(p.mean, ref, rtol=1e-4, atol=1e-4)
    p, x0_hat = diffusion.p_mean_variance(s, pred, x_t, t, prediction=kind, clip_x0=1.0)
    np.testing.assert_allclose(x0_hat, np.clip(x0, -1, 1), rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(
      p.mean, diffusion.q_posterior(s, jnp.clip(x0, -1, 1), x_t, t).mean, rtol=1e-4, atol=1e-4
    )


def test_bad_inputs_raise():
  x = jnp.zeros((4, 3))
  with pytest.raises(TypeError, match="float32"):
    diffusion.q_sample(SCHED, x, jnp.zeros((4,), jnp.float32), x)
  with pytest.raises(ValueError, match=r"\(3,\)"):
    diffusion.q_sample(SCHED, x, jnp.zeros((3,), jnp.int32), x)
  with pytest.raises(ValueError, match=r"\(4, 2\)"):
    diffusion.q_sample(SCHED, x, jnp.zeros((4,), jnp.int32), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match="'score'"):
    diffusion.to_x0_eps(SCHED, x, jnp.zeros((4,), jnp.int32), x, prediction="score")
  with pytest.raises(ValueError, match="'learned'"):
    diffusion.p_mean_variance(SCHED, x, x, jnp.zeros((4,), jnp.int32), variance="learned")
  with pytest.raises(ValueError, match="3"):
    diffusion.p_mean_variance(SCHED, x, x, jnp.zeros((4,), jnp.int32), variance="learned_range")
