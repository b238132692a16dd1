"""A small CNN classifier whose penultimate features and class probabilities score samples
of small grey-scale datasets (the embedded digits) where no Inception weights exist."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class SmallClassifier(nn.Module):
  """conv(width) -> pool -> conv(2 width) -> pool -> dense(features) -> dense(num_classes).

  Attributes:
    num_classes: output classes.
    width: channels of the first convolution.
    features: size of the penultimate (feature) layer.
  """

  num_classes: int = 10
  width: int = 32
  features: int = 128

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    """images [B, H, W, C] in [-1, 1] -> (features [B, features] (post-ReLU), logits [B, K])."""
    x = jnp.asarray(images, jnp.float32)
    for i, ch in enumerate((self.width, 2 * self.width)):
      x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", name=f"conv{i}")(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    feats = nn.relu(nn.Dense(self.features, name="hidden")(x))
    return feats, nn.Dense(self.num_classes, name="logits")(feats)
