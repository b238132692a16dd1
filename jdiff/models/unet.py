"""The diffusion U-Net of DDPM / improved DDPM / ADM, in flax.linen (NHWC).

References:
  Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020, App. B.
  Nichol, Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021.
  Dhariwal, Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021, §3.
  Ho, Salimans, "Classifier-Free Diffusion Guidance", 2022 (null label).
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import (
  AttentionBlock,
  GroupNorm32,
  Resample,
  ResBlock,
  conv_fn,
  timestep_embedding,
)
from jdiff.models.transformer2d import Transformer2D, split_text_cond
from jdiff.ops.winograd import resolve_conv_impl

Array = jax.Array
Dtype = Any


class UNet(nn.Module):
  """Noise-prediction U-Net ``(x [B, H, W, C], t [B], y [B]) -> [B, H, W, out]``.

  Each of the ``len(ch_mult)`` levels has ``num_res_blocks`` residual blocks of
  ``ch * ch_mult[i]`` channels (each followed by attention when the feature
  map's height is in ``attn_resolutions``) and, except the last level, a 2x
  downsampling; the middle is ResBlock-Attention-ResBlock; the decoder mirrors
  the encoder with ``num_res_blocks + 1`` blocks per level fed by skip
  connections (DDPM, App. B). The time embedding is sinusoidal followed by a
  2-layer MLP of width ``4 * ch``; class labels add a learned embedding.

  Attributes:
    ch: base channel count.
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: residual blocks per level in the encoder.
    attn_resolutions: feature-map heights (e.g. ``(16,)``) that get attention.
    num_heads: attention heads (ignored when ``head_channels`` is set).
    head_channels: fixed channels per head (ADM uses 64), or None.
    dropout: dropout rate inside residual blocks.
    num_groups: GroupNorm groups.
    use_scale_shift_norm: FiLM conditioning in residual blocks (ADM).
    resblock_updown: BigGAN-style residual up/downsampling (ADM) instead of
      nearest-upsample+conv / strided conv.
    conv_resample: use convs in the plain up/downsampling layers.
    num_classes: number of classes for class conditioning, or None. The
      embedding table has ``num_classes + 1`` rows; label ``num_classes``
      (``null_label``) is the unconditional label for classifier-free guidance.
    out_channels: output channels (default: input channels), e.g. eps, x0 or v.
    learn_sigma: double the output channels (mean and variance interpolation,
      Nichol & Dhariwal 2021, §3.1).
    zero_init: zero-initialise the last layer of every residual branch and the
      output conv (ADM), so the network starts as the identity / zero.
    dtype: compute dtype (float32 or bfloat16).
    param_dtype: parameter dtype (float32).
    remat: rematerialise residual blocks in the backward pass (``nn.remat``).
    conv_impl: how the 3x3 stride-1 convolutions run: "xla" (the backend's
      native convolution), "winograd" (``jdiff.ops.winograd``: 2.25x fewer
      multiplies, same result up to rounding) or "auto" (Winograd for float32
      on CPU, where XLA has no Winograd kernel; native elsewhere). Parameters
      and results are the same either way.
    norm_eps: GroupNorm epsilon everywhere (diffusers' DDPM ports: 1e-6).
    flip_sin_to_cos, freq_shift: the timestep embedding's layout and frequency
      shift (``layers.timestep_embedding``; diffusers' options of the same names).
    downsample_padding: padding of the strided downsampling convs: 1 (ADM) or
      0, meaning bottom/right only (original DDPM, diffusers' option of the same
      name).
    mid_attention: attention between the two middle ResBlocks (diffusers'
      ``add_attention``).
    mid_attn_norm: GroupNorm at the input of that attention (diffusers builds none with
      ``resnet_time_scale_shift='scale_shift'`` and no ``attn_norm_num_groups``).
    center_input: map the input from [0, 1] to [-1, 1] first (diffusers'
      ``center_input_sample``).
    timestep_scale: multiplies t before the embedding (improved-diffusion's
      ``rescale_timesteps``: 1000 / T).
    attention_impl: the attention kernel, "xla" (default), "cudnn" or "auto"
      (`jdiff.ops.attention`).
    norm_impl: GroupNorm's reductions, "flax" (default) or "colsum" (`layers.GroupNorm32`).
    image_cond_channels: channels of an image concatenated to x (SR3's upsampled
      low-resolution image and its augmentation level, or a known image and its mask);
      then ``y`` is that image [B, H, W, image_cond_channels] instead of a label, and the
      output keeps x's channels. 0 (default): no image input, parameters unchanged.
    context_dim: width D of a text context [B, L, D]: the attention at `attn_resolutions`
      (and in the middle) becomes a `Transformer2D` cross-attending to it ([LDM] Sec. 3.3),
      and `y` is the context, or a dict {'context', 'mask' [B, L], 'labels' [B]}. None
      (default): no context, parameters unchanged.
    transformer_depth: transformer blocks per `Transformer2D`.
    attention_head_dim: channels per head of the transformers, one int or one per level
      (the middle takes the last level's); None: `num_heads` / `head_channels`. (diffusers'
      SD configs name the head COUNT `attention_head_dim`; the importer converts.)
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  head_channels: int | None = None
  dropout: float = 0.0
  num_groups: int = 32
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  conv_resample: bool = True
  num_classes: int | None = None
  out_channels: int | None = None
  learn_sigma: bool = False
  zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_attention: bool = True
  mid_attn_norm: bool = True
  center_input: bool = False
  timestep_scale: float = 1.0
  image_cond_channels: int = 0
  attention_impl: str = "xla"
  norm_impl: str = "flax"
  context_dim: int | None = None
  transformer_depth: int = 1
  attention_head_dim: int | Sequence[int] | None = None

  @property
  def null_label(self) -> int | None:
    """The reserved unconditional label (``num_classes``), or None if unconditional."""
    return self.num_classes

  def _check_config(self) -> None:
    if self.ch <= 0 or self.ch % self.num_groups:
      raise ValueError(
        f"ch={self.ch} must be positive and divisible by num_groups={self.num_groups}"
      )
    if not self.ch_mult or any(int(m) <= 0 for m in self.ch_mult):
      raise ValueError(
        f"ch_mult must be a non-empty sequence of positive ints, got {self.ch_mult!r}"
      )
    if self.num_res_blocks < 1:
      raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.num_classes is not None and self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")
    if jnp.dtype(self.param_dtype) != jnp.float32:
      raise ValueError(f"param_dtype must be float32, got {self.param_dtype}")
    if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype}")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")

  def _check_inputs(self, x: Array, t: Array, y: Array | None):
    if x.ndim != 4:
      raise ValueError(f"x must be NHWC [B, H, W, C], got shape {x.shape}")
    b, h, w, _ = x.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    if h % factor or w % factor:
      raise ValueError(
        f"H, W = {h}, {w} must be divisible by 2**(len(ch_mult)-1)"
        f" = {factor} (ch_mult={tuple(self.ch_mult)})"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
      raise ValueError(f"t must have shape [B]=({b},) or be a scalar, got shape {t.shape}")
    if self.num_classes is None:
      if y is not None:
        raise ValueError("y was given but the UNet is unconditional (num_classes=None)")
    else:
      if y is None:
        raise ValueError(
          f"y (class labels [B]) is required: num_classes={self.num_classes}; "
          f"pass null_label={self.null_label} for the unconditional model"
        )
      y = jnp.asarray(y)
      if y.shape != (b,):
        raise ValueError(f"y must have shape [B]=({b},), got shape {y.shape}")
      if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"y must be integer class labels, got dtype {y.dtype}")
    return t, y

  def _split_image_cond(self, x: Array, y: Array | None):
    """(image conditioning or None, label y) after checking the image's shape."""
    if not self.image_cond_channels:
      return None, y
    if self.num_classes is not None:
      raise ValueError(
        f"image_cond_channels={self.image_cond_channels} takes the image as y; it cannot be "
        f"combined with class labels (num_classes={self.num_classes})"
      )
    want = (*x.shape[:-1], self.image_cond_channels)
    if y is None or jnp.shape(y) != want:
      raise ValueError(
        f"y must be the conditioning image of shape {want} (image_cond_channels="
        f"{self.image_cond_channels}), got {None if y is None else jnp.shape(y)}"
      )
    return jnp.asarray(y), None

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool) -> Array:
    """Predicts eps / x0 / v (and the variance interpolation if ``learn_sigma``).

    Args:
      x: noisy images [B, H, W, C] (NHWC), H and W divisible by
        ``2 ** (len(ch_mult) - 1)``.
      t: timesteps [B] (or a scalar), int or float.
      y: class labels [B] int in ``[0, num_classes]``; required iff
        ``num_classes`` is set (``null_label`` = unconditional). With ``context_dim``:
        the context [B, L, context_dim], or {'context', 'mask' [B, L], 'labels' [B]}.
      train: enables dropout; needs a ``'dropout'`` rng when ``dropout > 0``.

    Returns:
      [B, H, W, out] in ``dtype`` with ``out = out_channels or C``, doubled
      when ``learn_sigma``.
    """
    self._check_config()
    context = mask = None
    if self.context_dim is not None:
      y, context, mask = split_text_cond(y, context_dim=self.context_dim, batch=x.shape[0])
    image_cond, y = self._split_image_cond(x, y)
    t, y = self._check_inputs(x, t, y)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    impl = resolve_conv_impl(self.conv_impl, self.dtype)
    out_ch = self.out_channels or x.shape[-1]
    if self.learn_sigma:
      out_ch *= 2
    if image_cond is not None:
      x = jnp.concatenate([x, image_cond.astype(x.dtype)], axis=-1)
    emb_dim = 4 * self.ch

    res_cls = ResBlock
    if self.remat:
      # self=0, x=1, emb=2, train=3: train is a Python bool.
      res_cls = nn.remat(ResBlock, static_argnums=(3,))
    blk = dict(
      dropout=self.dropout,
      use_scale_shift_norm=self.use_scale_shift_norm,
      num_groups=self.num_groups,
      zero_init=self.zero_init,
      conv_impl=impl,
      norm_eps=self.norm_eps,
      norm_impl=self.norm_impl,
      **kw,
    )

    def attn(name, level, use_norm=True):
      if self.context_dim is not None:
        return lambda h: self._transformer(name, level, h.shape[-1], kw)(h, context, mask)
      return AttentionBlock(
        use_norm=use_norm,
        num_heads=self.num_heads,
        head_channels=self.head_channels,
        num_groups=self.num_groups,
        zero_init=self.zero_init,
        norm_eps=self.norm_eps,
        attention_impl=self.attention_impl,
        norm_impl=self.norm_impl,
        name=name,
        **kw,
      )

    def resample(h, *, up: bool, name: str):
      # ADM's BigGAN-style residual resampling, or DDPM's (conv-)interpolation / pooling.
      if self.resblock_updown:
        return res_cls(h.shape[-1], up=up, down=not up, name=name, **blk)(h, emb, train)
      resample = Resample(
        h.shape[-1],
        up=up,
        use_conv=self.conv_resample,
        conv_impl=impl,
        down_padding=self.downsample_padding,
        name=name,
        **kw,
      )
      return resample(h)

    # Time (and class) embedding: DDPM App. B / ADM.
    if self.timestep_scale != 1.0:
      t = t.astype(jnp.float32) * self.timestep_scale
    emb = timestep_embedding(
      t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
    )
    emb = nn.Dense(emb_dim, name="time_mlp_0", **kw)(emb.astype(self.dtype))
    emb = nn.Dense(emb_dim, name="time_mlp_1", **kw)(nn.silu(emb))
    if self.num_classes is not None:
      emb = emb + nn.Embed(
        self.num_classes + 1,
        emb_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="class_emb",
      )(y)

    if self.center_input:
      x = 2.0 * x - 1.0
    h = nn.Conv(
      self.ch,
      (3, 3),
      padding=((1, 1), (1, 1)),
      name="conv_in",
      conv_general_dilated=conv_fn(impl),
      **kw,
    )(x.astype(self.dtype))
    hs = [h]
    last = len(self.ch_mult) - 1
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = res_cls(self.ch * mult, name=f"down_{i}_res_{j}", **blk)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f"down_{i}_attn_{j}", i)(h)
        hs.append(h)
      if i != last:
        h = resample(h, up=False, name=f"down_{i}_downsample")
        hs.append(h)

    h = res_cls(h.shape[-1], name="mid_res_0", **blk)(h, emb, train)
    if self.mid_attention:
      h = attn("mid_attn", last, self.mid_attn_norm)(h)
    h = res_cls(h.shape[-1], name="mid_res_1", **blk)(h, emb, train)

    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_cls(self.ch * self.ch_mult[i], name=f"up_{i}_res_{j}", **blk)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f"up_{i}_attn_{j}", i)(h)
      if i != 0:
        h = resample(h, up=True, name=f"up_{i}_upsample")
    assert not hs

    h = nn.silu(
      GroupNorm32(self.num_groups, self.norm_eps, name="norm_out", norm_impl=self.norm_impl, **kw)(
        h
      )
    )
    init = nn.initializers.zeros if self.zero_init else nn.linear.default_kernel_init
    return nn.Conv(
      out_ch,
      (3, 3),
      padding=((1, 1), (1, 1)),
      kernel_init=init,
      conv_general_dilated=conv_fn(impl),
      name="conv_out",
      **kw,
    )(h)

  def _transformer(self, name: str, level: int, channels: int, kw) -> Transformer2D:
    dims = self.attention_head_dim
    if dims is None:
      head_dim = self.head_channels or channels // self.num_heads
    else:
      head_dim = dims if isinstance(dims, int) else dims[level]
    if channels % head_dim:
      raise ValueError(f"{name}: channels={channels} not divisible by the head size {head_dim}")
    return Transformer2D(
      channels // head_dim,
      head_dim,
      depth=self.transformer_depth,
      num_groups=self.num_groups,
      zero_init=self.zero_init,
      attention_impl=self.attention_impl,
      norm_impl=self.norm_impl,
      name=name,
      **kw,
    )


