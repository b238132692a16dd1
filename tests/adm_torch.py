"""A compact torch rebuild of openai guided-diffusion's `UNetModel`, the reference for ADM imports
(and, at the end, its timestep respacing and respaced ancestral sampler in numpy).

No package provides openai's `UNetModel`, so this helper rebuilds it for the tests: it
was written for jdiff from the module structure of guided-diffusion's
`guided_diffusion/unet.py` (https://github.com/openai/guided-diffusion, MIT licence),
with the same sub-module names and nesting (hence the same state-dict keys and shapes)
and the same forward maths (GroupNorm(32), [cos, sin] time embedding, FiLM / additive
ResBlocks, BigGAN up/down, legacy and new qkv orders); 2-D only, no fp16 or
checkpointing. It does not use jdiff, so it checks the key mapping independently.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _norm(c: int) -> nn.GroupNorm:
  return nn.GroupNorm(32, c)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Up(nn.Module):
  def __init__(self, c: int, use_conv: bool):
    super().__init__()
    self.use_conv = use_conv
    if use_conv:
      self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return self.conv(x) if self.use_conv else x


class _Down(nn.Module):
  def __init__(self, c: int, use_conv: bool):
    super().__init__()
    self.op = nn.Conv2d(c, c, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

  def forward(self, x):
    return self.op(x)


class ResBlock(nn.Module):
  def __init__(self, c, emb_c, out_c, scale_shift, up=False, down=False):
    super().__init__()
    self.scale_shift, self.updown = scale_shift, up or down
    self.in_layers = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, out_c, 3, padding=1))
    if up:
      self.h_upd, self.x_upd = _Up(c, False), _Up(c, False)
    elif down:
      self.h_upd, self.x_upd = _Down(c, False), _Down(c, False)
    self.emb_layers = nn.Sequential(
      nn.SiLU(), nn.Linear(emb_c, 2 * out_c if scale_shift else out_c)
    )
    self.out_layers = nn.Sequential(
      _norm(out_c), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_c, out_c, 3, padding=1)
    )
    self.skip_connection = nn.Identity() if out_c == c else nn.Conv2d(c, out_c, 1)

  def forward(self, x, emb):
    if self.updown:
      h = self.h_upd(self.in_layers[:-1](x))
      x = self.x_upd(x)
      h = self.in_layers[-1](h)
    else:
      h = self.in_layers(x)
    e = self.emb_layers(emb)[..., None, None]
    if self.scale_shift:
      scale, shift = torch.chunk(e, 2, dim=1)
      h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
    else:
      h = self.out_layers(h + e)
    return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
  def __init__(self, c, num_heads, num_head_channels, new_order):
    super().__init__()
    self.heads = num_heads if num_head_channels == -1 else c // num_head_channels
    self.new_order = new_order
    self.norm = _norm(c)
    self.qkv = nn.Conv1d(c, 3 * c, 1)
    self.proj_out = nn.Conv1d(c, c, 1)

  def forward(self, x):
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = self.qkv(self.norm(x))
    length, d = qkv.shape[-1], c // self.heads
    if self.new_order:  # split q, k, v first, then heads
      q, k, v = (z.reshape(b * self.heads, d, length) for z in qkv.chunk(3, dim=1))
    else:  # heads first, then q, k, v
      q, k, v = qkv.reshape(b * self.heads, 3 * d, length).split(d, dim=1)
    scale = 1 / math.sqrt(math.sqrt(d))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
    return (x + self.proj_out(a)).reshape(b, c, *spatial)


class _Seq(nn.Sequential):  # guided-diffusion's TimestepEmbedSequential
  def forward(self, x, emb):
    for layer in self:
      x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
    return x


class UNetModel(nn.Module):
  """ADM's U-Net; `attention_resolutions` are downsampling rates, as in guided-diffusion."""

  def __init__(
    self,
    in_channels,
    model_channels,
    out_channels,
    num_res_blocks,
    attention_resolutions,
    channel_mult,
    num_classes=None,
    num_heads=1,
    num_head_channels=-1,
    use_scale_shift_norm=False,
    resblock_updown=False,
    use_new_attention_order=False,
  ):
    super().__init__()
    self.model_channels, self.num_classes = model_channels, num_classes
    emb_c = 4 * model_channels
    ss = use_scale_shift_norm

    def attn(c):
      return AttentionBlock(c, num_heads, num_head_channels, use_new_attention_order)

    self.time_embed = nn.Sequential(
      nn.Linear(model_channels, emb_c), nn.SiLU(), nn.Linear(emb_c, emb_c)
    )
    if num_classes is not None:
      self.label_emb = nn.Embedding(num_classes, emb_c)
    ch = model_channels * channel_mult[0]
    self.input_blocks = nn.ModuleList([_Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        layers = [ResBlock(ch, emb_c, mult * model_channels, ss)]
        ch = mult * model_channels
        if ds in attention_resolutions:
          layers.append(attn(ch))
        self.input_blocks.append(_Seq(*layers))
        chans.append(ch)
      if level != len(channel_mult) - 1:
        down = ResBlock(ch, emb_c, ch, ss, down=True) if resblock_updown else _Down(ch, True)
        self.input_blocks.append(_Seq(down))
        chans.append(ch)
        ds *= 2
    self.middle_block = _Seq(ResBlock(ch, emb_c, ch, ss), attn(ch), ResBlock(ch, emb_c, ch, ss))
    self.output_blocks = nn.ModuleList([])
    for level, mult in list(enumerate(channel_mult))[::-1]:
      for i in range(num_res_blocks + 1):
        layers = [ResBlock(ch + chans.pop(), emb_c, model_channels * mult, ss)]
        ch = model_channels * mult
        if ds in attention_resolutions:
          layers.append(attn(ch))
        if level and i == num_res_blocks:
          layers.append(ResBlock(ch, emb_c, ch, ss, up=True) if resblock_updown else _Up(ch, True))
          ds //= 2
        self.output_blocks.append(_Seq(*layers))
    self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

  def forward(self, x, timesteps, y=None):
    emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
    if self.num_classes is not None:
      emb = emb + self.label_emb(y)
    hs, h = [], x
    for module in self.input_blocks:
      h = module(h, emb)
      hs.append(h)
    h = self.middle_block(h, emb)
    for module in self.output_blocks:
      h = module(torch.cat([h, hs.pop()], dim=1), emb)
    return self.out(h)


# ----------------------------------------------------------------------------- respacing
# guided-diffusion's `respace.py` (`space_timesteps`, `SpacedDiffusion`) and the sampling
# path of `gaussian_diffusion.py` (`p_mean_variance`, `p_sample`, `p_sample_loop`), rebuilt
# in float64 numpy with the same arithmetic: the reference for `jdiff.pretrained.respace`.


def space_timesteps(num_timesteps, section_counts):
  """ADM's set of kept timesteps for `timestep_respacing`."""
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired_count = int(section_counts[len("ddim") :])
      for i in range(1, num_timesteps):
        if len(range(0, num_timesteps, i)) == desired_count:
          return set(range(0, num_timesteps, i))
      raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError(f"cannot divide section of {size} steps into {section_count}")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    taken_steps = []
    for _ in range(section_count):
      taken_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    all_steps += taken_steps
    start_idx += size
  return set(all_steps)


def spaced_p_sample_loop(alphas_cumprod, use_timesteps, model, x_T, noises, *, model_var_type):
  """ADM's `SpacedDiffusion(...).p_sample_loop(model, clip_denoised=True)` with given noises.

  Args:
    alphas_cumprod: the base diffusion's float64 [T].
    use_timesteps: the kept timesteps (a set).
    model: numpy `model(x, t) -> out` with the base diffusion's timesteps (the
      `_WrappedModel`'s timestep_map), eps (and the variance values for 'learned_range').
    x_T: float64 starting noise.
    noises: noises[k] for the k-th step from the noisiest (unused at the last).
    model_var_type: 'learned_range', 'fixed_large' or 'fixed_small'.
  """
  last, new_betas, timestep_map = 1.0, [], []
  for i, ab in enumerate(alphas_cumprod):
    if i in use_timesteps:
      new_betas.append(1 - ab / last)
      last = ab
      timestep_map.append(i)
  betas = np.array(new_betas, dtype=np.float64)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
  coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
  coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
  x = x_T
  n = len(betas)
  for k, i in enumerate(reversed(range(n))):
    out = model(x, timestep_map[i])
    c = x.shape[-1]
    if model_var_type == "learned_range":
      eps, v = out[..., :c], out[..., c:]
      frac = (v + 1) / 2
      log_var = frac * np.log(betas[i]) + (1 - frac) * post_log_var_clipped[i]
    elif model_var_type == "fixed_large":
      eps, log_var = out, np.log(np.append(post_var[1], betas[1:]))[i]
    else:
      eps, log_var = out, post_log_var_clipped[i]
    x0 = np.sqrt(1.0 / ac[i]) * x - np.sqrt(1.0 / ac[i] - 1) * eps
    x0 = np.clip(x0, -1, 1)
    mean = coef1[i] * x0 + coef2[i] * x
    x = mean + (i > 0) * np.exp(0.5 * log_var) * noises[k]
  return x
