"""Cross-attention U-Nets imported from diffusers' `UNet2DConditionModel` are the same
functions (random weights, tiny SD 1.x- and 2.x-shaped configs), round trip exactly, and a
whole tiny `StableDiffusionPipeline` gives the same image (jdiff.pretrained.stable_diffusion).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.pretrained import PretrainedError, build, diffusers_unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# SD 1.x: conv projections, one head count for every level (diffusers' attention_head_dim).
SD1 = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  block_out_channels=(16, 32),
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=12,
  attention_head_dim=2,
  norm_num_groups=8,
)
# SD 2.x: linear projections, heads per level, two transformer blocks, attention everywhere.
SD2 = dict(
  SD1,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  attention_head_dim=(2, 4),
  use_linear_projection=True,
  transformer_layers_per_block=2,
)


def perturbed(module):
  """Random weights everywhere (diffusers zero-inits nothing, but make biases non-trivial)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return module.eval()


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_condition_unet_same_function_and_exact_round_trip(cfg):
  model = perturbed(diffusers.UNet2DConditionModel(**cfg))
  config = dict(model.config)
  config["_class_name"] = "UNet2DConditionModel"
  pt = build("diffusers", _state_dict(model), config=config, conv_impl="xla")
  heads = cfg["attention_head_dim"]
  heads = (heads,) * 2 if isinstance(heads, int) else heads
  assert pt.module.attention_head_dim == tuple(c // h for c, h in zip((16, 32), heads))
  rs = np.random.RandomState(1)
  x = rs.randn(2, 4, 8, 8).astype(np.float32)
  ctx = rs.randn(2, 5, 12).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  t = np.array([3, 999])
  apply = jax.jit(lambda p, x, t, c: pt.module.apply({"params": p}, x, t, c, train=False))
  for m in (None, mask):
    with torch.no_grad():
      ref = model(
        torch.from_numpy(x),
        torch.from_numpy(t),
        torch.from_numpy(ctx),
        encoder_attention_mask=None if m is None else torch.from_numpy(m),
      ).sample.numpy()
    cond = ctx if m is None else {"context": ctx, "mask": m}
    out = apply(pt.params, x.transpose(0, 2, 3, 1), t, cond)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
  sd, ref_sd = pt.state_dict(), _state_dict(model)
  assert sorted(sd) == sorted(ref_sd)
  for k, v in ref_sd.items():
    np.testing.assert_array_equal(sd[k], v, err_msg=k)


def test_condition_unet_unsupported_options_are_clear_errors():
  with pytest.raises(PretrainedError, match="addition_embed_type"):
    diffusers_unet.unet_kwargs(
      {"_class_name": "UNet2DConditionModel", **SD1, "addition_embed_type": "text_time"}
    )
  with pytest.raises(PretrainedError, match="transformer_layers_per_block"):
    diffusers_unet.unet_kwargs(
      {"_class_name": "UNet2DConditionModel", **SD1, "transformer_layers_per_block": [1, 2]}
    )


def test_context_shape_is_checked():
  from jdiff.models.unet import UNet

  net = UNet(
    ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), num_groups=8, context_dim=6
  )
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match=r"context must have shape \[B, L, context_dim\]"):
    net.init(jax.random.key(0), x, jnp.zeros(2), jnp.zeros((2, 3, 5)), train=False)
