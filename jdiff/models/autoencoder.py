"""KL-regularised convolutional autoencoder of latent diffusion (the "VAE" of SD).

`AutoencoderKL` follows the first-stage model of [LDM] layer for layer
(CompVis `ldm/modules/diffusionmodules/model.py` Encoder/Decoder and
`ldm/models/autoencoder.py` AutoencoderKL; diffusers `AutoencoderKL`), so that
weights of that family map onto it mechanically (`params_from_ldm_state_dict`):

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

Flax parameter tree (`params` collection), names mirroring the LDM state dict:

  encoder/conv_in, encoder/down_{i}/block_{j}/{norm1,conv1,norm2,conv2,nin_shortcut},
  encoder/down_{i}/downsample/conv, encoder/mid/{block_1,attn_1,block_2},
  encoder/mid/attn_1/{norm,q,k,v,proj_out}, encoder/{norm_out,conv_out},
  decoder/conv_in, decoder/mid/..., decoder/up_{i}/block_{j}/...,
  decoder/up_{i}/upsample/conv, decoder/{norm_out,conv_out},
  quant_conv, post_quant_conv.

A flax path maps to an LDM key by writing `down_{i}`, `up_{i}`, `block_{j}` (outside
`mid`) as `down.{i}`, `up.{i}`, `block.{j}`, joining with '.', and renaming the leaf
`kernel`/`scale` to `weight` (see `ldm_key`). E.g.
`encoder/down_0/block_0/conv1/kernel` <-> `encoder.down.0.block.0.conv1.weight`,
`decoder/up_3/upsample/conv/bias` <-> `decoder.up.3.upsample.conv.bias`,
`encoder/mid/attn_1/q/kernel` <-> `encoder.mid.attn_1.q.weight`. Note that, as in
LDM, `decoder.up.{i}` is indexed by resolution level (i = 0 is the finest), not by
execution order.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022, Sec. 3.1 and App. G.
  [VAE] Kingma, Welling. Auto-Encoding Variational Bayes, ICLR 2014, App. B
    (closed-form KL between diagonal Gaussians and N(0, I)).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

# LDM's clip range for the posterior log-variance (ldm/modules/distributions).
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


# ----------------------------------------------------------------------------------
# Posterior.


@flax.struct.dataclass
class DiagonalGaussian:
  """Diagonal Gaussian q(z | x) = N(mean, exp(logvar)), a pytree.

  Build it with `DiagonalGaussian.create(mean, logvar)` or
  `DiagonalGaussian.from_moments(moments)`, which clip `logvar` to [-30, 20] as
  LDM's `DiagonalGaussianDistribution`; the raw constructor stores values as given.

  Attributes:
    mean: [B, h, w, C] float32.
    logvar: [B, h, w, C] float32, natural-log variance.
  """

  mean: Array
  logvar: Array

  @classmethod
  def create(cls, mean: Array, logvar: Array) -> DiagonalGaussian:
    """Returns the posterior with `logvar` clipped to [LOGVAR_MIN, LOGVAR_MAX]."""
    mean = jnp.asarray(mean)
    logvar = jnp.asarray(logvar)
    if mean.shape != logvar.shape:
      raise ValueError(f'mean shape {mean.shape} != logvar shape {logvar.shape}')
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @classmethod
  def from_moments(cls, moments: Array) -> DiagonalGaussian:
    """Splits [..., 2C] moments into mean (first C channels) and logvar (last C).

    This is LDM's `torch.chunk(parameters, 2, dim=1)` in NHWC layout.
    """
    if moments.shape[-1] % 2:
      raise ValueError(f'moments need an even channel count, got shape {moments.shape}')
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls.create(mean, logvar)

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: Array) -> Array:
    """Draws z = mean + std * eps, eps ~ N(0, I) (reparameterised). [B, h, w, C]."""
    eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
    return self.mean + self.std * eps

  def mode(self) -> Array:
    """Returns the mean (the mode of a Gaussian). [B, h, w, C]."""
    return self.mean

  def kl(self) -> Array:
    """KL(q || N(0, I)) summed over all non-batch axes, [B].

    KL = 0.5 * sum(mean^2 + var - 1 - logvar)   ([VAE] App. B).
    """
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)

  def nll(self, x: Array) -> Array:
    """Negative log-density -log q(x) summed over all non-batch axes, [B] (nats)."""
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(
        np.log(2.0 * np.pi) + self.logvar + jnp.square(x - self.mean) / self.var,
        axis=axes)


# ----------------------------------------------------------------------------------
# Layers (names mirror LDM's modules so that the state-dict mapping is mechanical).


def _conv(features: int, kernel: int, *, dtype, name: str, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  if padding is None:
    p = kernel // 2
    padding = ((p, p), (p, p))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm(num_groups: int, *, dtype, name: str) -> nn.GroupNorm:
  # LDM's Normalize: GroupNorm(32, eps=1e-6, affine=True).
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv3x3 twice plus a (1x1 `nin_shortcut` if needed) skip."""

  out_channels: int
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.swish(_norm(self.num_groups, dtype=self.dtype, name='norm1')(x))
    h = _conv(self.out_channels, 3, dtype=self.dtype, name='conv1')(h)
    h = nn.swish(_norm(self.num_groups, dtype=self.dtype, name='norm2')(h))
    h = _conv(self.out_channels, 3, dtype=self.dtype, name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, dtype=self.dtype, name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out, residual."""

  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = _norm(self.num_groups, dtype=self.dtype, name='norm')(x)
    q = _conv(c, 1, dtype=self.dtype, name='q')(h).reshape(b, hh * ww, c)
    k = _conv(c, 1, dtype=self.dtype, name='k')(h).reshape(b, hh * ww, c)
    v = _conv(c, 1, dtype=self.dtype, name='v')(h).reshape(b, hh * ww, c)
    # Logits and softmax in float32: a bfloat16 softmax over h*w keys loses mass.
    logits = jnp.einsum('bic,bjc->bij', q, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(self.dtype)
    h = jnp.einsum('bij,bjc->bic', w, v).reshape(b, hh, ww, c)
    return x + _conv(c, 1, dtype=self.dtype, name='proj_out')(h)


class Downsample(nn.Module):
  """LDM's asymmetric pad (bottom/right by 1) then 3x3 stride-2 conv."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, stride=2, padding='VALID', dtype=self.dtype,
                 name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling then 3x3 conv."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, dtype=self.dtype, name='conv')(x)


class MidBlock(nn.Module):
  """ResnetBlock, AttnBlock, ResnetBlock at constant width (`block_1/attn_1/block_2`)."""

  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    x = ResnetBlock(c, **kw, name='block_1')(x)
    x = AttnBlock(**kw, name='attn_1')(x)
    return ResnetBlock(c, **kw, name='block_2')(x)


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
      x = ResnetBlock(self.out_channels, num_groups=self.num_groups, dtype=self.dtype,
                      name=f'block_{j}')(x)
    if self.resample == 'downsample':
      x = Downsample(dtype=self.dtype, name='downsample')(x)
    elif self.resample == 'upsample':
      x = Upsample(dtype=self.dtype, name='upsample')(x)
    return x


class Encoder(nn.Module):
  """LDM Encoder with double_z: [B, H, W, in] -> [B, H/f, W/f, 2 * z_channels]."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  z_channels: int
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    n = len(self.ch_mult)
    h = _conv(self.ch, 3, dtype=self.dtype, name='conv_in')(x)
    for i, mult in enumerate(self.ch_mult):
      h = _Level(self.ch * mult, self.num_res_blocks,
                 'downsample' if i != n - 1 else None, **kw, name=f'down_{i}')(h)
    h = MidBlock(**kw, name='mid')(h)
    h = nn.swish(_norm(self.num_groups, dtype=self.dtype, name='norm_out')(h))
    return _conv(2 * self.z_channels, 3, dtype=self.dtype, name='conv_out')(h)


class Decoder(nn.Module):
  """LDM Decoder: [B, h, w, z_channels] -> [B, h*f, w*f, out_ch]."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_ch: int
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    h = _conv(self.ch * self.ch_mult[-1], 3, dtype=self.dtype, name='conv_in')(z)
    h = MidBlock(**kw, name='mid')(h)
    for i in reversed(range(len(self.ch_mult))):
      h = _Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1,
                 'upsample' if i != 0 else None, **kw, name=f'up_{i}')(h)
    h = nn.swish(_norm(self.num_groups, dtype=self.dtype, name='norm_out')(h))
    return _conv(self.out_ch, 3, dtype=self.dtype, name='conv_out')(h)


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
    kw = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
              num_groups=self.num_groups, dtype=self.dtype)
    self.encoder = Encoder(z_channels=self.z_channels, **kw)
    self.decoder = Decoder(out_ch=self.output_channels, **kw)
    self.quant_conv = _conv(2 * self.latent_channels, 1, dtype=self.dtype,
                            name='quant_conv')
    self.post_quant_conv = _conv(self.z_channels, 1, dtype=self.dtype,
                                 name='post_quant_conv')

  def encode(self, x: Array) -> DiagonalGaussian:
    """Encodes images [B, H, W, in_channels] into q(z | x) over [B, H/f, W/f, embed_dim].

    H and W must be multiples of f.
    """
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'encode expects [B, H, W, {self.in_channels}] images, '
                       f'got shape {x.shape}')
    f = self.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'image size {x.shape[1:3]} must be a multiple of f={f}')
    moments = self.quant_conv(self.encoder(x))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: Array) -> Array:
    """Decodes latents [B, h, w, embed_dim] into images [B, h*f, w*f, out_ch] (float32)."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f'decode expects [B, h, w, {self.latent_channels}] latents, '
                       f'got shape {z.shape}')
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, x: Array, rng: Array | None = None, *,
               sample_posterior: bool = True) -> tuple[Array, DiagonalGaussian]:
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
        raise ValueError('sample_posterior=True needs an rng key (got rng=None)')
      z = posterior.sample(rng)
    else:
      z = posterior.mode()
    return self.decode(z), posterior


def _validate_config(m: AutoencoderKL) -> None:
  if not isinstance(m.ch_mult, (tuple, list)) or not m.ch_mult:
    raise ValueError(f'ch_mult must be a non-empty tuple of ints, got {m.ch_mult!r}')
  for name in ('ch', 'num_res_blocks', 'z_channels', 'in_channels', 'num_groups'):
    v = getattr(m, name)
    if not isinstance(v, (int, np.integer)) or v < (0 if name == 'num_res_blocks' else 1):
      raise ValueError(f'{name} must be a positive int, got {v!r}')
  for name in ('embed_dim', 'out_ch'):
    v = getattr(m, name)
    if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
      raise ValueError(f'{name} must be a positive int or None, got {v!r}')
  for mult in m.ch_mult:
    if not isinstance(mult, (int, np.integer)) or mult < 1:
      raise ValueError(f'ch_mult entries must be positive ints, got {m.ch_mult!r}')
    if (m.ch * mult) % m.num_groups:
      raise ValueError(f'num_groups={m.num_groups} must divide every width ch * mult; '
                       f'{m.ch} * {mult} = {m.ch * mult} is not divisible')


# ----------------------------------------------------------------------------------
# Presets.


def _presets() -> dict[str, dict[str, Any]]:
  return {
      # Fast on CPU: 1-channel digits at 16x16 / 32x32, f = 4, 4 latent channels
      # (override z_channels=2 for 2).
      'tiny_f4': dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4,
                      in_channels=1, num_groups=8),
      # LDM's KL-f4 (models/first_stage_models/kl-f4): z = 3.
      'kl_f4': dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3,
                    in_channels=3),
      # Stable Diffusion 1.x / 2.x VAE = LDM's KL-f8: z = 4.
      'sd_kl_f8': dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                       in_channels=3),
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
    raise ValueError(f'unknown autoencoder preset {name!r}; known: {sorted(presets)}')
  fields = {f.name for f in dataclasses.fields(AutoencoderKL)} - {'parent', 'name'}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise TypeError(f'unknown AutoencoderKL field(s) {bad}; known: {sorted(fields)}')
  module = AutoencoderKL(**{**presets[name], **overrides})
  _validate_config(module)
  return module


# ----------------------------------------------------------------------------------
# LDM / diffusers state-dict mapping.

_INDEXED = re.compile(r'^(down|up|block)_(\d+)$')


def ldm_key(path: Sequence[str]) -> str:
  """Maps a flax param path (tuple of names) to its LDM state-dict key.

  E.g. ('encoder', 'down_0', 'block_1', 'conv1', 'kernel') ->
  'encoder.down.0.block.1.conv1.weight'.
  """
  parts = []
  for i, name in enumerate(path[:-1]):
    m = _INDEXED.match(name)
    if m and not (i > 0 and path[i - 1] == 'mid'):
      parts.extend(m.groups())
    else:
      parts.append(name)
  leaf = path[-1]
  parts.append({'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf])
  return '.'.join(parts)


def _param_shapes(config: AutoencoderKL) -> dict[tuple[str, ...], tuple[int, ...]]:
  if not isinstance(config, AutoencoderKL):
    raise TypeError(f'config must be an AutoencoderKL, got {type(config).__name__}')
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: config.init(jax.random.key(0), x, sample_posterior=False), x)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes['params']))
  return {k: tuple(v.shape) for k, v in flat.items()}


def ldm_state_dict_keys(config: AutoencoderKL) -> list[str]:
  """The LDM state-dict keys (without prefix) that `config`'s params map to, sorted."""
  return sorted(ldm_key(p) for p in _param_shapes(config))


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':  # HWIO -> OIHW.
    return np.transpose(value, (3, 2, 0, 1))
  return value


