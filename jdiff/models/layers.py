"""Building blocks of the diffusion U-Net (DDPM / improved DDPM / ADM family).

All layers take and return channels-last activations: NHWC ``[B, H, W, C]`` for images,
``[B, L, C]`` for 1-D signals (`jdiff.models.unet1d`); the rank comes from the input. Parameters are
stored in ``param_dtype`` (float32 by default) while the convolutions and
matmuls run in ``dtype`` (float32 or bfloat16); GroupNorm statistics and the
attention softmax are always computed in float32.

References:
  Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020 (DDPM).
  Nichol, Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021.
  Dhariwal, Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021 (ADM).
  Brock, Donahue, Simonyan, "Large Scale GAN Training ...", 2019 (BigGAN).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.ops.attention import dot_product_attention
from jdiff.ops.winograd import winograd_conv_general_dilated

# config names of the compute dtypes (`config.model.dtype`, the autoencoder's `dtype`)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Array = jax.Array
Dtype = Any


def timestep_embedding(
  t: Array,
  dim: int,
  *,
  max_period: float = 10000.0,
  flip_sin_to_cos: bool = True,
  freq_shift: float = 0.0,
) -> Array:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Follows ADM's ``timestep_embedding`` (``[cos, sin]`` halves, frequencies
  ``max_period ** (-i / (dim // 2))``), which is also what diffusers'
  ``UNet2DModel`` uses with its defaults (``flip_sin_to_cos=True``,
  ``freq_shift=0``). Transformer positional encoding: Vaswani et al. 2017, §3.5.

  Args:
    t: timesteps [B], int or float (continuous-time samplers pass fractional t).
    dim: embedding width; an odd ``dim`` gets one trailing zero column.
    max_period: controls the lowest frequency.
    flip_sin_to_cos: ``[cos, sin]`` halves (ADM, the default) or ``[sin, cos]``
      (diffusers' ``flip_sin_to_cos=False``, as in the google/ddpm-* ports).
    freq_shift: frequencies ``max_period ** (-i / (dim // 2 - freq_shift))``
      (diffusers' ``freq_shift``, 1 in the DDPM ports; 0 is ADM's).

  Returns:
    float32 embedding [B, dim].
  """
  if dim < 2:
    raise ValueError(f"timestep_embedding needs dim >= 2, got dim={dim}")
  t = jnp.asarray(t)
  if t.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got shape {t.shape}")
  half = dim // 2
  if half - freq_shift <= 0:
    raise ValueError(f"freq_shift={freq_shift} must be < dim // 2 = {half}")
  exponent = jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  freqs = jnp.exp(-math.log(max_period) * exponent)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  halves = [jnp.cos(args), jnp.sin(args)]
  emb = jnp.concatenate(halves if flip_sin_to_cos else halves[::-1], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _zero_or_default(zero: bool):
  return nn.initializers.zeros if zero else nn.linear.default_kernel_init


NORM_IMPLS = ("flax", "colsum")


def group_norm_colsum(x: Array, scale: Array, bias: Array, *, num_groups: int, eps: float) -> Array:
  """flax's GroupNorm (fast variance E[x^2] - E[x]^2, clipped at 0) in two reductions.

  First per-channel column sums of x and x^2 over (H, W) -> [B, C] (long, contiguous rows),
  then a [B, G, C / G] sum -> [B, G], instead of one reduction over axes (1, 3) of
  [B, HW, G, C / G] with inner rows of C / G elements. Same statistics up to the order of
  float32 sums.

  Args:
    x: float32 activations [B, H, W, C] (or [B, ..., C]).
    scale, bias: [C].
    num_groups: G; C must be divisible by it.
    eps: added to the variance.
  """
  b, c = x.shape[0], x.shape[-1]
  axes = tuple(range(1, x.ndim - 1))
  n = x.size // (b * c) * (c // num_groups)
  s1 = jnp.sum(x, axis=axes).reshape(b, num_groups, -1).sum(-1)
  s2 = jnp.sum(jnp.square(x), axis=axes).reshape(b, num_groups, -1).sum(-1)
  mean = s1 / n
  var = jnp.maximum(s2 / n - jnp.square(mean), 0.0)
  per_channel = lambda a: jnp.repeat(a, c // num_groups, axis=-1).reshape(b, *[1] * len(axes), c)
  mul = per_channel(jax.lax.rsqrt(var + eps)) * scale
  return (x - per_channel(mean)) * mul + bias


class _ColsumGroupNorm(nn.Module):
  """Parameters named as nn.GroupNorm's (scale, bias [C]); `group_norm_colsum`."""

  num_groups: int
  epsilon: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    f32 = jnp.float32
    return group_norm_colsum(
      x, scale.astype(f32), bias.astype(f32), num_groups=self.num_groups, eps=self.epsilon
    )


class GroupNorm32(nn.Module):
  """GroupNorm computed in float32, result cast back to the compute dtype.

  Attributes:
    num_groups: number of groups (32 in DDPM / ADM).
    dtype: dtype of the returned activations.
    param_dtype: dtype of scale and bias.
    norm_impl: "flax" (nn.GroupNorm) or "colsum" (`group_norm_colsum`: the same numbers,
      other reductions; not yet measured on a GPU).
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, C] normalised over (H, W, C // groups)."""
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: channels={c} is not divisible by num_groups={self.num_groups}")
    if self.norm_impl not in NORM_IMPLS:
      raise ValueError(
        f"config.model.norm_impl must be one of {NORM_IMPLS}, got {self.norm_impl!r}"
      )
    if self.norm_impl == "colsum":
      norm = _ColsumGroupNorm(self.num_groups, self.epsilon, self.param_dtype, name="norm")
    else:
      norm = nn.GroupNorm(
        num_groups=self.num_groups,
        epsilon=self.epsilon,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        name="norm",
      )
    return norm(x.astype(jnp.float32)).astype(self.dtype)


def conv_fn(conv_impl: str):
  """The ``conv_general_dilated`` that ``nn.Conv`` should call for a resolved impl."""
  if conv_impl == "winograd":
    return winograd_conv_general_dilated
  if conv_impl == "xla":
    return None  # nn.Conv's default, lax.conv_general_dilated
  raise ValueError(
    f"conv_impl must be 'xla' or 'winograd' here (resolve 'auto' "
    f"with resolve_conv_impl), got conv_impl={conv_impl!r}"
  )


def _conv(
  features: int,
  kernel: int,
  *,
  dtype,
  param_dtype,
  name: str,
  strides: int = 1,
  zero: bool = False,
  conv_impl: str = "xla",
  padding=None,
  rank: int = 2,
) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel,) * rank,
    strides=(strides,) * rank,
    padding=((pad, pad),) * rank if padding is None else padding,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_zero_or_default(zero),
    conv_general_dilated=conv_fn(conv_impl),
    name=name,
  )


