"""`model.norm_impl='colsum'`: per-channel column sums, then a [B, G] reduction; the same
GroupNorm as flax.linen.GroupNorm (forward and gradients), same parameter tree."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models.layers import GroupNorm32, group_norm_colsum


@pytest.mark.parametrize("shape, groups", [((2, 5, 7, 12), 4), ((3, 4, 4, 32), 32), ((2, 9, 8), 2)])
def test_colsum_group_norm_equals_flax(shape, groups):
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)  # a mean, so E[x^2] - E[x]^2
  scale = jax.random.normal(jax.random.key(1), shape[-1:])
  bias = jax.random.normal(jax.random.key(2), shape[-1:])
  ref_mod = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
  w = jax.random.normal(jax.random.key(3), shape)

  def ref(x, scale, bias):
    return jnp.sum(w * ref_mod.apply({"params": {"scale": scale, "bias": bias}}, x))

  def new(x, scale, bias):
    return jnp.sum(w * group_norm_colsum(x, scale, bias, num_groups=groups, eps=1e-5))

  np.testing.assert_allclose(
    group_norm_colsum(x, scale, bias, num_groups=groups, eps=1e-5),
    ref_mod.apply({"params": {"scale": scale, "bias": bias}}, x),
    rtol=1e-5,
    atol=2e-5,
  )
  for a, b in zip(
    jax.grad(new, (0, 1, 2))(x, scale, bias), jax.grad(ref, (0, 1, 2))(x, scale, bias)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm32_colsum_keeps_the_parameter_tree():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16)).astype(jnp.bfloat16)
  flax_gn = GroupNorm32(4, dtype=jnp.bfloat16)
  params = flax_gn.init(jax.random.key(1), x)
  colsum = GroupNorm32(4, dtype=jnp.bfloat16, norm_impl="colsum")
  assert jax.tree.structure(colsum.init(jax.random.key(1), x)) == jax.tree.structure(params)
  out = colsum.apply(params, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(flax_gn.apply(params, x), np.float32), atol=2e-2
  )
  with pytest.raises(ValueError, match="config.model.norm_impl must be one of"):
    GroupNorm32(4, norm_impl="fused").init(jax.random.key(1), x)


def test_unet_norm_impl_colsum_matches_flax():
  """Every GroupNorm of the U-Net (ResBlocks, attention, output) takes config.model.norm_impl."""
  from jdiff.models.unet import UNet  # noqa: PLC0415

  def net(**kw):
    return UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, **kw)

  x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([3, 7])
  params = net().init(jax.random.key(1), x, t, train=False)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  ref = net().apply(params, x, t, train=False)
  out = net(norm_impl="colsum").apply(params, x, t, train=False)
  assert not np.array_equal(np.asarray(out), np.asarray(ref))  # really another computation
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
