"""CLIP's text tower in flax: the text encoder of Stable Diffusion 1.x and 2.x.

A causal transformer over token ids [B, L] (L <= 77): token + learned position embeddings,
`num_layers` pre-LayerNorm blocks (multi-head self-attention under a causal mask, an MLP
with quick-GELU (OpenAI CLIP) or GELU (OpenCLIP)), and a final LayerNorm; the output is the
whole sequence [B, L, width], SD's cross-attention context.

  - SD 1.x: OpenAI CLIP ViT-L/14 (`PRESETS['openai_vit_l14']`): the last layer's output.
  - SD 2.x: OpenCLIP ViT-H/14 (`PRESETS['openclip_vit_h14']`): the penultimate layer's
    output, through the final LayerNorm (`FrozenOpenCLIPEmbedder(layer='penultimate')`),
    i.e. the 24-layer tower without its last layer, which is how diffusers ships it
    (`num_hidden_layers=23`); `clip_convert.clip_kwargs(config, skip_last_layers=1)` drops
    the last layer of a full tower.

Parameter names follow transformers' `CLIPTextModel` (`jdiff.pretrained.clip_convert`).

References:
  Radford et al. Learning Transferable Visual Models From Natural Language Supervision,
    2021 (CLIP), Sec. 2.4. Hendrycks, Gimpel. GELUs, 2016 (x sigmoid(1.702 x)).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class CLIPTextEncoder(nn.Module):
  """Token ids [B, L] -> hidden states [B, L, width] after the final LayerNorm.

  Attributes:
    vocab_size: token count (49408 for CLIP's BPE).
    width: hidden size.
    num_layers: transformer blocks run (SD 2.x: 23 of OpenCLIP's 24).
    heads: attention heads.
    mlp_dim: the MLP's hidden size.
    max_length: position embeddings (77).
    act: 'quick_gelu' (OpenAI CLIP) or 'gelu' (OpenCLIP).
    eps: LayerNorm epsilon.
    dtype: compute dtype (LayerNorm and softmax in float32).
  """

  vocab_size: int = 49408
  width: int = 768
  num_layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  max_length: int = 77
  act: str = "quick_gelu"
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    """Encodes token ids [B, L] (int, L <= max_length) -> [B, L, width] in `dtype`."""
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
    if ids.ndim != 2 or ids.shape[1] > self.max_length:
      raise ValueError(f"ids must be [B, L] with L <= {self.max_length}, got shape {ids.shape}")
    if self.width % self.heads:
      raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
    b, n = ids.shape
    d = self.width // self.heads
    kw = dict(dtype=self.dtype)
    act = ACTIVATIONS[self.act]

    def norm(name):
      ln = nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, name=name)
      return lambda h: ln(h.astype(jnp.float32)).astype(self.dtype)

    tok = nn.Embed(self.vocab_size, self.width, name="token_embedding")(ids)
    pos = nn.Embed(self.max_length, self.width, name="position_embedding")(jnp.arange(n))
    h = (tok + pos[None]).astype(self.dtype)
    for i in range(self.num_layers):
      x = norm(f"layers_{i}_layer_norm1")(h)
      q, k, v = (
        nn.Dense(self.width, name=f"layers_{i}_{p}_proj", **kw)(x).reshape(b, n, self.heads, d)
        for p in "qkv"
      )
      a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, n, self.width)
      h = h + nn.Dense(self.width, name=f"layers_{i}_out_proj", **kw)(a)
      x = act(
        nn.Dense(self.mlp_dim, name=f"layers_{i}_fc1", **kw)(norm(f"layers_{i}_layer_norm2")(h))
      )
      h = h + nn.Dense(self.width, name=f"layers_{i}_fc2", **kw)(x)
    return norm("final_layer_norm")(h)


# Presets (read-only): SD 1.x's and SD 2.x's text towers.
PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
  {
    "openai_vit_l14": types.MappingProxyType(
      dict(width=768, num_layers=12, heads=12, mlp_dim=3072, act="quick_gelu")
    ),
    # OpenCLIP ViT-H/14 has 24 layers; SD 2.x reads the penultimate one.
    "openclip_vit_h14": types.MappingProxyType(
      dict(width=1024, num_layers=23, heads=16, mlp_dim=4096, act="gelu")
    ),
  }
)
