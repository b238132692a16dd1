"""Schedules against the papers' formulas, computed independently here in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import schedules

T = 1000


def _cumprod_loop(betas):
  """alpha_bar by an explicit Python product (independent of np.cumprod)."""
  out, acc = [], 1.0
  for b in betas:
    acc *= 1.0 - float(b)
    out.append(acc)
  return np.array(out)


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_linear_matches_ddpm():
  s = schedules.linear(T)
  betas = np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, _cumprod_loop(betas), rtol=2e-5, atol=1e-9)
  # [Lin24] Sec. 3.1 quotes sqrt(alpha_bar_T) = 0.006353 for this schedule.
  assert abs(float(s.sqrt_alphas_cumprod[-1]) - 0.006353) < 5e-6


def test_linear_scales_with_num_steps():
  # [IDDPM]: the endpoints scale by 1000 / T.
  s = schedules.linear(500)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [2e-4, 0.04], rtol=1e-6)


def test_scaled_linear_matches_stable_diffusion():
  s = schedules.scaled_linear(T)
  lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
  betas = np.array([(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)])
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, _cumprod_loop(betas), rtol=2e-5)
  # [Lin24] Sec. 3.1: Stable Diffusion's terminal sqrt(alpha_bar) is 0.068265.
  assert abs(float(s.sqrt_alphas_cumprod[-1]) - 0.068265) < 5e-6


def test_cosine_matches_iddpm():
  s = schedules.cosine(T)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  ab_paper = np.array([f((i + 1) / T) / f(0.0) for i in range(T)])  # [IDDPM] eq. 17
  betas_paper = np.minimum(1.0 - ab_paper / np.concatenate([[1.0], ab_paper[:-1]]), 0.999)
  np.testing.assert_allclose(s.betas, betas_paper, rtol=1e-5, atol=1e-9)
  clipped = betas_paper >= 0.999
  # Only the very end is clipped; before that, alpha_bar is exactly f(t)/f(0).
  assert clipped[-1] and clipped.sum() < 5
  first = int(np.argmax(clipped))
  np.testing.assert_allclose(s.alphas_cumprod[:first], ab_paper[:first], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(s.alphas_cumprod, _cumprod_loop(betas_paper), rtol=1e-4, atol=1e-9)
  assert float(s.betas.max()) <= 0.999 + 1e-7


def test_sigmoid_matches_chen_algorithm_1():
  start, end, tau = -3.0, 3.0, 1.0
  s = schedules.sigmoid(T, start=start, end=end, tau=tau)
  v_start, v_end = _sigmoid(start / tau), _sigmoid(end / tau)
  gamma = lambda u: (v_end - _sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
  ab_paper = np.array([gamma((i + 1) / T) for i in range(T)])
  # The last alpha_bar is 0 in the continuous schedule; betas are clipped at 0.999.
  np.testing.assert_allclose(s.alphas_cumprod[:-1], ab_paper[:-1], rtol=1e-4, atol=1e-8)
  assert abs(float(s.betas[-1]) - 0.999) < 1e-6
  # A different temperature gives a different schedule (the options are used).
  s2 = schedules.sigmoid(T, start=0.0, end=3.0, tau=0.5)
  v_start, v_end = _sigmoid(0.0), _sigmoid(6.0)
  ab2 = np.array(
    [(v_end - _sigmoid(((i + 1) / T * 3.0) / 0.5)) / (v_end - v_start) for i in range(T - 1)]
  )
  np.testing.assert_allclose(s2.alphas_cumprod[:-1], ab2, rtol=1e-4, atol=1e-8)


def test_from_betas_and_derived_quantities():
  rng = np.random.default_rng(0)
  betas = np.sort(rng.uniform(1e-4, 0.3, size=37))
  s = schedules.from_betas(betas)
  ab = _cumprod_loop(betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-5)
  np.testing.assert_allclose(s.alphas_cumprod_prev, ab_prev, rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(ab), rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ab), rtol=1e-5)
  # SNR and log-SNR ([Kingma et al. 2021, VDM] SNR = alpha^2 / sigma^2).
  np.testing.assert_allclose(s.snr, ab / (1 - ab), rtol=1e-5)
  np.testing.assert_allclose(s.log_snr, np.log(ab / (1 - ab)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ab) / ab), rtol=1e-5)
  # Posterior coefficients of [DDPM] eq. 7.
  post_var = betas * (1 - ab_prev) / (1 - ab)
  np.testing.assert_allclose(s.posterior_variance, post_var, rtol=1e-5, atol=1e-12)
  assert float(s.posterior_variance[0]) == 0.0
  np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(post_var[1:]), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(post_var[1]), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef1, betas * np.sqrt(ab_prev) / (1 - ab), rtol=1e-5)
  np.testing.assert_allclose(
    s.posterior_mean_coef2, (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab), rtol=1e-5
  )
  assert s.num_steps == 37
  for leaf in jax.tree_util.tree_leaves(s):
    assert leaf.dtype == jnp.float32 and leaf.shape == (37,)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_rescale_zero_terminal_snr(name):
  base = schedules.get_schedule(name, T)
  s = schedules.rescale_zero_terminal_snr(base)
  # [Lin24] Alg. 1, recomputed here in float64 from the base betas.
  sq = np.sqrt(_cumprod_loop(np.asarray(base.betas, np.float64)))
  expected = (sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, expected, rtol=1e-4, atol=1e-6)
  assert float(s.alphas_cumprod[-1]) == 0.0
  assert float(s.betas[-1]) == 1.0
  assert float(s.snr[-1]) == 0.0 and float(s.log_snr[-1]) == -np.inf
  np.testing.assert_allclose(s.sqrt_alphas_cumprod[0], base.sqrt_alphas_cumprod[0], rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(s.posterior_variance)))
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
  via_name = schedules.get_schedule(name, T, zero_terminal_snr=True)
  np.testing.assert_allclose(via_name.alphas_cumprod, s.alphas_cumprod, rtol=1e-6, atol=1e-9)


def test_schedule_is_a_pytree_without_retrace():
  traces = []

  @jax.jit
  def f(s):
    traces.append(1)
    return jnp.sum(s.alphas_cumprod) + s.num_steps

  a = f(schedules.linear(100))
  b = f(schedules.cosine(100))
  assert len(traces) == 1
  assert float(a) != float(b)


@pytest.mark.parametrize(
  "betas",
  [
    [0.1, 0.0, 0.2],
    [0.1, -0.1],
    [0.1, 1.5],
    [0.1, float("nan")],
    [[0.1, 0.2]],
    [],
    [0.1, 1.0, 0.2],
  ],
)
def test_bad_betas_raise(betas):
  with pytest.raises(ValueError, match="beta"):
    schedules.from_betas(betas)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="'foo'"):
    schedules.get_schedule("foo")
  with pytest.raises(ValueError, match="num_steps"):
    schedules.linear(1)
  with pytest.raises(ValueError, match="num_steps"):
    schedules.cosine(10.5)
  with pytest.raises(ValueError, match="end > start"):
    schedules.sigmoid(10, start=3.0, end=-3.0)
  with pytest.raises(ValueError, match="tau"):
    schedules.sigmoid(10, tau=0.0)
