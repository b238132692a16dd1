"""The Dance Diffusion U-Net (diffusers' `UNet1DModel` with its 1-D blocks) in flax, on [B, L, C].

Built from diffusers 0.42's `unet_1d.py` / `unet_1d_blocks.py` (Harmonai's Dance Diffusion,
after Crowson's audio-diffusion): Gaussian Fourier time features repeated along the signal and
concatenated to the input of the first block; blocks of three `ResConvBlock`s (conv5 -
GroupNorm(1) - GELU - conv5 - GroupNorm(1) - GELU, plus a residual), with self-attention
(`layers.AttentionBlock`, one group, C / 32 heads) after each in the Attn blocks; every block
but the first starts by halving the length with a fixed 'cubic' kernel (reflect-padded
strided conv) and every up block but the last ends by doubling it (its transpose). Parameter
names follow diffusers' modules (`down_blocks_0/resnets_1/conv_1`, ...), so the weight map
(`jdiff.pretrained.diffusers_unet1d`) is one rule per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.layers import AttentionBlock, GroupNorm32

Array = jax.Array
# diffusers' _kernels["cubic"] (Keys' cubic, a = -0.5, at half-sample offsets)
CUBIC = np.array(
  [
    -0.01171875,
    -0.03515625,
    0.11328125,
    0.43359375,
    0.43359375,
    0.11328125,
    -0.03515625,
    -0.01171875,
  ]
)
DOWN_BLOCKS = ("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D")
UP_BLOCKS = ("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip")


def downsample_cubic(x: Array) -> Array:
  """[B, L, C] -> [B, L / 2, C]: reflect-pad 3, then y[i] = sum_j k[j] x[2i + j] (Downsample1d)."""
  k, p = CUBIC, len(CUBIC) // 2 - 1
  xp = jnp.pad(x, ((0, 0), (p, p), (0, 0)), mode="reflect")
  n = (xp.shape[1] - len(k)) // 2 + 1
  return sum(float(k[j]) * xp[:, j : j + 2 * n - 1 : 2] for j in range(len(k)))


def upsample_cubic(x: Array) -> Array:
  """[B, L, C] -> [B, 2L, C]: Upsample1d's reflect pad 2, transposed stride-2 conv with 2k,
  cropped by 2p + 1 = 7 each side."""
  k, p = 2 * CUBIC, len(CUBIC) // 2 - 1
  xp = jnp.pad(x, ((0, 0), ((p + 1) // 2,) * 2, (0, 0)), mode="reflect")
  b, n, c = xp.shape
  z = jnp.zeros((b, 2 * n - 1, c), x.dtype).at[:, ::2].set(xp)  # zero-stuffed
  zp = jnp.pad(z, ((0, 0), (len(k) - 1,) * 2, (0, 0)))
  full = sum(
    float(k[j]) * zp[:, len(k) - 1 - j : len(k) - 1 - j + z.shape[1] + len(k) - 1]
    for j in range(len(k))
  )
  crop = 2 * p + 1
  return full[:, crop : full.shape[1] - crop]


class ResConvBlock(nn.Module):
  """diffusers' ResConvBlock on [B, L, C]; `is_last` drops the second norm and GELU."""

  mid_channels: int
  out_channels: int
  is_last: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    res = x
    if x.shape[-1] != self.out_channels:
      res = nn.Conv(self.out_channels, (1,), use_bias=False, name="conv_skip")(x)
    gelu = lambda h: jax.nn.gelu(h, approximate=False)  # noqa: E731 (torch's exact GELU)
    h = nn.Conv(self.mid_channels, (5,), padding=((2, 2),), name="conv_1")(x)
    h = gelu(GroupNorm32(1, name="group_norm_1")(h))
    h = nn.Conv(self.out_channels, (5,), padding=((2, 2),), name="conv_2")(h)
    if not self.is_last:
      h = gelu(GroupNorm32(1, name="group_norm_2")(h))
    return h + res


