"""DiffWave: a non-causal WaveNet of dilated residual layers as the diffusion network.

Kong, Ping, Huang, Zhao, Catanzaro, "DiffWave: A Versatile Diffusion Model for Audio
Synthesis", ICLR 2021, §3 and Fig. 2: the input is lifted by a 1x1 conv to C residual
channels; each of ``layers`` residual layers adds the (per-layer projected) diffusion-step
embedding, applies a bidirectional dilated conv (kernel 3, dilation ``2 ** (i % cycle)``) to
2C channels, gates ``tanh(a) * sigmoid(b)`` and splits a 1x1 conv into
a residual (scaled by 1/sqrt(2)) and a skip path; the skips are summed (scaled by
1/sqrt(layers)) and mapped by ReLU-1x1-ReLU-1x1 (the last zero-initialised) to the output.
Here the conditioner is a class label (as the paper's class-conditional SC09 model, §3.2; with a
null label for classifier-free guidance) rather than a mel spectrogram: its learned embedding is
summed with the step embedding (`unet1d.TimeClassEmbedding`), which every layer projects.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.unet1d import TimeClassEmbedding, check_signal_inputs

Array = jax.Array
Dtype = Any


class DiffWave(nn.Module):
  """``(x [B, L, C], t [B], y [B]) -> [B, L, out]``: DiffWave's residual stack.

  Attributes:
    residual_channels: C of every residual layer (64 in the paper's base model).
    layers: residual layers (30 in the paper).
    dilation_cycle: dilations 1, 2, ..., 2 ** (cycle - 1), repeated (10 in the paper).
    embed_dim: width of the diffusion-step embedding MLP (512 in the paper).
    num_classes: class count (label num_classes = null label), or None.
    out_channels, learn_sigma: output channels (default C), doubled by learn_sigma.
    dtype, param_dtype: compute and parameter dtypes.
  """

  residual_channels: int = 64
  layers: int = 12
  dilation_cycle: int = 6
  embed_dim: int = 256
  # conditioning and output, as the U-Nets'
  num_classes: int | None = None
  out_channels: int | None = None
  learn_sigma: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def null_label(self) -> int | None:
    return self.num_classes

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool) -> Array:
    del train  # no dropout
    if self.layers < 1 or self.dilation_cycle < 1:
      raise ValueError(
        f"DiffWave needs layers >= 1 and dilation_cycle >= 1, got {self.layers}, "
        f"{self.dilation_cycle}"
      )
    t, y = check_signal_inputs(x, t, y, self.num_classes, 1)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self.residual_channels
    emb = TimeClassEmbedding(c, self.embed_dim, self.num_classes, name="embed", **kw)(t, y)
    emb = nn.silu(emb)
    h = nn.relu(nn.Conv(c, (1,), name="input_proj", **kw)(x.astype(self.dtype)))
    skip = 0.0
    for i in range(self.layers):
      d = 2 ** (i % self.dilation_cycle)
      z = h + nn.Dense(c, name=f"layer_{i}_emb", **kw)(emb)[:, None, :]
      z = nn.Conv(
        2 * c, (3,), kernel_dilation=(d,), padding=((d, d),), name=f"layer_{i}_dil", **kw
      )(z)
      a, b = jnp.split(z, 2, axis=-1)
      z = nn.Conv(2 * c, (1,), name=f"layer_{i}_out", **kw)(jnp.tanh(a) * jax.nn.sigmoid(b))
      res, s = jnp.split(z, 2, axis=-1)
      h, skip = (h + res) / math.sqrt(2.0), skip + s
    h = nn.relu(nn.Conv(c, (1,), name="skip_proj", **kw)(skip / math.sqrt(self.layers)))
    out = (self.out_channels or x.shape[-1]) * (2 if self.learn_sigma else 1)
    return nn.Conv(out, (1,), kernel_init=nn.initializers.zeros, name="output_proj", **kw)(h)
