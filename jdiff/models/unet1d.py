"""The diffusion U-Net in one dimension, for waveforms ``[B, L, C]``, from the 2-D U-Net's blocks.

`UNet1D` is the DDPM / ADM U-Net (`jdiff.models.unet.UNet`) with every block taken from
`jdiff.models.layers` (ResBlock, Resample, AttentionBlock, GroupNorm32 take the rank from
their input): the same levels, skips, time MLP, class embedding with a null label for
classifier-free guidance, and the same option names, so `config.model` configures either.
Attention runs at the levels whose length is in ``attn_resolutions``. The references are the
2-D U-Net's (DDPM App. B, ADM §3, classifier-free guidance's null label).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import layers
from jdiff.models.layers import AttentionBlock, GroupNorm32, ResBlock

Array = jax.Array
Dtype = Any


def check_signal_inputs(x: Array, t: Array, y: Array | None, num_classes: int | None, factor: int):
  """(t [B], y) of a 1-D network's call after checking x [B, L, C], t and the labels.

  Args:
    x: the noisy signal [B, L, C]; L must be divisible by `factor`.
    t: timesteps [B] or a scalar (broadcast).
    y: int labels [B] in [0, num_classes] (num_classes = the null label), or None.
    num_classes: the class count, None for an unconditional network (then y must be None).
    factor: the network's total downsampling.
  """
  if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float signal [B, L, C], got {x.dtype} shape {x.shape}")
  b, n = x.shape[:2]
  if n % factor:
    raise ValueError(f"signal length L={n} must be divisible by the downsampling {factor}")
  t = jnp.asarray(t)
  t = jnp.broadcast_to(t, (b,)) if t.ndim == 0 else t
  if t.shape != (b,):
    raise ValueError(f"t must have shape [B]=({b},) or be a scalar, got shape {t.shape}")
  if (num_classes is None) != (y is None):
    raise ValueError(
      f"y (labels [B]; null label {num_classes}) must be given iff num_classes is set; "
      f"num_classes={num_classes}, y={'None' if y is None else jnp.shape(y)}"
    )
  if y is not None and (
    jnp.shape(y) != (b,) or not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer)
  ):
    raise ValueError(
      f"y must be int labels of shape ({b},), got {jnp.asarray(y).dtype} {jnp.shape(y)}"
    )
  return t, y


class TimeClassEmbedding(nn.Module):
  """Sinusoidal timestep features -> 2-layer MLP (+ a learned class embedding) [B, dim].

  The class table has ``num_classes + 1`` rows: row ``num_classes`` is the null label of
  classifier-free guidance (Ho & Salimans 2022).
  """

  ch: int
  dim: int
  num_classes: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, y: Array | None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = layers.timestep_embedding(t, self.ch).astype(self.dtype)
    emb = nn.Dense(self.dim, name="time_mlp_1", **kw)(
      nn.silu(nn.Dense(self.dim, name="time_mlp_0", **kw)(emb))
    )
    if self.num_classes is None:
      return emb
    return emb + nn.Embed(self.num_classes + 1, self.dim, name="class_emb", **kw)(y)


class UNet1D(nn.Module):
  """Noise-prediction 1-D U-Net ``(x [B, L, C], t [B], y [B]) -> [B, L, out]``.

  Attributes (as `jdiff.models.unet.UNet`'s of the same names):
    ch, ch_mult, num_res_blocks: base channels, multiplier per level, blocks per level.
    attn_resolutions: signal lengths (e.g. ``(256,)``) whose blocks get self-attention.
    num_heads, head_channels: attention heads, or fixed channels per head.
    dropout, num_groups, use_scale_shift_norm, resblock_updown, conv_resample: block options.
    num_classes: class count for conditioning (None: unconditional); ``null_label`` =
      ``num_classes`` is the unconditional label.
    out_channels, learn_sigma: output channels (default C), doubled by learn_sigma.
    zero_init: zero-initialise the last layer of each residual branch and the output.
    dtype, param_dtype: compute and parameter dtypes.
    remat: rematerialise the residual blocks in the backward pass.
    mid_attention: attention between the two middle blocks.
    norm_eps, norm_impl, attention_impl: GroupNorm epsilon / reductions, attention kernel.
  """

  # levels
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 1
  # attention
  attn_resolutions: Sequence[int] = ()
  num_heads: int = 1
  head_channels: int | None = None
  mid_attention: bool = True
  attention_impl: str = "xla"
  # residual blocks and resampling
  conv_resample: bool = True
  resblock_updown: bool = False
  use_scale_shift_norm: bool = False
  num_groups: int = 8
  dropout: float = 0.0
  # conditioning and output
  learn_sigma: bool = False
  out_channels: int | None = None
  num_classes: int | None = None
  zero_init: bool = True
  # numerics
  param_dtype: Dtype = jnp.float32
  dtype: Dtype = jnp.float32
  remat: bool = False
  norm_impl: str = "flax"
  norm_eps: float = 1e-5

  @property
  def null_label(self) -> int | None:
    """The reserved unconditional label (``num_classes``), or None if unconditional."""
    return self.num_classes

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool) -> Array:
    """Predicts eps / x0 / v for noisy signals x [B, L, C] (L divisible by
    ``2 ** (len(ch_mult) - 1)``) at timesteps t [B]; returns [B, L, out]."""
    if self.ch % self.num_groups or not self.ch_mult:
      raise ValueError(f"ch={self.ch} must be divisible by num_groups={self.num_groups}")
    t, y = check_signal_inputs(x, t, y, self.num_classes, 2 ** (len(self.ch_mult) - 1))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(num_groups=self.num_groups, norm_eps=self.norm_eps, norm_impl=self.norm_impl)
    emb = TimeClassEmbedding(self.ch, 4 * self.ch, self.num_classes, name="embed", **kw)(t, y)
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    blk = dict(
      dropout=self.dropout,
      use_scale_shift_norm=self.use_scale_shift_norm,
      zero_init=self.zero_init,
      **norm,
      **kw,
    )
    heads = dict(num_heads=self.num_heads, head_channels=self.head_channels)

    def block(h, channels, name):  # a ResBlock, then attention at the chosen lengths
      h = res_cls(channels, name=name, **blk)(h, emb, train)
      if h.shape[1] not in self.attn_resolutions:
        return h
      attn = AttentionBlock(
        zero_init=self.zero_init, attention_impl=self.attention_impl, name=f"{name}_attn",
        **heads, **norm, **kw,
      )  # fmt: skip
      return attn(h)

    def resample(h, up, name):
      if self.resblock_updown:  # BigGAN-style residual resampling (ADM)
        return res_cls(h.shape[-1], up=up, down=not up, name=name, **blk)(h, emb, train)
      return layers.Resample(h.shape[-1], up=up, use_conv=self.conv_resample, name=name, **kw)(h)

    h = nn.Conv(self.ch, (3,), padding=((1, 1),), name="conv_in", **kw)(x.astype(self.dtype))
    skips, last = [h], len(self.ch_mult) - 1
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        skips.append(h := block(h, self.ch * mult, f"down_{i}_res_{j}"))
      if i != last:
        skips.append(h := resample(h, False, f"down_{i}_downsample"))
    h = res_cls(h.shape[-1], name="mid_res_0", **blk)(h, emb, train)
    if self.mid_attention:
      h = AttentionBlock(
        zero_init=self.zero_init, attention_impl=self.attention_impl, name="mid_attn",
        **heads, **norm, **kw,
      )(h)  # fmt: skip
    h = res_cls(h.shape[-1], name="mid_res_1", **blk)(h, emb, train)
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = block(
          jnp.concatenate([h, skips.pop()], -1), self.ch * self.ch_mult[i], f"up_{i}_res_{j}"
        )
      if i:
        h = resample(h, True, f"up_{i}_upsample")
    h = nn.silu(
      GroupNorm32(
        self.num_groups, self.norm_eps, self.dtype, norm_impl=self.norm_impl, name="norm_out"
      )(h)
    )
    out = (self.out_channels or x.shape[-1]) * (2 if self.learn_sigma else 1)
    init = nn.initializers.zeros if self.zero_init else nn.linear.default_kernel_init
    return nn.Conv(out, (3,), padding=((1, 1),), kernel_init=init, name="conv_out", **kw)(h)