def _upsample_nearest(x: Array) -> Array:
  if x.ndim == 3:  # [B, L, C]
    return jnp.repeat(x, 2, axis=1)
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def _downsample_avg(x: Array) -> Array:
  if x.ndim == 3:  # [B, L, C]
    b, n, c = x.shape
    return x.reshape(b, n // 2, 2, c).astype(jnp.float32).mean(axis=2).astype(x.dtype)
  b, h, w, c = x.shape
  y = x.reshape(b, h // 2, 2, w // 2, 2, c).astype(jnp.float32).mean(axis=(2, 4))
  return y.astype(x.dtype)


class Resample(nn.Module):
  """2x resampling between U-Net levels (DDPM / ADM / diffusers).

  ``up``: nearest-neighbour 2x upsampling, then a 3x3 conv if ``use_conv``.
  Down: a strided 3x3 conv (padding 1, as ADM/diffusers) if ``use_conv``, else
  2x2 average pooling. Without a conv the channels are unchanged.

  Attributes:
    channels: output channels of the conv.
    up: upsample (True) or downsample (False).
    use_conv: resample with a conv (see above).
    down_padding: padding of the strided conv: 1 on every side, or 0: one row
      and column of zeros at the bottom and right only (TF's 'SAME' for even
      sizes, as the original DDPM code and diffusers' ``downsample_padding=0``).
  """

  channels: int
  up: bool
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_impl: str = "xla"
  down_padding: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, channels] (up) or [B, H/2, W/2, channels] (down);
    [B, L, C] -> [B, 2L | L/2, channels]."""
    if not self.use_conv:
      return _upsample_nearest(x) if self.up else _downsample_avg(x)
    if self.up:
      x = _upsample_nearest(x)
    if self.down_padding not in (0, 1):
      raise ValueError(f"down_padding must be 0 or 1, got {self.down_padding}")
    return _conv(
      self.channels,
      3,
      strides=1 if self.up else 2,
      padding=((0, 1),) * (x.ndim - 2) if not self.up and self.down_padding == 0 else None,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_impl=self.conv_impl,
      name="conv",
      rank=x.ndim - 2,
    )(x)


class ResBlock(nn.Module):
  """Residual block with time(+class) conditioning.

  ``h = conv(act(norm(x)))``; the embedding is projected and added
  (DDPM, Ho et al. 2020, App. B), or used as FiLM scale/shift after the second
  norm, ``norm(h) * (1 + s) + b`` (``use_scale_shift_norm``, ADM §3 / Nichol &
  Dhariwal 2021); then ``conv(dropout(act(.)))``. With ``up``/``down`` the
  block resamples both branches without a conv (BigGAN-style, ADM).

  Attributes:
    out_channels: output channels.
    dropout: dropout rate on the second conv's input.
    use_scale_shift_norm: FiLM conditioning instead of additive.
    up: nearest 2x upsampling inside the block.
    down: average-pool 2x downsampling inside the block.
    num_groups: GroupNorm groups.
    zero_init: zero-initialise the last conv (residual branch starts as 0).
    conv_impl: "xla" or "winograd" for the 3x3 convs (``jdiff.ops.winograd``).
    norm_eps: GroupNorm epsilon (1e-6 in the diffusers DDPM ports).
  """

  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  num_groups: int = 32
  zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_impl: str = "xla"
  norm_eps: float = 1e-5
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool) -> Array:
    """Applies the block.

    Args:
      x: activations [B, H, W, C_in] (or [B, L, C_in]).
      emb: conditioning embedding [B, E].
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      [B, H', W', out_channels] with H' = 2H (up), H/2 (down) or H.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, rank=x.ndim - 2)
    nkw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(
      GroupNorm32(self.num_groups, self.norm_eps, name="norm1", norm_impl=self.norm_impl, **nkw)(x)
    )
    if self.up:
      h, x = _upsample_nearest(h), _upsample_nearest(x)
    elif self.down:
      h, x = _downsample_avg(h), _downsample_avg(x)
    h = _conv(self.out_channels, 3, name="conv1", conv_impl=self.conv_impl, **kw)(h)

    n_emb = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    e = nn.Dense(n_emb, name="emb_proj", **nkw)(nn.silu(emb.astype(self.dtype)))
    e = e.reshape(e.shape[0], *[1] * (x.ndim - 2), n_emb)  # over every spatial axis
    norm2 = GroupNorm32(
      self.num_groups, self.norm_eps, name="norm2", norm_impl=self.norm_impl, **nkw
    )
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = norm2(h) * (1 + scale) + shift
    else:
      h = norm2(h + e)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(
      self.out_channels, 3, name="conv2", zero=self.zero_init, conv_impl=self.conv_impl, **kw
    )(h)

    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, name="skip", conv_impl=self.conv_impl, **kw)(x)
    return x + h