def _stack(h: Array, channels: Sequence[tuple[int, int]], attn: bool, last: bool = False) -> Array:
  """Three (six in the middle) ResConvBlocks (mid, out), each followed by attention if `attn`;
  called inside a compact module, so the submodules are that module's."""
  for i, (mid, out) in enumerate(channels):
    h = ResConvBlock(mid, out, is_last=last and i == len(channels) - 1, name=f"resnets_{i}")(h)
    if attn:
      h = AttentionBlock(
        num_heads=out // 32, num_groups=1, zero_init=False, name=f"attentions_{i}"
      )(h)
  return h


class _Block(nn.Module):
  """One down / mid / up block of `UNet1DModel` (its diffusers class name in `kind`)."""

  kind: str
  in_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, h: Array) -> Array:
    kind, out = self.kind, self.out_channels
    if kind.startswith("Down") or kind.startswith("AttnDown"):
      if kind != "DownBlock1DNoSkip":
        h = downsample_cubic(h)
      return _stack(h, [(out, out)] * 3, attn=kind.startswith("Attn"))
    if kind == "UNetMidBlock1D":
      return upsample_cubic(_stack(downsample_cubic(h), [(out, out)] * 6, attn=True))
    mid = out if kind == "AttnUpBlock1D" else self.in_channels
    h = _stack(
      h, [(mid, mid), (mid, mid), (mid, out)], kind.startswith("Attn"), kind.endswith("NoSkip")
    )
    return h if kind == "UpBlock1DNoSkip" else upsample_cubic(h)


class DanceUNet1D(nn.Module):
  """``(x [B, L, C], t [B]) -> [B, L, out_channels]``: diffusers' `UNet1DModel` with Fourier time
  features, no time MLP and no out block (the Dance Diffusion configuration).

  Attributes (diffusers' config keys):
    in_channels, out_channels, extra_in_channels: signal channels and the Fourier features'
      width (the first block sees in_channels + extra_in_channels).
    time_embedding_dim: Fourier features (default 2 * block_out_channels[0]).
    flip_sin_to_cos: [cos, sin] (True) or [sin, cos].
    down_block_types, up_block_types, block_out_channels: the levels.
  """

  in_channels: int = 2
  out_channels: int = 2
  extra_in_channels: int = 0
  time_embedding_dim: int | None = None
  flip_sin_to_cos: bool = True
  down_block_types: Sequence[str] = ("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D")
  up_block_types: Sequence[str] = ("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip")
  block_out_channels: Sequence[int] = (32, 32, 64)

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False) -> Array:
    del y, train  # unconditional, no dropout
    b, n, _ = x.shape
    dim = self.time_embedding_dim or 2 * self.block_out_channels[0]
    w = self.param("time_proj_weight", nn.initializers.normal(1.0), (dim // 2,))
    proj = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))[:, None] * w[None] * 2 * math.pi
    feats = [jnp.cos(proj), jnp.sin(proj)]
    temb = jnp.concatenate(feats if self.flip_sin_to_cos else feats[::-1], axis=-1)
    h = jnp.concatenate([x, jnp.broadcast_to(temb[:, None], (b, n, dim))], axis=-1)
    skips, ch = [], list(self.block_out_channels)
    for i, kind in enumerate(self.down_block_types):
      h = _Block(kind, h.shape[-1], ch[i], name=f"down_blocks_{i}")(h)
      skips.append(h)
    h = _Block("UNetMidBlock1D", ch[-1], ch[-1], name="mid_block")(h)
    rev = ch[::-1]
    for i, kind in enumerate(self.up_block_types):
      out = rev[i + 1] if i < len(self.up_block_types) - 1 else self.out_channels
      h = _Block(kind, rev[i], out, name=f"up_blocks_{i}")(jnp.concatenate([h, skips.pop()], -1))
    return h
