"""Checksums of a checkpoint: what `Checkpointer` records at save time and verifies on restore.

The record (version 2) is `{"version", "arrays": {name: {"shape", "dtype", "hash"}},
"data": {process index: crc32}}`:

- every array leaf of the saved state, named by its path ('params/conv_in/kernel'), with
  a 32-bit hash of its bits computed on the device (`tree_hashes`): the sum mod 2**32 of
  fmix32(word XOR (flat index x 0x9E3779B9)) over its 32-bit words (16- and 8-bit elements
  are widened). fmix32 (MurmurHash3's finaliser) is a bijection, so any change of one word
  changes the hash; the index term makes the same words in another order hash otherwise;
  other changes go unnoticed with probability about 2**-32. A sum
  does not depend on the order of its terms: the hash is the same whatever the mesh or
  process count the array is sharded over, so every process verifies every array, also
  when it restores onto another mesh. Only one uint32 per leaf leaves the device: a save
  no longer copies the state to the host and hashes it there (the stall the version-1
  record cost: BENCHMARKS.md, "Checkpoint save stall");
- the data iterator's state of every process: the CRC-32 of the exact text that grain's
  checkpoint handler writes (`process_<i>-of-<n>.json`), gathered from all processes.

Version-1 records (`"crc32"` of the bytes as the host held them, or `"shards"` per shard of
an array sharded over processes) still verify. Both are guards against torn writes and bit
rot, not against tampering.
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

VERSION = 2
GOLDEN = 0x9E3779B9  # odd, so index -> index * GOLDEN mod 2**32 is one-to-one
CHECKSUMS = "jdiff_checksums"  # key of the record in the step's custom metadata
METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's step metadata, which holds the record


def leaf_name(path) -> str:
  """'params/conv_in/kernel' for a key path of a state, a dict or a (named) tuple."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _crc(x: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def _host_value(x) -> np.ndarray | None:
  """The whole array on this host, or None when it is sharded over processes."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return None


def _shard_crcs(x: jax.Array) -> dict[str, int]:
  return {
    str([(s.start, s.stop) for s in shard.index]): _crc(np.asarray(shard.data))
    for shard in x.addressable_shards
    if shard.replica_id == 0
  }


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """x's bits as uint32: 32-bit elements bitcast, 16- and 8-bit ones widened, 64-bit ones
  split in two (a trailing axis), keys as their key data."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def dtype_name(dtype) -> str:
  """The recorded name of a leaf's dtype: numpy's name, or jax's for typed PRNG keys
  ('key<fry>'), which numpy cannot interpret."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return str(dtype)
  return str(np.dtype(dtype))


def _leaf_hash(x: jax.Array) -> jax.Array:
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)  # the row-major flat index, without a reshape
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  return jnp.sum(_fmix32(w ^ (index * jnp.uint32(GOLDEN))), dtype=jnp.uint32)


@functools.cache
def _hash_fn(out_sharding, many: bool):
  kw = {} if out_sharding is None else {"out_shardings": out_sharding}
  if not many:
    return jax.jit(_leaf_hash, **kw)
  leaf_hash = jax.jit(_leaf_hash)  # one program; each leaf signature traced once, as a call
  return jax.jit(lambda leaves: [leaf_hash(x) for x in leaves], **kw)


def _hashes(named: list) -> list[int]:
  """The hash of each leaf of `named` (`tree_flatten_with_path`'s leaves), computed where the
  leaves live (on a multi-process mesh a collective every process calls).

  On one device: one small program per leaf signature (shape, dtype), dispatched leaf after
  leaf and read back together, so that the first save compiles a few small programs instead of
  one with thousands of operations (the tiny U-Net's train state, 579 leaves of 25 signatures,
  the test suite's compile flags: 0.95 s, then 40 ms a save, instead of 4.6 s, then 13 ms; AVX2
  CPU; BENCHMARKS.md, "Checkpoint save stall"). On several devices: one program for all leaves
  (each signature traced once, as a call: 2.5 s to compile there), since separate programs
  whose collectives are dispatched asynchronously may enter them in another order on each
  device and deadlock (seen on the CPU: between processes with gloo, and between the devices
  of one process on a data x fsdp mesh)."""
  # Host values (numpy, Python scalars) enter as numpy: jit replicates them on any mesh.
  leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for _, x in named]
  mesh_sharding = next(
    (
      x.sharding
      for x in leaves
      if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
    ),
    None,
  )
  out = None
  if mesh_sharding is not None:  # replicated, so that every process can read it
    out = jax.sharding.NamedSharding(mesh_sharding.mesh, jax.sharding.PartitionSpec())
  if jax.device_count() > 1:
    hashes = _hash_fn(out, True)(leaves)
  else:
    hashes = [_hash_fn(out, False)(x) for x in leaves]
  return [int(h) for h in jax.device_get([h.addressable_data(0) for h in hashes])]


def tree_hashes(tree: Any) -> dict[str, int]:
  """{leaf name: the 32-bit hash of its bits} of `tree` (`_hashes`)."""
  named = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {leaf_name(path): h for (path, _), h in zip(named, _hashes(named), strict=True)}


def array_checksums(tree: Any) -> dict[str, dict]:
  """{leaf name: {"shape", "dtype", "hash"}} of `tree`."""
  named = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    leaf_name(path): {
      "shape": [int(d) for d in np.shape(x)],
      "dtype": dtype_name(x.dtype),
      "hash": h,
    }
    for (path, x), h in zip(named, _hashes(named), strict=True)
  }


def iterator_text(data_iter) -> str:
  """The text grain's `CheckpointHandler` writes for `data_iter` (see its `save`)."""
  from grain._src.python.dataset import dataset  # pylint: disable=g-import-not-at-top

  if isinstance(data_iter, dataset.DatasetIterator):
    return json.dumps(data_iter.get_state(), indent=4)
  return data_iter.get_state().decode()


def text_crc(text: str | bytes) -> int:
  return zlib.crc32(text.encode() if isinstance(text, str) else text)


def data_checksums(data_iter) -> dict[str, int]:
  """{process index: CRC-32 of its iterator's saved text}, gathered from every process."""
  crc = text_crc(iterator_text(data_iter))
  if jax.process_count() == 1:
    return {"0": crc}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  # uint32: a CRC-32 does not fit int32, and JAX (without x64) would narrow an int64 to it.
  crcs = multihost_utils.process_allgather(np.array([crc], np.uint32))
  return {str(i): int(c) for i, c in enumerate(np.asarray(crcs).reshape(-1))}


def make_record(state: Any, data_iter=None) -> dict:
  record = {"version": VERSION, "arrays": array_checksums(state)}
  if data_iter is not None:
    record["data"] = data_checksums(data_iter)
  return record


class ShapeMismatchError(ValueError):
  """The checkpoint holds other shapes (or leaves) than the target: a config, not a disk, fault."""


def check_shapes(record: dict, target: Any, *, where: str) -> None:
  """Raises ShapeMismatchError naming the first leaf of `target` that the record lacks or
  holds with another shape or dtype."""
  arrays = record["arrays"]
  for path, t in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = leaf_name(path)
    if name not in arrays:
      raise ShapeMismatchError(
        f"{where} has no array {name}: it was saved from another model or optimiser than "
        "the config builds"
      )
    saved, shape = arrays[name], [int(d) for d in np.shape(t)]
    if saved["shape"] != shape or saved["dtype"] != dtype_name(t.dtype):
      raise ShapeMismatchError(
        f"{where} holds {name} as {saved['dtype']}{tuple(saved['shape'])}, the config builds "
        f"{dtype_name(t.dtype)}{tuple(shape)}: the model config differs from the one the "
        "checkpoint was trained with"
      )


def verify_arrays(record: dict, restored: Any) -> str | None:
  """None if every restored leaf matches its recorded checksum, else what differs."""
  arrays = record["arrays"]
  hashes = None
  for path, x in jax.tree_util.tree_flatten_with_path(restored)[0]:
    name = leaf_name(path)
    saved = arrays.get(name)
    if saved is None:
      return f"no checksum recorded for {name}"
    if "hash" in saved:
      hashes = tree_hashes(restored) if hashes is None else hashes  # one program, once
      if hashes[name] != saved["hash"]:
        return f"checksum mismatch in {name}"
    elif "crc32" in saved:  # a version-1 record
      value = _host_value(x)
      if value is None:  # saved whole, restored sharded over processes: not comparable here
        continue
      if _crc(value) != saved["crc32"]:
        return f"checksum mismatch in {name}"
    else:
      mine = _shard_crcs(x) if isinstance(x, jax.Array) else {}
      for index, crc in mine.items():
        if index in saved["shards"] and saved["shards"][index] != crc:
          return f"checksum mismatch in {name} shard {index}"
  return None


# ----------------------------------------------------------------------------- reading a step


def step_metadata(step_dir: str) -> dict:
  """The step's `_CHECKPOINT_METADATA`, parsed; ValueError when it cannot be (corruption),
  OSError when it cannot be read."""
  with open(os.path.join(step_dir, METADATA_FILE), "rb") as f:
    raw = f.read()
  try:
    meta = json.loads(raw)
  except ValueError:
    meta = None
  if not isinstance(meta, dict):
    raise ValueError(f"{METADATA_FILE} cannot be parsed ({len(raw)} bytes)")
  return meta


def step_record(step_dir: str) -> dict | None:
  """The checksum record in the step's metadata; None when the metadata holds none."""
  return (step_metadata(step_dir).get("custom_metadata") or {}).get(CHECKSUMS)


def has_record(step_dir: str) -> bool:
  try:
    return step_record(step_dir) is not None
  except (OSError, ValueError):
    return False


def check_readable(step_dir: str) -> None:
  """Opens every file under `step_dir`: an unreadable one raises its OSError."""

  def fail(e: OSError):
    raise e

  for root, _, files in os.walk(step_dir, onerror=fail):
    for name in files:
      os.close(os.open(os.path.join(root, name), os.O_RDONLY | os.O_CLOEXEC))


# TensorStore (orbax's reader) reports an OS error as `..."<path>": <why> [os_error_code='N']`.
_TS_OS_ERROR = re.compile(r"""([^"]*)": [^"\[]*\[os_error_code='(\d+)'\]""")


def read_error(e: BaseException | None) -> str:
  """'<file>: [Errno N] <why>' when `e` (or its cause) is a read failure other than a
  missing file (permissions, I/O: no verdict on integrity), else ''."""
  while e is not None:
    if isinstance(e, OSError) and e.errno not in (None, errno.ENOENT):
      return f"{e.filename}: [Errno {e.errno}] {e.strerror}"
    match = _TS_OS_ERROR.search(str(e))
    if match and int(match.group(2)) != errno.ENOENT:
      code = int(match.group(2))
      return f"{match.group(1)}: [Errno {code}] {os.strerror(code)}"
    e = e.__cause__ or e.__context__
  return ""


CLOSED_LOOP = "Event loop is closed"


def is_closed_loop(exc) -> bool:
  """Whether `exc` is asyncio's report of a call on an event loop orbax already closed."""
  return isinstance(exc, RuntimeError) and CLOSED_LOOP in str(exc)


def _is_orbax_read(obj) -> bool:
  code = getattr(obj, "cr_code", None)
  return code is not None and "/orbax/" in code.co_filename


class _DropLateReads:
  """The unraisable hook after a failed read: drops the late reports of its abandoned reads
  (calls on a closed event loop, orbax's coroutines) and passes the rest to `hook`."""

  def __init__(self, hook):
    self.hook = hook

  def __call__(self, unraisable) -> None:
    if not (is_closed_loop(unraisable.exc_value) or _is_orbax_read(unraisable.object)):
      self.hook(unraisable)


class _DropNeverRetrieved(logging.Filter):
  """Drops asyncio's "never retrieved" reports: all of them, or (`orbax_only`) orbax's."""

  def __init__(self, orbax_only: bool = False):
    super().__init__()
    self.orbax_only = orbax_only

  def filter(self, record) -> bool:
    text = record.getMessage()
    return "never retrieved" not in text or (self.orbax_only and not _from_a_read(record, text))


def _from_a_read(record, text: str) -> bool:
  """Whether a "never retrieved" report is of an orbax read: orbax's code in the message or
  the exception's frames, or TensorStore's error (a read failing on a damaged file)."""
  if "/orbax/" in text or "tensorstore_spec" in text:
    return True
  exc = record.exc_info[1] if record.exc_info else None
  tb = getattr(exc, "__traceback__", None)
  while tb is not None:
    if "/orbax/" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


_LATE_READS = _DropNeverRetrieved(orbax_only=True)


def _drop_tracebacks(error: BaseException) -> None:
  """Clears the tracebacks of `error` and of its causes: their frames hold the failed read."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    error.__traceback__ = None
    error = error.__cause__ or error.__context__


def read_quietly(read: Callable[[], Any]) -> Any:
  """`read()`, silencing the reports of its abandoned reads when it fails.

  When one of orbax's concurrent TensorStore reads fails (a truncated file), the others'
  futures and coroutines are abandoned, and each is reported when it is collected
  ("Future exception was never retrieved", "Exception ignored in coroutine"); their
  callbacks meet a closed event loop ("Event loop is closed"): hundreds of tracebacks for
  one fault that the caller reports in one line. On an error, the error's tracebacks (whose
  frames hold the abandoned reads) are dropped and the reads collected (`gc.collect`) while
  the asyncio logger's and `sys.unraisablehook`'s reports of them are dropped; other records
  and reports pass; the error is re-raised. orbax's event-loop threads and TensorStore's
  own threads keep finishing the abandoned reads afterwards, at times the caller cannot
  wait for: after a failed read, the reports of orbax's abandoned coroutines and tasks and
  of calls on closed event loops (and only those) stay dropped for the rest of the process.
  """
  import asyncio  # pylint: disable=g-import-not-at-top

  asyncio_log, drop, hook = logging.getLogger("asyncio"), _DropNeverRetrieved(), sys.unraisablehook

  def drop_abandoned(unraisable) -> None:
    abandoned = asyncio.iscoroutine(unraisable.object) or asyncio.isfuture(unraisable.object)
    if not (abandoned or is_closed_loop(unraisable.exc_value)):
      hook(unraisable)

  asyncio_log.addFilter(drop)
  sys.unraisablehook = drop_abandoned
  error = None
  try:
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    _drop_tracebacks(error)  # outside the handler: nothing else holds the read's frames
    gc.collect()
    raise error
  finally:
    late = error is not None and not isinstance(hook, _DropLateReads)
    sys.unraisablehook = _DropLateReads(hook) if late else hook
    asyncio_log.removeFilter(drop)
    if error is not None:
      asyncio_log.addFilter(_LATE_READS)  # once: a filter is not added twice
