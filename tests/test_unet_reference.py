"""An independent float64 numpy forward of the U-Net's pieces, written from the papers'
equations, against the Flax modules of jdiff.models.{layers,unet} on the same parameters.

Covered: the sinusoidal timestep embedding, a ResBlock (GroupNorm, SiLU, 3x3 conv,
additive or scale-shift timestep injection, BigGAN-style up/down resampling, 1x1 skip when
the width changes; dropout off), a multi-head attention block, and a whole tiny U-Net
(time MLP, class embedding, skip concatenations, resampling layers, output head).

References: DDPM (Ho et al. 2020, App. B), ADM (Dhariwal & Nichol 2021, Sec. 3),
Vaswani et al. 2017 (scaled dot-product attention, Sec. 3.2; positional encoding, Sec. 3.5),
Wu & He 2018 (GroupNorm).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models.layers import AttentionBlock, ResBlock, timestep_embedding
from jdiff.models.unet import UNet

# ---------------------------------------------------------------- numpy reference


def np_group_norm(x, p, groups, eps=1e-5):
  """GroupNorm over (H, W, C / groups) per example and group; p = {scale, bias} [C]."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
  return y * p["scale"] + p["bias"]


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_conv(x, p, stride=1):
  """Cross-correlation NHWC x HWIO with zero padding k // 2 ("SAME" for odd k), by im2col."""
  w = p["kernel"]
  kh, kw = w.shape[:2]
  b, h, ww, _ = x.shape
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  ho, wo = (h - 1) // stride + 1, (ww - 1) // stride + 1
  cols = np.stack(
    [
      np.stack(
        [xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride] for j in range(kw)],
        axis=3,
      )
      for i in range(kh)
    ],
    axis=3,
  )
  return np.einsum("bhwijc,ijco->bhwo", cols, w) + p["bias"]  # cols: [B, Ho, Wo, kh, kw, C]


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_upsample(x):
  return x.repeat(2, axis=1).repeat(2, axis=2)


def np_avgpool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def np_timestep_embedding(t, dim, max_period=10000.0):
  """[cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim // 2)), i < dim // 2; odd: + 0."""
  half = dim // 2
  freqs = max_period ** (-np.arange(half, dtype=np.float64) / half)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  return np.pad(emb, ((0, 0), (0, dim % 2)))


def np_resblock(p, x, emb, out_ch, groups, scale_shift=False, up=False, down=False):
  """DDPM App. B residual block; ADM's FiLM ``norm(h) (1 + s) + b`` when scale_shift."""
  h = np_silu(np_group_norm(x, p["norm1"]["norm"], groups))
  if up:
    h, x = np_upsample(h), np_upsample(x)
  elif down:
    h, x = np_avgpool(h), np_avgpool(x)
  h = np_conv(h, p["conv1"])
  e = np_dense(np_silu(emb), p["emb_proj"])[:, None, None, :]
  if scale_shift:
    scale, shift = e[..., :out_ch], e[..., out_ch:]
    h = np_group_norm(h, p["norm2"]["norm"], groups) * (1.0 + scale) + shift
  else:
    h = np_group_norm(h + e, p["norm2"]["norm"], groups)
  h = np_conv(np_silu(h), p["conv2"])
  if x.shape[-1] != out_ch:
    x = np_conv(x, p["skip"])
  return x + h


def np_attention(p, x, heads, groups):
  """Multi-head self-attention over H*W positions: softmax(q k^T / sqrt(d)) v, residual."""
  b, hh, ww, c = x.shape
  d = c // heads
  h = np_group_norm(x, p["norm"]["norm"], groups).reshape(b, hh * ww, c)
  split = lambda a: a.reshape(b, hh * ww, heads, d).transpose(0, 2, 1, 3)  # [B, heads, N, d]
  q, k, v = (split(np_dense(h, p[n])) for n in ("q", "k", "v"))
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  out = (a @ v).transpose(0, 2, 1, 3).reshape(b, hh * ww, c)
  return x + np_dense(out, p["proj_out"]).reshape(b, hh, ww, c)


