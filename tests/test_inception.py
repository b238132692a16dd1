"""The Flax FID InceptionV3 against pytorch-fid's torch network with random weights."""

from __future__ import annotations

from unittest import mock

import jax
import numpy as np
import pytest

from jdiff.models import inception, inception_convert

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")


@pytest.fixture(scope="module")
def torch_fid():
  """(pytorch-fid's InceptionV3 [block 3], its state dict as numpy) with random weights.

  `fid_inception_v3` downloads the FID weights with `load_state_dict_from_url`; the patch
  returns the network's own random state dict instead, with BatchNorm statistics and
  affine parameters randomised too (they are identity at init and would test nothing).
  """
  torch.manual_seed(0)
  built = {}
  make = pfi._inception_v3

  def capture(*args, **kwargs):
    built["net"] = make(*args, **kwargs)
    return built["net"]

  def own_state_dict(url, progress=True):
    del url, progress
    g = torch.Generator().manual_seed(1)
    sd = built["net"].state_dict()
    for k, v in sd.items():
      if k.endswith("running_mean") or k.endswith("bn.bias"):
        sd[k] = 0.1 * torch.randn(v.shape, generator=g)
      elif k.endswith("running_var") or k.endswith("bn.weight"):
        sd[k] = 0.5 + torch.rand(v.shape, generator=g)
    built["sd"] = sd
    return sd

  with (
    mock.patch.object(pfi, "_inception_v3", capture),
    mock.patch.object(pfi, "load_state_dict_from_url", own_state_dict),
  ):
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  return model, {k: v.numpy() for k, v in built["sd"].items()}


def test_port_matches_pytorch_fid(torch_fid, tmp_path):
  """pool3 and logits on 2 images of 40x40 (the 299 resize included) to ~1e-4 relative;
  the weights go through the .pth -> .npz conversion a user would run."""
  model, sd = torch_fid
  pth = str(tmp_path / "random_fid_inception.pth")
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  npz = str(tmp_path / "w.npz")
  inception_convert.main(["convert", pth, npz])
  params = inception_convert.load_inception_params(npz)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 40, 40, 3)).astype(np.float32)
  with torch.no_grad():  # pytorch-fid takes [0, 1] NCHW
    pool = model(torch.from_numpy((x.transpose(0, 3, 1, 2) + 1) / 2))[0][:, :, 0, 0]
    logits = torch.nn.functional.linear(
      pool, torch.tensor(sd["fc.weight"]), torch.tensor(sd["fc.bias"])
    )
  net = inception.InceptionV3(conv_impl="winograd")  # config.eval's default
  got_pool, got_logits = jax.jit(lambda p, x: net.apply({"params": p}, x))(params, x)
  for got, want in ((got_pool, pool.numpy()), (got_logits, logits.numpy())):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)


@pytest.mark.parametrize("size_in,size_out", [(7, 5), (5, 11), (16, 299)])
def test_resize_matches_torch_bilinear(size_in, size_out):
  x = np.random.default_rng(size_in).normal(size=(2, size_in, size_in + 1, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(
    torch.from_numpy(x.transpose(0, 3, 1, 2)),
    size=(size_out, size_out),
    mode="bilinear",
    align_corners=False,
  ).numpy()
  got = np.asarray(inception.resize_bilinear(x, size_out)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_weight_files(torch_fid, tmp_path):
  _, sd = torch_fid
  params = inception_convert.convert_state_dict(sd)
  for suffix in ("npz", "safetensors"):
    path = inception_convert.save_params(str(tmp_path / f"w.{suffix}"), params)
    back = inception_convert.load_inception_params(path)
    jax.tree.map(np.testing.assert_array_equal, back, params)
  shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), np.zeros((1, 75, 75, 3)))
  assert jax.tree.map(lambda s: s.shape, shapes["params"]) == jax.tree.map(np.shape, params)
  with pytest.raises(ValueError, match="config.eval.inception_weights is empty"):
    inception_convert.load_inception_params("")
  with pytest.raises(FileNotFoundError, match="nowhere.npz"):
    inception_convert.load_inception_params(str(tmp_path / "nowhere.npz"))
  with pytest.raises(ValueError, match="lacks"):
    inception_convert.convert_state_dict(
      {k: v for k, v in sd.items() if "Mixed_7c" not in k or "bn" not in k}
    )
