"""Atomic file writes: a leaf module (no jdiff imports) that every layer may use.

`atomic_write` writes to a temporary name and renames it, so readers never see half a file;
`unique_path` picks the first free `stem-N.ext` so that outputs never overwrite each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def unique_path(path: str) -> str:
  """`path` if it does not exist, else `stem-1.ext`, `stem-2.ext`, ... (first free)."""
  if not os.path.exists(path):
    return path
  stem, ext = os.path.splitext(path)
  i = 1
  while os.path.exists(f"{stem}-{i}{ext}"):
    i += 1
  return f"{stem}-{i}{ext}"


def atomic_write(path: str, write: Callable[[str], None], *, overwrite: bool = False) -> str:
  """Calls `write(tmp_path)`, then renames the file to `path` (readers never see half a file).

  Args:
    path: destination.
    write: writes the whole file at the path it is given.
    overwrite: replace an existing `path`; otherwise write to `unique_path(path)`.

  Returns:
    The path written.
  """
  path = path if overwrite else unique_path(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
