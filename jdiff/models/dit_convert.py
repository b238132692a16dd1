"""diffusers' `DiTTransformer2DModel` weights -> `jdiff.models.dit.DiT` parameters.

The published DiT checkpoints (facebook/DiT-XL-2-256, -512) load through diffusers' format:

  cfg = json.load(open("transformer/config.json"))
  module = DiT(**dit_kwargs(cfg))
  params = from_diffusers(safetensors.numpy.load_file(".../diffusion_pytorch_model.safetensors"))

Key map (i: block index; Linear weights are transposed, the patch conv's [D, C, p, p] becomes
flax's [p, p, C, D]):

  pos_embed.proj                                       patch
  transformer_blocks.0.norm1.emb.timestep_embedder.linear_1 / linear_2   t_mlp1 / t_mlp2
  transformer_blocks.0.norm1.emb.class_embedder.embedding_table          label
  transformer_blocks.i.norm1.linear                    block{i}.adaLN
  transformer_blocks.i.attn1.to_q / to_k / to_v / to_out.0   block{i}.q / k / v / attn_out
  transformer_blocks.i.ff.net.0.proj / ff.net.2        block{i}.fc1 / fc2
  proj_out_1 / proj_out_2                              final_adaLN / final

diffusers stores one conditioning embedder per block (its conversion script copies DiT's single
one into each) and uses block 0's for the output layer; DiT has one, so the blocks' copies must
be equal (checked). The fixed sin-cos position table (`pos_embed.pos_embed`) is not a
parameter here: `DiT` recomputes the same table.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def dit_kwargs(config: Mapping) -> dict:
  """`DiT` constructor arguments for a diffusers `DiTTransformer2DModel` config (a dict)."""
  c = dict(config)
  checks = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "norm_elementwise_affine": False,
  }
  for key, want in checks.items():
    if c.get(key, want) != want:
      raise ValueError(
        f"unsupported DiTTransformer2DModel config: {key}={c[key]!r} (need {want!r})"
      )
  heads, head_dim = c.get("num_attention_heads", 16), c.get("attention_head_dim", 72)
  return dict(
    patch_size=c.get("patch_size", 2),
    hidden=heads * head_dim,
    depth=c.get("num_layers", 28),
    num_heads=heads,
    num_classes=c.get("num_embeds_ada_norm", 1000),
    out_channels=c.get("out_channels") or c.get("in_channels", 4),
    learn_sigma=False,  # out_channels already counts the variance channels
    mlp_norm_eps=c.get("norm_eps", 1e-5),
    freq_shift=1.0,
  )


def _dense(sd, name):
  out = {"kernel": np.asarray(sd[name + ".weight"], np.float32).T}
  if name + ".bias" in sd:
    out["bias"] = np.asarray(sd[name + ".bias"], np.float32)
  return out


def from_diffusers(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Flax `params` of `DiT` from a diffusers DiT state dict (numpy arrays or array-likes).

  Raises:
    KeyError: a key the map needs is missing. ValueError: the blocks' conditioning embedders
      differ, or keys are left unmapped.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
  used = set()

  def dense(name):
    used.update({name + ".weight", name + ".bias"})
    return _dense(sd, name)

  emb = "transformer_blocks.{}.norm1.emb."
  for i in range(1, depth):
    for k in [k for k in sd if k.startswith(emb.format(0))]:
      other = k.replace(emb.format(0), emb.format(i), 1)
      if not np.array_equal(sd[k], sd[other]):
        raise ValueError(
          f"{other} differs from {k}: DiT has one conditioning embedder shared by all blocks"
        )
      used.add(other)
  w = np.asarray(sd["pos_embed.proj.weight"], np.float32)
  params = {
    "patch": {"kernel": w.transpose(2, 3, 1, 0), "bias": np.asarray(sd["pos_embed.proj.bias"])},
    "t_mlp1": dense(emb.format(0) + "timestep_embedder.linear_1"),
    "t_mlp2": dense(emb.format(0) + "timestep_embedder.linear_2"),
    "final_adaLN": dense("proj_out_1"),
    "final": dense("proj_out_2"),
  }
  used.update({"pos_embed.proj.weight", "pos_embed.proj.bias", "pos_embed.pos_embed"})
  table = emb.format(0) + "class_embedder.embedding_table.weight"
  if table in sd:
    params["label"] = {"embedding": np.asarray(sd[table], np.float32)}
    used.add(table)
  for i in range(depth):
    b = f"transformer_blocks.{i}."
    params[f"block{i}"] = {
      "adaLN": dense(b + "norm1.linear"),
      "q": dense(b + "attn1.to_q"),
      "k": dense(b + "attn1.to_k"),
      "v": dense(b + "attn1.to_v"),
      "attn_out": dense(b + "attn1.to_out.0"),
      "fc1": dense(b + "ff.net.0.proj"),
      "fc2": dense(b + "ff.net.2"),
    }
  left = sorted(set(sd) - used)
  if left:
    raise ValueError(f"unmapped diffusers DiT keys: {left[:8]}{' ...' if len(left) > 8 else ''}")
  return params
