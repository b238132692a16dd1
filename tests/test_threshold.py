"""x0 clipping and Imagen dynamic thresholding: `diffusion.threshold_x0` and the
`continuous.make_denoiser(clip_x0=, dynamic_percentile=)` hook, on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, diffusion, schedules
from tests import analytic

SCHED = schedules.linear(1000)
# Data well outside [-1, 1] so that the thresholding acts on the exact denoiser's output.
MU, S = 1.4, 0.5


def _np_dynamic(x, p, c):
  """[Imagen] Sec. 2.3 in float64: s = max(quantile_p |x|, c) per example; clip, times c / s."""
  x = np.asarray(x, np.float64)
  s = np.maximum(np.quantile(np.abs(x).reshape(len(x), -1), p, axis=1), c)
  s = s.reshape((-1,) + (1,) * (x.ndim - 1))
  return np.clip(x, -s, s) * c / s


def test_dynamic_thresholding_by_hand():
  x = jnp.array(
    [
      [0.5, -2.0, 4.0, 1.0],  # |x| sorted 0.5 1 2 4
      [0.2, -0.3, 0.9, -1.0],  # inside [-1, 1]
      [3.0, 3.0, -3.0, 3.0],
    ]
  )
  # p = 1: s is the max |x| (4, then floored at 1, then 3): a pure rescale into [-1, 1].
  np.testing.assert_allclose(
    diffusion.threshold_x0(x, dynamic_percentile=1.0),
    [[0.125, -0.5, 1.0, 0.25], [0.2, -0.3, 0.9, -1.0], [1.0, 1.0, -1.0, 1.0]],
    rtol=1e-6,
  )
  # p = 0.5: linear-interpolated medians 1.5, 0.6 -> 1 (floor), 3; clip to [-s, s], then / s.
  np.testing.assert_allclose(
    diffusion.threshold_x0(x, dynamic_percentile=0.5),
    [[1 / 3, -1.0, 1.0, 2 / 3], [0.2, -0.3, 0.9, -1.0], [1.0, 1.0, -1.0, 1.0]],
    rtol=1e-6,
  )
  # A data range c = 2: s = max(1.5, 2) = 2 for the first row, so it is only clipped to [-2, 2].
  np.testing.assert_allclose(
    diffusion.threshold_x0(x, clip_x0=2.0, dynamic_percentile=0.5)[0],
    [0.5, -2.0, 2.0, 1.0],
    rtol=1e-6,
  )
  # Static clipping alone, and no-op by default.
  np.testing.assert_array_equal(diffusion.threshold_x0(x, clip_x0=1.0), np.clip(x, -1, 1))
  assert diffusion.threshold_x0(x) is x


@pytest.mark.parametrize("p, c", [(0.995, 1.0), (0.9, 1.0), (0.8, 2.5)])
def test_dynamic_thresholding_matches_numpy(p, c):
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (6, 5, 4, 3))
  x = x * jnp.array([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])[:, None, None, None]  # some rows in range
  got = diffusion.threshold_x0(x, clip_x0=c, dynamic_percentile=p)
  want = _np_dynamic(x, p, c)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(got))) <= c * (1 + 1e-6)
  # Rows whose p-quantile is within the range are only clipped at c (often: unchanged).
  q = np.quantile(np.abs(np.asarray(x)).reshape(6, -1), p, axis=1)
  inside = q <= c
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(np.asarray(got)[inside], np.clip(np.asarray(x)[inside], -c, c))


def test_bfloat16_keeps_dtype():
  x = (3.0 * jax.random.normal(jax.random.PRNGKey(1), (4, 8, 2))).astype(jnp.bfloat16)
  for kwargs in ({"clip_x0": 1.0}, {"dynamic_percentile": 0.9}):
    got = diffusion.threshold_x0(x, **kwargs)
    assert got.dtype == jnp.bfloat16
    want = diffusion.threshold_x0(x.astype(jnp.float32), **kwargs)
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=1e-2, atol=1e-2)


def _model(prediction):
  """The exact Gaussian-data model at fractional t (alpha_bar from the continuous view)."""
  fns = {"eps": analytic.gaussian_eps_at_alpha_bar, "x0": analytic.gaussian_x0_at_alpha_bar}

  def model_fn(x_t, t, cond=None):
    del cond
    ab = continuous.alpha_bar_at(SCHED, t)
    return fns[prediction](ab, x_t, MU, S).astype(x_t.dtype)

  return model_fn


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_make_denoiser_thresholds_the_exact_data_prediction(prediction):
  """D(x, sigma) with thresholding = threshold_x0 of D without it = threshold_x0 of the exact
  E[x0 | x] (float64 numpy); rtol 1e-4 covers the eps -> x0 conversion at sigma = 10."""
  sigma = jnp.array([0.3, 1.0, 3.0, 10.0])
  x0 = MU + S * jax.random.normal(jax.random.PRNGKey(2), (4, 6, 2))
  x = x0 + sigma[:, None, None] * jax.random.normal(jax.random.PRNGKey(3), x0.shape)
  plain = continuous.make_denoiser(SCHED, _model(prediction), prediction=prediction)(x, sigma)
  exact = analytic.gaussian_x0_at_alpha_bar(
    1 / (1 + sigma**2), x / jnp.sqrt(1 + sigma[:, None, None] ** 2), MU, S
  )
  np.testing.assert_allclose(plain, exact, rtol=1e-4, atol=1e-5)
  for kwargs in (
    {"dynamic_percentile": 0.9},
    {"clip_x0": 2.0, "dynamic_percentile": 0.6},
    {"clip_x0": 1.0},
  ):
    den = continuous.make_denoiser(SCHED, _model(prediction), prediction=prediction, **kwargs)
    got = jax.jit(den)(x, sigma)
    np.testing.assert_allclose(got, diffusion.threshold_x0(plain, **kwargs), rtol=1e-5, atol=1e-6)
    c = kwargs.get("clip_x0", 1.0)
    p = kwargs.get("dynamic_percentile")
    want = np.clip(exact, -c, c) if p is None else _np_dynamic(exact, p, c)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The data lie mostly above 1: the thresholding did act.
  assert float(jnp.max(plain)) > 1.5
  bf = continuous.make_denoiser(
    SCHED, _model(prediction), prediction=prediction, dynamic_percentile=0.9
  )(x.astype(jnp.bfloat16), sigma)
  assert bf.dtype == jnp.bfloat16


def test_bad_options_name_the_value():
  x = jnp.ones((2, 3))
  for p in (0.0, 1.5, -0.2):
    with pytest.raises(ValueError, match=rf"dynamic_percentile must be in \(0, 1\], got {p}"):
      diffusion.threshold_x0(x, dynamic_percentile=p)
    with pytest.raises(ValueError, match=rf"dynamic_percentile must be in \(0, 1\], got {p}"):
      continuous.make_denoiser(SCHED, _model("eps"), dynamic_percentile=p)
  with pytest.raises(ValueError, match="clip_x0 must be positive, got -1.0"):
    diffusion.threshold_x0(x, clip_x0=-1.0, dynamic_percentile=0.9)
  with pytest.raises(ValueError, match="clip_x0 must be positive, got 0"):
    continuous.make_denoiser(SCHED, _model("eps"), clip_x0=0)
