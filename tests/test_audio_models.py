"""Tests for the 1-D networks (jdiff.models.unet1d, jdiff.models.diffwave): the rank-generic
layers against their 2-D selves on a height-1 image, shapes and conditioning, DiffWave's
receptive field, and the samplers (CFG, inpainting of a time span) on a 1-D model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models import layers
from jdiff.models.diffwave import DiffWave
from jdiff.models.unet1d import UNet1D
from jdiff.samplers import editing
from jdiff.samplers.registry import make_sample_fn
from jdiff.schedules import get_schedule

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), num_groups=4)


def _random_params(net, *args):
  """Fan-in scaled normal weights of `net`'s shapes (non-degenerate: no zero-init outputs)."""
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), *args, train=False))["params"]
  rng = np.random.default_rng(0)

  def fill(path, s):
    fan_in = math.prod(s.shape[:-1]) if path[-1].key == "kernel" else 10.0
    return jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _middle_row(params_2d):
  """2-D conv kernels [k, k, I, O] -> 1-D [k, I, O]: on a height-1 image with padding k // 2
  only the middle row of a k x k kernel meets data, so this is the same map."""

  def f(a):
    return a[a.shape[0] // 2] if a.ndim == 4 else a

  return jax.tree.map(f, params_2d)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_and_attention_1d_equal_2d_on_a_height_one_image(scale_shift):
  x = jax.random.normal(jax.random.key(1), (2, 16, 8))
  emb = jax.random.normal(jax.random.key(2), (2, 12))
  for block, args in (
    (layers.ResBlock(12, num_groups=4, use_scale_shift_norm=scale_shift), (emb, False)),
    (layers.AttentionBlock(num_heads=2, num_groups=4, zero_init=False), ()),
  ):
    p2 = block.init(jax.random.key(3), x[:, None], *args)["params"]
    p2 = jax.tree.map(lambda a: a + 0.1 * jnp.sign(a + 0.5), p2)  # zero-init branches live
    want = block.apply({"params": p2}, x[:, None], *args)[:, 0]
    got = block.apply({"params": _middle_row(p2)}, x, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resample_1d_closed_forms():
  x = jnp.arange(2 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 3)
  np.testing.assert_array_equal(
    layers.Resample(3, up=True, use_conv=False).apply({}, x), np.repeat(x, 2, axis=1)
  )
  down = layers.Resample(3, up=False, use_conv=False).apply({}, x)
  np.testing.assert_allclose(down, (x[:, 0::2] + x[:, 1::2]) / 2)
  conv = layers.Resample(5, up=False, down_padding=0)
  assert conv.apply(conv.init(jax.random.key(0), x), x).shape == (2, 4, 5)


@pytest.mark.parametrize(
  "net, out_c",
  [
    (UNet1D(**TINY), 2),
    (UNet1D(**TINY, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True), 4),
    (DiffWave(residual_channels=8, layers=3, dilation_cycle=2, embed_dim=16), 2),
  ],
)
def test_shapes_and_class_conditioning(net, out_c):
  net = net.clone(num_classes=5)
  x = jax.random.normal(jax.random.key(0), (3, 32, 2))
  t, y = jnp.array([1, 50, 99]), jnp.array([0, 4, 5])  # 5 = the null label
  params = _random_params(net, x, t, y)
  out = net.apply({"params": params}, x, t, y, train=False)
  assert out.shape == (3, 32, out_c) and bool(jnp.isfinite(out).all())
  other = net.apply({"params": params}, x, t, jnp.array([1, 4, 2]), train=False)
  assert not np.allclose(out[0], other[0]) and not np.allclose(out[2], other[2])
  np.testing.assert_array_equal(out[1], other[1])  # same label, same row
  assert net.null_label == 5
  with pytest.raises(ValueError, match="y"):
    net.apply({"params": params}, x, t, None, train=False)
  with pytest.raises(ValueError, match=r"\[B, L, C\]"):
    net.apply({"params": params}, x[:, :, :, None], t, y, train=False)


def test_unet1d_attention_at_chosen_lengths_and_zero_init():
  net = UNet1D(**TINY)
  x = jnp.ones((1, 32, 1))
  init = jax.jit(lambda k, x, t: net.init(k, x, t, train=False))  # one compile, not op by op
  params = init(jax.random.key(0), x, jnp.array([3]))["params"]
  attn = sorted(k for k in params if k.endswith("_attn"))
  # length 32 at level 0, 16 at level 1 and the middle: attention only at 16
  assert attn == ["down_1_res_0_attn", "mid_attn", "up_1_res_0_attn", "up_1_res_1_attn"]
  np.testing.assert_array_equal(net.apply({"params": params}, x, 3, train=False), 0.0)
  with pytest.raises(ValueError, match="divisible"):
    net.apply({"params": params}, jnp.ones((1, 31, 1)), 3, train=False)


def test_diffwave_receptive_field_is_the_sum_of_dilations():
  net = DiffWave(residual_channels=4, layers=4, dilation_cycle=2, embed_dim=8)  # 1, 2, 1, 2
  x = jax.random.normal(jax.random.key(0), (1, 33, 1))
  params = _random_params(net, x, jnp.array([5]))
  grad = jax.grad(lambda x: net.apply({"params": params}, x, jnp.array([5]), train=False)[0, 16, 0])
  support = np.flatnonzero(np.abs(np.asarray(grad(x))[0, :, 0]) > 0)
  # 1 + 2 + 1 + 2 = 6 each side; inside, a position can be cut off by the input ReLU
  assert (support.min(), support.max()) == (16 - 6, 16 + 6), support


def test_samplers_guidance_and_time_span_inpainting_on_a_1d_model():
  net = UNet1D(**TINY, num_classes=3)
  x_T = jax.random.normal(jax.random.key(0), (2, 32, 1))
  labels = jnp.array([0, 2])
  params = _random_params(net, x_T, jnp.array([0, 0]), labels)
  schedule = get_schedule("linear", 100)
  known = jnp.sin(jnp.arange(32.0) / 3.0)[None, :, None] * jnp.ones((2, 1, 1)) * 0.5
  mask = (jnp.arange(32) >= 16).astype(jnp.float32)[None, :, None]  # generate the 2nd half
  fn = make_sample_fn(net, schedule, sampler="ddim", num_steps=3, null_label=3, guidance_scale=2.0)
  out = fn(params, x_T, jax.random.key(1), labels, inpaint=editing.Inpaint(known, mask))
  assert out.shape == x_T.shape and bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out[:, :16], known[:, :16], atol=1e-5)  # the kept span
  assert not np.allclose(out[:, 16:], known[:, 16:], atol=1e-2)  # the generated one


def test_config_builds_the_1d_networks_and_rejects_a_resize():
  from jdiff.configs import audio_notes
  from jdiff.runs import validate
  from jdiff.runs.builders import build_model

  c = audio_notes.get_config()
  validate.validate(c)
  assert c.objective == "edm"  # the network inside EDM's preconditioning
  net = build_model(c, num_classes=12, channels=1).net
  assert isinstance(net, UNet1D) and net.num_classes == 12 and net.ch == c.model.ch
  c.model.arch = "diffwave"
  net = build_model(c, num_classes=12, channels=1).net
  assert isinstance(net, DiffWave) and net.layers == c.diffwave.layers and net.null_label == 12
  c.data.image_size = 16
  with pytest.raises(ValueError, match="config.data.image_size=0"):
    validate.validate(c)


@pytest.mark.parametrize("arch", ["unet1d", "diffwave"])
def test_edm_preconditioning_on_1d_networks(arch):
  """objective='edm' wraps a 1-D network: D = c_skip x + c_out F(c_in x, c_noise), with the
  coefficients broadcast over [B, L, C] (they were broadcast as images, [B, 1, 1, 1])."""
  from jdiff.configs import audio_notes
  from jdiff.models.edm import edm_coefs
  from jdiff.runs.builders import build_model

  c = audio_notes.get_config()
  c.objective, c.model.arch = "edm", arch
  c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 8, (1, 2), (16,)
  c.model.num_groups, c.diffwave.residual_channels, c.diffwave.layers = 4, 8, 3
  net = build_model(c, num_classes=12, channels=1)
  x = jax.random.normal(jax.random.key(0), (2, 32, 1)) * 0.3
  sigma, y = jnp.array([0.05, 3.0]), jnp.array([1, 12])
  params = _random_params(net, x, sigma, y)
  d = net.apply({"params": params}, x, sigma, y, train=False)
  assert d.shape == x.shape
  c_skip, c_out, c_in, c_noise = (a[:, None, None] for a in edm_coefs(sigma, net.sigma_data))
  f = net.net.apply(
    {"params": params["net"]}, c_in * x, c_noise[:, 0, 0] * net.c_noise_scale, y, train=False
  )
  np.testing.assert_allclose(d, c_skip * x + c_out * f, rtol=1e-5, atol=1e-6)
