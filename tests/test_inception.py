"""The Flax FID InceptionV3 against pytorch-fid's torch network with random weights."""

from __future__ import annotations

from unittest import mock

import jax
import numpy as np
import pytest

from jdiff.configs import default
from jdiff.models import inception, inception_convert
from jdiff.runs import feature_nets

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")


@pytest.fixture(scope="module")
def torch_fid():
  """(pytorch-fid's InceptionV3 [block 3], its state dict as numpy) with random weights.

  `fid_inception_v3` downloads the FID weights with `load_state_dict_from_url`; the patch
  returns the network's own state dict instead, randomised so that the signal survives
  all 94 convolutions: Kaiming-normal kernels (std sqrt(2 / fan_in), for the ReLUs), and
  BatchNorm statistics and affine parameters of order one. With torch's default init the
  activations die out and pool3 is the last biases alone, the same for every input. The
  classifier's bias is random too, so a score that used it would show.
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
      elif k.endswith("conv.weight") or k == "fc.weight":
        sd[k] = torch.randn(v.shape, generator=g) * np.sqrt(2 / v[0].numel())
      elif k == "fc.bias":
        sd[k] = torch.randn(v.shape, generator=g)
    built["sd"] = sd
    return sd

  with (
    mock.patch.object(pfi, "_inception_v3", capture),
    mock.patch.object(pfi, "load_state_dict_from_url", own_state_dict),
  ):
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  return model, {k: v.numpy() for k, v in built["sd"].items()}


@pytest.fixture(scope="module")
def samples():
  """Float samples [2, 40, 40, 3], some outside [-1, 1], and their PNG pixels (uint8, as
  `jdiff.training.writers.image_grid` stores them), computed here with numpy."""
  x = np.random.default_rng(0).uniform(-1.1, 1.1, (2, 40, 40, 3)).astype(np.float32)
  return x, np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def _pytorch_fid_pool3(model, u8, *, normalize_input=True):
  """pytorch-fid's pool3 [B, 2048] of uint8 images as it reads PNGs: ToTensor's u / 255."""
  x = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
  model.normalize_input = normalize_input
  try:
    with torch.no_grad():
      return model(x)[0][:, :, 0, 0].numpy()
  finally:
    model.normalize_input = True


@pytest.fixture(scope="module")
def jdiff_scores(torch_fid, samples, tmp_path_factory):
  """jdiff's FID feature network (`load_feature_net`, config.eval's defaults) on the float
  samples: (pool3 [2, 2048], probabilities [2, 1008]). Its weights go through the .pth ->
  .npz conversion a user would run."""
  _, sd = torch_fid
  tmp = tmp_path_factory.mktemp("inception")
  pth = str(tmp / "random_fid_inception.pth")
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  npz = str(tmp / "w.npz")
  inception_convert.main(["convert", pth, npz])
  c = default.get_config()
  c.eval.feature_net, c.eval.inception_weights = "inception", npz
  net = feature_nets.load_feature_net(c, (40, 40, 3))
  feats, probs = jax.jit(net.apply)(net.params, samples[0])
  return np.asarray(feats), np.asarray(probs)


def _softmax(logits):
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def _assert_close(got, want):
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)


def test_port_matches_pytorch_fid_on_pngs(torch_fid, samples, jdiff_scores):
  """Float samples score what pytorch-fid gives for their PNGs (the 299 resize included),
  to ~1e-4: pool3, and the Inception Score's softmax(pool3 @ W) without the classifier's
  bias (Salimans et al.; ADM's evaluator), written out in numpy."""
  model, sd = torch_fid
  pool = _pytorch_fid_pool3(model, samples[1])
  assert np.abs(pool[0] - pool[1]).max() > 1e-2 * np.abs(pool).max()  # the signal survives
  feats, probs = jdiff_scores
  _assert_close(feats, pool)
  logits = pool.astype(np.float64) @ sd["fc.weight"].T.astype(np.float64)
  np.testing.assert_allclose(probs, _softmax(logits), atol=1e-5)
  # the classifier's bias changes them well beyond that: the test sees it
  assert np.abs(_softmax(logits + sd["fc.bias"]) - probs).max() > 1e-2


def test_wrong_input_scaling_fails_the_comparison(torch_fid, samples, jdiff_scores):
  """pytorch-fid without its 2x - 1 input scaling moves pool3 far outside the tolerance
  (with torch's default init it moved by 1e-6: the comparison could not see it)."""
  model, _ = torch_fid
  right = _pytorch_fid_pool3(model, samples[1])
  wrong = _pytorch_fid_pool3(model, samples[1], normalize_input=False)
  assert np.abs(wrong - right).max() > 0.05 * np.abs(right).max()
  with pytest.raises(AssertionError):
    _assert_close(jdiff_scores[0], wrong)


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
  assert set(params["fc"]) == {"kernel"}  # the Inception Score does not use the bias
  with_bias = str(tmp_path / "with_fc_bias.npz")
  np.savez(with_bias, **inception_convert.flatten(params), **{"fc.bias": sd["fc.bias"]})
  jax.tree.map(
    np.testing.assert_array_equal, inception_convert.load_inception_params(with_bias), params
  )
  net = inception.InceptionV3(conv_impl="auto")  # resolved inside: winograd on this CPU
  shapes = jax.eval_shape(net.init, jax.random.key(0), np.zeros((1, 75, 75, 3)))
  assert jax.tree.map(lambda s: s.shape, shapes["params"]) == jax.tree.map(np.shape, params)
  with pytest.raises(ValueError, match="config.eval.inception_weights is empty"):
    inception_convert.load_inception_params("")
  with pytest.raises(FileNotFoundError, match="nowhere.npz"):
    inception_convert.load_inception_params(str(tmp_path / "nowhere.npz"))
  with pytest.raises(ValueError, match="lacks"):
    inception_convert.convert_state_dict(
      {k: v for k, v in sd.items() if "Mixed_7c" not in k or "bn" not in k}
    )
