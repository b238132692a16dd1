"""State-dict mapping of `AutoencoderKL` params to and from LDM / diffusers key names.

The Flax parameter tree (`params` collection) mirrors the LDM state dict:

  encoder/conv_in, encoder/down_{i}/block_{j}/{norm1,conv1,norm2,conv2,nin_shortcut},
  encoder/down_{i}/downsample/conv, encoder/mid/{block_1,attn_1,block_2},
  encoder/mid/attn_1/{norm,q,k,v,proj_out}, encoder/{norm_out,conv_out},
  decoder/conv_in, decoder/mid/..., decoder/up_{i}/block_{j}/...,
  decoder/up_{i}/upsample/conv, decoder/{norm_out,conv_out},
  quant_conv, post_quant_conv.

A flax path maps to an LDM key by writing `down_{i}`, `up_{i}`, `block_{j}` (outside
`mid`) as `down.{i}`, `up.{i}`, `block.{j}`, joining with '.', and renaming the leaf
`kernel`/`scale` to `weight` (see `ldm_key`). E.g.
`encoder/down_0/block_0/conv1/kernel` <-> `encoder.down.0.block.0.conv1.weight`,
`decoder/up_3/upsample/conv/bias` <-> `decoder.up.3.upsample.conv.bias`,
`encoder/mid/attn_1/q/kernel` <-> `encoder.mid.attn_1.q.weight`. Note that, as in
LDM, `decoder.up.{i}` is indexed by resolution level (i = 0 is the finest), not by
execution order.

Conv weights are OIHW [O, I, kh, kw] in the state dicts and HWIO [kh, kw, I, O] in flax.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022 (CompVis `ldm/models/autoencoder.py`; diffusers `AutoencoderKL`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.autoencoder import AutoencoderKL

PyTree = Any

_INDEXED = re.compile(r"^(down|up|block)_(\d+)$")


def ldm_key(path: Sequence[str]) -> str:
  """Maps a flax param path (tuple of names) to its LDM state-dict key.

  E.g. ('encoder', 'down_0', 'block_1', 'conv1', 'kernel') ->
  'encoder.down.0.block.1.conv1.weight'.
  """
  parts = []
  for i, name in enumerate(path[:-1]):
    m = _INDEXED.match(name)
    if m and not (i > 0 and path[i - 1] == "mid"):
      parts.extend(m.groups())
    else:
      parts.append(name)
  leaf = path[-1]
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
  return ".".join(parts)


def _param_shapes(config: AutoencoderKL) -> dict[tuple[str, ...], tuple[int, ...]]:
  if not isinstance(config, AutoencoderKL):
    raise TypeError(f"config must be an AutoencoderKL, got {type(config).__name__}")
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: config.init(jax.random.key(0), x, sample_posterior=False), x)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes["params"]))
  return {k: tuple(v.shape) for k, v in flat.items()}


def ldm_state_dict_keys(config: AutoencoderKL) -> list[str]:
  """The LDM state-dict keys (without prefix) that `config`'s params map to, sorted."""
  return sorted(ldm_key(p) for p in _param_shapes(config))


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":  # HWIO -> OIHW.
    return np.transpose(value, (3, 2, 0, 1))
  return value


