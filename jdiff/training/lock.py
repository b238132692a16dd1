"""One writer per workdir: an OS-level exclusive lock on the workdir itself.

The lock is `fcntl.flock` on the workdir directory (and on `<workdir>/.lock`), so the
kernel drops it when the process dies, however it dies (SIGKILL included): a stale lock
never blocks a restart. The directory cannot be unlinked while it holds the run's files,
so deleting `.lock` (which stays behind after every run) does not let a second trainer
in; the file holds the holder's host and pid, for the error message of a second run, and
its own flock excludes runs of older jdiff versions, which lock only the file. Where a
filesystem cannot flock a directory (some network filesystems), the file alone is the
lock. Only process 0 of a multi-process run takes it.

A holder calls `verify` before anything destructive (moving a checkpoint aside, a save
that deletes old checkpoints): if the locked inode is no longer the one at its path (the
workdir was moved or replaced; in file-only mode, `.lock` was deleted), another run may
be using the path, and the holder stops instead of touching its files.

Caveats: flock is per host on most network filesystems (NFS gives no cross-host
exclusion for flock on older kernels), and a child forked without exec inherits it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another process holds the workdir's lock."""


class WorkdirLockLostError(WorkdirBusyError):
  """The locked workdir (or lock file) was moved, deleted or replaced while it was held."""


class WorkdirLock:
  """An exclusive, non-blocking lock on `workdir` (a context manager).

  Args:
    workdir: the run's directory (created if missing).

  Raises:
    WorkdirBusyError (on `acquire`): another process holds the lock; the message names
      its host and pid.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fds: list[int] = []  # [directory fd (if it could be locked), lock file fd]
    self._locked_path = ""  # the path whose inode `verify` compares: workdir, or the file

  @property
  def held(self) -> bool:
    return bool(self._fds)

  def acquire(self) -> WorkdirLock:
    if self._fds:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fds = []
    try:
      fds.append(os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
      if not _flock(fds[0], self):
        os.close(fds.pop())  # the filesystem cannot flock a directory: the file alone
      fds.append(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
      if not _flock(fds[-1], self) and len(fds) == 1:
        raise OSError(f"cannot flock {self.path}")
    except BaseException:
      for fd in fds:
        os.close(fd)
      raise
    self._fds = fds
    self._locked_path = self.workdir if len(fds) == 2 else self.path
    try:
      self.verify("taking the lock")  # the file was deleted between its open and its flock
    except WorkdirLockLostError:
      self.release()
      return self.acquire()
    fd = fds[-1]
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
    return self

  def verify(self, before: str = "continuing") -> None:
    """Raises WorkdirLockLostError unless the locked inode is still the one at its path.

    Args:
      before: what the holder is about to do, for the message.
    """
    if not self._fds:
      raise WorkdirLockLostError(f"the lock of workdir {self.workdir} is not held ({before})")
    locked = os.fstat(self._fds[0])
    try:
      now = os.stat(self._locked_path)
      same = (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino)
    except FileNotFoundError:
      same = False
    if not same:
      raise WorkdirLockLostError(
        f"{self._locked_path} was moved, deleted or replaced while this run held its lock: "
        f"stopped before {before}, so as not to touch the files of another run there"
      )

  @contextlib.contextmanager
  def verified(self, before: str = "continuing") -> Iterator[bool]:
    """`verify`, as the guard of `jdiff.training.checkpoint.Checkpointer` (yields True)."""
    self.verify(before)
    yield True

  def release(self) -> None:
    """Releases the lock (idempotent); the file stays, naming the last holder."""
    fds, self._fds = self._fds, []
    for fd in reversed(fds):
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _flock(fd: int, lock: WorkdirLock) -> bool:
  """Locks `fd` (exclusive, non-blocking): True, or False where its filesystem cannot.

  Raises WorkdirBusyError, naming the holder, when another process holds it.
  """
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise WorkdirBusyError(
      f"workdir {lock.workdir} is in use by another run ({_read_holder(lock.path)}; lock "
      f"{lock.path}): wait for it, stop it, or use another --workdir"
    ) from None
  except OSError:  # EBADF/ENOLCK/EINVAL: e.g. NFS cannot flock a read-only directory fd
    return False
  return True


def _read_holder(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.load(f)
    return f"host {holder['host']}, pid {holder['pid']}"
  except FileNotFoundError:
    return "host and pid unknown: its lock file was deleted"
  except (ValueError, KeyError, TypeError, OSError):  # the holder has not written it yet
    return "host and pid not yet recorded"


@contextlib.contextmanager
def lock_if_free(workdir: str) -> Iterator[bool]:
  """Holds the workdir's lock for the block if no other run holds it; yields whether it does.

  Read-only modes (sample, eval) use it around the few writes that touch files a trainer
  owns (moving a corrupt checkpoint aside): with a trainer running they leave them alone.
  A workdir that does not exist is never created.
  """
  if not os.path.isdir(workdir):
    yield False
    return
  lock = WorkdirLock(workdir)
  try:
    lock.acquire()
  except WorkdirBusyError:
    yield False
    return
  try:
    yield True
  finally:
    lock.release()
