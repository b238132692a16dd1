"""Checkpoints with orbax's `CheckpointManager`: a state pytree plus the data iterator.

Each checkpoint holds the full state (e.g. a `TrainState`: step, params, EMA, optimiser
state) as the item 'state' and every process's grain iterator position as the item
'data', so that a resumed run continues the same data stream and ends bit-identical to
an uninterrupted one. `Checkpointer` is the one reader and writer of this format: a
frozen model's parameters are read back with `restore_partial`, not by a second reader.

Integrity: every save records the CRC-32 of every array and of every process's iterator
state (`jdiff.training.integrity`) in the step's own metadata (orbax's custom metadata in
`_CHECKPOINT_METADATA`, which orbax writes after all the items, just before it commits the
step by renaming its temporary directory): a step without the record was not completely
written. A restore without an explicit step verifies the newest step against its record;
a step that is missing files, fails to load or mismatches is moved aside to
`<step>.corrupt` with one warning line and the next older step is tried, until one is
intact (`NoIntactCheckpointError`, one line, when none is). In a multi-process run every
process verifies what it holds, all agree on the verdict, and only process 0 renames.

Only integrity failures set a step aside: a checksum mismatch, data or metadata that
cannot be parsed, a file missing inside the step. A file that cannot be read for another
reason (EACCES, EIO, ...) is no proof of corruption: it stops the restore with
`CheckpointReadError` naming the file and the errno, and nothing is moved. A step that
vanished while it was read (deleted by the run that owns the workdir, `keep_checkpoints`)
is skipped, never called corrupt. A step whose metadata holds no checksum record restores
unverified only when the workdir's record (`<directory>_checksums.json` beside the
directory, e.g. `<workdir>/checkpoints_checksums.json`, written before the first save; for
a directory older than that file, an older step with checksums) says it was saved before
jdiff recorded them, or with
`allow_unverified=True` (`config.train.allow_unverified_checkpoints`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from jdiff.training import integrity
from jdiff.training.writers import write_json

STATE = "state"
DATA = "data"
PYTREE_METADATA = "_METADATA"  # orbax's tree structure of the saved state
CHECKSUMS = integrity.CHECKSUMS  # key of the record in the step's custom metadata
METADATA_FILE = integrity.METADATA_FILE  # orbax's step metadata, which holds the record
# <directory>_checksums.json, beside the directory: {"since_step": S}, every step >= S was
# saved with checksums (written before the first save)
SINCE_SUFFIX = "_checksums.json"
ALLOW_UNVERIFIED = "config.train.allow_unverified_checkpoints"
_VANISHED = "vanished"  # a step deleted while it was read: not a verdict on its files


class NoIntactCheckpointError(FileNotFoundError):
  """Every checkpoint of the directory failed verification (they were moved aside)."""


class CorruptCheckpointError(ValueError):
  """An explicitly requested step failed verification."""


class CheckpointReadError(OSError):
  """A checkpoint file could not be read (permissions, I/O): no verdict on its integrity."""


class Checkpointer:
  """Saves and restores (state, data iterator) under `directory`, keeping the last K.

  Use it as a context manager (or call `close`): leaving the block waits for an
  in-flight asynchronous save and releases orbax's threads, also when an error is
  propagating (the error then stays the last thing printed).

  Args:
    directory: absolute or relative path; created if missing.
    max_to_keep: how many checkpoints to keep (older ones are deleted after a newer one
      is fully written, so there is always a complete checkpoint on disk).
    guard: `guard()` is entered around moving a corrupt step aside and yields whether
      this process may (e.g. `jdiff.training.lock.lock_if_free` for read-only modes, so
      that they never touch a running trainer's files); None: always (the workdir's
      writer holds the lock). The writer's guard (`WorkdirLock.verified`) is also entered
      before every save, which may delete old steps.
    allow_unverified: restore a step without a (readable) checksum record, unverified, even
      when the directory's record says it should have one.
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int = 3,
    guard: Callable[[], AbstractContextManager[bool]] | None = None,
    allow_unverified: bool = False,
  ):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    self._guard = guard or (lambda: nullcontext(True))
    self._skipped: set[int] = set()  # corrupt steps left in place (guard said no), vanished
    self._allow_unverified = allow_unverified
    # PyTreeCheckpointHandler (StandardCheckpointHandler's own backend, same files) so that
    # a subtree can be restored alone (`partial_restore`).
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_handlers={
        STATE: ocp.PyTreeCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
      },
    )

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # an error is propagating: clean up, but never hide it behind a second one
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("closing the checkpointer after an error also failed: %r", e)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    return sorted(s for s in self._manager.all_steps() if s not in self._skipped)

  def save(self, step: int, state: Any, data_iter=None) -> None:
    """Saves `state` (and the iterator's position) as checkpoint `step` (async).

    The checksums are computed now, on the host, from the values being saved; orbax
    writes them into the step's metadata when the step is complete.
    """
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    record = integrity.make_record(state, data_iter)
    with self._guard() as allowed:  # the writer's lock is still its own (a save deletes)
      if not allowed:
        raise RuntimeError(f"cannot save checkpoint {step}: another run holds the workdir")
    if jax.process_index() == 0 and not os.path.exists(self._since_path):
      since = min([s for s in self.all_steps() if self._has_checksums(s)] + [step])
      write_json(self._since_path, {"since_step": since})
    self._manager.save(
      step, args=ocp.args.Composite(**items), force=True, custom_metadata={CHECKSUMS: record}
    )

  def _restore(self, target: Any, step: int, data_iter=None, *, partial: bool) -> Any:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    items = {
      STATE: ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial,
      )
    }
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

  @property
  def _since_path(self) -> str:
    return self.directory + SINCE_SUFFIX

  def _has_checksums(self, step: int) -> bool:
    return integrity.has_record(os.path.join(self.directory, str(step)))

  def _predates_checksums(self, step: int) -> bool:
    """Whether the directory's record says `step` was saved before jdiff recorded checksums:
    `<directory>_checksums.json`, or (a directory written before that file existed) no older
    step has checksums."""
    try:
      with open(self._since_path, encoding="utf-8") as f:
        return step < int(json.load(f)["since_step"])
    except FileNotFoundError:
      return not any(self._has_checksums(s) for s in self.all_steps() if s < step)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{self._since_path} cannot be parsed ({e})") from None

  def _record(self, step: int) -> dict | None:
    """The step's checksum record; None for a step restored unverified (saved before jdiff
    recorded checksums, or `allow_unverified`)."""
    try:
      record = integrity.step_record(os.path.join(self.directory, str(step)))
    except ValueError:
      if not self._allow_unverified:
        raise ValueError(
          f"{METADATA_FILE} cannot be parsed, so its checksums cannot be read (set "
          f"{ALLOW_UNVERIFIED}=true to restore it unverified)"
        ) from None
      record = None
    if record is None and not (self._allow_unverified or self._predates_checksums(step)):
      raise ValueError(
        f"{METADATA_FILE} has no checksum record, but the directory records checksums for "
        f"this step (set {ALLOW_UNVERIFIED}=true to restore it unverified)"
      )
    if record is not None and "arrays" not in record:
      raise ValueError("its checksum record is malformed")
    return record

  def _check_files(self, step: int, record: dict) -> None:
    """The state's pytree metadata must be there (without it orbax spends minutes rebuilding
    the tree from the arrays, then fails); this process's iterator file must match its
    recorded CRC-32."""
    tree = os.path.join(self.directory, str(step), STATE, PYTREE_METADATA)
    if not os.path.exists(tree):
      raise FileNotFoundError(f"{STATE}/{PYTREE_METADATA} is missing")
    key = str(jax.process_index())
    if key not in record.get("data", {}):
      return
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    with open(os.path.join(self.directory, str(step), DATA, name), "rb") as f:
      if integrity.text_crc(f.read()) != record["data"][key]:
        raise ValueError(f"checksum mismatch in {DATA}/{name}")

  def _try_step(self, target: Any, step: int, data_iter, *, partial: bool) -> tuple[Any, str]:
    """(restored, '') if `step` verifies on this process, else (None, why it does not).

    A checkpoint that is intact but holds other shapes than `target` is not corrupt: that
    raises `integrity.ShapeMismatchError` instead; a file that cannot be read for another
    reason than its absence raises `CheckpointReadError`. A step deleted meanwhile gives
    (None, _VANISHED).
    """
    where = f"checkpoint {step} under {self.directory}"
    # The file checks run first and are agreed by every process before orbax's restore,
    # whose collectives would otherwise wait for a process that skipped it.
    why, unreadable, record = "", "", None
    try:
      integrity.check_readable(os.path.join(self.directory, str(step)))
      record = self._record(step)
      if record is not None:
        self._check_files(step, record)
    except Exception as e:  # pylint: disable=broad-except
      why, unreadable = _one_line(e), integrity.read_error(e)
    self._raise_unreadable(where, unreadable)
    if not _all_agree(not why):
      return None, self._vanished(step) or why or "a file check failed on another process"
    if record is None:  # saved before checksums (or allowed): restored as is, errors raised
      logging.warning(
        "%s has no checksums (saved before jdiff recorded them, or %s): restored unverified",
        where,
        ALLOW_UNVERIFIED,
      )
      return self._restore(target, step, data_iter, partial=partial), ""
    integrity.check_shapes(record, target, where=where)
    restored, unreadable = None, ""
    try:
      restored = integrity.read_quietly(
        lambda: self._restore(target, step, data_iter, partial=partial)
      )
      why = integrity.verify_arrays(record, restored) or ""
    except Exception as e:  # pylint: disable=broad-except
      why, unreadable = _one_line(e), integrity.read_error(e)
    self._raise_unreadable(where, unreadable)
    if why:
      return None, self._vanished(step) or why
    return restored, ""

  def _raise_unreadable(self, where: str, unreadable: str) -> None:
    """One verdict for all processes: any unreadable file stops the restore everywhere."""
    if not _all_agree(not unreadable):
      raise CheckpointReadError(
        f"cannot read {where}: {unreadable or 'a file is unreadable on another process'}; "
        "this is not corruption (nothing was moved aside): fix the permissions or the disk "
        "and rerun"
      )

  def _vanished(self, step: int) -> str:
    return "" if os.path.isdir(os.path.join(self.directory, str(step))) else _VANISHED

  def _set_aside(self, step: int, why: str) -> None:
    """Moves a corrupt step to `<step>.corrupt` (process 0, if the guard allows)."""
    with self._guard() as allowed:
      where = "left in place: another run holds the workdir"
      if allowed:
        where = "moved aside by process 0"
        if jax.process_index() == 0:
          src = dst = os.path.join(self.directory, str(step))
          k = 0
          while os.path.exists(dst):
            dst, k = f"{src}.corrupt" + (f"-{k}" if k else ""), k + 1
          try:
            os.rename(src, dst)
          except FileNotFoundError:  # deleted meanwhile: nothing to set aside
            why = _VANISHED
          where = f"moved aside to {os.path.basename(dst)}"
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(f"jdiff: checkpoint {step} set aside")
    if allowed:
      self._manager.reload()
    else:
      self._skipped.add(step)
    if why == _VANISHED:
      self._skip_vanished(step)
      return
    logging.warning(
      "checkpoint %d under %s is corrupt (%s): %s; falling back to an older step",
      step,
      self.directory,
      why,
      where,
    )

  def _skip_vanished(self, step: int) -> None:
    self._skipped.add(step)
    self._manager.reload()
    logging.info(
      "checkpoint %d under %s was deleted while it was read (by the run that "
      "owns the workdir, keep_checkpoints): trying the next",
      step,
      self.directory,
    )

  def _restore_verified(self, target: Any, step: int | None, data_iter, *, partial: bool):
    """(restored, step): the given step, or the newest intact one, verified."""
    if step is not None:
      if step not in self.all_steps():
        raise FileNotFoundError(
          f"no checkpoint {step} under {self.directory} (has {self.all_steps()})"
        )
      restored, why = self._try_step(target, step, data_iter, partial=partial)
      if _all_agree(not why):
        return restored, step
      if why == _VANISHED:
        raise FileNotFoundError(
          f"checkpoint {step} under {self.directory} was deleted while "
          "it was read (by the run that owns the workdir?)"
        )
      raise CorruptCheckpointError(f"checkpoint {step} under {self.directory} is corrupt ({why})")
    if not self.all_steps():
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    bad = []
    while self.all_steps():
      step = self.all_steps()[-1]
      restored, why = self._try_step(target, step, data_iter, partial=partial)
      if _all_agree(not why):
        return restored, step
      if why == _VANISHED:
        self._skip_vanished(step)
        continue
      self._set_aside(step, why or "corrupt on another process")
      bad.append(step)
    if not bad:
      raise FileNotFoundError(f"no checkpoint under {self.directory} (deleted while read)")
    raise NoIntactCheckpointError(
      f"no intact checkpoint under {self.directory}: step(s) {', '.join(map(str, bad))} "
      "failed verification (each moved aside to <step>.corrupt unless another run holds the "
      "workdir); training again starts from step 0"
    )

  def restore(self, abstract_state: Any, data_iter=None, *, step: int | None = None) -> Any:
    """Restores the state (with the shardings of `abstract_state`) and, if given, moves
    `data_iter` to the saved position, verifying the checkpoint's checksums.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays.
      data_iter: the grain iterator to restore in place.
      step: which checkpoint; by default the newest intact one (corrupt newer steps are
        moved aside).

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: no such checkpoint (the message names the directory);
        `NoIntactCheckpointError` when every step failed verification.
      CorruptCheckpointError: the explicitly requested step failed verification.
      integrity.ShapeMismatchError: the checkpoint holds other shapes than the target.
    """
    return self._restore_verified(abstract_state, step, data_iter, partial=False)[0]

  def restore_partial(self, abstract_subtree: dict, *, step: int | None = None) -> tuple[dict, int]:
    """Restores only some top-level fields of the saved state, e.g. `{'params': ...}`.

    The other fields (optimiser state, EMA) are not read; the fields read are verified
    (and the step falls back as in `restore`).

    Args:
      abstract_subtree: {field name: pytree of `jax.ShapeDtypeStruct` (with shardings)}.
      step: which checkpoint; the newest intact one by default.

    Returns:
      (the restored {field name: pytree}, its step).
    """
    return self._restore_verified(abstract_subtree, step, None, partial=True)

  def restore_or_keep(self, state: Any, data_iter=None) -> tuple[Any, int]:
    """Resume always wins: the newest intact checkpoint if there is one, else `state`.

    Returns:
      (state, its step as a Python int).
    """
    if self.latest_step() is not None:
      state = self.restore(state, data_iter)
      logging.info("resumed from %s at step %d", self.directory, int(state.step))
    return state, int(jax.device_get(state.step))

  def wait(self) -> None:
    """Blocks until the last asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for an in-flight save, then releases the manager (idempotent)."""
    if self._manager is None:
      return
    manager, self._manager = self._manager, None
    try:
      manager.wait_until_finished()
    finally:
      manager.close()


def _one_line(e: BaseException) -> str:
  while e.__cause__ is not None:  # orbax wraps TensorStore's error (the one that says why)
    e = e.__cause__
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}"


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one verdict for all)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))
