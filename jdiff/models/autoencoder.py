"""KL-regularised convolutional autoencoder of latent diffusion (the "VAE" of SD).

`AutoencoderKL` follows the first-stage model of [LDM] layer for layer
(CompVis `ldm/modules/diffusionmodules/model.py` Encoder/Decoder and
`ldm/models/autoencoder.py` AutoencoderKL; diffusers `AutoencoderKL`), so that
weights of that family map onto it mechanically (`autoencoder_convert`):

  encoder: conv_in -> per level `num_res_blocks` ResnetBlocks (+ Downsample except
           at the last level) -> mid (ResnetBlock, AttnBlock, ResnetBlock)
           -> GroupNorm, swish -> conv_out to 2 * z_channels (mean and log-variance)
  quant_conv: 1x1 conv, 2 * z_channels -> 2 * embed_dim
  post_quant_conv: 1x1 conv, embed_dim -> z_channels
  decoder: conv_in -> mid -> per level, from the coarsest, `num_res_blocks + 1`
           ResnetBlocks (+ nearest x2 Upsample and conv except at level 0)
           -> GroupNorm, swish -> conv_out to out_ch

The downsampling factor is f = 2 ** (len(ch_mult) - 1). Layout is NHWC. Params are
float32; `dtype` is the compute dtype. The outputs (reconstruction, posterior
moments) are returned in float32 so that losses and the KL are computed in full
precision. LDM's optional `attn_resolutions` (empty for every released KL model),
dropout (0 in every released KL model) and `tanh_out` are not implemented.

The flax parameter tree mirrors the LDM state dict (`encoder/down_{i}/block_{j}/conv1`,
`encoder/mid/attn_1/q`, `decoder/up_{i}/upsample/conv`, `quant_conv`, ...), so that
`jdiff.models.autoencoder_convert` maps it to and from LDM and diffusers key names.
The posterior q(z | x) is `jdiff.models.distributions.DiagonalGaussian`.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022, Sec. 3.1 and App. G.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.distributions import DiagonalGaussian

Array = jax.Array

# ----------------------------------------------------------------------------------
# Layers (names mirror LDM's modules so that the state-dict mapping is mechanical).


def _conv(
  features: int, kernel: int, *, dtype, name: str, stride: int = 1, padding: Any = None
) -> nn.Conv:
  if padding is None:
    p = kernel // 2
    padding = ((p, p), (p, p))
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def _norm(num_groups: int, *, dtype, name: str) -> nn.GroupNorm:
  # LDM's Normalize: GroupNorm(32, eps=1e-6, affine=True).
  return nn.GroupNorm(
    num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name
  )


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv3x3 twice plus a (1x1 `nin_shortcut` if needed) skip."""

  out_channels: int
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.swish(_norm(self.num_groups, dtype=self.dtype, name="norm1")(x))
    h = _conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
    h = nn.swish(_norm(self.num_groups, dtype=self.dtype, name="norm2")(h))
    h = _conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out, residual."""

  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = _norm(self.num_groups, dtype=self.dtype, name="norm")(x)
    q = _conv(c, 1, dtype=self.dtype, name="q")(h).reshape(b, hh * ww, c)
    k = _conv(c, 1, dtype=self.dtype, name="k")(h).reshape(b, hh * ww, c)
    v = _conv(c, 1, dtype=self.dtype, name="v")(h).reshape(b, hh * ww, c)
    # Logits and softmax in float32: a bfloat16 softmax over h*w keys loses mass.
    logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits * (c**-0.5), axis=-1).astype(self.dtype)
    h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
    return x + _conv(c, 1, dtype=self.dtype, name="proj_out")(h)


class Downsample(nn.Module):
  """LDM's asymmetric pad (bottom/right by 1) then 3x3 stride-2 conv."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, stride=2, padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling then 3x3 conv."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, dtype=self.dtype, name="conv")(x)


class MidBlock(nn.Module):
  """ResnetBlock, AttnBlock, ResnetBlock at constant width (`block_1/attn_1/block_2`)."""

  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    x = ResnetBlock(c, **kw, name="block_1")(x)
    x = AttnBlock(**kw, name="attn_1")(x)
    return ResnetBlock(c, **kw, name="block_2")(x)