def np_unet(p, x, t, y, cfg, out_ch):
  """The U-Net of DDPM App. B / ADM, built from the blocks above."""
  ch, mult, nres, groups = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["num_groups"]
  attn_res, heads, ss = cfg["attn_resolutions"], cfg["num_heads"], cfg["use_scale_shift_norm"]
  emb = np_timestep_embedding(t, ch)
  emb = np_dense(np_silu(np_dense(emb, p["time_mlp_0"])), p["time_mlp_1"])
  if y is not None:
    emb = emb + p["class_emb"]["embedding"][y]

  def res(name, h, width):
    return np_resblock(p[name], h, emb, width, groups, scale_shift=ss)

  def attn(name, h):
    return np_attention(p[name], h, heads, groups) if h.shape[1] in attn_res else h

  def resample(name, h, up):
    if cfg.get("resblock_updown"):  # BigGAN / ADM residual resampling
      return np_resblock(p[name], h, emb, h.shape[-1], groups, scale_shift=ss, up=up, down=not up)
    if not cfg.get("conv_resample", True):
      return np_upsample(h) if up else np_avgpool(h)
    return np_conv(np_upsample(h), p[name]["conv"]) if up else np_conv(h, p[name]["conv"], 2)

  h = np_conv(x, p["conv_in"])
  hs = [h]
  for i, m in enumerate(mult):
    for j in range(nres):
      h = attn(f"down_{i}_attn_{j}", res(f"down_{i}_res_{j}", h, ch * m))
      hs.append(h)
    if i != len(mult) - 1:
      h = resample(f"down_{i}_downsample", h, up=False)
      hs.append(h)
  h = res("mid_res_0", h, h.shape[-1])
  h = np_attention(p["mid_attn"], h, heads, groups)
  h = res("mid_res_1", h, h.shape[-1])
  for i in reversed(range(len(mult))):
    for j in range(nres + 1):
      h = np.concatenate([h, hs.pop()], axis=-1)
      h = attn(f"up_{i}_attn_{j}", res(f"up_{i}_res_{j}", h, ch * mult[i]))
    if i != 0:
      h = resample(f"up_{i}_upsample", h, up=True)
  assert not hs and out_ch == p["conv_out"]["kernel"].shape[-1]
  return np_conv(np_silu(np_group_norm(h, p["norm_out"]["norm"], groups)), p["conv_out"])


# ---------------------------------------------------------------- helpers


def _random_params(module, *args, seed=0, **kwargs):
  """Generic non-degenerate float32 params of `module`'s shapes (no XLA init compile)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "scale":
      v = 1.0 + 0.2 * rng.standard_normal(s.shape)
    elif name in ("bias", "embedding"):
      v = 0.2 * rng.standard_normal(s.shape)
    else:  # kernels: fan-in scaled
      v = rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _close(got, want, rtol=1e-5):
  """float32 Flax vs float64 numpy: relative to each value, plus rtol of the output scale."""
  got = np.asarray(got, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("dim", [16, 7])
def test_timestep_embedding_matches_formula(dim):
  t = np.array([0.0, 1.0, 17.5, 999.0])
  got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), dim), np.float64)
  # float32 arguments t * w of up to ~1e3 carry ~6e-5 absolute phase error.
  np.testing.assert_allclose(got, np_timestep_embedding(t, dim), rtol=0, atol=2e-4)
  half = dim // 2
  np.testing.assert_allclose(got[0, :half], 1.0)  # cos(0)
  np.testing.assert_allclose(got[:, half : 2 * half][:, 0], np.sin(t), atol=2e-4)  # w_0 = 1


@pytest.mark.parametrize(
  "c_in, c_out, kw",
  [
    (8, 8, dict()),
    (8, 16, dict(use_scale_shift_norm=True)),
    (16, 8, dict(up=True)),
    (8, 16, dict(down=True, use_scale_shift_norm=True)),
  ],
)
def test_resblock_matches_numpy(c_in, c_out, kw):
  block = ResBlock(c_out, num_groups=4, zero_init=False, dropout=0.5, **kw)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 4, 4, c_in)).astype(np.float32)
  emb = rng.standard_normal((2, 12)).astype(np.float32)
  params = _random_params(block, x, emb, False, seed=2)
  got = block.apply({"params": params}, x, emb, False)  # train=False: dropout off
  want = np_resblock(
    _f64(params),
    x.astype(np.float64),
    emb.astype(np.float64),
    c_out,
    4,
    scale_shift=kw.get("use_scale_shift_norm", False),
    up=kw.get("up", False),
    down=kw.get("down", False),
  )
  assert ("skip" in params) == (c_in != c_out)
  _close(got, want)


@pytest.mark.parametrize(
  "kw, heads", [(dict(num_heads=1), 1), (dict(num_heads=4), 4), (dict(head_channels=4), 4)]
)
def test_attention_block_matches_numpy(kw, heads):
  block = AttentionBlock(num_groups=4, zero_init=False, **kw)
  x = np.random.default_rng(3).standard_normal((2, 4, 4, 16)).astype(np.float32)
  params = _random_params(block, x, seed=4)
  got = block.apply({"params": params}, x)
  _close(got, np_attention(_f64(params), x.astype(np.float64), heads, 4))


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(use_scale_shift_norm=True, num_classes=3, num_heads=2, learn_sigma=True),
    dict(conv_resample=False),
    dict(resblock_updown=True, use_scale_shift_norm=True),
  ],
)
def test_whole_unet_matches_numpy(kw):
  cfg = dict(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_heads=1,
    num_groups=4,
    use_scale_shift_norm=False,
  )
  cfg.update(kw)
  net = UNet(**cfg, zero_init=False, conv_impl="xla")
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 8, 8, 2)).astype(np.float32)
  t = np.array([3, 41], np.int32)  # small t: float32 phases t * w_i exact to ~1e-6
  y = np.array([1, 3], np.int32) if net.num_classes else None  # 3 = null label
  params = _random_params(net, x, t, y, seed=6, train=False)
  got = net.apply({"params": params}, x, t, y, train=False)
  out_ch = 4 if net.learn_sigma else 2
  want = np_unet(_f64(params), x.astype(np.float64), t, y, cfg, out_ch)
  _close(got, want, rtol=2e-5)
