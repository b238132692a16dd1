"""DiT: the diffusion transformer of Peebles & Xie (2023), in flax.linen, NHWC in and out.

  x [B, H, W, C] -> p x p patches (a stride-p conv) + fixed 2-D sin-cos positions -> N = HW / p^2
  tokens of width D -> `depth` adaLN-Zero blocks -> final adaLN layer -> linear to p^2 C_out ->
  unpatchify -> [B, H, W, C_out]

Conditioning c = MLP(sinusoid(t)) + Embed(y) (one shared embedder, label `num_classes` is the
classifier-free-guidance null label, as the U-Net's). Each block regresses from SiLU(c) the
shift, scale and gate of its attention and MLP branches; the regression and the output layer
start at zero ("adaLN-Zero", [DiT] Sec. 3.2), so every block starts as the identity and the
model starts predicting 0. Attention is `jax.nn.dot_product_attention` (cuDNN's fused kernel
on GPUs). `learn_sigma` doubles the output channels (the prediction, then the variance
interpolation of [IDDPM]), as DiT's released models do.

It is a `model_fn` network like the U-Net: `DiT(...)(x, t, y, train=...)`, so it trains and
samples on any objective (ddpm, edm through `edm.EDMPrecond`, flow) and in pixel or latent
space (DiT's own use: 32 x 32 x 4 SD-VAE latents of 256 x 256 images).

Presets (`make_dit`, [DiT] Table 1): S (D 384, 12 blocks, 6 heads), B (768, 12, 12),
L (1024, 24, 16), XL (1152, 28, 16), each with patch 2 ('S/2' ...) or 4 / 8 ('S/4', ...).
With 32 x 32 x 4 inputs, 1000 classes and learn_sigma they have the paper's 33M, 130M, 458M and
675M parameters.

`jdiff.models.dit_convert.from_diffusers` maps diffusers' `DiTTransformer2DModel` weights onto
this module (so the published DiT checkpoints load). To match it exactly, the sinusoid uses
diffusers' frequencies exp(-ln(1e4) i / (128 - freq_shift)) with freq_shift = 1 and the MLP's
LayerNorm eps is `mlp_norm_eps` (diffusers' default 1e-5; the original DiT uses 1e-6 everywhere).

References:
  [DiT] Peebles, Xie. Scalable Diffusion Models with Transformers, ICCV 2023 (Sec. 3, Table 1,
    Fig. 3); github.com/facebookresearch/DiT `models.py`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.layers import DenseParams
from jdiff.ops.attention import dot_product_attention

Array = jax.Array
Dtype = Any

PRESETS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_xavier = nn.initializers.xavier_uniform()
# The reference's patch embedding: xavier on the conv weight viewed as [D, C * p * p]
# (fan_in C p^2, fan_out D); flax's xavier on [p, p, C, D] would count p^2 on both sides.
_xavier_patch = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2))


def _xavier_qkv(key, shape, dtype=jnp.float32):
  """One [D, D] third of the reference's fused qkv layer: xavier over [D, 3D]."""
  return nn.initializers.xavier_uniform()(key, (shape[0], 3 * shape[1]), dtype)[:, : shape[1]]


_zeros = nn.initializers.zeros