def ldm_state_dict_from_params(params: PyTree, *, prefix: str = "") -> dict[str, np.ndarray]:
  """Inverse of `params_from_ldm_state_dict`: flax params -> LDM-named numpy arrays.

  Args:
    params: the `params` collection of an `AutoencoderKL` (not the outer variables
      dict).
    prefix: prepended to every key, e.g. 'first_stage_model.' for a full SD checkpoint.

  Returns:
    {key: array} with conv weights OIHW [O, I, kh, kw] and GroupNorm `weight`/`bias`.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return {prefix + ldm_key(p): _to_torch_layout(p, np.asarray(v)) for p, v in flat.items()}


def params_from_ldm_state_dict(
  state_dict: Mapping[str, Any], *, config: AutoencoderKL, prefix: str = ""
) -> dict[str, Any]:
  """Maps an LDM / CompVis (or `ldm_state_dict_from_diffusers`-renamed) state dict.

  Conv weights OIHW [O, I, kh, kw] become flax kernels HWIO [kh, kw, I, O]; the
  attention q/k/v/proj_out weights may also be linear [O, I] (diffusers' layout);
  GroupNorm `weight` becomes `scale`. Keys are listed by `ldm_state_dict_keys`, e.g.
  `encoder.down.0.block.0.conv1.weight`, `encoder.mid.attn_1.q.weight`,
  `decoder.up.3.upsample.conv.bias`, `quant_conv.weight`.

  Args:
    state_dict: {key: array-like} (numpy, or anything `np.asarray` accepts; convert
      torch tensors with `t.float().numpy()` first, since numpy has no bfloat16).
    config: the `AutoencoderKL` whose params to build (defines expected keys/shapes).
    prefix: only keys starting with it are used, with it stripped (e.g.
      'first_stage_model.' for a full SD checkpoint); others are ignored, as are
      LDM training-only keys starting with 'loss.' (LPIPS, discriminator, logvar).

  Returns:
    The float32 `params` collection; use as `module.apply({'params': params}, ...)`.

  Raises:
    ValueError: missing or unexpected keys, or a shape mismatch (naming the key).
  """
  shapes = _param_shapes(config)
  sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
  sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
  by_key = {ldm_key(p): p for p in shapes}
  missing = sorted(set(by_key) - set(sd))
  unexpected = sorted(set(sd) - set(by_key))
  if missing or unexpected:
    raise ValueError(
      f"state dict does not match the config: missing keys {missing[:10]}"
      f"{' ...' if len(missing) > 10 else ''}, unexpected keys "
      f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
    )
  flat = {}
  for key, path in by_key.items():
    value = np.asarray(sd[key], dtype=np.float32)
    if path[-1] == "kernel":
      if value.ndim == 2:  # Linear [O, I] (diffusers attention) -> 1x1 conv.
        value = value[:, :, None, None]
      if value.ndim != 4:
        raise ValueError(f"{prefix}{key}: expected a 4-d conv weight, got shape {value.shape}")
      value = np.transpose(value, (2, 3, 1, 0))
    if value.shape != shapes[path]:
      raise ValueError(
        f"{prefix}{key}: shape {value.shape} (after transposing to flax "
        f"layout) != expected {shapes[path]}"
      )
    flat[path] = jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


_DIFFUSERS_ATTN = {
  "group_norm": "norm",
  "to_q": "q",
  "to_k": "k",
  "to_v": "v",
  "to_out.0": "proj_out",
  "query": "q",
  "key": "k",
  "value": "v",
  "proj_attn": "proj_out",
}


def ldm_state_dict_from_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames a diffusers `AutoencoderKL` state dict to LDM keys (values untouched).

  diffusers -> LDM: `{enc,dec}oder.conv_norm_out` -> `norm_out`;
  `encoder.down_blocks.i.resnets.j` -> `encoder.down.i.block.j`;
  `downsamplers.0` -> `downsample`; `decoder.up_blocks.i` -> `decoder.up.{L-1-i}`
  (diffusers counts up blocks in execution order); `upsamplers.0` -> `upsample`;
  `mid_block.resnets.{0,1}` -> `mid.block_{1,2}`; `mid_block.attentions.0` -> `mid.attn_1`
  with `group_norm/to_q/to_k/to_v/to_out.0` (or the older `query/key/value/proj_attn`)
  -> `norm/q/k/v/proj_out`; `conv_shortcut` -> `nin_shortcut`. Attention weights stay
  linear [O, I]; `params_from_ldm_state_dict` accepts that.

  Raises:
    ValueError: a key it does not recognise.
  """
  ups = {int(m.group(1)) for k in state_dict if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
  num_levels = max(ups) + 1 if ups else 0
  out = {}
  for key, value in state_dict.items():
    k = key
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(
      r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k
    )
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.", k)
    if m:
      level = num_levels - 1 - int(m.group(1))
      k = re.sub(r"^decoder\.up_blocks\.\d+\.resnets\.(\d+)\.", rf"decoder.up.{level}.block.\1.", k)
      k = re.sub(r"^decoder\.up_blocks\.\d+\.upsamplers\.0\.", rf"decoder.up.{level}.upsample.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2.", k)
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
    if m:
      if m.group(2) not in _DIFFUSERS_ATTN:
        raise ValueError(f"unrecognised diffusers attention key {key!r}")
      k = f"{m.group(1)}.mid.attn_1.{_DIFFUSERS_ATTN[m.group(2)]}.{m.group(3)}"
    k = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", k)
    if "blocks" in k or "mid_block" in k or "samplers" in k:
      raise ValueError(f"unrecognised diffusers key {key!r}")
    out[k] = value
  return out
