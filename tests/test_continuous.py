"""The continuous-time view (`jdiff.continuous`) against the discrete schedule, in float64.

The one prediction conversion is `diffusion.convert_prediction`; the discrete view gathers its
coefficients at integer t, the continuous one computes them from sigma. Both are exact to
float32 rounding, so at integer t they must agree to a few float32 ulps (not to the ~5e-4 of
forming sqrt(1 - alpha_bar) from alpha_bar near t = 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, diffusion, schedules

SCHEDULES = {
  "linear": schedules.linear(1000),
  "cosine": schedules.cosine(1000),
  "cosine_ztsnr": schedules.get_schedule("cosine", 1000, zero_terminal_snr=True),
}
F32_EPS = float(np.finfo(np.float32).eps)


def _sigma64(schedule, stop=None):
  """sigma_t = sqrt(1 - ab_t) / sqrt(ab_t) from the schedule's stored values, float64 [:stop]."""
  return np.asarray(schedule.sqrt_one_minus_alphas_cumprod[:stop], np.float64) / np.asarray(
    schedule.sqrt_alphas_cumprod[:stop], np.float64
  )


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_to_x0_eps_at_integer_t_equals_the_discrete_conversion(name, prediction):
  """rtol 4e-6: sigma(t) = exp(interp(log sigma)) is a float32 round trip through the log, whose
  absolute rounding (|log sigma| <= 10 for cosine's sigma_max ~ 2e4, so ~1e-6) becomes the
  relative error of sigma and of the coefficients; a few more ulps come from the arithmetic."""
  s = SCHEDULES[name]
  x = jax.random.normal(jax.random.PRNGKey(2), (7, 3))
  pred = jax.random.normal(jax.random.PRNGKey(3), (7, 3))
  t = jnp.array([0, 1, 10, 100, 500, 900, 999])
  want = diffusion.to_x0_eps(s, x, t, pred, prediction=prediction)
  got = continuous.to_x0_eps(s, x, t.astype(jnp.float32), pred, prediction=prediction)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=4e-6, atol=1e-7)


def test_vp_coefs_are_exact_near_sigma_zero():
  """sqrt(ab) and sqrt(1 - ab) at ab = 1 / (1 + sigma^2), against float64, to 2 ulps."""
  sigma = np.array([0.0, 1e-4, 6e-3, 0.1, 1.0, 80.0, 2e4], np.float32)
  a, s = continuous.vp_coefs(jnp.asarray(sigma), jnp.zeros((7, 2)))
  assert a.shape == s.shape == (7, 1)
  sig = sigma.astype(np.float64)
  np.testing.assert_allclose(a[:, 0], 1 / np.sqrt(1 + sig**2), rtol=2 * F32_EPS)
  np.testing.assert_allclose(s[:, 0], sig / np.sqrt(1 + sig**2), rtol=2 * F32_EPS)


def test_convert_prediction_inverts_the_forward_process():
  """x_t = a x0 + s eps, v = a eps - s x0: each kind recovers (x0, eps); s = 0 gives eps 0."""
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k0, (4, 3), jnp.float32)
  eps = jax.random.normal(k1, (4, 3), jnp.float32)
  a, s = continuous.vp_coefs(jnp.array([0.01, 0.5, 3.0, 50.0]), x0)
  x_t = a * x0 + s * eps
  preds = {"eps": eps, "x0": x0, "v": a * eps - s * x0}
  for kind, pred in preds.items():
    got_x0, got_eps = diffusion.convert_prediction(a, s, x_t, pred, prediction=kind)
    np.testing.assert_allclose(got_x0, x0, rtol=1e-4, atol=2e-4 if kind == "eps" else 1e-5)
    np.testing.assert_allclose(got_eps, eps, rtol=1e-4, atol=1e-4 if kind == "x0" else 1e-5)
  # sigma = 0 is the data: an x0 prediction has no defined eps; 0, not nan.
  out = continuous.to_x0_eps_sigma(0.0, x0, x0, prediction="x0")
  np.testing.assert_array_equal(out[0], x0)
  np.testing.assert_array_equal(out[1], np.zeros((4, 3)))
  with pytest.raises(ValueError, match="'score'"):
    diffusion.convert_prediction(a, s, x_t, eps, prediction="score")


def test_sigma_max_of_plain_cosine_is_not_floored():
  """Plain cosine ends at alpha_bar ~ 2.4e-9 > 0: its sigma_max is the schedule's own
  sqrt((1 - ab) / ab) ~ 2.03e4 (float32 log/exp round trip: rtol 2e-6), not the 4096 of the
  zero-terminal-SNR floor."""
  s = SCHEDULES["cosine"]
  ab = np.float64(s.alphas_cumprod[-1])
  assert 0 < ab < 2.0**-24
  smin, smax = continuous.sigma_min_max(s)
  np.testing.assert_allclose(float(smax), np.sqrt((1 - ab) / ab), rtol=2e-6)
  np.testing.assert_allclose(float(smin), _sigma64(s)[0], rtol=2e-6)
  np.testing.assert_allclose(continuous.t_to_sigma(s, jnp.arange(1000)), _sigma64(s), rtol=2e-6)


def test_zero_terminal_snr_last_alpha_bar_is_floored_at_2_pow_minus_24():
  """Only the alpha_bar = 0 step is replaced (by 2**-24, as diffusers does); the others keep
  their sigma, and sigma_to_t inverts t_to_sigma up to the last step."""
  s = SCHEDULES["cosine_ztsnr"]
  assert float(s.alphas_cumprod[-1]) == 0.0
  sig = np.asarray(continuous.t_to_sigma(s, jnp.arange(1000)), np.float64)
  np.testing.assert_allclose(sig[-1], np.sqrt(1 - 2.0**-24) / 2.0**-12, rtol=2e-6)
  np.testing.assert_allclose(sig[:-1], _sigma64(s, -1), rtol=2e-6)
  t = jnp.array([0.0, 10.5, 500.25, 998.0, 999.0])
  np.testing.assert_allclose(continuous.sigma_to_t(s, continuous.t_to_sigma(s, t)), t, atol=2e-3)
