"""diffusers' `UNet1DModel` (Dance Diffusion; config.json + weights) -> `jdiff.models.dance`.

Module correspondence (diffusers -> jdiff; the blocks keep diffusers' names):

  time_proj.weight                               time_proj_weight
  {down,up}_blocks.i / mid_block                 {down,up}_blocks_i / mid_block
  .resnets.j.{conv_1,conv_2,conv_skip}           resnets_j/{conv_1,conv_2,conv_skip}
                                                 (weights [O, I, K] -> kernels [K, I, O])
  .resnets.j.group_norm_{1,2}                    resnets_j/group_norm_{1,2}/norm
  .attentions.j.{group_norm,query,key,value,proj_attn}
                                                 attentions_j/{norm,q,k,v,proj_out}

What `DanceUNet1D` cannot express is a `PretrainedError` naming the config key (positional time
embeddings, a time MLP, an out block, other block types).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.dance import CUBIC, DOWN_BLOCKS, UP_BLOCKS, DanceUNet1D
from jdiff.pretrained import load, mapping
from jdiff.pretrained.mapping import PretrainedError, Rule

# (key, value DanceUNet1D needs) of UNet1DModel's config
REQUIRED = {
  "time_embedding_type": "fourier",
  "use_timestep_embedding": False,
  "mid_block_type": "UNetMidBlock1D",
  "out_block_type": None,
}
FIELDS = (
  "in_channels",
  "out_channels",
  "extra_in_channels",
  "time_embedding_dim",
  "flip_sin_to_cos",
  "down_block_types",
  "up_block_types",
  "block_out_channels",
)


def dance_kwargs(config: Mapping[str, Any]) -> dict:
  """DanceUNet1D's constructor arguments from a UNet1DModel config.json (checked)."""
  for key, want in REQUIRED.items():
    if config.get(key, want) != want:
      raise PretrainedError(
        f"UNet1DModel config {key}={config[key]!r}: jdiff imports only {want!r}"
      )
  for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
    bad = [b for b in config.get(key, ()) if b not in allowed]
    if bad:
      raise PretrainedError(f"UNet1DModel config {key} has {bad}; jdiff imports {allowed}")
  kw = {k: config[k] for k in FIELDS if k in config}
  for k in ("down_block_types", "up_block_types", "block_out_channels"):
    if k in kw:
      kw[k] = tuple(kw[k])
  extra = kw.get("extra_in_channels", 0)
  dim = kw.get("time_embedding_dim") or 2 * kw.get("block_out_channels", (32,))[0]
  if extra and extra != dim:
    raise PretrainedError(
      f"UNet1DModel extra_in_channels={extra} must equal the {dim} time features"
    )
  return kw


def _conv1d(key: str, path: tuple) -> Rule:
  """A Conv1d weight [O, I, K] <-> a flax 1-D kernel [K, I, O]."""
  t = lambda w: np.transpose(w, (2, 1, 0))  # noqa: E731 (its own inverse)
  return Rule((key,), (path,), lambda w: (t(w),), lambda w: (t(w),))


ATTENTION_NAMES = {"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def torch_key(path: tuple) -> str:
  """diffusers' state-dict key of a DanceUNet1D param path (module docstring)."""
  if path == ("time_proj_weight",):
    return "time_proj.weight"
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"(down_blocks|up_blocks|resnets|attentions)_(\d+)", p)
    parts += [m[1], m[2]] if m else [p]
  if parts[-1] == "norm":  # GroupNorm32 wraps an nn.GroupNorm named 'norm'
    parts.pop()
    parts[-1] = "group_norm" if parts[-1] == "norm" else parts[-1]
  if "attentions" in parts:
    parts[-1] = ATTENTION_NAMES.get(parts[-1], parts[-1])
  leaf = "bias" if path[-1] == "bias" else "weight"
  return ".".join([*parts, leaf])


def rules(shapes: Mapping[tuple, tuple]) -> list[Rule]:
  """One rule per parameter of a DanceUNet1D with these param shapes ({path: shape})."""
  out = []
  for path, shape in shapes.items():
    key = torch_key(path)
    if path[-1] == "kernel" and len(shape) == 3:
      out.append(_conv1d(key, path))
    elif path[-1] == "kernel":
      out.append(mapping.dense(key, path))
    else:
      out.append(mapping.same(key, path))
  return out


def _without_kernels(state: Mapping[str, Any], what: str) -> dict:
  """The state dict without the resamplers' fixed kernel buffers (`*.down.kernel`,
  `*.up.kernel`), after checking they are the cubic kernel DanceUNet1D has built in."""
  out = {}
  for key in state.keys():
    if key.endswith((".down.kernel", ".up.kernel")):
      want = CUBIC * (2 if key.endswith(".up.kernel") else 1)
      if not np.allclose(np.asarray(state[key], np.float64), want, atol=1e-7):
        raise PretrainedError(f"{what}: {key} is not diffusers' 'cubic' kernel")
    else:
      out[key] = state[key]
  return out


def load_unet1d(directory: str) -> tuple[DanceUNet1D, Any]:
  """(module, params) of a diffusers UNet1DModel directory (`save_pretrained`'s files)."""
  config_path, weights, _ = load.diffusers_files(directory)
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  module = DanceUNet1D(**dance_kwargs(config))
  n = 2 ** (len(module.down_block_types) + 1)
  x = jax.ShapeDtypeStruct((1, n, module.in_channels), jnp.float32)
  tree = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, jnp.zeros((1,))), x)["params"]
  flat = {
    tuple(p.key for p in k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }
  state = load.read_state_dict(weights)
  params = mapping.to_params(_without_kernels(state, weights), rules(flat), flat, what=weights)
  return module, params
