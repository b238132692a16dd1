"""DiT: the paper's parameter counts, and the forward pass against diffusers' DiTTransformer2DModel
on the same random weights (through `dit_convert.from_diffusers`, the key map that loads the
published checkpoints)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models.dit import DiT, make_dit, sincos_pos_embed
from jdiff.models.dit_convert import dit_kwargs, from_diffusers


def _count(module, shape=(1, 32, 32, 4)):
  init = lambda k: module.init(k, jnp.zeros(shape), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  return sum(
    int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(init, jax.random.key(0)))
  )


@pytest.mark.parametrize(
  "name, paper_m, official",
  # [DiT] Table 1 (33M, 130M, 675M) and the official code's count for XL/2, which includes the
  # fixed 256 x D position table (not a parameter here).
  [("S/2", 33, None), ("B/2", 130, None), ("XL/2", 675, 675_129_632)],
)
def test_parameter_counts_match_the_paper(name, paper_m, official):
  """256 x 256 images as 32 x 32 x 4 latents, 1000 classes, learned sigma (8 output channels)."""
  module = make_dit(name, num_classes=1000, learn_sigma=True)
  n = _count(module)  # trainable parameters
  assert round(n / 1e6) == paper_m, n
  if official is not None:  # + the official code's frozen position table
    assert n + 256 * module.hidden == official


def test_position_table_is_mae_2d_sincos():
  pe = sincos_pos_embed(8, 2, 3)  # token i * 3 + j: [1-D(j) | 1-D(i)], each [sin | cos]
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  j, i = 2, 1
  want = np.concatenate(
    [np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
  )
  np.testing.assert_allclose(pe[i * 3 + j], want, rtol=1e-6)


def test_forward_matches_diffusers_on_random_weights():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  ref = diffusers.DiTTransformer2DModel(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
    sample_size=8, patch_size=2, num_embeds_ada_norm=10,
  ).eval()  # fmt: skip
  with torch.no_grad():
    for p in ref.parameters():  # the zero-initialised adaLN layers too
      p.normal_(0.0, 0.3)
    for block in ref.transformer_blocks[1:]:  # one shared embedder, as in DiT's checkpoints
      block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  net = DiT(**dit_kwargs(ref.config))
  params = from_diffusers(sd)
  x = np.random.RandomState(0).randn(3, 8, 8, 4).astype(np.float32)
  t = np.array([1.0, 500.0, 999.0], np.float32)
  y = np.array([0, 3, 10])  # 10 = the null (CFG) label
  expect = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, y))["params"]
  assert jax.tree.structure(expect) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(expect), jax.tree.leaves(params), strict=True):
    assert a.shape == b.shape
  with torch.no_grad():
    want = (
      ref(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        timestep=torch.from_numpy(t),
        class_labels=torch.from_numpy(y),
      )
      .sample.numpy()
      .transpose(0, 2, 3, 1)
    )
  got = np.asarray(jax.jit(net.apply)({"params": params}, x, t, y))
  assert got.shape == (3, 8, 8, 8)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  # Per-block embedders that differ are not a DiT checkpoint.
  sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1.0
  with pytest.raises(ValueError, match="one conditioning embedder"):
    from_diffusers(sd)


def test_adaln_zero_starts_at_zero_and_checks_patches():
  net = DiT(patch_size=2, hidden=16, depth=1, num_heads=2, num_classes=3)
  x = jnp.ones((2, 4, 4, 3))
  params = jax.jit(net.init)(jax.random.key(0), x, jnp.ones((2,)), jnp.array([0, 3]))
  out = jax.jit(net.apply)(params, x, jnp.ones((2,)), jnp.array([0, 3]))
  np.testing.assert_array_equal(out, 0.0)
  with pytest.raises(ValueError, match="not divisible by patch_size=2"):
    net.apply(params, jnp.ones((1, 5, 4, 3)), jnp.ones((1,)), None)


def test_init_variances_follow_the_reference():
  """facebookresearch/DiT `initialize_weights`: the patch conv is xavier-uniform on its weight
  viewed as [D, C p^2] (variance 2 / (C p^2 + D)); q, k, v are one [D, 3D] xavier layer
  (variance 2 / (D + 3D) = 1 / (2D)); the MLP's [D, 4D] layers are xavier."""
  d, c, p = 256, 4, 2
  model = DiT(patch_size=p, hidden=d, depth=1, num_heads=4, num_classes=None)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, c)), jnp.zeros((1,)))["params"]

  def check(w, fan_in, fan_out):
    var = 2.0 / (fan_in + fan_out)
    np.testing.assert_allclose(np.var(np.asarray(w)), var, rtol=0.1)
    assert np.max(np.abs(w)) <= np.sqrt(3 * var)  # uniform on [-bound, bound]

  check(params["patch"]["kernel"], c * p * p, d)
  block = params["block0"]
  for name in "qkv":
    check(block[name]["kernel"], d, 3 * d)
  check(block["fc1"]["kernel"], d, 4 * d)


def test_bfloat16_residual_stream():
  """model.residual_dtype=bfloat16 carries the blocks' stream in bf16 (each branch still added
  in float32 and rounded once): per add a relative rounding of at most 2^-9, so with 2 blocks
  (4 adds) the output moves by well under 2 % of its scale, and it does move."""
  kw = dict(patch_size=2, hidden=32, depth=2, num_heads=2, num_classes=3, dtype=jnp.bfloat16)
  x, t, y = jax.random.normal(jax.random.key(1), (2, 8, 8, 4)), jnp.array([3.0, 700.0]), None
  params = DiT(**kw).init(jax.random.key(0), x, t, y)
  leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts at 0: draw every weight
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = tree.unflatten([0.2 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
  ref = DiT(**kw).apply(params, x, t, y)
  out, inter = DiT(**kw, residual_dtype=jnp.bfloat16).apply(
    params, x, t, y, capture_intermediates=True
  )
  assert out.dtype == ref.dtype == jnp.float32
  assert inter["intermediates"]["block0"]["__call__"][0].dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  assert 0 < err < 2e-2, err