class DenseParams(nn.Module):
  """The kernel [in, features] and bias [features] of an ``nn.Dense``, unapplied.

  Same names, shapes, initialisers and init RNG as ``nn.Dense(features)`` in
  this scope, so that several of them can be applied as one concatenated matmul
  with the parameter tree (checkpoints, converters) unchanged.
  """

  features: int
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array]:
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return kernel, bias


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, with a residual.

  DDPM (Ho et al. 2020) uses one head; ADM (Dhariwal & Nichol 2021, §3) uses
  several, set by ``num_heads`` or by a fixed ``head_channels``. Logits and
  softmax are float32 (``jax.nn.dot_product_attention``).

  Attributes:
    num_heads: number of heads (used when head_channels is None).
    head_channels: channels per head; overrides num_heads.
    num_groups: GroupNorm groups.
    zero_init: zero-initialise the output projection.
    norm_eps: GroupNorm epsilon.
    use_norm: GroupNorm the input first (diffusers' U-Net middle attention with
      'scale_shift' time conditioning has none).
    attention_impl: "xla", "cudnn" or "auto" (`jdiff.ops.attention`).
    norm_impl: "flax" or "colsum" (`GroupNorm32`).
  """

  num_heads: int = 1
  head_channels: int | None = None
  num_groups: int = 32
  zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-5
  use_norm: bool = True
  attention_impl: str = "xla"
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, C] (or [B, L, C] -> [B, L, C])."""
    b, c = x.shape[0], x.shape[-1]
    n = x.size // (b * c)  # positions attended over: H*W, or L
    if self.head_channels is not None:
      if c % self.head_channels:
        raise ValueError(f"channels={c} not divisible by head_channels={self.head_channels}")
      heads = c // self.head_channels
    else:
      if c % self.num_heads:
        raise ValueError(f"channels={c} not divisible by num_heads={self.num_heads}")
      heads = self.num_heads
    d = c // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_norm:
      x_in = GroupNorm32(
        self.num_groups, self.norm_eps, name="norm", norm_impl=self.norm_impl, **kw
      )(x)
    else:
      x_in = x
    h = x_in.reshape(b, n, c)
    # Separate q/k/v parameters (as DDPM's NIN layers and diffusers' to_q/k/v),
    # applied as one matmul: one pass over h (on XLA:CPU 16-17 ms against 34 ms for three
    # [C, C] ones in a profile, 0-1% of a whole forward; BENCHMARKS.md, "Pretrained
    # weights"). The kernels are stacked on a new axis ([C, 3, C], the memory layout of the
    # [C, 3C] concatenation) rather than concatenated: under FSDP each is split along its
    # output axis, and a concatenation along that axis made the compiler reshuffle the
    # shards with all-to-alls.
    qkv = [DenseParams(c, name=n, param_dtype=self.param_dtype)(c) for n in "qkv"]
    h, kernel, bias = nn.dtypes.promote_dtype(
      h,
      jnp.stack([kernel for kernel, _ in qkv], axis=1),
      jnp.stack([bias for _, bias in qkv]),
      dtype=self.dtype,
    )
    qkv = jnp.einsum("bnc,ctd->bntd", h, kernel) + bias
    q, k, v = (qkv[:, :, i].reshape(b, n, heads, d) for i in range(3))
    a = dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, n, c)
    out = nn.Dense(c, name="proj_out", kernel_init=_zero_or_default(self.zero_init), **kw)(a)
    return x + out.reshape(x.shape)
