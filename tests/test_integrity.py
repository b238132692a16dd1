"""The checkpoint record's array hash (`integrity.tree_hashes`): the formula against numpy, any
one-word change detected, the same number on every mesh, and version-1 (CRC-32) records still
verified."""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from jdiff.training import integrity

M32 = 0xFFFFFFFF


def _fmix(h: np.ndarray) -> np.ndarray:
  h = h.astype(np.uint64)
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def numpy_hash(x) -> int:
  """The documented formula, on the host: sum of fmix32(word ^ index * GOLDEN) mod 2**32."""
  a = np.asarray(x)
  if a.dtype == bool:
    w = a.astype(np.uint32)
  else:
    w = a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize]).astype(np.uint32)
  w = w.reshape(-1).astype(np.uint64)
  index = (np.arange(w.size, dtype=np.uint64) * 0x9E3779B9) & M32
  return int(_fmix(w ^ index).sum() % 2**32)


def _tree():
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "w": jax.random.normal(k[0], (16, 12)),
    "h": jax.random.normal(k[1], (5, 4, 2)).astype(jnp.bfloat16),
    "q": jax.random.randint(k[2], (7,), -100, 100).astype(jnp.int8),
    "mask": jnp.array([True, False, True]),
    "step": jnp.int32(1234),
  }


def test_hash_is_the_documented_formula():
  tree = _tree()
  hashes = integrity.tree_hashes(tree)
  assert hashes == {name: numpy_hash(x) for name, x in tree.items()}
  key = jax.random.key(7)  # a typed key hashes as its key data
  assert integrity.tree_hashes({"k": key}) == {"k": numpy_hash(jax.random.key_data(key))}


def test_any_one_word_change_is_detected():
  w = np.asarray(jax.random.normal(jax.random.key(1), (64, 64)))
  base = integrity.tree_hashes({"w": w})["w"]
  rng = np.random.default_rng(0)
  for _ in range(20):
    bad = w.copy().reshape(-1).view(np.uint32)
    i = rng.integers(bad.size)
    bad[i] ^= np.uint32(1 << int(rng.integers(32)))  # one bit flip anywhere
    assert integrity.tree_hashes({"w": bad.view(np.float32).reshape(w.shape)})["w"] != base
  swapped = w.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # the same words in another order
  assert integrity.tree_hashes({"w": swapped})["w"] != base
  assert integrity.tree_hashes({"w": np.zeros_like(w)})["w"] != base


def test_records_and_verification():
  tree = _tree()
  record = integrity.make_record(tree)
  assert record["version"] == 2
  assert record["arrays"]["w"] == {
    "shape": [16, 12],
    "dtype": "float32",
    "hash": numpy_hash(tree["w"]),
  }
  assert integrity.verify_arrays(record, tree) is None
  bad = dict(tree, h=tree["h"].at[2, 1, 0].add(1))
  assert integrity.verify_arrays(record, bad) == "checksum mismatch in h"
  # A record read back from JSON (the step's metadata) verifies the same.
  assert integrity.verify_arrays(json.loads(json.dumps(record)), tree) is None


def test_one_program_for_all_leaves_gives_the_per_leaf_hashes():
  """The several-devices path (one program) and the one-device path (a program per leaf)."""
  leaves = list(_tree().values())
  together = integrity._hash_fn(None, True)(leaves)
  assert [int(h) for h in together] == [int(integrity._hash_fn(None, False)(x)) for x in leaves]
  assert [int(h) for h in together] == [numpy_hash(np.asarray(x)) for x in leaves]


def test_typed_prng_keys_are_recorded_by_their_key_data():
  key = jax.random.key(3)
  record = integrity.make_record({"key": key})
  assert record["arrays"]["key"] == {
    "shape": [],
    "dtype": "key<fry>",
    "hash": numpy_hash(np.asarray(jax.random.key_data(key))),
  }
  integrity.check_shapes(record, {"key": jax.random.key(0)}, where="step 1")
  assert integrity.verify_arrays(record, {"key": key}) is None
  assert integrity.verify_arrays(record, {"key": jax.random.key(4)}) == "checksum mismatch in key"


def test_version_1_records_still_verify():
  tree = _tree()
  crc = lambda x: zlib.crc32(np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8))  # noqa: E731
  v1 = {
    "version": 1,
    "arrays": {
      n: {"shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype)), "crc32": crc(x)}
      for n, x in tree.items()
    },
  }
  assert integrity.verify_arrays(v1, tree) is None
  assert integrity.verify_arrays(v1, dict(tree, w=tree["w"] * 2)) == "checksum mismatch in w"


HASH_SCRIPT = r"""
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jdiff.training import integrity
from test_integrity import _tree
tree, out = _tree(), []
for shape, specs in (((4,), {"w": P("a"), "h": P(None, "a")}),
                     ((2, 2), {"w": P("a", "b"), "h": P(None, "b", "a"), "q": P()})):
  mesh = Mesh(np.array(jax.devices()).reshape(shape), ("a", "b")[: len(shape)])
  placed = {n: jax.device_put(x, NamedSharding(mesh, specs.get(n, P()))) for n, x in tree.items()}
  assert not placed["w"].sharding.is_fully_replicated
  out.append(integrity.tree_hashes(placed))
print(json.dumps(out))
"""


def test_the_hash_is_the_same_on_every_mesh():
  proc = run_python(["-c", HASH_SCRIPT], devices=4, env={"PYTHONPATH": "tests"})
  one_device = integrity.tree_hashes(_tree())
  for hashes in json.loads(proc.stdout.strip().splitlines()[-1]):
    assert hashes == one_device


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8"])
def test_each_dtype_against_numpy(dtype):
  x = (jax.random.normal(jax.random.key(3), (9, 5)) * 50).astype(dtype)
  assert integrity.tree_hashes([x]) == {"0": numpy_hash(x)}
