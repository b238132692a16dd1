"""Winograd convolution: a drop-in for 3x3 / stride 1 / "SAME" convolutions.

A 3x3 convolution computes each 2x2 output tile from a 4x4 input tile with 36
multiplies per (input, output) channel pair. Winograd's minimal filtering
algorithm F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016) computes the same tile with 16, as an elementwise product
in a transformed domain::

    Y = A^T [ (G g G^T) * (B^T d B) ] A

where ``d`` is the 4x4 input tile, ``g`` the 3x3 filter and ``A, B, G`` small
constant matrices. Summed over input channels the elementwise product becomes
16 independent matrix products ``M_p = V_p @ U_p`` (one per point ``p`` of the
transformed tile), so the matmul work drops by 36/16 = 2.25x at the price of
memory-bound tile transforms. F(4x4, 3x3) (``tile=4``) cuts it by 4x with 6x6
tiles, at ~10x the rounding error and a much longer XLA compile.

The gradient is Winograd too (``jax.custom_vjp``):

* ``dx`` is the "SAME" convolution of ``dy`` with the spatially flipped filter,
  contracted over the output channels;
* ``dw = G^T (sum_tiles V_p^T dM_p) G`` with ``dM = A dY A^T``, the exact
  transpose of the forward's linear maps.

Under autodiff, images are processed in chunks (``lax.map``) whose transformed
tiles fit in about 12 MiB, so that the batched matmuls' operands stay in the
last-level cache on XLA:CPU (measurements: BENCHMARKS.md, "U-Net throughput");
inference (no gradient) takes larger chunks, measured faster for the forward
alone (BENCHMARKS.md, "Pretrained weights").

The result equals ``lax.conv_general_dilated`` up to float rounding (F(2x2)'s
transforms use only 0, +-1 and +-1/2). It pays off where convolutions are
matmul-bound and the backend has no Winograd kernel of its own, i.e. XLA:CPU;
GPUs and TPUs keep their native convolution (cuDNN picks Winograd itself).
``UNet(conv_impl="auto")`` makes that choice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


class _Tiles:
  """Winograd F(m x m, 3 x 3) transforms (Lavin & Gray, 2016).

  ``bt`` [a, a], ``g`` [a, 3] and ``at`` [m, a] with input tile side
  ``a = m + 2``; ``b2``, ``g2`` and ``a2`` are the 2-D transforms as Kronecker
  products over row-major flattened tiles, e.g. ``V[p] = sum_k b2[p, k] d[k]``.
  """

  def __init__(self, m: int, bt, g, at):
    self.m, self.alpha = m, m + 2
    self.b2 = np.kron(np.asarray(bt, np.float64), np.asarray(bt, np.float64))
    self.g2 = np.kron(np.asarray(g, np.float64), np.asarray(g, np.float64))
    self.a2 = np.kron(np.asarray(at, np.float64), np.asarray(at, np.float64))
    self.points = self.alpha**2


TILES = {
  # Interpolation points 0, 1, -1, inf: transforms of 0, +-1 and +-1/2 only.
  2: _Tiles(
    2,
    bt=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    g=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    at=[[1, 1, 1, 0], [0, 1, -1, -1]],
  ),
  # Points 0, 1, -1, 2, -2, inf: 4x fewer multiplies than direct, larger constants.
  4: _Tiles(
    4,
    bt=[
      [4, 0, -5, 0, 1, 0],
      [0, -4, -4, 1, 1, 0],
      [0, 4, -4, -1, 1, 0],
      [0, -2, -1, 2, 1, 0],
      [0, 2, -1, -2, 1, 0],
      [0, 4, 0, -5, 0, 1],
    ],
    g=[
      [1 / 4, 0, 0],
      [-1 / 6, -1 / 6, -1 / 6],
      [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6],
      [1 / 24, -1 / 12, 1 / 6],
      [0, 0, 1],
    ],
    at=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
  ),
}

CONV_IMPLS = ("auto", "xla", "winograd")
# Break-even of F(2x2): the matmul saving grows as C * O, the transforms as C + O.
MIN_WINOGRAD_CHANNELS = 32


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


def _stack2(fn, n: int, axes=(0, 0)) -> Array:
  """``fn(a, b)`` for a, b < n stacked on ``axes`` (inner, then outer).

  Nested stacks of n <= 8 (not one stack of n * n) let XLA:CPU fuse a whole
  transform into one loop: it does not fuse concatenations of more than 8.
  """
  return jnp.stack(
    [jnp.stack([fn(a, b) for b in range(n)], axis=axes[0]) for a in range(n)], axis=axes[1]
  )


def _input_transform(x: Array, t: _Tiles) -> Array:
  """``B^T d B`` for every overlapping (m+2)^2 tile (stride m) of the zero-padded x.

  Args:
    x: [N, H, W, C] with H and W multiples of m.
    t: the transforms.

  Returns:
    [(m+2)^2, N * H/m * W/m, C].
  """
  n, h, w, c = x.shape
  m, hm, wm = t.m, h // t.m, w // t.m
  # Tile (i, j) covers rows m*i .. m*i + m + 1 of the padded image: the
  # m-row blocks i and i + 1.
  xp = jnp.pad(x, ((0, 0), (1, m - 1), (1, m - 1), (0, 0)))
  blk = xp.reshape(n, hm + 1, m, wm + 1, m, c)

  def tap(k):  # padded pixel (m*i + ky, m*j + kx) of every tile: [N, H/m, W/m, C]
    (dy, ry), (dx, rx) = divmod(k // t.alpha, m), divmod(k % t.alpha, m)
    return blk[:, dy : dy + hm, ry, dx : dx + wm, rx, :]

  v = _stack2(lambda a, b: _lincomb(t.b2[t.alpha * a + b], tap), t.alpha)
  return v.reshape(t.points, n * hm * wm, c)


def _output_transform(mm: Array, n: int, hm: int, wm: int, t: _Tiles) -> Array:
  """``A^T M A`` for every tile, laid back out: [(m+2)^2, T, O] -> [N, m*hm, m*wm, O]."""
  o = mm.shape[-1]
  mm = mm.reshape(t.points, n, hm, wm, o)
  y = _stack2(lambda r, s: _lincomb(t.a2[t.m * r + s], lambda p: mm[p]), t.m, axes=(3, 2))
  return y.reshape(n, t.m * hm, t.m * wm, o)  # from [N, hm, m, wm, m, O]


def _output_transform_t(dy: Array, t: _Tiles) -> Array:
  """Transpose of the output transform (``A dY A^T``): [N, H, W, O] -> [(m+2)^2, T, O]."""
  n, h, w, o = dy.shape
  d = dy.reshape(n, h // t.m, t.m, w // t.m, t.m, o)
  dm = _stack2(
    lambda a, b: _lincomb(t.a2[:, t.alpha * a + b], lambda q: d[:, :, q // t.m, :, q % t.m]),
    t.alpha,
  )
  return dm.reshape(t.points, -1, o)


def _filter_transform(w: Array, t: _Tiles, flip: bool = False) -> Array:
  """``G g G^T`` of g = w, or of w flipped in space: [3, 3, C, O] -> [(m+2)^2, C, O]."""
  tap = (lambda k: w[2 - k // 3, 2 - k % 3]) if flip else (lambda k: w[k // 3, k % 3])
  u = _stack2(lambda a, b: _lincomb(t.g2[t.alpha * a + b], tap), t.alpha)
  return u.reshape(t.points, *w.shape[2:])


def _filter_transform_t(du: Array, t: _Tiles) -> Array:
  """Transpose of the filter transform: [(m+2)^2, C, O] -> [3, 3, C, O]."""
  return _stack2(lambda i, j: _lincomb(t.g2[:, 3 * i + j], lambda p: du[p]), 3)


def _tiled_conv(x: Array, u: Array, t: _Tiles, spec: str = "ptc,pco->pto") -> Array:
  """Winograd conv of x [N, H, W, K] with transformed filters u, contracted by ``spec``.

  The forward passes u [(m+2)^2, C, O] and contracts over C; the input gradient
  passes the flipped filter's transform and ``"pto,pco->ptc"``, contracting
  over O (the "SAME" conv of dy with the spatially flipped filter).
  """
  n, h, w, _ = x.shape
  mm = jnp.einsum(spec, _input_transform(x, t), u)
  return _output_transform(mm, n, h // t.m, w // t.m, t)


# Working-set budget of one chunk of images (transformed inputs + products):
# about what stays cache-resident on a CPU. Matmul outputs that spill the
# last-level cache run slower on XLA:CPU (BENCHMARKS.md, "U-Net throughput").
_CHUNK_BYTES = 12 * 2**20
# Inference (the primal, no gradient being taken) takes chunks up to this budget:
# the whole batch up to 32 CIFAR-size images (8 MiB each at the widest conv). With no
# backward pass, one larger matmul per point and no chunk loop (nor its
# dynamic-update-slice copies) gave forwards 4-21% faster at batch 8-16 and equal at
# 32 (BENCHMARKS.md, "Pretrained weights"). The train step keeps ``_CHUNK_BYTES``.
_INFER_CHUNK_BYTES = 256 * 2**20


def _images_per_chunk(x_shape, o: int, itemsize: int, t: _Tiles, budget: int) -> int:
  """Largest divisor of the batch whose transformed tiles fit in ``budget`` bytes."""
  n, h, w, c = x_shape
  per_image = t.points * (h // t.m) * (w // t.m) * (c + o) * itemsize
  fit = max(1, budget // per_image)
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= fit)


def _chunked(x: Array, chunk: int) -> Array:
  return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _tiled_forward(x: Array, w: Array, m: int, chunk: int) -> Array:
  t = TILES[m]
  u = _filter_transform(w, t)
  if chunk == x.shape[0]:
    return _tiled_conv(x, u, t)
  y = lax.map(lambda xc: _tiled_conv(xc, u, t), _chunked(x, chunk))
  return y.reshape(x.shape[0], *y.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _winograd_tiled(x: Array, w: Array, m: int, chunk: int, infer_chunk: int) -> Array:
  """Forward with ``infer_chunk`` images per chunk; under autodiff ``chunk`` (both ways)."""
  return _tiled_forward(x, w, m, infer_chunk)


def _winograd_tiled_fwd(x, w, m, chunk, infer_chunk):
  del infer_chunk
  return _tiled_forward(x, w, m, chunk), (x, w)


def _winograd_tiled_bwd(m, chunk, infer_chunk, res, dy):
  del infer_chunk
  x, w = res
  t = TILES[m]
  u_flip = _filter_transform(w, t, flip=True)

  def chunk_grads(xs):
    xc, dyc = xs
    du = jnp.einsum("ptc,pto->pco", _input_transform(xc, t), _output_transform_t(dyc, t))
    return _tiled_conv(dyc, u_flip, t, "pto,pco->ptc"), du

  # Per-chunk filter gradients are summed after the map (not carried through a
  # scan), so the VJP also runs under shard_map without varying-axis casts.
  dx, du = lax.map(chunk_grads, (_chunked(x, chunk), _chunked(dy, chunk)))
  return dx.reshape(x.shape), _filter_transform_t(du.sum(0), t)


_winograd_tiled.defvjp(_winograd_tiled_fwd, _winograd_tiled_bwd)


def _varying_axes(a: Array) -> frozenset:
  """Mesh axes over which a shard_map value varies (jax >= 0.10; older: ``aval.vma``)."""
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _same_varying_axes(x: Array, w: Array) -> tuple[Array, Array]:
  """Under shard_map, marks x and w as varying over the same mesh axes.

  A custom VJP must return cotangents of its inputs' types; with w replicated
  and x sharded, dw varies per shard. Casting w to varying *outside* the custom
  VJP lets autodiff add the psum that turns dw back into a replicated gradient.
  """
  vx, vw = _varying_axes(x), _varying_axes(w)
  if vx - vw:
    w = lax.pcast(w, tuple(sorted(vx - vw)), to="varying")
  if vw - vx:
    x = lax.pcast(x, tuple(sorted(vw - vx)), to="varying")
  return x, w


def winograd_conv3x3(x: Array, w: Array, tile: int = 2) -> Array:
  """3x3 convolution, stride 1, zero padding 1 ("SAME"), by Winograd F(m x m, 3x3).

  Same result as ``lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
  dimension_numbers=("NHWC", "HWIO", "NHWC"))`` up to float rounding, with
  2.25x (``tile=2``) or 4x (``tile=4``) fewer multiplies in the forward and
  both gradients. Pure; runs under jit, vmap, grad, pmap and shard_map.

  Args:
    x: inputs [N, H, W, C]; H and W are zero-padded to multiples of ``tile``
      and the result cropped back.
    w: filter [3, 3, C, O].
    tile: output tile side m: 2 (default; relative error ~3e-7 in float32) or
      4 (~5e-6, and a much longer XLA compile).

  Returns:
    [N, H, W, O] in the result dtype of ``x`` and ``w``.
  """
  if x.ndim != 4 or w.ndim != 4 or w.shape[:2] != (3, 3) or w.shape[2] != x.shape[-1]:
    raise ValueError(
      "winograd_conv3x3 needs x [N, H, W, C] and w [3, 3, C, O]; got "
      f"x.shape={x.shape}, w.shape={w.shape}"
    )
  dtype = jnp.result_type(x, w)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"winograd_conv3x3 needs floating inputs, got dtype={dtype}")
  x, w = x.astype(dtype), w.astype(dtype)
  if tile not in TILES:
    raise ValueError(f"winograd_conv3x3: tile must be one of {sorted(TILES)}, got tile={tile}")
  n, h, ww, _ = x.shape
  ph, pw = -h % tile, -ww % tile
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  chunk, infer_chunk = (
    _images_per_chunk(x.shape, w.shape[-1], jnp.dtype(dtype).itemsize, TILES[tile], budget)
    for budget in (_CHUNK_BYTES, _INFER_CHUNK_BYTES)
  )
  x, w = _same_varying_axes(x, w)
  y = _winograd_tiled(x, w, tile, chunk, infer_chunk)
  return y[:, :h, :ww, :] if ph or pw else y


def _plain_nhwc(
  lhs,
  rhs,
  window_strides,
  *,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> bool:
  """A stride-1, undilated, ungrouped NHWC/HWIO 2-D convolution (`precision` aside)."""
  del precision  # only lax's path takes it
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  ones = lambda d: d is None or tuple(d) == (1, 1)
  return (
    tuple(window_strides) == (1, 1)
    and ones(lhs_dilation)
    and ones(rhs_dilation)
    and feature_group_count == 1
    and batch_group_count == 1
    and preferred_element_type is None
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
  )


def _padding(padding) -> Any:
  return padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)


def winograd_conv_general_dilated(
  lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any, **options
) -> Array:
  """``lax.conv_general_dilated`` with the CPU-friendly paths for U-Net convs.

  Stride-1 NHWC/HWIO convolutions run as:

  * 3x3 with padding 1 ("SAME") and at least ``MIN_WINOGRAD_CHANNELS`` input
    and output channels: ``winograd_conv3x3``. Narrower convs (RGB stems,
    output heads, tiny test models) stay on XLA: their matmuls are too small
    to pay for the tile transforms (and the longer compile);
  * 1x1 without padding: one matmul over the channels (XLA:CPU's 1x1
    weight-gradient convolution is slower than the matmul; BENCHMARKS.md).

  Anything else (strided, dilated, grouped, other layouts) goes to
  ``lax.conv_general_dilated`` unchanged; ``precision`` only applies there.
  ``options`` are ``lax.conv_general_dilated``'s keyword arguments (lhs_dilation,
  rhs_dilation, dimension_numbers, feature_group_count, batch_group_count, precision,
  preferred_element_type). Pass it as ``flax.linen.Conv(conv_general_dilated=...)``.
  """
  if _plain_nhwc(lhs, rhs, window_strides, **options):
    pad = _padding(padding)
    wide = min(rhs.shape[2:]) >= MIN_WINOGRAD_CHANNELS
    if rhs.shape[:2] == (3, 3) and pad in ("SAME", ((1, 1), (1, 1))) and wide:
      return winograd_conv3x3(lhs, rhs)
    if rhs.shape[:2] == (1, 1) and pad in ("SAME", "VALID", ((0, 0), (0, 0))):
      return jnp.einsum("nhwc,co->nhwo", lhs, rhs[0, 0])
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)


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
