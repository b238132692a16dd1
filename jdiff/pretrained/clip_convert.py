"""transformers' `CLIPTextModel` (config.json + state dict) <-> `jdiff.models.clip`, and
CLIP's tokenizer, without torch.

  encoder, params = load_text_encoder("/sd/text_encoder")   # .safetensors, numpy only
  tokenizer = load_tokenizer("/sd/tokenizer")              # transformers' CLIPTokenizerFast
  ids = tokenize(tokenizer, ["a photo of a cat"])          # [1, 77] int32

Key correspondence (layer i): text_model.embeddings.{token,position}_embedding.weight ->
{token,position}_embedding/embedding; text_model.encoder.layers.i.self_attn.{q,k,v,out}_proj
-> layers_i_{q,k,v,out}_proj; .layer_norm{1,2} -> layers_i_layer_norm{1,2}; .mlp.fc{1,2} ->
layers_i_fc{1,2}; text_model.final_layer_norm -> final_layer_norm. Linear weights [O, I]
become Dense kernels [I, O].
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from jdiff.models.clip import CLIPTextEncoder
from jdiff.pretrained import mapping
from jdiff.pretrained.mapping import PretrainedError, Rule

_ACTS = ("quick_gelu", "gelu")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def clip_kwargs(config: Mapping[str, Any], *, skip_last_layers: int = 0) -> dict:
  """`CLIPTextEncoder` kwargs from a `CLIPTextConfig` dict; `skip_last_layers=1` reads the
  penultimate layer (SD 2.x on a full OpenCLIP tower).

  Raises:
    PretrainedError: an activation or a layer count it cannot express.
  """
  c = dict(config.get("text_config", config))
  act = c.get("hidden_act", "quick_gelu")
  if act not in _ACTS:
    raise PretrainedError(f"text encoder config.json: hidden_act={act!r} (supported: {_ACTS})")
  layers = int(c.get("num_hidden_layers", 12)) - skip_last_layers
  if layers < 1:
    raise PretrainedError(f"skip_last_layers={skip_last_layers} leaves no layer")
  return dict(
    vocab_size=int(c.get("vocab_size", 49408)),
    width=int(c.get("hidden_size", 512)),
    num_layers=layers,
    heads=int(c.get("num_attention_heads", 8)),
    mlp_dim=int(c.get("intermediate_size", 2048)),
    max_length=int(c.get("max_position_embeddings", 77)),
    act=act,
    eps=float(c.get("layer_norm_eps", 1e-5)),
  )


def key_prefix(keys) -> str:
  """'text_model.' (CLIPTextModel checkpoints, as the SD hub's) or '' (transformers >= 5
  saves the text transformer's keys without it)."""
  return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


def rules(num_layers: int, prefix: str = "text_model.") -> list[Rule]:
  """The rules between a `CLIPTextModel` state dict and `CLIPTextEncoder` params."""
  t = prefix
  out = [
    mapping.same(f"{t}embeddings.{n}.weight", (n, "embedding"))
    for n in ("token_embedding", "position_embedding")
  ]

  def norm(key, name):
    return [
      mapping.same(f"{key}.weight", (name, "scale")),
      mapping.same(f"{key}.bias", (name, "bias")),
    ]

  for i in range(num_layers):
    p, j = f"{t}encoder.layers.{i}.", f"layers_{i}_"
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += mapping.module_rules("dense", f"{p}self_attn.{n}", (j + n,), {})
    for n in ("fc1", "fc2"):
      out += mapping.module_rules("dense", f"{p}mlp.{n}", (j + n,), {})
    out += norm(f"{p}layer_norm1", j + "layer_norm1") + norm(f"{p}layer_norm2", j + "layer_norm2")
  return out + norm(f"{t}final_layer_norm", "final_layer_norm")


def param_shapes(encoder: CLIPTextEncoder) -> dict:
  ids = jax.ShapeDtypeStruct((1, encoder.max_length), np.int32)
  shapes = jax.eval_shape(lambda i: encoder.init(jax.random.key(0), i), ids)["params"]
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes).items()}


def to_params(
  state_dict: Mapping[str, Any], encoder: CLIPTextEncoder, *, shardings=None, what="text encoder"
):
  """A `CLIPTextModel` state dict -> `encoder`'s params (layers past `num_layers` dropped)."""
  t = key_prefix(state_dict.keys())
  keep = {f"{t}encoder.layers.{i}." for i in range(encoder.num_layers)}

  def used(k):
    if k.endswith("position_ids") or k.startswith("text_projection"):
      return False  # a buffer; CLIPTextModelWithProjection's head (SDXL's pooled embedding)
    return not k.startswith(f"{t}encoder.layers.") or any(k.startswith(p) for p in keep)

  view = _Filtered(state_dict, used)
  return mapping.to_params(
    view, rules(encoder.num_layers, t), param_shapes(encoder), shardings=shardings, what=what
  )


class _Filtered(Mapping):
  """The keys of a (lazy) state dict that `keep` accepts, still read one at a time."""

  def __init__(self, sd, keep):
    self._sd, self._keys = sd, [k for k in sd.keys() if keep(k)]

  def __getitem__(self, k):
    return self._sd[k]

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)


def to_state_dict(
  params, encoder: CLIPTextEncoder, *, prefix: str = "text_model."
) -> dict[str, np.ndarray]:
  """The inverse of `to_params` (for a tower of `encoder.num_layers` layers)."""
  return mapping.to_state_dict(params, rules(encoder.num_layers, prefix))


def load_text_encoder(
  directory: str, *, skip_last_layers: int = 0, shardings=None, **overrides
) -> tuple[CLIPTextEncoder, Any]:
  """(encoder, params) of a transformers `CLIPTextModel` directory (config.json + weights)."""
  from jdiff.pretrained.load import read_state_dict  # pylint: disable=g-import-not-at-top

  config = os.path.join(directory, "config.json")
  if not os.path.isfile(config):
    raise FileNotFoundError(f"{directory} is not a text encoder directory: no config.json")
  with open(config) as f:
    kwargs = clip_kwargs(json.load(f), skip_last_layers=skip_last_layers)
  weights = [os.path.join(directory, w) for w in WEIGHTS]
  weights = [w for w in weights if os.path.isfile(w)]
  if not weights:
    raise FileNotFoundError(f"{directory} has none of {list(WEIGHTS)}")
  encoder = CLIPTextEncoder(**kwargs, **overrides)
  params = to_params(read_state_dict(weights[0]), encoder, shardings=shardings, what=weights[0])
  return encoder, params


def load_tokenizer(directory: str):
  """The pipeline's own CLIP tokenizer (transformers' `CLIPTokenizerFast`: no torch)."""
  try:
    from transformers import CLIPTokenizerFast  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("tokenizing prompts needs transformers (pip install transformers)") from None
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no tokenizer directory {directory}")
  return CLIPTokenizerFast.from_pretrained(directory)


def tokenize(tokenizer, prompts: Sequence[str], *, max_length: int | None = None) -> np.ndarray:
  """Token ids [len(prompts), max_length] int32: <start> prompt <end>, padded with the
  tokenizer's pad token and truncated as the SD pipelines do (default length: the
  tokenizer's `model_max_length`, 77)."""
  if isinstance(prompts, str):
    raise TypeError(f"prompts must be a sequence of strings, got the string {prompts!r}")
  n = max_length or tokenizer.model_max_length
  ids = tokenizer(
    list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="np"
  ).input_ids
  return np.asarray(ids, np.int32)
