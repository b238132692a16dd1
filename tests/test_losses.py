"""Losses: the MMSE of the exact denoiser, weightings, importance sampling, KL and decoder."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jdiff import losses, schedules
from tests import analytic

SCHED = schedules.linear(1000)
MU, SIG = 0.3, 0.5


@functools.partial(jax.jit, static_argnames=("prediction", "weighting"))
def _loss(schedule, x0, rng, t, *, prediction, weighting):
  fns = {
    "eps": analytic.gaussian_eps_fn,
    "x0": analytic.gaussian_x0_fn,
    "v": analytic.gaussian_v_fn,
  }
  model_fn = fns[prediction](schedule, MU, SIG)
  return losses.denoising_loss(
    schedule, model_fn, x0, rng, t=t, prediction=prediction, weighting=weighting
  )


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_denoising_loss_of_exact_denoiser_is_the_mmse(prediction):
  """x0 ~ N(mu, s^2): E||x0 - E[x0|x_t]||^2 = Var[x0|x_t] = s^2 (1-ab) / (ab s^2 + 1 - ab);
  the eps MMSE is SNR times that and the v MMSE (SNR + 1) times that."""
  n, d = 4096, 2
  ts = np.array([0, 30, 200, 500, 999])
  ab = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[ts]
  var_x0 = analytic.gaussian_posterior_x0_variance(ab, SIG)
  snr = ab / (1 - ab)
  mmse = {"x0": var_x0, "eps": snr * var_x0, "v": (snr + 1) * var_x0}[prediction]
  for i, ti in enumerate(ts):
    k0, k1 = jax.random.split(jax.random.PRNGKey(i))
    x0 = MU + SIG * jax.random.normal(k0, (n, d))
    loss = np.asarray(
      _loss(
        SCHED, x0, k1, jnp.full((n,), ti, jnp.int32), prediction=prediction, weighting="simple"
      ),
      np.float64,
    )
    # The per-example loss is a mean of d scaled chi^2_1 variables: std = mmse sqrt(2/d).
    se = mmse[i] * math.sqrt(2.0 / d) / math.sqrt(n)
    assert abs(loss.mean() - mmse[i]) < 5 * se, (ti, loss.mean(), mmse[i])


def test_denoising_loss_random_t_and_weights():
  """With t drawn by the loss, E[loss] is the t-average of the weighted MMSE; and the
  snr-weighted x0 loss is the eps loss ([DDPM] eq. 14 equivalence)."""
  n, d = 8192, 2
  ab = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))
  var_x0 = analytic.gaussian_posterior_x0_variance(ab, SIG)
  snr = ab / (1 - ab)
  x0 = MU + SIG * jax.random.normal(jax.random.PRNGKey(10), (n, d))
  rng = jax.random.PRNGKey(11)
  f = jax.jit(
    lambda s, x0, rng, pred, weighting: losses.denoising_loss(
      s,
      {"eps": analytic.gaussian_eps_fn, "x0": analytic.gaussian_x0_fn}[pred](s, MU, SIG),
      x0,
      rng,
      prediction=pred,
      weighting=weighting,
    ),
    static_argnums=(3, 4),
  )
  for pred, weighting, per_t in (
    ("eps", "simple", snr * var_x0),
    ("x0", "snr", snr * var_x0),
    ("x0", "min_snr", np.minimum(snr, 5.0) * var_x0),
  ):
    loss = np.asarray(f(SCHED, x0, rng, pred, weighting), np.float64)
    expected = per_t.mean()
    # Standard error estimated from the draws themselves (t varies).
    assert abs(loss.mean() - expected) < 5 * loss.std() / math.sqrt(n) + 1e-4, (pred, weighting)
  # Same rng -> same t and noise, so snr-weighted x0 loss equals the eps loss per example
  # (the exact denoiser satisfies eps_hat - eps = -sqrt(SNR) (x0_hat - x0)).
  a = f(SCHED, x0, rng, "eps", "simple")
  b = f(SCHED, x0, rng, "x0", "snr")
  np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)


def test_loss_weight_formulas():
  t = jnp.array([0, 10, 100, 300, 600, 999], jnp.int32)
  ab = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[np.asarray(t)]
  snr = ab / (1 - ab)
  gamma = 5.0
  # Weight on the MSE of each target so that the loss equals w_x0 * ||x0 - x0_hat||^2.
  expected = {
    ("eps", "snr"): np.ones_like(snr),
    ("x0", "snr"): snr,
    ("v", "snr"): snr / (snr + 1),
    ("eps", "min_snr"): np.minimum(snr, gamma) / snr,
    ("x0", "min_snr"): np.minimum(snr, gamma),
    ("v", "min_snr"): np.minimum(snr, gamma) / (snr + 1),  # [MinSNR] eq. for v-prediction
  }
  for pred in ("eps", "x0", "v"):
    np.testing.assert_array_equal(
      losses.loss_weight(SCHED, t, prediction=pred, weighting="simple"), np.ones(6)
    )
    for weighting in ("snr", "min_snr"):
      w = losses.loss_weight(SCHED, t, prediction=pred, weighting=weighting, min_snr_gamma=gamma)
      assert w.dtype == jnp.float32
      np.testing.assert_allclose(w, expected[(pred, weighting)], rtol=1e-4)
  # Zero terminal SNR keeps every weight finite.
  z = schedules.rescale_zero_terminal_snr(SCHED)
  for pred in ("eps", "x0", "v"):
    for weighting in ("snr", "min_snr"):
      w = losses.loss_weight(z, t, prediction=pred, weighting=weighting)
      assert np.all(np.isfinite(np.asarray(w)))
  with pytest.raises(ValueError, match="'foo'"):
    losses.loss_weight(SCHED, t, prediction="eps", weighting="foo")


def test_importance_sampling_is_unbiased():
  num, k = 50, 4
  hist = losses.init_loss_history(num, k)
  # Before the history is full: uniform t with weight 1.
  t, w = losses.importance_sample_timesteps(jax.random.PRNGKey(0), 64, hist)
  np.testing.assert_array_equal(w, np.ones(64))
  # Fill with known losses L_t = 1 + t / 10 (constant per t).
  f = 1.0 + jnp.arange(num, dtype=jnp.float32) / 10.0
  for _ in range(k):
    hist = losses.update_loss_history(hist, jnp.arange(num), f)
  assert np.all(np.asarray(hist.counts) == k)
  np.testing.assert_allclose(hist.values, np.repeat(np.asarray(f)[:, None] ** 2, k, 1), rtol=1e-6)
  n = 50000
  t, w = jax.jit(losses.importance_sample_timesteps, static_argnums=1)(
    jax.random.PRNGKey(1), n, hist
  )
  t, w = np.asarray(t), np.asarray(w, np.float64)
  p = np.asarray(f, np.float64) / float(np.sum(f)) * (1 - 0.001) + 0.001 / num
  np.testing.assert_allclose(w, 1.0 / (num * p[t]), rtol=1e-5)
  freq = np.bincount(t, minlength=num) / n
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n))
  # Unbiased: E_p[w g(t)] = uniform average of g, for an arbitrary g.
  g = np.sin(np.arange(num)) + 2.0
  est = w * g[t]
  assert abs(est.mean() - g.mean()) < 5 * est.std() / math.sqrt(n)


def test_loss_history_with_repeated_timesteps_equals_one_at_a_time():
  """A timestep repeated in a batch takes consecutive ring slots, as if pushed one by one."""
  k = 3
  hist = losses.init_loss_history(8, k)
  hist = losses.update_loss_history(hist, jnp.array([2, 6]), jnp.array([7.0, 8.0]))
  t = jnp.array([2, 2, 5, 2, 2, 5, 6])
  vals = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0])
  got = jax.jit(losses.update_loss_history)(hist, t, vals)
  ref = hist
  for ti, li in zip(np.asarray(t), np.asarray(vals)):
    ref = losses.update_loss_history(ref, jnp.array([ti]), jnp.array([li]))
  np.testing.assert_array_equal(got.counts, ref.counts)
  np.testing.assert_array_equal(got.values, ref.values)
  # By hand: t = 2 held 7 in slot 0, then 1, 2, 4, 5 go to slots 1, 2, 0, 1 (7 and 1 are
  # overwritten); t = 5 fills slots 0, 1; t = 6 (count 1) gets 9 in slot 1.
  np.testing.assert_array_equal(got.counts, [0, 0, 5, 0, 0, 2, 2, 0])
  np.testing.assert_array_equal(got.values[2], [16.0, 25.0, 4.0])
  np.testing.assert_array_equal(got.values[5], [9.0, 36.0, 0.0])
  np.testing.assert_array_equal(got.values[6], [64.0, 81.0, 0.0])
  # More repeats than slots in one batch: the last k losses are kept, in ring order.
  many = losses.update_loss_history(
    losses.init_loss_history(4, k), jnp.full((5,), 1), jnp.arange(1.0, 6.0)
  )
  assert int(many.counts[1]) == 5
  np.testing.assert_array_equal(many.values[1], [16.0, 25.0, 9.0])


def test_normal_kl_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 20))
  s1, s2 = np.exp(rng.normal(size=(2, 20)))
  expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
  got = losses.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(losses.normal_kl(m1, np.log(s1**2), m1, np.log(s1**2)), 0, atol=1e-6)


@pytest.mark.parametrize("levels", [256, 4096])
def test_discretized_gaussian_log_likelihood_vs_scipy(levels):
  """Every bin against scipy; with 4096 levels the bins (2 / 4095 ~ 4.9e-4 wide) are finer than
  a fixed 1e-3 edge tolerance, so the edge bins must be found from the grid itself. The
  tolerance there is 1e-3: in float32 the bin edges x -+ half carry ~6e-8 absolute rounding,
  ~1e-4 relative to a 4.9e-4-wide bin, and each log-probability that much."""
  tol = 2e-4 if levels == 256 else 1e-3
  grid = -1 + 2 * np.arange(levels) / (levels - 1)
  h = 1 / (levels - 1)
  for mean, scale in ((0.1, 0.2), (-0.95, 0.01), (0.999, 0.003), (0.3, 1e-4), (-3.0, 0.5)):
    lo = np.where(np.arange(levels) == 0, -np.inf, grid - h)
    hi = np.where(np.arange(levels) == levels - 1, np.inf, grid + h)
    # Differences of CDFs below the mean and of survival functions above it (float64 exact
    # enough either way; the naive CDF difference cancels above the mean).
    prob = np.where(
      lo > mean,
      stats.norm.sf(lo, mean, scale) - stats.norm.sf(hi, mean, scale),
      stats.norm.cdf(hi, mean, scale) - stats.norm.cdf(lo, mean, scale),
    )
    expected = np.log(np.maximum(prob, 1e-300))
    got = np.asarray(
      losses.discretized_gaussian_log_likelihood(
        jnp.asarray(grid[None], jnp.float32),
        jnp.full((1, levels), mean),
        jnp.log(scale),
        num_levels=levels,
      ),
      np.float64,
    )[0]
    # The probabilities sum to one.
    np.testing.assert_allclose(np.exp(got).sum(), 1.0, rtol=tol)
    # Compare where the probability is representable; far tails stay finite and very negative.
    ok = expected > -60
    np.testing.assert_allclose(got[ok], expected[ok], rtol=tol, atol=tol)
    assert np.all(np.isfinite(got))


def test_discretized_gaussian_gradients_are_finite():
  """Training through the decoder (hybrid loss) needs finite gradients even for far means."""
  x = jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0])

  def f(mean, log_scale):
    return jnp.sum(losses.discretized_gaussian_log_likelihood(x, mean, log_scale))

  grad = jax.jit(jax.grad(f, argnums=(0, 1)))
  for mean in (-1.0, 0.0, 1.0):
    for log_scale in (math.log(1e-2), math.log(1e-3), 0.0):
      g = grad(jnp.full((5,), mean), jnp.full((5,), log_scale))
      assert all(np.all(np.isfinite(np.asarray(a))) for a in g), (mean, log_scale, g)


def test_prior_bpd_closed_form():
  x0 = jnp.array([[0.5, -1.0], [0.0, 1.0]])
  ab = float(np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[-1])
  m, v = np.sqrt(ab) * np.asarray(x0), 1 - ab
  expected = (0.5 * (-1 - np.log(v) + v + m**2)).mean(1) / np.log(2)
  np.testing.assert_allclose(losses.prior_bpd(SCHED, x0), expected, rtol=1e-3, atol=1e-9)
  z = schedules.rescale_zero_terminal_snr(SCHED)
  np.testing.assert_allclose(losses.prior_bpd(z, x0), 0.0, atol=1e-7)


def test_hybrid_loss():
  n, d = 64, 3
  x0 = jnp.clip(MU + SIG * jax.random.normal(jax.random.PRNGKey(0), (n, d)), -1, 1)
  x0 = jnp.round((x0 + 1) * 127.5) / 127.5 - 1
  rng = jax.random.PRNGKey(1)
  eps_fn = analytic.gaussian_eps_fn(SCHED, MU, SIG)

  def model(offset, var_value):
    return lambda x_t, t, c: jnp.concatenate(
      [eps_fn(x_t, t, c) + offset, jnp.full(x_t.shape, var_value)], -1
    )

  @jax.jit
  def run(s, offset, var_value):
    return losses.hybrid_loss(s, model(offset, var_value), x0, rng)

  t_rng, noise_rng = jax.random.split(rng)
  t = losses.sample_timesteps(t_rng, n, 1000)
  noise = jax.random.normal(noise_rng, x0.shape)
  simple = jax.jit(lambda s: losses.denoising_loss(s, lambda *a: eps_fn(*a) + 0.1, x0, rng))(SCHED)
  for var_value, variance in ((-1.0, "fixed_small"), (1.0, None)):
    out = run(SCHED, 0.1, var_value)
    assert out.shape == (n,) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    if variance is not None:
      # v = -1 is the fixed-small variance: hybrid = L_simple + 0.001 * T * L_vlb.
      vlb = jax.jit(
        lambda s, v=variance: losses.vlb_term(
          s, lambda *a: eps_fn(*a) + 0.1, x0, t, noise, variance=v
        )
      )(SCHED)
      np.testing.assert_allclose(out, simple + 0.001 * 1000 * vlb, rtol=1e-4, atol=1e-5)
  # The vlb term sees a stop-gradient mean: d/d offset comes from L_simple alone.
  g_hybrid, g_var = jax.jit(jax.grad(lambda o, v: jnp.mean(run(SCHED, o, v)), argnums=(0, 1)))(
    0.1, 0.3
  )
  g_simple = jax.jit(
    jax.grad(lambda o: jnp.mean(losses.denoising_loss(SCHED, lambda *a: eps_fn(*a) + o, x0, rng)))
  )(0.1)
  np.testing.assert_allclose(g_hybrid, g_simple, rtol=1e-4)
  # ... while the variance channel does get a gradient.
  assert np.isfinite(float(g_var)) and float(g_var) != 0.0


def test_bad_inputs_raise():
  x0 = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r"\(4, 6\)"):
    losses.denoising_loss(SCHED, lambda x, t, c: jnp.zeros((4, 6)), x0, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="'score'"):
    losses.denoising_loss(SCHED, lambda x, t, c: x, x0, jax.random.PRNGKey(0), prediction="score")
  with pytest.raises(ValueError, match="'l1'"):
    losses.denoising_loss(SCHED, lambda x, t, c: x, x0, jax.random.PRNGKey(0), weighting="l1")


def test_vlb_terms_in_chunks_sum_to_the_bound():
  """The eval mode sums the bound's terms chunk by chunk (progress in between): the chunks
  of any partition of 0..T-1 give the terms, and the total, of `variational_bound`."""
  sched = schedules.linear(num_steps=20)
  x0 = jnp.round(jax.random.uniform(jax.random.key(0), (3, 4), minval=-1, maxval=1) * 127.5) / 127.5
  model = lambda x, t, c: 0.3 * x  # any deterministic model
  rng = jax.random.key(1)
  whole = losses.variational_bound(sched, model, x0, rng)
  chunks = [losses.vlb_terms(sched, model, x0, rng, jnp.arange(a, b)) for a, b in [(0, 7), (7, 20)]]
  np.testing.assert_allclose(np.concatenate(chunks, axis=1), whole.terms, rtol=1e-6)
  total = losses.prior_bpd(sched, x0) + sum(jnp.sum(c, axis=1) for c in chunks)
  np.testing.assert_allclose(total, whole.total, rtol=1e-5)
