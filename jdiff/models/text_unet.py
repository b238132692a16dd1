"""A text-conditioned U-Net trained with its own text encoder: token ids in, noise out.

`TextUNet(x, t, ids)` encodes the prompt's token ids [B, L] with a (small) CLIP text tower
and passes the hidden states as the cross-attention context of a `UNet` built with
`context_dim` = the tower's width, masking the padding (id `pad_id`). The library still
sees one `model_fn(x_t, t, cond)`, with cond = token ids; classifier-free guidance uses the
empty prompt's ids as the null condition (`jdiff.data.captions.null_ids`). Both networks
train together; parameters are {'encoder': CLIP's names, 'unet': the UNet's}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.clip import CLIPTextEncoder
from jdiff.models.unet import UNet

Array = jax.Array


class TextUNet(nn.Module):
  """`unet(x, t, {'context': encoder(ids), 'mask': ids != pad_id})`.

  Attributes:
    unet: a UNet with `context_dim == encoder.width` and no class labels.
    encoder: the text tower (`CLIPTextEncoder`), e.g. 2 layers of width 64 for digits.
    pad_id: the padding token, masked out of the cross-attention.
  """

  unet: UNet
  encoder: CLIPTextEncoder
  pad_id: int = 0

  @property
  def learn_sigma(self) -> bool:
    return self.unet.learn_sigma

  @property
  def image_cond_channels(self) -> int:
    return 0

  def __call__(self, x: Array, t: Array, y: Array, *, train: bool) -> Array:
    """x [B, H, W, C], t [B], y int token ids [B, L] -> the U-Net's output [B, H, W, C']."""
    if self.unet.context_dim != self.encoder.width or self.unet.num_classes is not None:
      raise ValueError(
        f"TextUNet needs unet.context_dim == encoder.width ({self.encoder.width}) and no "
        f"class labels; got context_dim={self.unet.context_dim}, "
        f"num_classes={self.unet.num_classes}"
      )
    if y is None or jnp.ndim(y) != 2 or jnp.shape(y)[0] != x.shape[0]:
      raise ValueError(
        f"cond must be token ids [B, L] with B = {x.shape[0]}, got "
        f"{None if y is None else jnp.shape(y)}"
      )
    if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
      raise ValueError(f"token ids must be integers, got dtype {jnp.asarray(y).dtype}")
    context = self.encoder(y)
    return self.unet(x, t, {"context": context, "mask": y != self.pad_id}, train=train)