def sincos_pos_embed(dim: int, h: int, w: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [h w, dim] (MAE / DiT `get_2d_sincos_pos_embed`).

  Token i w + j (row i, column j) gets [sincos_1d(dim / 2, j), sincos_1d(dim / 2, i)], each
  1-D half being [sin(pos omega), cos(pos omega)] with omega_k = 1e4^(-k / (dim / 4)).
  """
  if dim % 4:
    raise ValueError(f"the DiT width must be divisible by 4, got {dim}")

  def one_d(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(
    np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
  )
  return np.concatenate([one_d(cols), one_d(rows)], axis=1).astype(np.float32)


def timestep_features(t: Array, dim: int = 256, *, freq_shift: float = 1.0) -> Array:
  """[cos, sin] of t exp(-ln(1e4) i / (dim / 2 - freq_shift)), float32 [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """adaLN-Zero block: x + g1 Attn(mod(LN(x))) then + g2 MLP(mod(LN(x))) ([DiT] Fig. 3)."""

  hidden: int
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  residual_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    b, n, d = x.shape
    mod = nn.Dense(6 * d, kernel_init=_zeros, bias_init=_zeros, name="adaLN")(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod.astype(jnp.float32), 6, axis=-1)
    dense = lambda f, name, **kw: nn.Dense(
      f, kernel_init=_xavier, dtype=self.dtype, name=name, **kw
    )
    h = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, name="norm1")(x)
    h = _modulate(h, shift1, scale1).astype(self.dtype)
    # q, k, v: the reference's one [D, 3D] layer (xavier over its fan D + 3D), kept as three
    # parameters (the tree of diffusers' to_q / to_k / to_v) and applied as one matmul.
    qkv = [DenseParams(d, kernel_init=_xavier_qkv, name=name)(d) for name in "qkv"]
    kernel, bias = jnp.stack([k for k, _ in qkv], axis=1), jnp.stack([b_ for _, b_ in qkv])
    h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, bias, dtype=self.dtype)
    qkv = jnp.einsum("bnc,ctd->bntd", h, kernel) + bias
    q, k, v = (qkv[:, :, i].reshape(b, n, self.num_heads, d // self.num_heads) for i in range(3))
    a = dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, n, d)
    r = self.residual_dtype  # the stream's dtype; the gated branch is computed in float32
    x = x + (gate1[:, None] * dense(d, "attn_out")(a).astype(jnp.float32)).astype(r)
    h = nn.LayerNorm(epsilon=self.mlp_norm_eps, use_scale=False, use_bias=False, name="norm2")(x)
    h = _modulate(h, shift2, scale2).astype(self.dtype)
    h = nn.gelu(dense(int(d * self.mlp_ratio), "fc1")(h), approximate=True)
    return x + (gate2[:, None] * dense(d, "fc2")(h).astype(jnp.float32)).astype(r)


class DiT(nn.Module):
  """`DiT(x [B, H, W, C], t [B], y [B] | None, *, train) -> [B, H, W, C_out]`.

  Attributes:
    patch_size: p; H and W must be multiples of it.
    hidden: token width D (divisible by 4 and by num_heads).
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / D.
    num_classes: classes (+1 null label row), or None (unconditional).
    out_channels: output channels (default: the input's).
    learn_sigma: double the output channels (prediction, then variance).
    mlp_norm_eps: eps of each block's second LayerNorm (diffusers 1e-5, original DiT 1e-6).
    freq_shift: the timestep sinusoid's frequency shift (diffusers 1, original DiT 0).
    dtype: compute dtype (the norms' statistics and the adaLN modulation stay float32).
    attention_impl: "xla" (default), "cudnn" or "auto" (`jdiff.ops.attention`).
    residual_dtype: the blocks' residual stream: float32 (default) or bfloat16 (half its
      memory traffic; each branch is still added in float32 and rounded once).
  """

  patch_size: int = 2
  hidden: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int | None = None
  out_channels: int | None = None
  learn_sigma: bool = False
  mlp_norm_eps: float = 1e-5
  freq_shift: float = 1.0
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  residual_dtype: Dtype = jnp.float32

  @property
  def null_label(self) -> int | None:
    return self.num_classes

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False) -> Array:
    del train  # no dropout
    b, hh, ww, ch = x.shape
    p, d = self.patch_size, self.hidden
    if hh % p or ww % p:
      raise ValueError(f"DiT input {hh}x{ww} is not divisible by patch_size={p}")
    if d % self.num_heads:
      raise ValueError(f"hidden={d} is not divisible by num_heads={self.num_heads}")
    h, w = hh // p, ww // p
    tok = nn.Conv(
      d, (p, p), strides=(p, p), padding="VALID", kernel_init=_xavier_patch, name="patch"
    )(x.astype(jnp.float32))
    tok = tok.reshape(b, h * w, d) + jnp.asarray(sincos_pos_embed(d, h, w))[None]
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    std = nn.initializers.normal(0.02)
    c = timestep_features(t, freq_shift=self.freq_shift)
    c = nn.Dense(d, kernel_init=std, name="t_mlp1")(c)
    c = nn.Dense(d, kernel_init=std, name="t_mlp2")(nn.silu(c))
    if self.num_classes is not None:
      y = jnp.full((b,), self.num_classes, jnp.int32) if y is None else y
      c = c + nn.Embed(self.num_classes + 1, d, embedding_init=std, name="label")(y)
    tok = tok.astype(self.residual_dtype)
    for i in range(self.depth):
      tok = DiTBlock(
        d,
        self.num_heads,
        self.mlp_ratio,
        self.mlp_norm_eps,
        self.dtype,
        attention_impl=self.attention_impl,
        residual_dtype=self.residual_dtype,
        name=f"block{i}",
      )(tok, c)
    tok = tok.astype(jnp.float32)
    shift, scale = jnp.split(
      nn.Dense(2 * d, kernel_init=_zeros, name="final_adaLN")(nn.silu(c)), 2, -1
    )
    tok = _modulate(
      nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, name="norm_out")(tok),
      shift,
      scale,
    )
    c_out = (self.out_channels or ch) * (2 if self.learn_sigma else 1)
    out = nn.Dense(p * p * c_out, kernel_init=_zeros, name="final")(tok)
    out = out.reshape(b, h, w, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, hh, ww, c_out)


def make_dit(name: str, **overrides) -> DiT:
  """A [DiT] preset: 'S/2', 'B/2', 'L/2', 'XL/2' (or patch 4, 8), overrides on top."""
  size, _, patch = name.partition("/")
  if size not in PRESETS or patch not in ("2", "4", "8"):
    raise ValueError(
      f"unknown DiT preset {name!r}; choose e.g. one of {[k + '/2' for k in PRESETS]}"
    )
  hidden, depth, heads = PRESETS[size]
  kw = dict(patch_size=int(patch), hidden=hidden, depth=depth, num_heads=heads)
  return DiT(**{**kw, **overrides})
