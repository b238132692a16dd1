"""Loading pretrained U-Nets: diffusers directories, hub names, ADM .pt files.

  model = load_pretrained("google/ddpm-cifar10-32")            # hub (huggingface_hub)
  model = load_pretrained("/models/ddpm-cifar10-32")           # local diffusers layout
  model = load_pretrained("/models/64x64_diffusion.pt", format="adm",
                          flags="--image_size 64 --num_channels 192 ...")
  out = model.module.apply({"params": model.params}, x, t, y, train=False)

A diffusers directory holds `config.json` with `diffusion_pytorch_model.safetensors`
(read with the `safetensors` package's numpy API: no torch) or `.bin` (needs torch),
and optionally `scheduler_config.json`; a pipeline directory holds them in `unet/` and
`scheduler/`. ADM checkpoints are torch `.pt` state dicts (need torch); their flags
come as a '--name value' string, a dict, or `flags.json` next to the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from jdiff.models.unet import UNet
from jdiff.pretrained import adm, diffusers_unet, mapping, schedulers
from jdiff.pretrained.mapping import PretrainedError

FORMATS = ("diffusers", "adm")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class LazySafetensors(Mapping):
  """A read-only {key: float32 numpy array} view of a .safetensors file, read key by key."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    self.path = path
    self._file = safe_open(path, framework="numpy")
    self._keys = list(self._file.keys())

  def __getitem__(self, key: str) -> np.ndarray:
    return np.asarray(self._file.get_tensor(key), dtype=np.float32)

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
      f"reading {path} needs torch (pip install torch); .safetensors does not"
    ) from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  return {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "float")}


