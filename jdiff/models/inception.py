"""The FID InceptionV3 of pytorch-fid (TensorFlow's 2015 graph), in Flax, NHWC.

This is the network of `pytorch_fid.inception.InceptionV3` with `use_fid_inception=True`
(Heusel et al.'s TF Inception, ported to torch by pytorch-fid): torchvision's Inception3
with the FID block variants (`FIDInceptionA/C/E_1/E_2`: average pools that exclude the
padding, and a max pool in the last block), pool3 features [B, 2048] and the logits of the
1008-way classifier of the TF graph for the Inception Score: pool3 @ W without the
classifier's bias, as Salimans et al.'s code (`softmax(matmul(pool3, w))` of
`softmax/logits/MatMul`), ADM's evaluator, StyleGAN2-ADA, torchmetrics and torch-fidelity
(`logits_unbiased`) compute it. The input is resized to 299x299 by bilinear interpolation
with half-pixel centres and no antialiasing (torch's `F.interpolate(mode='bilinear',
align_corners=False)`, as pytorch-fid), and is taken in [-1, 1] (pytorch-fid maps its
[0, 1] input to [-1, 1] after the resize; resizing commutes with that affine map).

Every conv + BatchNorm pair of the torch network is stored folded into one convolution
with a bias (inference only; `inception_convert.py` folds). Weights come from a local
file written by `jdiff.models.inception_convert` (`load_inception_params`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdiff.models.layers import conv_fn
from jdiff.ops.winograd import resolve_conv_impl

Array = jax.Array
SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D linear interpolation, align_corners=False.

  source(i) = max((i + 0.5) * n_in / n_out - 0.5, 0); the two neighbours floor(source)
  and min(floor + 1, n_in - 1) get weights 1 - frac and frac (no antialiasing).
  """
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m


def resize_bilinear(x: Array, size: int = SIZE) -> Array:
  """[B, H, W, C] -> [B, size, size, C], as torch bilinear with align_corners=False."""
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x
  mh = jnp.asarray(resize_matrix(h, size), x.dtype)
  mw = jnp.asarray(resize_matrix(w, size), x.dtype)
  hp = lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hp)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


class BasicConv(nn.Module):
  """Conv (BatchNorm folded in as a bias) + ReLU: torchvision's BasicConv2d at inference."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    y = nn.Conv(
      self.features,
      self.kernel,
      strides=(self.strides, self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=True,
      conv_general_dilated=conv_fn(self.conv_impl),
      name="conv",
    )(x)
    return nn.relu(y)


def _max_pool(x: Array, stride: int, pad: int = 0) -> Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


def _avg_pool_exclude_pad(x: Array) -> Array:
  """3x3 / stride 1 / padding 1 average that ignores the padding (count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = lax.reduce_window(ones, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return total / count


class _Block(nn.Module):
  conv_impl: str = "xla"

  def conv(self, name, features, kernel, strides=1, padding=(0, 0)):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return BasicConv(features, kernel, strides, padding, self.conv_impl, name=name)


class InceptionA(_Block):
  """FIDInceptionA (Mixed_5b/c/d)."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=(2, 2))(self.conv("branch5x5_1", 48, 1)(x))
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """torchvision's InceptionB (Mixed_6a)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(_Block):
  """FIDInceptionC (Mixed_6b/c/d/e)."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, row[0], padding=row[1])(b7)
    b7 = self.conv("branch7x7_3", 192, col[0], padding=col[1])(b7)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    for i, (feat, (k, p)) in enumerate(zip((c7, c7, c7, 192), (col, row, col, row)), start=2):
      bd = self.conv(f"branch7x7dbl_{i}", feat, k, padding=p)(bd)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """torchvision's InceptionD (Mixed_7a)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, strides=2)(self.conv("branch3x3_1", 192, 1)(x))
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(_Block):
  """FIDInceptionE_1 (Mixed_7b, average pool without padding) or FIDInceptionE_2
  (Mixed_7c, max pool), as `max_pool`."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate(
      [
        self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
        self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
      ],
      axis=-1,
    )
    bd = self.conv("branch3x3dbl_1", 448, 1)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=(1, 1))(bd)
    bd = jnp.concatenate(
      [
        self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
        self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_exclude_pad(x)
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's FID InceptionV3: images [B, H, W, C] in [-1, 1] (C = 1 or 3) ->
  (pool3 features [B, 2048], logits pool3 @ W [B, 1008], without the classifier's bias).

  Attributes:
    conv_impl: 'xla', 'winograd' (jdiff.ops.winograd for the 3x3 'SAME' and 1x1
      convolutions, faster on XLA:CPU only) or 'auto' (winograd on XLA:CPU, XLA's
      convolutions on a GPU or TPU: `jdiff.ops.winograd.resolve_conv_impl`).
    resize: resize the input to 299x299 first (pytorch-fid's resize_input=True).
  """

  conv_impl: str = "xla"
  resize: bool = True

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [B, H, W, 1 or 3], got shape {x.shape}")
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize:
      x = resize_bilinear(x, SIZE)
    ci = resolve_conv_impl(self.conv_impl, x.dtype)

    def conv(name, feat, k, s=1, p=(0, 0)):
      return BasicConv(feat, (k, k), s, p, ci, name=name)

    x = conv("Conv2d_1a_3x3", 32, 3, 2)(x)
    x = conv("Conv2d_2a_3x3", 32, 3)(x)
    x = conv("Conv2d_2b_3x3", 64, 3, p=(1, 1))(x)
    x = _max_pool(x, 2)
    x = conv("Conv2d_3b_1x1", 80, 1)(x)
    x = conv("Conv2d_4a_3x3", 192, 3)(x)
    x = _max_pool(x, 2)
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(ci, pool_features=pool, name=name)(x)
    x = InceptionB(ci, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(ci, channels_7x7=c7, name=name)(x)
    x = InceptionD(ci, name="Mixed_7a")(x)
    x = InceptionE(ci, max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(ci, max_pool=True, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, use_bias=False, name="fc")(pool3)
    return pool3, logits
