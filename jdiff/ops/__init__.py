"""Kernels that XLA does not provide well on every backend.

`winograd` holds the Winograd F(2x2, 3x3) / F(4x4, 3x3) convolutions that the U-Net uses
for float32 3x3 convolutions on CPU (`UNet(conv_impl="auto")`).
"""

from jdiff.ops.winograd import (
  CONV_IMPLS,
  resolve_conv_impl,
  winograd_conv3x3,
  winograd_conv_general_dilated,
)
