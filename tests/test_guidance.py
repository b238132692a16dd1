"""Tests of the classifier-free guidance wrapper (`jdiff.models.guidance`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models.guidance import cfg_model_fn, rescale_guidance

NULL = 10  # the U-Net's null_label for num_classes = 10


def make_model(calls):
  """A toy conditional model: output depends on x, t and the label (null differs)."""
  table = jax.random.normal(jax.random.PRNGKey(0), (NULL + 1, 3))

  def model_fn(x, t, y):
    calls.append(x.shape[0])
    return jnp.tanh(x) * table[y][:, None, :] + 0.01 * t[:, None, None]

  return model_fn


X = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
T = jnp.array([1, 50, 300, 999])
Y = jnp.array([0, 3, 7, 9])


@pytest.mark.parametrize("w", [0.0, 1.0, 3.5])
def test_combination_and_one_batched_call(w):
  calls = []
  model = make_model(calls)
  cond = model(X, T, Y)
  uncond = model(X, T, jnp.full_like(Y, NULL))
  calls.clear()
  out = cfg_model_fn(model, guidance_scale=w, null_cond=NULL)(X, T, Y)
  assert calls == [8]  # one call on the doubled batch
  np.testing.assert_allclose(out, uncond + w * (cond - uncond), rtol=1e-6, atol=1e-6)
  if w == 1.0:
    np.testing.assert_allclose(out, cond, rtol=1e-6, atol=1e-6)
  if w == 0.0:
    np.testing.assert_allclose(out, uncond, rtol=1e-6, atol=1e-6)


def test_rescale_formula():
  calls = []
  model = make_model(calls)
  w, phi = 4.0, 0.7
  cond = np.asarray(model(X, T, Y), np.float64)
  uncond = np.asarray(model(X, T, jnp.full_like(Y, NULL)), np.float64)
  guided = uncond + w * (cond - uncond)
  std = lambda a: a.reshape(a.shape[0], -1).std(axis=1).reshape(-1, 1, 1)
  want = phi * guided * std(cond) / std(guided) + (1 - phi) * guided
  out = cfg_model_fn(model, guidance_scale=w, null_cond=NULL, guidance_rescale=phi)(X, T, Y)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  full = rescale_guidance(jnp.asarray(guided, jnp.float32), jnp.asarray(cond, jnp.float32), 1.0)
  np.testing.assert_allclose(std(np.asarray(full, np.float64)), std(cond), rtol=1e-5)


def test_jit_traced_scale_and_null_embedding():
  """guidance_scale may be traced; null_cond may be a per-example embedding."""

  def model_fn(x, t, c):
    return x * jnp.sum(c, axis=-1, keepdims=True)[:, None] + t[:, None, None]

  c = jax.random.normal(jax.random.PRNGKey(2), (4, 6))
  null = jnp.zeros((6,))

  @jax.jit
  def run(w):
    return cfg_model_fn(model_fn, guidance_scale=w, null_cond=null)(X, T.astype(jnp.float32), c)

  want = model_fn(X, T, c)
  np.testing.assert_allclose(run(1.0), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(0.0), model_fn(X, T, jnp.zeros_like(c)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_learn_sigma_guides_only_eps_half(phi):
  """[B, ..., 2C] outputs: eps half guided (and rescaled), variance half = conditional."""
  calls = []
  table = jax.random.normal(jax.random.PRNGKey(3), (NULL + 1, 6))

  def model_fn(x, t, y):  # eps in channels 0..2, variance interpolation in 3..5
    calls.append(x.shape[0])
    h = jnp.tanh(jnp.concatenate([x, 2 * x], -1))
    return h * table[y][:, None, :] + 0.01 * t[:, None, None]

  w = 3.0
  cond = np.asarray(model_fn(X, T, Y), np.float64)
  uncond = np.asarray(model_fn(X, T, jnp.full_like(Y, NULL)), np.float64)
  calls.clear()
  fn = cfg_model_fn(
    model_fn, guidance_scale=w, null_cond=NULL, guidance_rescale=phi, learn_sigma=True
  )
  out = np.asarray(fn(X, T, Y))
  assert calls == [8] and out.shape == (4, 5, 6)
  np.testing.assert_array_equal(out[..., 3:], np.asarray(model_fn(X, T, Y))[..., 3:])
  guided = uncond[..., :3] + w * (cond[..., :3] - uncond[..., :3])
  if phi:
    std = lambda a: a.reshape(a.shape[0], -1).std(axis=1).reshape(-1, 1, 1)
    guided = phi * guided * std(cond[..., :3]) / std(guided) + (1 - phi) * guided
  np.testing.assert_allclose(out[..., :3], guided, rtol=1e-5, atol=1e-5)
  # Without learn_sigma the variance channels are extrapolated too (what it must avoid).
  plain = np.asarray(cfg_model_fn(model_fn, guidance_scale=w, null_cond=NULL)(X, T, Y))
  want = uncond[..., 3:] + w * (cond[..., 3:] - uncond[..., 3:])
  np.testing.assert_allclose(plain[..., 3:], want, rtol=1e-5, atol=1e-5)
  assert np.abs(plain[..., 3:] - out[..., 3:]).max() > 0.1


def test_errors():
  model = make_model([])
  with pytest.raises(ValueError, match="guidance_rescale"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=NULL, guidance_rescale=1.5)
  with pytest.raises(ValueError, match="null_cond"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=None)
  with pytest.raises(ValueError, match="cond"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=NULL)(X, T, None)
  with pytest.raises(ValueError, match=r"even number of output channels.*\(5, 3\)"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=NULL, learn_sigma=True)(X, T, Y)
