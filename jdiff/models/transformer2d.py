"""The spatial transformer of latent diffusion: cross-attention to a text context (NHWC).

`Transformer2D` is LDM's `SpatialTransformer` / diffusers' `Transformer2DModel`: GroupNorm,
a projection to the inner width, `depth` blocks of (self-attention, cross-attention to the
context [B, L, D_ctx], GEGLU feed-forward), each pre-LayerNorm with a residual, a
projection back, and a residual over the whole. diffusers' `use_linear_projection=False`
projects with a 1x1 conv, which is the same map as a linear layer on the H*W tokens: both
are a `Dense` here (the importer transposes the conv's [O, I, 1, 1] weight).

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models, 2022,
    Sec. 3.3 (cross-attention conditioning).
  [GLU] Shazeer. GLU Variants Improve Transformer, 2020 (GEGLU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import GroupNorm32
from jdiff.ops.attention import dot_product_attention

Array = jax.Array
Dtype = Any


class Attention(nn.Module):
  """Multi-head attention of x [B, N, C] to a context [B, L, D] (x itself when None).

  q, k, v without bias, the output projection with one (LDM, diffusers' `Attention`).

  Attributes:
    heads: number of heads.
    head_dim: channels per head.
  """

  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None) -> Array:
    """x [B, N, C], context [B, L, D] or None, mask [B, L] bool or None -> [B, N, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ctx = x if context is None else context
    inner = self.heads * self.head_dim
    split = lambda a: a.reshape(*a.shape[:2], self.heads, self.head_dim)  # noqa: E731
    q = split(nn.Dense(inner, use_bias=False, name="to_q", **kw)(x))
    k = split(nn.Dense(inner, use_bias=False, name="to_k", **kw)(ctx))
    v = split(nn.Dense(inner, use_bias=False, name="to_v", **kw)(ctx))
    a = dot_product_attention(q, k, v, impl=self.attention_impl, mask=mask)
    return nn.Dense(x.shape[-1], name="to_out", **kw)(a.reshape(*x.shape[:2], inner))


class Transformer2D(nn.Module):
  """[LDM]'s spatial transformer over the H*W positions of [B, H, W, C], with a residual.

  Attributes:
    heads: attention heads; `heads * head_dim` is the inner width (C in SD).
    head_dim: channels per head.
    depth: transformer blocks.
    num_groups: GroupNorm groups (epsilon 1e-6, as diffusers').
    zero_init: zero-initialise proj_out (the block starts as the identity, as LDM).
    attention_impl: "xla", "cudnn" or "auto" (`jdiff.ops.attention`).
    norm_impl: "flax" or "colsum" (`layers.GroupNorm32`).
  """

  heads: int
  head_dim: int
  depth: int = 1
  num_groups: int = 32
  zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
    """Applies the transformer.

    Args:
      x: activations [B, H, W, C].
      context: the conditioning sequence [B, L, D] (e.g. CLIP's text embedding).
      mask: [B, L] bool, True where the context token may be attended to; None: all.

    Returns:
      [B, H, W, C].
    """
    b, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm32(self.num_groups, 1e-6, name="norm", norm_impl=self.norm_impl, **kw)(x)
    h = nn.Dense(self.heads * self.head_dim, name="proj_in", **kw)(h.reshape(b, hh * ww, c))
    att = dict(heads=self.heads, head_dim=self.head_dim, attention_impl=self.attention_impl, **kw)

    def norm(name):
      ln = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype, name=name)
      return lambda h: ln(h.astype(jnp.float32)).astype(self.dtype)

    # Each block (diffusers' BasicTransformerBlock, LayerNorm eps 1e-5, exact GELU):
    # self-attention, cross-attention, GEGLU feed-forward (4x), each pre-norm + residual.
    context = context.astype(self.dtype)
    for d in range(self.depth):
      p = f"block_{d}_"
      h = h + Attention(name=p + "attn1", **att)(norm(p + "norm1")(h))
      h = h + Attention(name=p + "attn2", **att)(norm(p + "norm2")(h), context, mask)
      inner = self.heads * self.head_dim
      g = nn.Dense(8 * inner, name=p + "ff_proj", **kw)(norm(p + "norm3")(h))  # value, gate
      g, gate = jnp.split(g, 2, axis=-1)
      h = h + nn.Dense(inner, name=p + "ff_out", **kw)(g * nn.gelu(gate, approximate=False))
    init = nn.initializers.zeros if self.zero_init else nn.linear.default_kernel_init
    h = nn.Dense(c, kernel_init=init, name="proj_out", **kw)(h)
    return x + h.reshape(b, hh, ww, c)


def split_text_cond(y, *, context_dim: int, batch: int):
  """(labels or None, context [B, L, D], mask [B, L] or None) of a text-conditioned U-Net's y.

  `y` is the context [B, L, context_dim] itself, or a mapping with 'context' and optionally
  'mask' ([B, L] bool) and 'labels' ([B] int, for a model that also takes class labels).
  """
  if isinstance(y, dict):
    unknown = sorted(set(y) - {"context", "mask", "labels"})
    if unknown or "context" not in y:
      raise ValueError(
        f"cond must hold 'context' and optionally 'mask' and 'labels', got keys {sorted(y)}"
      )
    labels, context, mask = y.get("labels"), y["context"], y.get("mask")
  else:
    labels, context, mask = None, y, None
  if context is None or jnp.ndim(context) != 3 or jnp.shape(context)[::2] != (batch, context_dim):
    raise ValueError(
      f"the context must have shape [B, L, context_dim] = [{batch}, L, {context_dim}], got "
      f"{None if context is None else jnp.shape(context)}"
    )
  if mask is not None and jnp.shape(mask) != jnp.shape(context)[:2]:
    raise ValueError(
      f"the context mask must have shape [B, L] = {jnp.shape(context)[:2]}, got {jnp.shape(mask)}"
    )
  return labels, jnp.asarray(context), mask
