"""diffusers' `UNet1DModel` (the Dance Diffusion architecture) imported into jdiff's DanceUNet1D:
random weights saved with `save_pretrained`, the same outputs within 1e-4; the fixed cubic
resampling against diffusers' own Downsample1d / Upsample1d; unsupported configs are errors."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.unets import unet_1d_blocks

from jdiff.models import dance
from jdiff.pretrained import diffusers_unet1d
from jdiff.pretrained.mapping import PretrainedError

# A small Dance Diffusion: every block kind, attention with 32 and 64 channels (1 and 2 heads).
CONFIG = dict(
  sample_size=64,
  in_channels=2,
  out_channels=2,
  extra_in_channels=16,
  time_embedding_type="fourier",
  use_timestep_embedding=False,
  flip_sin_to_cos=True,
  down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
  up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
  mid_block_type="UNetMidBlock1D",
  block_out_channels=(8, 32, 64),
  time_embedding_dim=16,
)


def test_cubic_resampling_equals_diffusers():
  x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)  # [B, C, L]
  with torch.no_grad():
    down = unet_1d_blocks.Downsample1d("cubic")(torch.from_numpy(x)).numpy()
    up = unet_1d_blocks.Upsample1d("cubic")(torch.from_numpy(x)).numpy()
  xj = jnp.asarray(x.transpose(0, 2, 1))
  np.testing.assert_allclose(dance.downsample_cubic(xj), down.transpose(0, 2, 1), atol=1e-6)
  np.testing.assert_allclose(dance.upsample_cubic(xj), up.transpose(0, 2, 1), atol=1e-6)


def test_unet1d_import_same_outputs(tmp_path):
  torch.manual_seed(0)
  model = diffusers.UNet1DModel(**CONFIG).eval()
  with torch.no_grad():  # non-trivial GroupNorm affines and biases
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  module, params = diffusers_unet1d.load_unet1d(str(tmp_path))
  x = np.random.default_rng(1).standard_normal((2, 2, 64)).astype(np.float32)
  t = np.array([0.3, 0.9], np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
  out = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))(params, x.transpose(0, 2, 1), t)
  out = np.asarray(out).transpose(0, 2, 1)
  assert out.shape == ref.shape == (2, 2, 64)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  n_torch = sum(p.numel() for p in model.parameters())
  assert sum(a.size for a in jax.tree.leaves(params)) == n_torch  # every weight mapped once


def test_unsupported_unet1d_configs_name_the_key():
  with pytest.raises(PretrainedError, match="time_embedding_type"):
    diffusers_unet1d.dance_kwargs({**CONFIG, "time_embedding_type": "positional"})
  with pytest.raises(PretrainedError, match="DownResnetBlock1D"):
    diffusers_unet1d.dance_kwargs({**CONFIG, "down_block_types": ("DownResnetBlock1D",)})
  with pytest.raises(PretrainedError, match="out_block_type"):
    diffusers_unet1d.dance_kwargs({**CONFIG, "out_block_type": "OutConv1DBlock"})