# Presets: constructor kwargs per name (read-only; make_unet copies).
PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
  {
    # DDPM CIFAR-10 (Ho et al. 2020, App. B): 35.7M parameters.
    "ddpm_cifar10": types.MappingProxyType(
      dict(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
        num_groups=32,
      )
    ),
    # Improved DDPM CIFAR-10 (Nichol & Dhariwal 2021): L_hybrid, 3 blocks, 4 heads.
    "iddpm_cifar10": types.MappingProxyType(
      dict(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attn_resolutions=(16, 8),
        num_heads=4,
        dropout=0.3,
        num_groups=32,
        use_scale_shift_norm=True,
        learn_sigma=True,
      )
    ),
    # Small net for 16x16 (or 32x32) 1-channel 8x8-digits data on a CPU.
    "digits_small": types.MappingProxyType(
      dict(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        num_heads=1,
        dropout=0.1,
        num_groups=8,
      )
    ),
  }
)


def make_unet(name: str, **overrides: Any) -> UNet:
  """Builds a preset U-Net, e.g. ``make_unet("digits_small", num_classes=10)``.

  Args:
    name: a key of ``PRESETS``.
    **overrides: UNet constructor kwargs replacing the preset's.

  Returns:
    The (unbound) ``UNet`` module.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}; choose from {sorted(PRESETS)}")
  fields = set(UNet.__dataclass_fields__) - {"parent", "name"}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise TypeError(f"unknown UNet option(s) {bad}; valid: {sorted(fields)}")
  return UNet(**{**dict(PRESETS[name]), **overrides})
