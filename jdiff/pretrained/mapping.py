"""The engine shared by the diffusers and ADM mappings: rules between state-dict keys and params.

A `Rule` ties one or more torch state-dict keys to one or more flax param paths with a
pair of layout transforms. The format modules (`diffusers_unet`, `adm`) only list the
rules of a given `UNet`; this module checks them against the module's own parameter
shapes (every param covered once, every key known), converts in both directions, and
places each converted array straight onto its sharding, one at a time, so that a big
model never has all its weights on one device (nor, with a lazy state dict such as
`load.LazySafetensors`, all in host memory).

Layouts: torch convs are OIHW [O, I, kh, kw], flax HWIO [kh, kw, I, O]; torch linears
[O, I] (ADM's 1x1 `conv_nd(1, ...)` [O, I, 1]), flax Dense kernels [I, O]; GroupNorm
`weight` is flax `scale`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Path = tuple[str, ...]


class PretrainedError(ValueError):
  """A pretrained model's configuration, flags or weights that jdiff cannot import as given;
  the message names the key, flag or file and what to change."""


class Rule(NamedTuple):
  """Torch keys <-> flax param paths.

  Attributes:
    torch: state-dict keys read together.
    flax: the param paths they become.
    to_flax: arrays of `torch` (in order) -> arrays of `flax` (in order).
    to_torch: the inverse.
  """

  torch: tuple[str, ...]
  flax: tuple[Path, ...]
  to_flax: Callable[..., tuple[np.ndarray, ...]]
  to_torch: Callable[..., tuple[np.ndarray, ...]]


def _one(f):
  return lambda *a: (f(*a),)


def conv(key: str, path: Path) -> Rule:
  """A conv weight, OIHW <-> HWIO."""
  return Rule(
    (key,),
    (path,),
    _one(lambda w: np.transpose(w, (2, 3, 1, 0))),
    _one(lambda w: np.transpose(w, (3, 2, 0, 1))),
  )


def dense(key: str, path: Path, *, conv1d: bool = False) -> Rule:
  """A linear weight [O, I] (or a 1x1 conv1d's [O, I, 1]) <-> a Dense kernel [I, O]."""
  if conv1d:
    return Rule((key,), (path,), _one(lambda w: w[..., 0].T), _one(lambda w: w.T[..., None]))
  return Rule((key,), (path,), _one(lambda w: w.T), _one(lambda w: w.T))


def same(key: str, path: Path) -> Rule:
  """A bias, GroupNorm weight/bias: copied as is."""
  return Rule((key,), (path,), _one(lambda w: w), _one(lambda w: w))


def embedding(key: str, path: Path) -> Rule:
  """A class-embedding table [N, E] <-> jdiff's [N + 1, E] (row N: the null label).

  The imported model never saw the null label: its row is set to zeros, and dropped on
  export (so state dict -> params -> state dict is exact).
  """
  return Rule(
    (key,),
    (path,),
    _one(lambda w: np.concatenate([w, np.zeros_like(w[:1])], axis=0)),
    _one(lambda w: w[:-1]),
  )


def fused_qkv(key: str, paths: tuple[Path, Path, Path], *, heads: int, legacy: bool) -> Rule:
  """ADM's fused qkv projection (weight [3C, C, 1] or bias [3C]) <-> separate q, k, v.

  ADM's `QKVAttentionLegacy` splits the 3C output channels as (heads, 3, d) (heads
  first), `QKVAttention` (``use_new_attention_order``) as (3, heads, d); jdiff's q, k,
  v Dense layers each give (heads, d).
  """

  def split(w):
    c3 = w.shape[0]
    d = c3 // (3 * heads)
    rest = w.shape[1:]
    w = w.reshape((heads, 3, d, *rest)) if legacy else w.reshape((3, heads, d, *rest))
    parts = [w[:, i] if legacy else w[i] for i in range(3)]
    parts = [p.reshape((heads * d, *rest)) for p in parts]
    return tuple(p[..., 0].T if p.ndim == 3 else p for p in parts)

  def join(q, k, v):
    parts = [p.T[..., None] if p.ndim == 2 else p for p in (q, k, v)]
    c = parts[0].shape[0]
    d = c // heads
    rest = parts[0].shape[1:]
    parts = [p.reshape((heads, d, *rest)) for p in parts]
    w = np.stack(parts, axis=1 if legacy else 0)
    return (w.reshape((3 * c, *rest)),)

  return Rule((key,), paths, split, join)


def module_rules(kind: str, torch_prefix: str, path: Path, names: Mapping[str, str]) -> list[Rule]:
  """The rules of one jdiff sub-module whose torch sub-module names are `names`.

  Args:
    kind: 'conv' (nn.Conv), 'dense' (nn.Dense), 'dense1d' (Dense from a conv1d), 'norm'
      (GroupNorm32) for a leaf module; or 'res' / 'attn' for ResBlock / AttentionBlock
      with `names` mapping jdiff's child names to torch's.
    torch_prefix: e.g. 'down_blocks.0.resnets.1'.
    path: the jdiff path of the module, e.g. ('down_0_res_1',).
    names: child name map for 'res'/'attn' (unused for leaves).
  """
  p = torch_prefix + "." if torch_prefix else ""
  if kind == "conv":
    return [conv(p + "weight", (*path, "kernel")), same(p + "bias", (*path, "bias"))]
  if kind in ("dense", "dense1d"):
    return [
      dense(p + "weight", (*path, "kernel"), conv1d=kind == "dense1d"),
      same(p + "bias", (*path, "bias")),
    ]
  if kind == "norm":
    return [
      same(p + "weight", (*path, "norm", "scale")),
      same(p + "bias", (*path, "norm", "bias")),
    ]
  raise ValueError(f"unknown module kind {kind!r}")


# ----------------------------------------------------------------------------- checks


def param_shapes(module, sample_x: jax.ShapeDtypeStruct, *, conditional: bool) -> dict:
  """{path: shape} of `module`'s params for an input like `sample_x` (nothing computed)."""
  b = sample_x.shape[0]

  def init(x):
    y = jnp.zeros((b,), jnp.int32) if conditional else None
    if getattr(module, "context_dim", None) is not None:  # a text-conditioned U-Net
      context = jnp.zeros((b, 1, module.context_dim), jnp.float32)
      y = context if y is None else {"context": context, "labels": y}
    return module.init(jax.random.key(0), x, jnp.zeros((b,), jnp.int32), y, train=False)

  shapes = jax.eval_shape(init, sample_x)["params"]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  return {k: tuple(v.shape) for k, v in flat.items()}


def check_rules(rules: Sequence[Rule], shapes: Mapping[Path, tuple]) -> None:
  """Every param path covered by exactly one rule, and no rule naming an unknown path."""
  covered = [p for r in rules for p in r.flax]
  dup = sorted({"/".join(p) for p in covered if covered.count(p) > 1})
  if dup:
    raise AssertionError(f"params mapped twice: {dup[:5]}")
  missing = sorted("/".join(p) for p in set(shapes) - set(covered))
  extra = sorted("/".join(p) for p in set(covered) - set(shapes))
  if missing or extra:
    raise AssertionError(
      f"mapping does not match the UNet: unmapped {missing[:5]}, extra {extra[:5]}"
    )


def check_keys(rules: Sequence[Rule], keys, *, what: str) -> None:
  """The state dict's keys are exactly the rules' keys; a clear error otherwise."""
  expected = {k for r in rules for k in r.torch}
  keys = set(keys)
  missing, unexpected = sorted(expected - keys), sorted(keys - expected)
  if missing or unexpected:
    raise PretrainedError(
      f"{what}: the state dict does not match the configured architecture: "
      f"{len(missing)} missing keys (e.g. {missing[:4]}), {len(unexpected)} unexpected keys "
      f"(e.g. {unexpected[:4]}); check the config / flags that go with these weights"
    )


# ----------------------------------------------------------------------------- conversion


def _sharding_of(shardings, path: Path, shape):
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if callable(shardings):
    return shardings(path, shape)
  node = shardings
  for name in path:
    node = node[name]
  return node


def to_params(
  state_dict: Mapping[str, Any],
  rules: Sequence[Rule],
  shapes: Mapping[Path, tuple],
  *,
  shardings=None,
  what: str = "state dict",
) -> PyTree:
  """Converts a state dict to the float32 `params` collection, one rule at a time.

  Args:
    state_dict: {key: array-like}; read key by key (a lazy mapping stays lazy).
    rules: from a format module, checked against `shapes` first.
    shapes: `param_shapes` of the target module.
    shardings: where each param goes: None (the default device), one
      `jax.sharding.Sharding` for all, a pytree of them shaped like the params, or a
      callable `(path, shape) -> Sharding`. Each converted array is `device_put`
      straight onto its sharding (each device receives only its shards).
    what: names the source in error messages.

  Returns:
    The params pytree (nested dicts of jax Arrays).

  Raises:
    PretrainedError: missing / unexpected keys, or a shape that does not match.
  """
  check_rules(rules, shapes)
  check_keys(rules, state_dict.keys(), what=what)
  flat = {}
  for rule in rules:
    arrays = [np.asarray(state_dict[k], dtype=np.float32) for k in rule.torch]
    for path, value in zip(rule.flax, rule.to_flax(*arrays), strict=True):
      if tuple(value.shape) != shapes[path]:
        raise PretrainedError(
          f"{what}: {rule.torch} gives {'/'.join(path)} the shape {value.shape}, but the "
          f"configured UNet expects {shapes[path]}"
        )
      sharding = _sharding_of(shardings, path, value.shape)
      value = np.ascontiguousarray(value)
      flat[path] = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def to_state_dict(params: PyTree, rules: Sequence[Rule], *, prefix: str = "") -> dict:
  """The inverse of `to_params`: params -> {key: float32 numpy array} in torch layouts."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  check_rules(rules, {k: tuple(v.shape) for k, v in flat.items()})
  out = {}
  for rule in rules:
    arrays = [np.asarray(jax.device_get(flat[p]), dtype=np.float32) for p in rule.flax]
    for key, value in zip(rule.torch, rule.to_torch(*arrays), strict=True):
      out[prefix + key] = np.ascontiguousarray(value)
  return out
