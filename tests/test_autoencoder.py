"""Tests for jdiff.models.{autoencoder,autoencoder_convert,distributions,autoencoder_losses}."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from jdiff.models.autoencoder import (
  AttnBlock,
  AutoencoderKL,
  Downsample,
  ResnetBlock,
  Upsample,
  make_autoencoder,
)
from jdiff.models.autoencoder_convert import (
  ldm_key,
  ldm_state_dict_from_diffusers,
  ldm_state_dict_from_params,
  ldm_state_dict_keys,
  params_from_ldm_state_dict,
)
from jdiff.models.autoencoder_losses import (
  autoencoder_loss,
  latent_scale_factor,
  mse,
  psnr,
  psnr_from_mse,
  reconstruction_loss,
)
from jdiff.models.distributions import DiagonalGaussian
from jdiff.training.step import make_autoencoder_train_step

# Threefry init of ~60 params takes XLA seconds to compile on CPU; rbg is cheap.
_INIT_KEY = lambda seed: jax.random.key(seed, impl="rbg")  # noqa: E731


def _abstract_init(module, image_shape):
  x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, sample_posterior=False), x)


def _digits(n=64, size=16):
  """n sklearn digits, nearest-upsampled 8x8 -> size x size, scaled to [-1, 1]."""
  d = load_digits().images[:n].astype(np.float32) / 16.0
  r = size // 8
  d = np.repeat(np.repeat(d, r, axis=1), r, axis=2)
  return jnp.asarray(d[..., None] * 2.0 - 1.0)


# The tiny_f4 preset at half width (ch=8) keeps the CPU test budget small.
_TINY = dict(ch=8, num_groups=4)


@pytest.fixture(scope="module")
def tiny():
  module = make_autoencoder("tiny_f4", **_TINY)
  x = _digits()
  init = jax.jit(lambda k: module.init(k, x[:1], sample_posterior=False))
  return module, init(_INIT_KEY(0))["params"], x


# ---------------------------------------------------------------- shapes / dtypes


@pytest.mark.parametrize("ch_mult,f", [((1, 2, 2), 4), ((1, 2, 4, 4), 8)])
@pytest.mark.parametrize("z", [1, 2, 4, 8])
def test_encode_decode_shapes(ch_mult, f, z):
  module = AutoencoderKL(
    ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=z, in_channels=3, num_groups=4
  )
  assert module.downsample_factor == f
  shape = (2, 32, 48, 3)
  variables = _abstract_init(module, shape)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  post = jax.eval_shape(lambda v, x: module.apply(v, x, method=AutoencoderKL.encode), variables, x)
  assert post.mean.shape == post.logvar.shape == (2, 32 // f, 48 // f, z)
  zz = jax.ShapeDtypeStruct(post.mean.shape, jnp.float32)
  y = jax.eval_shape(lambda v, z: module.apply(v, z, method=AutoencoderKL.decode), variables, zz)
  assert y.shape == shape
  recon, post2 = jax.eval_shape(
    lambda v, x, k: module.apply(v, x, k), variables, x, jax.random.key(0)
  )
  assert recon.shape == shape and post2.mean.shape == post.mean.shape


def test_embed_dim_and_out_ch_differ_from_z_and_in():
  module = AutoencoderKL(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    z_channels=6,
    embed_dim=3,
    in_channels=1,
    out_ch=2,
    num_groups=4,
  )
  variables = _abstract_init(module, (1, 8, 8, 1))
  p = variables["params"]
  assert p["quant_conv"]["kernel"].shape == (1, 1, 12, 6)
  assert p["post_quant_conv"]["kernel"].shape == (1, 1, 3, 6)
  recon, post = jax.eval_shape(
    lambda v, x: module.apply(v, x, sample_posterior=False),
    variables,
    jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32),
  )
  assert post.mean.shape == (1, 4, 4, 3) and recon.shape == (1, 8, 8, 2)


def test_bfloat16_compute_float32_params(tiny):
  module, params, x = tiny
  m16 = make_autoencoder("tiny_f4", **_TINY, dtype=jnp.bfloat16)
  shapes = _abstract_init(m16, (1, 16, 16, 1))["params"]
  assert {a.dtype for a in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  # Same params, bf16 compute: close to the float32 result, outputs float32.
  fwd = lambda m: jax.jit(
    lambda p, x: m.apply(
      {"params": p},
      x,  # noqa: E731
      sample_posterior=False,
    )
  )
  r32, p32 = fwd(module)(params, x[:4])
  r16, p16 = fwd(m16)(params, x[:4])
  assert r16.dtype == jnp.float32 and p16.mean.dtype == jnp.float32
  # bfloat16 keeps 8 mantissa bits (~0.4% per op); ~25 layers give a few % RMS.
  rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))  # noqa: E731
  assert rms(r16 - r32) < 0.1 * float(jnp.std(r32))
  assert rms(p16.mean - p32.mean) < 0.1 * float(jnp.std(p32.mean))
  assert not np.allclose(np.asarray(r16), np.asarray(r32), rtol=0, atol=1e-6)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="preset"):
    make_autoencoder("nope")
  with pytest.raises(TypeError, match="chanels"):
    make_autoencoder("tiny_f4", z_chanels=2)
  with pytest.raises(ValueError, match="num_groups=32"):
    make_autoencoder("tiny_f4", num_groups=32)
  module = make_autoencoder("tiny_f4")
  v = _abstract_init(module, (1, 16, 16, 1))
  with pytest.raises(ValueError, match="multiple of f=4"):
    jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 18, 16, 1)), sample_posterior=False), v)
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
    jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 16, 16, 3)), sample_posterior=False), v)
  with pytest.raises(ValueError, match="rng"):
    jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 16, 16, 1))), v)
  with pytest.raises(ValueError, match="recon_loss"):
    reconstruction_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), recon_loss="l3")
  with pytest.raises(ValueError, match="shape"):
    mse(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


# ------------------------------------------------------------- layer references


def _np_conv(x, w, b, *, pad, stride=1):
  """Reference NHWC conv: x [1, H, W, I] padded by pad=((t, b), (l, r)), w [kh, kw, I, O]."""
  xp = np.pad(x[0], (pad[0], pad[1], (0, 0)))
  kh, kw = w.shape[:2]
  ho, wo = (xp.shape[0] - kh) // stride + 1, (xp.shape[1] - kw) // stride + 1
  out = np.empty((ho, wo, w.shape[-1]), np.float64)
  for i in range(ho):
    for j in range(wo):
      patch = xp[i * stride : i * stride + kh, j * stride : j * stride + kw]
      out[i, j] = np.einsum("hwi,hwio->o", patch, w) + b
  return out[None]


def _np_group_norm(x, scale, bias, groups, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  mu = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mu) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _random_params(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda a: rng.normal(scale=0.5, size=a.shape).astype(np.float32), params
  )


def test_downsample_pads_bottom_right_like_ldm():
  x = np.random.default_rng(0).normal(size=(1, 6, 6, 2)).astype(np.float32)
  layer = Downsample()
  p = _random_params(layer.init(_INIT_KEY(0), x)["params"], 1)
  y = np.asarray(layer.apply({"params": p}, x))
  # torch: F.pad(x, (0, 1, 0, 1)) then Conv2d(k=3, stride=2, padding=0).
  ref = _np_conv(x, p["conv"]["kernel"], p["conv"]["bias"], pad=((0, 1), (0, 1)), stride=2)
  assert y.shape == (1, 3, 3, 2)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_upsample_is_nearest_neighbour_then_same_conv():
  x = np.random.default_rng(2).normal(size=(1, 2, 3, 2)).astype(np.float32)
  layer = Upsample()
  p = _random_params(layer.init(_INIT_KEY(0), x)["params"], 3)
  y = np.asarray(layer.apply({"params": p}, x))
  up = x[:, [0, 0, 1, 1]][:, :, [0, 0, 1, 1, 2, 2]]  # F.interpolate(scale_factor=2, 'nearest')
  ref = _np_conv(up, p["conv"]["kernel"], p["conv"]["bias"], pad=((1, 1), (1, 1)))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_resnet_block_matches_numpy():
  x = np.random.default_rng(4).normal(size=(1, 4, 4, 4)).astype(np.float32)
  layer = ResnetBlock(8, num_groups=2)
  p = _random_params(layer.init(_INIT_KEY(0), x)["params"], 5)
  assert set(p) == {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}
  y = np.asarray(layer.apply({"params": p}, x))
  swish = lambda a: a / (1 + np.exp(-a))  # noqa: E731
  same = ((1, 1), (1, 1))
  h = swish(_np_group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], 2))
  h = _np_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"], pad=same)
  h = swish(_np_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"], 2))
  h = _np_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"], pad=same)
  skip = _np_conv(x, p["nin_shortcut"]["kernel"], p["nin_shortcut"]["bias"], pad=((0, 0), (0, 0)))
  np.testing.assert_allclose(y, skip + h, rtol=1e-4, atol=1e-4)


def test_attention_matches_numpy_single_head():
  x = np.random.default_rng(1).normal(size=(2, 3, 4, 8)).astype(np.float32)
  layer = AttnBlock(num_groups=4)
  p = _random_params(layer.init(_INIT_KEY(0), x)["params"], 6)
  y = np.asarray(layer.apply({"params": p}, x))
  h = _np_group_norm(x, p["norm"]["scale"], p["norm"]["bias"], 4).reshape(2, 12, 8)
  lin = lambda n, a: a @ p[n]["kernel"][0, 0] + p[n]["bias"]  # noqa: E731
  q, k, v = lin("q", h), lin("k", h), lin("v", h)
  logits = np.einsum("bic,bjc->bij", q, k) / np.sqrt(8)  # LDM: int(c) ** -0.5
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = x + lin("proj_out", w @ v).reshape(2, 3, 4, 8)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- posterior


def _random_posterior(seed, shape=(3, 2, 2, 4)):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=shape).astype(np.float32),
    rng.uniform(-2.0, 1.0, size=shape).astype(np.float32),
  )


def test_kl_matches_numpy_formula():
  mean, logvar = _random_posterior(0)
  post = DiagonalGaussian.create(mean, logvar)
  m, lv = mean.astype(np.float64), logvar.astype(np.float64)
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, per dimension.
  ref = np.sum(-0.5 * lv + 0.5 * (np.exp(lv) + m**2) - 0.5, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(post.kl()), ref, rtol=1e-5)
  assert post.kl().shape == (3,)
  zero = DiagonalGaussian.create(np.zeros((2, 1, 1, 3)), np.zeros((2, 1, 1, 3)))
  np.testing.assert_allclose(np.asarray(zero.kl()), 0.0, atol=1e-7)


def test_kl_matches_monte_carlo():
  mean, logvar = _random_posterior(1, shape=(2, 2, 2, 2))
  post = DiagonalGaussian.create(mean, logvar)
  n = 20000

  @jax.jit
  def log_ratio(key):
    z = jax.vmap(post.sample)(jax.random.split(key, n))  # [n, B, ...]
    log_q = -jax.vmap(post.nll)(z)  # [n, B]
    log_p = -0.5 * jnp.sum(np.log(2 * np.pi) + z**2, axis=(2, 3, 4))
    return log_q - log_p

  est = np.asarray(log_ratio(jax.random.key(0)), np.float64)
  se = est.std(0) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(est.mean(0) - np.asarray(post.kl())), 4 * se + 1e-4)


def test_nll_matches_scipy():
  from scipy.stats import norm

  mean, logvar = _random_posterior(2)
  post = DiagonalGaussian.create(mean, logvar)
  x = np.random.default_rng(3).normal(size=mean.shape).astype(np.float32)
  ref = -norm.logpdf(x, mean, np.exp(0.5 * logvar)).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(post.nll(x)), ref, rtol=1e-5)


def test_sample_statistics_and_mode():
  mean, logvar = _random_posterior(4, shape=(1, 2, 2, 3))
  post = DiagonalGaussian.create(mean, logvar)
  n = 20000
  draw = jax.jit(lambda k: jax.vmap(post.sample)(jax.random.split(k, n)))
  z = np.asarray(draw(jax.random.key(5)))
  std = np.exp(0.5 * logvar)
  # Mean within 5 standard errors; std within 5 SEs of the sample std (~std/sqrt(2n)).
  np.testing.assert_array_less(np.abs(z.mean(0) - mean), 5 * std / np.sqrt(n))
  np.testing.assert_array_less(np.abs(z.std(0) - std), 5 * std / np.sqrt(2 * n))
  np.testing.assert_array_equal(np.asarray(post.mode()), mean)


def test_logvar_clipped_and_moments_split():
  moments = jnp.concatenate([jnp.ones((1, 1, 1, 2)), jnp.array([[[[-100.0, 100.0]]]])], axis=-1)
  post = DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(np.asarray(post.mean), np.ones((1, 1, 1, 2)))
  np.testing.assert_array_equal(np.asarray(post.logvar), [[[[-30.0, 20.0]]]])
  with pytest.raises(ValueError, match="even"):
    DiagonalGaussian.from_moments(jnp.ones((1, 1, 1, 3)))


# --------------------------------------------------------------------- metrics


def test_psnr_mse_and_loss_formulas():
  rng = np.random.default_rng(6)
  x = rng.uniform(-1, 1, size=(3, 4, 4, 2)).astype(np.float32)
  y = (x + rng.normal(scale=0.1, size=x.shape)).astype(np.float32)
  err = ((x.astype(np.float64) - y) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(np.asarray(mse(x, y)), err, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(psnr(x, y)), 10 * np.log10(4.0 / err), rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(psnr(x, y, data_range=1.0)), 10 * np.log10(1.0 / err), rtol=1e-5
  )
  # Quantised-noise example: MSE = 0.01 on range 2 -> 10 log10(400) dB.
  np.testing.assert_allclose(
    np.asarray(psnr(np.zeros((1, 4)), np.full((1, 4), 0.1))), [10 * np.log10(400.0)], rtol=1e-5
  )
  # PSNR of the aggregated MSE (not the mean PSNR): 10 log10(2^2 / mean MSE).
  np.testing.assert_allclose(
    float(psnr_from_mse(err.mean())), 10 * np.log10(4.0 / err.mean()), rtol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(psnr_from_mse(err, data_range=255.0)), 10 * np.log10(255.0**2 / err), rtol=1e-5
  )
  assert float(psnr_from_mse(0.0)) == np.inf
  with pytest.raises(ValueError, match="data_range must be positive, got -1.0"):
    psnr_from_mse(err, data_range=-1.0)
  mean, logvar = _random_posterior(7, shape=(3, 1, 1, 2))
  post = DiagonalGaussian.create(mean, logvar)
  kl_ref = np.mean(np.sum(-0.5 * logvar + 0.5 * (np.exp(logvar) + mean**2) - 0.5, axis=(1, 2, 3)))
  for kind, rec in (("l1", np.abs(x - y)), ("l2", (x - y) ** 2)):
    loss, metrics = autoencoder_loss(y, x, post, recon_loss=kind, kl_weight=0.5)
    rec_ref = rec.reshape(3, -1).sum(1).mean()
    np.testing.assert_allclose(float(metrics["rec_loss"]), rec_ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl_ref, rtol=1e-5)
    np.testing.assert_allclose(float(loss), rec_ref + 0.5 * kl_ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["psnr"]), np.mean(10 * np.log10(4.0 / err)), rtol=1e-5)


def test_latent_scale_factor_gives_unit_std():
  z = np.random.default_rng(8).normal(loc=0.3, scale=5.5, size=(16, 4, 4, 4))
  s = latent_scale_factor(z)
  np.testing.assert_allclose(np.std(z * s), 1.0, rtol=1e-10)
  np.testing.assert_allclose(s, 1 / 5.5, rtol=0.05)
  with pytest.raises(ValueError, match="std"):
    latent_scale_factor(np.ones((2, 2)))


# ------------------------------------------------------------------- training


def test_training_reduces_reconstruction_error(tiny):
  module, params, x = tiny
  opt = optax.adam(2e-3)
  step = jax.jit(make_autoencoder_train_step(module, opt, recon_loss="l2", kl_weight=1e-6))
  evaluate = jax.jit(lambda p: module.apply({"params": p}, x, sample_posterior=False))
  recon0, _ = evaluate(params)
  mse_untrained = float(jnp.mean(mse(x, recon0)))
  mse_mean_image = float(jnp.mean(mse(x, jnp.broadcast_to(x.mean(0), x.shape))))
  opt_state = opt.init(params)
  base = jax.random.key(1)
  for i in range(100):
    params, opt_state, metrics = step(params, opt_state, x, jax.random.fold_in(base, i))
  assert np.isfinite(float(metrics["loss"]))
  recon, post = evaluate(params)
  mse_trained = float(jnp.mean(mse(x, recon)))
  assert mse_trained < 0.35 * mse_mean_image, (mse_trained, mse_mean_image)
  assert mse_trained < 0.1 * mse_untrained, (mse_trained, mse_untrained)
  # The latent is the bottleneck (4 x 4 x 4 = 64 numbers for 256 pixels) and decode
  # of encode's mode equals __call__ without sampling.
  z = module.apply({"params": params}, x, method=AutoencoderKL.encode).mode()
  assert z.shape == (64, 4, 4, 4)
  np.testing.assert_allclose(
    np.asarray(module.apply({"params": params}, z, method=AutoencoderKL.decode)),
    np.asarray(recon),
    rtol=1e-4,
    atol=1e-4,
  )
  s = latent_scale_factor(post.sample(jax.random.key(2)))
  assert np.isfinite(s) and s > 0


# ------------------------------------------------------------- state dict / SD


def test_state_dict_round_trip(tiny):
  module, params, _ = tiny
  sd = ldm_state_dict_from_params(params, prefix="first_stage_model.")
  assert sorted(k[len("first_stage_model.") :] for k in sd) == ldm_state_dict_keys(module)
  # torch layouts: conv OIHW, norm [C].
  assert sd["first_stage_model.encoder.conv_in.weight"].shape == (8, 1, 3, 3)
  assert sd["first_stage_model.encoder.down.0.block.0.norm1.weight"].shape == (8,)
  assert sd["first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"].shape == (16, 8, 1, 1)
  assert sd["first_stage_model.decoder.up.2.upsample.conv.weight"].shape == (16, 16, 3, 3)
  assert sd["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)
  assert sd["first_stage_model.encoder.conv_out.weight"].shape == (8, 16, 3, 3)
  extra = {"first_stage_model.loss.logvar": np.zeros(()), "model.x": np.zeros(3)}
  back = params_from_ldm_state_dict({**sd, **extra}, config=module, prefix="first_stage_model.")
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # Attention weights as linear [O, I] (diffusers' layout) load identically.
  lin = dict(sd)
  for n in ("q", "k", "v", "proj_out"):
    key = f"first_stage_model.encoder.mid.attn_1.{n}.weight"
    lin[key] = lin[key][:, :, 0, 0]
  back = params_from_ldm_state_dict(lin, config=module, prefix="first_stage_model.")
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # A transposed kernel, a missing and an unexpected key are all named.
  bad = dict(sd)
  key = "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"
  bad[key] = bad[key].transpose(1, 0, 2, 3)
  with pytest.raises(ValueError, match="nin_shortcut"):
    params_from_ldm_state_dict(bad, config=module, prefix="first_stage_model.")
  bad = dict(sd)
  del bad["first_stage_model.quant_conv.bias"]
  bad["first_stage_model.encoder.foo.weight"] = np.zeros(1)
  with pytest.raises(ValueError, match=r"quant_conv\.bias.*encoder\.foo\.weight"):
    params_from_ldm_state_dict(bad, config=module, prefix="first_stage_model.")


def test_ldm_key_examples():
  assert ldm_key(("encoder", "down_0", "block_1", "conv1", "kernel")) == (
    "encoder.down.0.block.1.conv1.weight"
  )
  assert ldm_key(("decoder", "mid", "block_2", "norm1", "scale")) == (
    "decoder.mid.block_2.norm1.weight"
  )
  assert ldm_key(("decoder", "up_3", "upsample", "conv", "bias")) == (
    "decoder.up.3.upsample.conv.bias"
  )
  assert ldm_key(("encoder", "mid", "attn_1", "proj_out", "kernel")) == (
    "encoder.mid.attn_1.proj_out.weight"
  )


def _diffusers_sd_keys(num_levels=4, layers=2, widths=(128, 128, 256, 512, 512)):
  """diffusers' AutoencoderKL key names for SD, generated from its module structure
  (Encoder.down_blocks[i].resnets[j] / downsamplers[0], Decoder.up_blocks in execution
  order with layers + 1 resnets, UNetMidBlock2D resnets[0..1] + attentions[0])."""
  keys = []

  def resnet(p, shortcut):
    for n in ("norm1", "conv1", "norm2", "conv2") + (("conv_shortcut",) if shortcut else ()):
      keys.extend([f"{p}.{n}.weight", f"{p}.{n}.bias"])

  def mid(p):
    resnet(f"{p}.mid_block.resnets.0", False)
    resnet(f"{p}.mid_block.resnets.1", False)
    for n in ("group_norm", "to_q", "to_k", "to_v", "to_out.0"):
      keys.extend(
        [f"{p}.mid_block.attentions.0.{n}.weight", f"{p}.mid_block.attentions.0.{n}.bias"]
      )

  for i in range(num_levels):
    for j in range(layers):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", j == 0 and widths[i] != widths[i + 1])
    if i < num_levels - 1:
      keys.extend([f"encoder.down_blocks.{i}.downsamplers.0.conv.{w}" for w in ("weight", "bias")])
  # Decoder: mid width, then each up block's output width in execution order.
  chain = (widths[-1],) + widths[:0:-1]  # 512, 512, 512, 256, 128
  for i in range(num_levels):
    for j in range(layers + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", j == 0 and chain[i] != chain[i + 1])
    if i < num_levels - 1:
      keys.extend([f"decoder.up_blocks.{i}.upsamplers.0.conv.{w}" for w in ("weight", "bias")])
  for p in ("encoder", "decoder"):
    mid(p)
    for n in ("conv_in", "conv_norm_out", "conv_out"):
      keys.extend([f"{p}.{n}.weight", f"{p}.{n}.bias"])
  keys += ["quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"]
  return keys


def test_sd_param_count_and_diffusers_key_names():
  module = make_autoencoder("sd_kl_f8")
  variables = _abstract_init(module, (1, 16, 16, 3))
  # diffusers AutoencoderKL of SD 1.x (stabilityai/sd-vae-ft-mse, runwayml/...): 83,653,863.
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 83_653_863
  keys = ldm_state_dict_keys(module)
  assert len(keys) == 248
  renamed = ldm_state_dict_from_diffusers({k: None for k in _diffusers_sd_keys()})
  assert sorted(renamed) == keys
  # Known correspondences (diffusers' convert_vae_pt_to_diffusers / SD checkpoints).
  for diff, ldm in [
    ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"),
    ("decoder.up_blocks.3.resnets.2.norm2.weight", "decoder.up.0.block.2.norm2.weight"),
    ("decoder.up_blocks.2.resnets.0.conv_shortcut.bias", "decoder.up.1.block.0.nin_shortcut.bias"),
    ("encoder.down_blocks.2.downsamplers.0.conv.weight", "encoder.down.2.downsample.conv.weight"),
    ("decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight"),
    ("encoder.mid_block.attentions.0.query.bias", "encoder.mid.attn_1.q.bias"),
    ("encoder.mid_block.resnets.1.norm1.weight", "encoder.mid.block_2.norm1.weight"),
    ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
  ]:
    probe = {diff: None, "decoder.up_blocks.3.resnets.0.conv1.weight": None}
    assert ldm in ldm_state_dict_from_diffusers(probe), (diff, ldm)
  with pytest.raises(ValueError, match="weird"):
    ldm_state_dict_from_diffusers({"encoder.mid_block.attentions.0.weird.weight": None})