class _Level(nn.Module):
  """One resolution level: `block_{j}` ResnetBlocks then optional resampling."""

  out_channels: int
  num_blocks: int
  resample: str | None  # 'downsample', 'upsample' or None.
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_blocks):
      x = ResnetBlock(
        self.out_channels, num_groups=self.num_groups, dtype=self.dtype, name=f"block_{j}"
      )(x)
    if self.resample == "downsample":
      x = Downsample(dtype=self.dtype, name="downsample")(x)
    elif self.resample == "upsample":
      x = Upsample(dtype=self.dtype, name="upsample")(x)
    return x


class _Coder(nn.Module):
  """Fields shared by `Encoder` and `Decoder` (see `AutoencoderKL` for their meaning)."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  num_groups: int = 32
  dtype: Any = jnp.float32

  def _head(self, h: Array) -> Array:
    """GroupNorm, swish, 3x3 `conv_out` to `out_channels` (the last layers of both)."""
    h = nn.swish(_norm(self.num_groups, dtype=self.dtype, name="norm_out")(h))
    return _conv(self.out_channels, 3, dtype=self.dtype, name="conv_out")(h)


class Encoder(_Coder):
  """LDM Encoder with double_z: [B, H, W, in] -> [B, H/f, W/f, out_channels].

  `AutoencoderKL` sets out_channels = 2 * z_channels (posterior mean and log-variance).
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    n = len(self.ch_mult)
    h = _conv(self.ch, 3, dtype=self.dtype, name="conv_in")(x)
    for i, mult in enumerate(self.ch_mult):
      h = _Level(
        self.ch * mult,
        self.num_res_blocks,
        "downsample" if i != n - 1 else None,
        **kw,
        name=f"down_{i}",
      )(h)
    return self._head(MidBlock(**kw, name="mid")(h))


class Decoder(_Coder):
  """LDM Decoder: [B, h, w, z_channels] -> [B, h*f, w*f, out_channels]."""

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    h = _conv(self.ch * self.ch_mult[-1], 3, dtype=self.dtype, name="conv_in")(z)
    h = MidBlock(**kw, name="mid")(h)
    for i in reversed(range(len(self.ch_mult))):
      h = _Level(
        self.ch * self.ch_mult[i],
        self.num_res_blocks + 1,
        "upsample" if i != 0 else None,
        **kw,
        name=f"up_{i}",
      )(h)
    return self._head(h)


# ----------------------------------------------------------------------------------
# The autoencoder.


class AutoencoderKL(nn.Module):
  """KL-regularised autoencoder of [LDM] (SD's VAE), NHWC.

  Attributes:
    ch: base channel count.
    ch_mult: channel multiplier per resolution level; f = 2 ** (len(ch_mult) - 1).
    num_res_blocks: ResnetBlocks per encoder level (the decoder has one more).
    z_channels: channels of the encoder/decoder bottleneck.
    embed_dim: latent channels after quant_conv (the diffusion model's channels);
      None means `z_channels` (as in every released LDM/SD KL model).
    in_channels: image channels in.
    out_ch: image channels out; None means `in_channels`.
    num_groups: GroupNorm groups (32 in LDM/SD); must divide every width.
    dtype: compute dtype; params stay float32.

  Usage:
    module = make_autoencoder('tiny_f4')
    variables = module.init(key, x, sample_posterior=False)
    recon, posterior = module.apply(variables, x, rng)
    posterior = module.apply(variables, x, method=AutoencoderKL.encode)
    x_hat = module.apply(variables, posterior.mode(), method=AutoencoderKL.decode)
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  embed_dim: int | None = None
  in_channels: int = 3
  out_ch: int | None = None
  num_groups: int = 32
  dtype: Any = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return self.z_channels if self.embed_dim is None else self.embed_dim

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_ch is None else self.out_ch

  def setup(self):
    _validate_config(self)
    kw = dict(
      ch=self.ch,
      ch_mult=tuple(self.ch_mult),
      num_res_blocks=self.num_res_blocks,
      num_groups=self.num_groups,
      dtype=self.dtype,
    )
    self.encoder = Encoder(out_channels=2 * self.z_channels, **kw)
    self.decoder = Decoder(out_channels=self.output_channels, **kw)
    self.quant_conv = _conv(2 * self.latent_channels, 1, dtype=self.dtype, name="quant_conv")
    self.post_quant_conv = _conv(self.z_channels, 1, dtype=self.dtype, name="post_quant_conv")

  def encode(self, x: Array) -> DiagonalGaussian:
    """Encodes images [B, H, W, in_channels] into q(z | x) over [B, H/f, W/f, embed_dim].

    H and W must be multiples of f.
    """
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"encode expects [B, H, W, {self.in_channels}] images, got shape {x.shape}")
    f = self.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"image size {x.shape[1:3]} must be a multiple of f={f}")
    moments = self.quant_conv(self.encoder(x))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: Array) -> Array:
    """Decodes latents [B, h, w, embed_dim] into images [B, h*f, w*f, out_ch] (float32)."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(
        f"decode expects [B, h, w, {self.latent_channels}] latents, got shape {z.shape}"
      )
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(
    self, x: Array, rng: Array | None = None, *, sample_posterior: bool = True
  ) -> tuple[Array, DiagonalGaussian]:
    """Encodes, takes a posterior sample (or its mode) and decodes.

    Args:
      x: images [B, H, W, in_channels], H and W multiples of f.
      rng: PRNG key for the posterior sample; required if `sample_posterior`.
      sample_posterior: decode z ~ q(z | x) if True, else its mode.

    Returns:
      (recon [B, H, W, out_ch] float32, posterior over [B, H/f, W/f, embed_dim]).
    """
    posterior = self.encode(x)
    if sample_posterior:
      if rng is None:
        raise ValueError("sample_posterior=True needs an rng key (got rng=None)")
      z = posterior.sample(rng)
    else:
      z = posterior.mode()
    return self.decode(z), posterior


