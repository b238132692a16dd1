"""Multi-head attention with a choice of kernel: XLA's, query-chunked XLA, or cuDNN's fused one.

`jax.nn.dot_product_attention` without `implementation` is XLA's: it writes the whole
float32 score matrix [B, heads, N, N] to memory. cuDNN's fused (flash) kernel does not;
it needs a GPU with cuDNN and a half-precision dtype. `impl`:
  - "xla": always XLA (the default, the numbers every test and benchmark was run with);
  - "cudnn": cuDNN's kernel; where it is refused (no GPU, no cuDNN, an unsupported shape
    or dtype) one warning line, then XLA;
  - "chunked": XLA's attention over blocks of `CHUNK` queries in turn (`lax.map`): each
    block sees every key, so the softmax is exact and the result equals "xla" up to float
    rounding, with a score matrix of [B, heads, CHUNK, L] at a time instead of [B, heads,
    N, L] (the 64x64 latents of SD: 4,096 queries, 4x less);
  - "auto": cuDNN on a GPU in bfloat16 / float16, XLA elsewhere.
The choice is logged once per (impl, backend, dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked")
CHUNK = 1024  # queries per block of the "chunked" attention
Array = jax.Array


@functools.cache
def _log_once(level: str, message: str) -> None:
  getattr(logging, level)(message)


def resolve_attention_impl(impl: str, dtype, backend: str | None = None) -> str:
  """'xla' or 'cudnn' for `impl` (see the module docstring) at compute `dtype`."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  backend = backend or jax.default_backend()
  if impl == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    impl = "cudnn" if backend == "gpu" and half else "xla"
    _log_once("info", f"attention_impl=auto: {impl} ({backend}, {jnp.dtype(dtype).name})")
  return impl


def dot_product_attention(
  q: Array, k: Array, v: Array, *, impl: str = "xla", mask: Array | None = None
) -> Array:
  """Softmax attention of q [B, N, heads, D] to k, v [B, L, heads, D] -> [B, N, heads, D].

  `mask` [B, L] bool (None: every key) marks the keys each query may attend to.
  """
  impl = resolve_attention_impl(impl, q.dtype)
  if mask is not None:
    mask = jnp.asarray(mask, bool)[:, None, None, :]
  if impl == "chunked" and q.shape[1] > CHUNK:
    return _chunked(q, k, v, mask, CHUNK)
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as e:  # refused at trace time
      _log_once("warning", f"attention_impl=cudnn refused ({e}); using XLA's attention")
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _chunked(q: Array, k: Array, v: Array, mask: Array | None, chunk: int) -> Array:
  """XLA's attention for blocks of `chunk` queries in turn (the last block zero-padded)."""
  b, n, h, d = q.shape
  blocks = -(-n // chunk)
  q = jnp.pad(q, ((0, 0), (0, blocks * chunk - n), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(b, blocks, chunk, h, d), 1, 0)
  out = jax.lax.map(lambda qb: jax.nn.dot_product_attention(qb, k, v, mask=mask), q)
  return jnp.moveaxis(out, 0, 1).reshape(b, blocks * chunk, h, d)[:, :n]
