"""One writer per workdir: an OS-level exclusive lock on `<workdir>/.lock`.

The lock is `fcntl.flock` on an open file, so the kernel drops it when the process dies,
however it dies (SIGKILL included): a stale lock never blocks a restart. The file holds
the holder's host and pid, for the error message of a second run; its content is only
informative, the flock is the lock. Only process 0 of a multi-process run takes it.

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
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> WorkdirLock:
    if self._fd is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
        f"workdir {self.workdir} is in use by another run ({holder}; lock {self.path}): "
        "wait for it, stop it, or use another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Releases the lock (idempotent); the file stays, naming the last holder."""
    fd, self._fd = self._fd, None
    if fd is not None:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode())
    return f"host {holder['host']}, pid {holder['pid']}"
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
