"""`model.attention_impl`: auto picks XLA on the CPU (bit-identical to the default), and cudnn,
refused on the CPU, falls back to XLA with one warning line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from jdiff.models.dit import DiT
from jdiff.models.unet import UNet
from jdiff.ops import attention


def _unet(**kw):
  return UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_is_xla_on_cpu_bit_for_bit(dtype):
  assert attention.resolve_attention_impl("auto", dtype) == "xla"
  assert attention.resolve_attention_impl("auto", jnp.bfloat16, backend="gpu") == "cudnn"
  assert attention.resolve_attention_impl("auto", jnp.float32, backend="gpu") == "xla"
  x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([3, 7])
  for make in (_unet, lambda **kw: DiT(patch_size=2, hidden=32, depth=1, num_heads=2, **kw)):
    params = jax.jit(make().init, static_argnames="train")(jax.random.key(1), x, t, train=False)
    ref = jax.jit(make(dtype=dtype).apply, static_argnames="train")(params, x, t, train=False)
    auto = make(dtype=dtype, attention_impl="auto")
    out = jax.jit(auto.apply, static_argnames="train")(params, x, t, train=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_cudnn_on_cpu_falls_back_with_one_warning(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a if a else msg))
  attention._log_once.cache_clear()
  x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([3, 7])
  params = _unet().init(jax.random.key(1), x, t, train=False)
  ref = _unet().apply(params, x, t, train=False)
  for _ in range(2):  # two traces, one warning
    out = _unet(attention_impl="cudnn").apply(params, x, t, train=False)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert len(warnings) == 1 and "attention_impl=cudnn refused" in warnings[0], warnings
  with pytest.raises(ValueError, match="config.model.attention_impl must be one of"):
    attention.resolve_attention_impl("flash", jnp.float32)


@pytest.mark.parametrize("n", [attention.CHUNK + 37, 3 * attention.CHUNK])
def test_chunked_equals_xla_with_and_without_a_key_mask(n):
  kq, kk, kv, km = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(kq, (2, n, 2, 8))
  k, v = jax.random.normal(kk, (2, 77, 2, 8)), jax.random.normal(kv, (2, 77, 2, 8))
  mask = jax.random.bernoulli(km, 0.7, (2, 77)).at[:, 0].set(True)
  for m in (None, mask):
    ref = attention.dot_product_attention(q, k, v, impl="xla", mask=m)
    out = jax.jit(
      lambda q, k, v, m=m: attention.dot_product_attention(q, k, v, impl="chunked", mask=m)
    )(q, k, v)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
  # At or below one chunk it is XLA's call itself.
  small = q[:, : attention.CHUNK]
  np.testing.assert_array_equal(
    attention.dot_product_attention(small, k, v, impl="chunked"),
    attention.dot_product_attention(small, k, v, impl="xla"),
  )