def read_state_dict(path: str) -> Mapping[str, np.ndarray]:
  """A state dict from .safetensors (lazy, numpy only) or .bin / .pt / .pth / .ckpt (torch)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file {path}")
  if path.endswith(".safetensors"):
    return LazySafetensors(path)
  if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
    return _torch_load(path)
  raise PretrainedError(f"unknown weights format {path!r} (.safetensors, .bin, .pt, .pth)")


def looks_like_hub_name(name: str) -> bool:
  """'owner/name' that is not a local path."""
  parts = name.split("/")
  return len(parts) == 2 and all(parts) and not os.path.exists(name) and not name.startswith(".")


def hub_files(*, torch_weights: bool = False) -> list[str]:
  """The repository paths `hub_download` fetches (exact names: no wildcards)."""
  weights = list(WEIGHTS if torch_weights else WEIGHTS[:1])
  unet = ["config.json", *weights]
  scheduler = "scheduler_config.json"
  return [*unet, scheduler, *(f"unet/{f}" for f in unet), f"scheduler/{scheduler}"]


def hub_download(
  repo_id: str,
  *,
  revision: str | None = None,
  torch_weights: bool = False,
  patterns: list[str] | None = None,
) -> str:
  """Downloads (or finds cached) a hub repo's configs and weights; returns its local dir.

  Only the files `diffusers_files` reads, named (a pipeline repository's other
  components, its VAE or text encoder, are not fetched): `config.json`, the .safetensors
  weights and `scheduler_config.json` at the root, or in `unet/` and `scheduler/` for a
  pipeline; with `torch_weights` the .bin weights too; or exactly `patterns`.

  Raises:
    ImportError: huggingface_hub is not installed.
    OSError: the hub cannot be reached (offline) and nothing is cached, in one line.
  """
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
      f"loading {repo_id!r} by hub name needs huggingface_hub (pip install huggingface_hub); "
      "or pass a local directory"
    ) from None
  patterns = patterns or hub_files(torch_weights=torch_weights)
  try:
    return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001  (offline: several exception types, one message)
    raise OSError(
      f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}); check the network or pass a local directory"
    ) from None


def diffusers_files(directory: str) -> tuple[str, str, str | None]:
  """(config.json, weights file, scheduler_config.json or None) of a diffusers directory."""
  unet_dir = directory
  if not os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(
    os.path.join(directory, "unet")
  ):
    unet_dir = os.path.join(directory, "unet")
  config = os.path.join(unet_dir, "config.json")
  if not os.path.isfile(config):
    raise FileNotFoundError(f"{directory} is not a diffusers model directory: no config.json")
  weights = [
    os.path.join(unet_dir, w) for w in WEIGHTS if os.path.isfile(os.path.join(unet_dir, w))
  ]
  if not weights:
    raise FileNotFoundError(f"{unet_dir} has none of {list(WEIGHTS)}")
  sched = None
  for d in (unet_dir, directory, os.path.join(directory, "scheduler")):
    if os.path.isfile(os.path.join(d, "scheduler_config.json")):
      sched = os.path.join(d, "scheduler_config.json")
      break
  return config, weights[0], sched


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _scheduler_settings(scheduler: Mapping[str, Any], source: str):
  """`from_diffusers`, or None with a one-line warning when the config cannot be read:
  the U-Net is the same function without it (the run's own schedule is used)."""
  try:
    return schedulers.from_diffusers(scheduler)
  except (ValueError, TypeError, KeyError) as e:
    logging.warning(
      "pretrained %s: scheduler config %s not used (%s): the U-Net loads without its "
      "schedule and sampler settings (config.diffusion / config.sample apply)",
      source,
      scheduler.get("_class_name", "DDPMScheduler"),
      " ".join(str(e).split()),
    )
    return None


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """An imported U-Net: the module, its params, and everything to sample from it.

  Attributes:
    format: 'diffusers' or 'adm'.
    module: the `UNet` (the same function as the source model).
    params: its `params` collection.
    image_shape: (H, W, C) it was trained at.
    num_classes: class count (label `num_classes` is jdiff's null label) or None.
    settings: `schedulers.Settings`, or None if the source has no scheduler config.
    rules: the key mapping (for `state_dict`).
    source: where it came from.
  """

  format: str
  module: UNet
  params: Any
  image_shape: tuple[int, int, int]
  num_classes: int | None
  settings: schedulers.Settings | None
  rules: tuple
  source: str

  def state_dict(self, params=None) -> dict[str, np.ndarray]:
    """Exports `params` (default: the loaded ones) back to the source's state-dict keys."""
    return mapping.to_state_dict(self.params if params is None else params, self.rules)


def build(
  fmt: str,
  state_dict: Mapping[str, Any],
  *,
  config: Mapping[str, Any] | None = None,
  flags: Mapping[str, Any] | None = None,
  variant: str = "guided",
  scheduler: Mapping[str, Any] | None = None,
  shardings=None,
  source: str = "state dict",
  **module_overrides: Any,
) -> Pretrained:
  """Maps an in-memory state dict (diffusers `config` or ADM `flags`) to a `Pretrained`.

  Args:
    fmt: 'diffusers' (needs `config`, the config.json dict) or 'adm' (needs `flags`).
    state_dict: {key: array}.
    variant: ADM defaults, 'guided' or 'improved'.
    scheduler: a scheduler_config.json dict (diffusers) for `settings`.
    shardings: see `mapping.to_params` (None, a Sharding, a pytree or a callable).
    **module_overrides: UNet fields that do not change the function's parameters, e.g.
      dtype, conv_impl, remat.
  """
  if fmt == "diffusers":
    if config is None:
      raise PretrainedError("format 'diffusers' needs the config.json dict")
    kwargs, shape = diffusers_unet.unet_kwargs(config)
    settings = _scheduler_settings(scheduler, source) if scheduler is not None else None
  elif fmt == "adm":
    if flags is None:
      raise PretrainedError("format 'adm' needs the model's flags")
    kwargs, shape = adm.unet_kwargs(flags, variant=variant)
    settings = schedulers.from_adm(flags, variant=variant)
  else:
    raise PretrainedError(f"format must be one of {FORMATS}, got {fmt!r}")
  module = UNet(**{**kwargs, **module_overrides})
  sample = jax.ShapeDtypeStruct((1, *shape), np.float32)
  # Traced with XLA's convs: the same params as Winograd's (UNet.conv_impl), 3x faster to trace.
  shapes = mapping.param_shapes(
    module.clone(conv_impl="xla", remat=False),
    sample,
    conditional=kwargs["num_classes"] is not None,
  )
  if fmt == "diffusers":
    deprecated = diffusers_unet.uses_deprecated_attention(state_dict.keys())
    rules = diffusers_unet.rules(
      kwargs,
      shapes,
      deprecated_attention=deprecated,
      linear_projection=bool(config.get("use_linear_projection", False)),
    )
  else:
    new_order = bool(adm.complete_flags(flags, variant=variant)["use_new_attention_order"])
    rules = adm.rules(kwargs, shapes, new_attention_order=new_order)
  params = mapping.to_params(state_dict, rules, shapes, shardings=shardings, what=source)
  return Pretrained(
    fmt, module, params, shape, kwargs["num_classes"], settings, tuple(rules), source
  )


def load_pretrained(
  path: str,
  *,
  format: str = "diffusers",  # noqa: A002  (the config key's name)
  flags: str | Mapping[str, Any] | None = None,
  variant: str = "guided",
  revision: str | None = None,
  shardings=None,
  **module_overrides: Any,
) -> Pretrained:
  """Loads a pretrained U-Net from a local directory / file or a hub name.

  Args:
    path: a diffusers directory (or pipeline directory with `unet/`), a hub name such as
      'google/ddpm-cifar10-32' (format 'diffusers'), or an ADM .pt file (or a directory
      holding one .pt and `flags.json`).
    format: 'diffusers' or 'adm'.
    flags: ADM model/diffusion flags: '--name value ...' or a dict; overrides flags.json.
    variant: ADM defaults for omitted flags: 'guided' or 'improved'.
    revision: hub revision.
    shardings: where each param goes (see `mapping.to_params`).
    **module_overrides: e.g. dtype=jnp.bfloat16, conv_impl='xla', remat=True.
  """
  if format not in FORMATS:
    raise PretrainedError(f"pretrained format must be one of {FORMATS}, got {format!r}")
  if format == "diffusers":
    directory = path
    if not os.path.exists(path):
      if not looks_like_hub_name(path):
        raise FileNotFoundError(f"{path!r} is neither a local directory nor a hub name owner/name")
      directory = hub_download(path, revision=revision)
      try:
        diffusers_files(directory)
      except FileNotFoundError:  # a repo without .safetensors: its .bin (needs torch)
        directory = hub_download(path, revision=revision, torch_weights=True)
    config, weights, sched = diffusers_files(directory)
    return build(
      "diffusers",
      read_state_dict(weights),
      config=_read_json(config),
      scheduler=_read_json(sched) if sched else None,
      shardings=shardings,
      source=weights,
      **module_overrides,
    )
  file, all_flags = path, {}
  if os.path.isdir(path):
    pts = sorted(f for f in os.listdir(path) if f.endswith((".pt", ".pth", ".safetensors")))
    if len(pts) != 1:
      raise FileNotFoundError(f"{path} must hold exactly one .pt/.safetensors file, has {pts}")
    file = os.path.join(path, pts[0])
    if os.path.isfile(os.path.join(path, "flags.json")):
      all_flags = _read_json(os.path.join(path, "flags.json"))
  if isinstance(flags, str):
    flags = adm.parse_flags(flags)
  all_flags.update(flags or {})
  if not all_flags:
    raise PretrainedError(
      f"ADM weights {file} need their flags (config.pretrained.flags or flags.json)"
    )
  return build(
    "adm",
    read_state_dict(file),
    flags=all_flags,
    variant=variant,
    shardings=shardings,
    source=file,
    **module_overrides,
  )