def ldm_state_dict_from_params(params: PyTree, *, prefix: str = '') -> dict[str, np.ndarray]:
  """Inverse of `params_from_ldm_state_dict`: flax params -> LDM-named numpy arrays.

  Args:
    params: the `params` collection of an `AutoencoderKL` (not the outer variables
      dict).
    prefix: prepended to every key, e.g. 'first_stage_model.' for a full SD checkpoint.

  Returns:
    {key: array} with conv weights OIHW [O, I, kh, kw] and GroupNorm `weight`/`bias`.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return {prefix + ldm_key(p): _to_torch_layout(p, np.asarray(v)) for p, v in flat.items()}


def params_from_ldm_state_dict(state_dict: Mapping[str, Any], *, config: AutoencoderKL,
                               prefix: str = '') -> dict[str, Any]:
  """Maps an LDM / CompVis (or `ldm_state_dict_from_diffusers`-renamed) state dict.

  Conv weights OIHW [O, I, kh, kw] become flax kernels HWIO [kh, kw, I, O]; the
  attention q/k/v/proj_out weights may also be linear [O, I] (diffusers' layout);
  GroupNorm `weight` becomes `scale`. Keys are listed by `ldm_state_dict_keys`, e.g.
  `encoder.down.0.block.0.conv1.weight`, `encoder.mid.attn_1.q.weight`,
  `decoder.up.3.upsample.conv.bias`, `quant_conv.weight`.

  Args:
    state_dict: {key: array-like} (numpy, or anything `np.asarray` accepts; convert
      torch tensors with `t.float().numpy()` first, since numpy has no bfloat16).
    config: the `AutoencoderKL` whose params to build (defines expected keys/shapes).
    prefix: only keys starting with it are used, with it stripped (e.g.
      'first_stage_model.' for a full SD checkpoint); others are ignored, as are
      LDM training-only keys starting with 'loss.' (LPIPS, discriminator, logvar).

  Returns:
    The float32 `params` collection; use as `module.apply({'params': params}, ...)`.

  Raises:
    ValueError: missing or unexpected keys, or a shape mismatch (naming the key).
  """
  shapes = _param_shapes(config)
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  sd = {k: v for k, v in sd.items() if not k.startswith('loss.')}
  by_key = {ldm_key(p): p for p in shapes}
  missing = sorted(set(by_key) - set(sd))
  unexpected = sorted(set(sd) - set(by_key))
  if missing or unexpected:
    raise ValueError(f'state dict does not match the config: missing keys {missing[:10]}'
                     f'{" ..." if len(missing) > 10 else ""}, unexpected keys '
                     f'{unexpected[:10]}{" ..." if len(unexpected) > 10 else ""}')
  flat = {}
  for key, path in by_key.items():
    value = np.asarray(sd[key], dtype=np.float32)
    if path[-1] == 'kernel':
      if value.ndim == 2:  # Linear [O, I] (diffusers attention) -> 1x1 conv.
        value = value[:, :, None, None]
      if value.ndim != 4:
        raise ValueError(f'{prefix}{key}: expected a 4-d conv weight, got shape '
                         f'{value.shape}')
      value = np.transpose(value, (2, 3, 1, 0))
    if value.shape != shapes[path]:
      raise ValueError(f'{prefix}{key}: shape {value.shape} (after transposing to flax '
                       f'layout) != expected {shapes[path]}')
    flat[path] = jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


_DIFFUSERS_ATTN = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v',
                   'to_out.0': 'proj_out', 'query': 'q', 'key': 'k', 'value': 'v',
                   'proj_attn': 'proj_out'}


def ldm_state_dict_from_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames a diffusers `AutoencoderKL` state dict to LDM keys (values untouched).

  diffusers -> LDM: `{enc,dec}oder.conv_norm_out` -> `norm_out`;
  `encoder.down_blocks.i.resnets.j` -> `encoder.down.i.block.j`;
  `downsamplers.0` -> `downsample`; `decoder.up_blocks.i` -> `decoder.up.{L-1-i}`
  (diffusers counts up blocks in execution order); `upsamplers.0` -> `upsample`;
  `mid_block.resnets.{0,1}` -> `mid.block_{1,2}`; `mid_block.attentions.0` -> `mid.attn_1`
  with `group_norm/to_q/to_k/to_v/to_out.0` (or the older `query/key/value/proj_attn`)
  -> `norm/q/k/v/proj_out`; `conv_shortcut` -> `nin_shortcut`. Attention weights stay
  linear [O, I]; `params_from_ldm_state_dict` accepts that.

  Raises:
    ValueError: a key it does not recognise.
  """
  ups = {int(m.group(1)) for k in state_dict
         if (m := re.match(r'^decoder\.up_blocks\.(\d+)\.', k))}
  num_levels = max(ups) + 1 if ups else 0
  out = {}
  for key, value in state_dict.items():
    k = key
    k = re.sub(r'^(encoder|decoder)\.conv_norm_out\.', r'\1.norm_out.', k)
    k = re.sub(r'^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.',
               r'encoder.down.\1.block.\2.', k)
    k = re.sub(r'^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.',
               r'encoder.down.\1.downsample.', k)
    m = re.match(r'^decoder\.up_blocks\.(\d+)\.', k)
    if m:
      level = num_levels - 1 - int(m.group(1))
      k = re.sub(r'^decoder\.up_blocks\.\d+\.resnets\.(\d+)\.',
                 rf'decoder.up.{level}.block.\1.', k)
      k = re.sub(r'^decoder\.up_blocks\.\d+\.upsamplers\.0\.',
                 rf'decoder.up.{level}.upsample.', k)
    k = re.sub(r'^(encoder|decoder)\.mid_block\.resnets\.0\.', r'\1.mid.block_1.', k)
    k = re.sub(r'^(encoder|decoder)\.mid_block\.resnets\.1\.', r'\1.mid.block_2.', k)
    m = re.match(r'^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$', k)
    if m:
      if m.group(2) not in _DIFFUSERS_ATTN:
        raise ValueError(f'unrecognised diffusers attention key {key!r}')
      k = f'{m.group(1)}.mid.attn_1.{_DIFFUSERS_ATTN[m.group(2)]}.{m.group(3)}'
    k = re.sub(r'\.conv_shortcut\.', '.nin_shortcut.', k)
    if 'blocks' in k or 'mid_block' in k or 'samplers' in k:
      raise ValueError(f'unrecognised diffusers key {key!r}')
    out[k] = value
  return out


def param_count(params: PyTree) -> int:
  """Total number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
