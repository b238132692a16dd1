"""Winograd F(2x2, 3x3) convolution: a drop-in for 3x3 / stride 1 / "SAME" convs.

A 3x3 convolution computes each 2x2 output tile from a 4x4 input tile with 36
multiplies per (input, output) channel pair. Winograd's minimal filtering
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
CVPR 2016) computes the same tile with 16, as an elementwise product in a
transformed domain::

    Y = A^T [ (G g G^T) * (B^T d B) ] A

where ``d`` is the 4x4 input tile, ``g`` the 3x3 filter and ``A, B, G`` small
constant matrices. Summed over input channels the elementwise product becomes
16 independent matrix products ``M_p = V_p @ U_p`` (one per point ``p`` of the
4x4 transformed tile), so the matmul work of a convolution drops by 36/16 =
2.25x at the price of cheap, memory-bound tile transforms.

The gradient is Winograd too (``jax.custom_vjp``):

* ``dx`` is the 3x3 "SAME" convolution of ``dy`` with the spatially flipped,
  in/out-transposed filter, so it reuses the forward;
* ``dw = G^T (sum_tiles V_p^T dM_p) G`` with ``dM = A dy A^T``, the exact
  transpose of the forward's linear maps.

The result equals ``lax.conv_general_dilated`` up to float rounding (the
transforms use only 0, +-1 and +-1/2). It pays off where convolutions are
matmul-bound and the backend has no Winograd kernel of its own, e.g. XLA:CPU;
GPUs and TPUs should keep their native convolution (cuDNN picks Winograd
itself). ``UNet(conv_impl="auto")`` makes that choice.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

# Lavin & Gray (2016), F(2x2, 3x3).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# 2-D transforms as Kronecker products over flattened tiles:
# V[p] = sum_k _B16[p, k] d[k] (p = 4a + b, k = 4i + j); Y[q] = sum_p _A16[q, p] M[p].
_B16 = np.kron(_BT, _BT)
_A16 = np.kron(_AT, _AT)
_G16 = np.kron(_G, _G)  # U[p] = sum_k _G16[p, k] g[k], k = 3i + j
# G J = P G for the reversal J and the row swap P = (3, 1, 2, 0), so the
# transformed spatially flipped filter is U[_FLIP] with _FLIP[4a + b] =
# 4 P(a) + P(b) (an involution): the input gradient needs no filter transform
# of its own, only permuted tile transforms.
_P = (3, 1, 2, 0)
_FLIP = np.array([4 * _P[a] + _P[b] for a in range(4) for b in range(4)])

CONV_IMPLS = ("auto", "xla", "winograd")


def _lincomb(coefs: np.ndarray, terms) -> Array:
  """``sum_k coefs[k] * terms(k)`` over the nonzero ``coefs`` (Python scalars)."""
  out = None
  for k in np.flatnonzero(coefs):
    c, t = float(coefs[k]), terms(int(k))
    if out is None:
      out = t if c == 1 else (-t if c == -1 else c * t)
    elif c in (1, -1):
      out = out + t if c == 1 else out - t
    else:
      out = out + c * t
  return out


def _stack44(fn) -> Array:
  """``fn(a, b)`` for a, b in 0..3 stacked to [4, 4, ...].

  Nested stacks of 4 (not one stack of 16) let XLA:CPU fuse the whole
  transform into one loop: it does not fuse concatenations of more than 8.
  """
  return jnp.stack([jnp.stack([fn(a, b) for b in range(4)]) for a in range(4)])


def _input_transform(x: Array, flip: bool = False) -> Array:
  """``B^T d B`` for every overlapping 4x4 tile (stride 2) of the zero-padded x.

  Args:
    x: [N, H, W, C] with even H and W.
    flip: return the 16 transformed points in ``_FLIP`` order.

  Returns:
    [16, N * H/2 * W/2, C].
  """
  b16 = _B16[_FLIP] if flip else _B16
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  # Tile (i, j) covers rows 2i..2i+3 of the padded image: 2x2 blocks i, i+1.
  blk = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, h2 + 1, 2, w2 + 1, 2, c)

  def tap(k):  # padded pixel (2i + ky, 2j + kx) of every tile: [N, h2, w2, C]
    (dy, ry), (dx, rx) = divmod(k // 4, 2), divmod(k % 4, 2)
    return blk[:, dy:dy + h2, ry, dx:dx + w2, rx, :]

  v = _stack44(lambda a, b: _lincomb(b16[4 * a + b], tap))
  return v.reshape(16, n * h2 * w2, c)


def _output_transform(m: Array, n: int, h2: int, w2: int, flip: bool = False) -> Array:
  """``A^T M A`` for every tile, tiles laid back out: [16, T, O] -> [N, 2h2, 2w2, O].

  With ``flip`` the 16 points of ``m`` come in ``_FLIP`` order.
  """
  a16 = _A16[:, _FLIP] if flip else _A16
  o = m.shape[-1]
  m = m.reshape(16, n, h2, w2, o)
  y = [[_lincomb(a16[2 * r + s], lambda p: m[p]) for s in range(2)] for r in range(2)]
  y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # [N, h2, 2, w2, 2, O]
  return y.reshape(n, 2 * h2, 2 * w2, o)


def _output_transform_t(dy: Array) -> Array:
  """Transpose of the output transform: [N, H, W, O] -> [16, T, O] (``A dY A^T``)."""
  n, h, w, o = dy.shape
  d = dy.reshape(n, h // 2, 2, w // 2, 2, o)
  dm = _stack44(lambda a, b: _lincomb(_A16[:, 4 * a + b], lambda q: d[:, :, q // 2, :, q % 2]))
  return dm.reshape(16, -1, o)


def _filter_transform(w: Array) -> Array:
  """``G g G^T``: [3, 3, C, O] -> [16, C, O]."""
  u = _stack44(lambda a, b: _lincomb(_G16[4 * a + b], lambda k: w[k // 3, k % 3]))
  return u.reshape(16, *w.shape[2:])


def _filter_transform_t(du: Array) -> Array:
  """Transpose of the filter transform: [16, C, O] -> [3, 3, C, O]."""
  return jnp.stack([jnp.stack([_lincomb(_G16[:, 3 * i + j], lambda p: du[p]) for j in range(3)])
                    for i in range(3)])


def _forward(x: Array, u: Array) -> Array:
  """Winograd conv of x [N, H, W, C] (H, W even) with transformed filters u [16, C, O]."""
  n, h, w, _ = x.shape
  m = jnp.einsum("ptc,pco->pto", _input_transform(x), u)
  return _output_transform(m, n, h // 2, w // 2)


def _input_grad(dy: Array, u: Array) -> Array:
  """dx [N, H, W, C] of the conv with transformed filters u [16, C, O], from dy [N, H, W, O].

  The "SAME" conv of dy with the spatially flipped, in/out-transposed filter,
  whose transform is ``u[_FLIP]`` transposed: the permutation moves into the
  tile transforms and the transpose into the matmul's contraction.
  """
  n, h, w, _ = dy.shape
  m = jnp.einsum("pto,pco->ptc", _input_transform(dy, flip=True), u)
  return _output_transform(m, n, h // 2, w // 2, flip=True)


# Working-set budget of one chunk of images (transformed inputs + products):
# about what stays cache-resident on a CPU; larger matmul outputs run at half
# speed on XLA:CPU once they spill the last-level cache.
_CHUNK_BYTES = 12 * 2**20


def _images_per_chunk(x_shape, o: int, itemsize: int, budget: int) -> int:
  """Largest divisor of the batch whose transformed tiles fit in ``budget`` bytes."""
  n, h, w, c = x_shape
  per_image = 16 * (h // 2) * (w // 2) * (c + o) * itemsize
  fit = max(1, budget // per_image)
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= fit)


def _chunked(x: Array, chunk: int) -> Array:
  return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd_even(x: Array, w: Array, chunk: int) -> Array:
  u = _filter_transform(w)
  y = lax.map(lambda xc: _forward(xc, u), _chunked(x, chunk))
  return y.reshape(x.shape[0], *y.shape[2:])


def _winograd_even_fwd(x, w, chunk):
  return _winograd_even(x, w, chunk), (x, w)


def _winograd_even_bwd(chunk, res, dy):
  x, w = res
  u = _filter_transform(w)

  def body(du, xs):
    xc, dyc = xs
    dxc = _input_grad(dyc, u)
    du = du + jnp.einsum("ptc,pto->pco", _input_transform(xc), _output_transform_t(dyc))
    return du, dxc

  du0 = jnp.zeros((16, *w.shape[2:]), w.dtype)
  du, dx = lax.scan(body, du0, (_chunked(x, chunk), _chunked(dy, chunk)))
  return dx.reshape(x.shape), _filter_transform_t(du)


_winograd_even.defvjp(_winograd_even_fwd, _winograd_even_bwd)


def winograd_conv3x3(x: Array, w: Array) -> Array:
  """3x3 convolution, stride 1, zero padding 1 ("SAME"), by Winograd F(2x2, 3x3).

  Same result as ``lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
  dimension_numbers=("NHWC", "HWIO", "NHWC"))`` up to float rounding, with
  2.25x fewer multiplies in both the forward and the backward pass. Pure; runs
  under jit, vmap, grad, pmap and shard_map.

  Args:
    x: inputs [N, H, W, C]; odd H or W are zero-padded to even and cropped.
    w: filter [3, 3, C, O].

  Returns:
    [N, H, W, O] in the result dtype of ``x`` and ``w``.
  """
  if x.ndim != 4 or w.ndim != 4 or w.shape[:2] != (3, 3) or w.shape[2] != x.shape[-1]:
    raise ValueError(
        "winograd_conv3x3 needs x [N, H, W, C] and w [3, 3, C, O]; got "
        f"x.shape={x.shape}, w.shape={w.shape}")
  dtype = jnp.result_type(x, w)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"winograd_conv3x3 needs floating inputs, got dtype={dtype}")
  x, w = x.astype(dtype), w.astype(dtype)
  n, h, ww, _ = x.shape
  ph, pw = h % 2, ww % 2
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  chunk = _images_per_chunk(x.shape, w.shape[-1], jnp.dtype(dtype).itemsize, _CHUNK_BYTES)
  y = _winograd_even(x, w, chunk)
  return y[:, :h, :ww, :] if ph or pw else y


def _plain_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, preferred_element_type) -> bool:
  """A stride-1, undilated, ungrouped NHWC/HWIO 2-D convolution."""
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  ones = lambda d: d is None or tuple(d) == (1, 1)
  return (tuple(window_strides) == (1, 1) and ones(lhs_dilation) and ones(rhs_dilation)
          and feature_group_count == 1 and batch_group_count == 1
          and preferred_element_type is None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)


def _padding(padding) -> Any:
  return padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)


def winograd_conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                                  padding: Any, lhs_dilation=None, rhs_dilation=None,
                                  dimension_numbers=None, feature_group_count: int = 1,
                                  batch_group_count: int = 1, precision=None,
                                  preferred_element_type=None) -> Array:
  """``lax.conv_general_dilated`` with the CPU-friendly paths for U-Net convs.

  Stride-1 NHWC/HWIO convolutions run as:

  * 3x3 with padding 1 ("SAME"): ``winograd_conv3x3``;
  * 1x1 without padding: one matmul over the channels (XLA:CPU's 1x1
    weight-gradient convolution is several times slower than the matmul).

  Anything else (strided, dilated, grouped, other layouts) goes to
  ``lax.conv_general_dilated`` unchanged; ``precision`` only applies there.
  Pass it as ``flax.linen.Conv(conv_general_dilated=...)``.
  """
  if _plain_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, batch_group_count, preferred_element_type):
    pad = _padding(padding)
    if rhs.shape[:2] == (3, 3) and pad in ("SAME", ((1, 1), (1, 1))):
      return winograd_conv3x3(lhs, rhs)
    if rhs.shape[:2] == (1, 1) and pad in ("SAME", "VALID", ((0, 0), (0, 0))):
      return jnp.einsum("nhwc,co->nhwo", lhs, rhs[0, 0])
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


def resolve_conv_impl(conv_impl: str, dtype: Any) -> str:
  """Maps ``"auto"`` to ``"winograd"`` for float32 on XLA:CPU and to ``"xla"`` elsewhere.

  Args:
    conv_impl: "auto", "xla" or "winograd".
    dtype: the convolutions' compute dtype.

  Returns:
    "xla" or "winograd".
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got conv_impl={conv_impl!r}")
  if conv_impl != "auto":
    return conv_impl
  cpu_f32 = jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32
  return "winograd" if cpu_f32 else "xla"
