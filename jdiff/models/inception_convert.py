"""Weights of the FID InceptionV3: pytorch-fid's `.pth` -> jdiff's `.npz` / `.safetensors`.

pytorch-fid downloads `pt_inception-2015-12-05-6726825d.pth` (its `FID_WEIGHTS_URL`); no
download is possible here, so the weights are always a local file:

  python -m jdiff.models.inception_convert pt_inception-2015-12-05-6726825d.pth inception.npz

Only that conversion needs torch (to unpickle the `.pth`); `.npz` and `.safetensors`
files, which this module writes, load with numpy alone, so cluster jobs never import
torch. Each torch BasicConv2d (conv without bias + BatchNorm2d with eps 1e-3) is folded
into one convolution with a bias:

  kernel = W^T * gamma / sqrt(var + eps),  bias = beta - mean * gamma / sqrt(var + eps).

The classifier keeps its weight alone: the Inception Score uses pool3 @ W, not its bias
(`jdiff.models.inception`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import jax
import numpy as np

from jdiff.io import atomic_write

BN_EPS = 1e-3  # torchvision's BasicConv2d
SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """pytorch-fid's FID Inception state dict (numpy arrays) -> Flax params of `InceptionV3`.

  Raises:
    ValueError: naming missing or unused keys.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  params: dict = {}
  used = set()
  convs = sorted({k[: -len(".conv.weight")] for k in sd if k.endswith(".conv.weight")})
  for prefix in convs:
    keys = [f"{prefix}.conv.weight"] + [
      f"{prefix}.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")
    ]
    missing = [k for k in keys if k not in sd]
    if missing:
      raise ValueError(f"state dict lacks {missing}")
    w, gamma, beta, mean, var = (sd[k].astype(np.float64) for k in keys)
    used.update(keys)
    scale = gamma / np.sqrt(var + BN_EPS)
    node = params
    for part in prefix.split("."):
      node = node.setdefault(part, {})
    node["conv"] = {
      "kernel": (w.transpose(2, 3, 1, 0) * scale).astype(np.float32),
      "bias": (beta - mean * scale).astype(np.float32),
    }
  if "fc.weight" not in sd:
    raise ValueError("state dict lacks 'fc.weight' (the 1008-way classifier)")
  used.update(("fc.weight", "fc.bias"))  # the bias is read past: see the module docstring
  params["fc"] = {"kernel": sd["fc.weight"].T.astype(np.float32)}
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f"state dict has keys the FID Inception does not use: {unused[:8]}")
  return params


def flatten(params) -> dict[str, np.ndarray]:
  """{dotted name: array} of a params tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {".".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in flat}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  params: dict = {}
  for name, value in flat.items():
    node = params
    *parents, leaf = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value, np.float32)
  return params


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch `.pth` state dict to numpy (the only function that imports torch)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"converting {path} needs torch; convert it once where torch is installed with "
      "`python -m jdiff.models.inception_convert IN.pth OUT.npz` and point to the .npz"
    ) from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def save_params(path: str, params) -> str:
  """Writes params as `.npz` or `.safetensors` (flat dotted names); returns the path."""
  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flatten(params).items()}
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    return atomic_write(path, lambda p: save_file(flat, p), overwrite=True)
  if not path.endswith(".npz"):
    raise ValueError(f"output must end in .npz or .safetensors, got {path!r}")

  def write(p):
    with open(p, "wb") as f:
      np.savez(f, **flat)

  return atomic_write(path, write, overwrite=True)


def load_inception_params(path: str, *, what: str = "config.eval.inception_weights") -> dict:
  """Flax params of `InceptionV3` from a `.npz`/`.safetensors` (numpy only) or a `.pth`.

  Raises:
    ValueError: no file configured (`path` empty) or an unknown suffix.
    FileNotFoundError: naming the missing file.
  """
  if not path:
    raise ValueError(
      f"{what} is empty: the FID Inception needs its weights from a local file, "
      "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or the .npz/.safetensors that "
      "`python -m jdiff.models.inception_convert IN.pth OUT.npz` writes"
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what}={path!r}: Inception weights file not found")
  if path.endswith((".npz", ".safetensors")):
    return unflatten({k: v for k, v in _read_flat(path).items() if k != "fc.bias"})
  if path.endswith((".pth", ".pt")):
    return convert_state_dict(load_torch_state_dict(path))
  raise ValueError(f"{what}={path!r}: expected one of {SUFFIXES}")


def _read_flat(path: str) -> dict[str, np.ndarray]:
  """{dotted name: array} of a `.npz` / `.safetensors` file (one may hold an `fc.bias`,
  which the network does not use; the caller skips it)."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    return load_file(path)
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit(f"usage: python -m jdiff.models.inception_convert IN.pth OUT.npz\ngot {argv}")
  params = convert_state_dict(load_torch_state_dict(argv[1]))
  print("wrote", save_params(argv[2], params))


if __name__ == "__main__":
  main(sys.argv)