def _validate_config(m: AutoencoderKL) -> None:
  if not isinstance(m.ch_mult, (tuple, list)) or not m.ch_mult:
    raise ValueError(f"ch_mult must be a non-empty tuple of ints, got {m.ch_mult!r}")
  for name in ("ch", "num_res_blocks", "z_channels", "in_channels", "num_groups"):
    v = getattr(m, name)
    if not isinstance(v, (int, np.integer)) or v < (0 if name == "num_res_blocks" else 1):
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  for name in ("embed_dim", "out_ch"):
    v = getattr(m, name)
    if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
      raise ValueError(f"{name} must be a positive int or None, got {v!r}")
  for mult in m.ch_mult:
    if not isinstance(mult, (int, np.integer)) or mult < 1:
      raise ValueError(f"ch_mult entries must be positive ints, got {m.ch_mult!r}")
    if (m.ch * mult) % m.num_groups:
      raise ValueError(
        f"num_groups={m.num_groups} must divide every width ch * mult; "
        f"{m.ch} * {mult} = {m.ch * mult} is not divisible"
      )


# ----------------------------------------------------------------------------------
# Presets.


def _presets() -> dict[str, dict[str, Any]]:
  return {
    # Fast on CPU: 1-channel digits at 16x16 / 32x32, f = 4, 4 latent channels
    # (override z_channels=2 for 2).
    "tiny_f4": dict(
      ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, in_channels=1, num_groups=8
    ),
    # LDM's KL-f4 (models/first_stage_models/kl-f4): z = 3.
    "kl_f4": dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, in_channels=3),
    # Stable Diffusion 1.x / 2.x VAE = LDM's KL-f8: z = 4.
    "sd_kl_f8": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, in_channels=3),
  }


def autoencoder_presets() -> tuple[str, ...]:
  """Names accepted by `make_autoencoder`."""
  return tuple(_presets())


def make_autoencoder(name: str, **overrides: Any) -> AutoencoderKL:
  """Builds a preset `AutoencoderKL`, with keyword overrides of any of its fields.

  Args:
    name: 'tiny_f4' (ch=16, ch_mult=(1, 2, 2), 1 res block, z=4, 1 channel, 8 groups),
      'kl_f4' (LDM KL-f4, z=3) or 'sd_kl_f8' (SD's VAE: ch=128, ch_mult=(1, 2, 4, 4),
      2 res blocks, z=4).
    **overrides: AutoencoderKL fields, e.g. `z_channels=2, dtype=jnp.bfloat16`.

  Returns:
    The (unbound) module.
  """
  presets = _presets()
  if name not in presets:
    raise ValueError(f"unknown autoencoder preset {name!r}; known: {sorted(presets)}")
  fields = {f.name for f in dataclasses.fields(AutoencoderKL)} - {"parent", "name"}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise TypeError(f"unknown AutoencoderKL field(s) {bad}; known: {sorted(fields)}")
  module = AutoencoderKL(**{**presets[name], **overrides})
  _validate_config(module)
  return module
