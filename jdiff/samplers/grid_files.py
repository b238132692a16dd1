"""Sigma grids stored beside a model: `<workdir>/grids/<sampler>_nfe<NFE>.json`.

The grids are fitted by `jdiff.samplers.optimize.optimize_grid`; `sample.grid_file` points
`samplers.registry.make_sample_fn` at such a file. Files are written atomically and never
overwritten unless asked; reading checks the format, the sigmas and the sampler / step count
they were made for, and every error names the file.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from jdiff.io import atomic_write
from jdiff.samplers.optimize import OBJECTIVE, nfe_of

FORMAT = "jdiff.sigma_grid.v1"


def grid_path(workdir: str, sampler: str, num_steps: int) -> str:
  """`<workdir>/grids/<sampler>_nfe<NFE>.json`."""
  return os.path.join(workdir, "grids", f"{sampler}_nfe{nfe_of(sampler, num_steps)}.json")


def save_grid(
  path: str,
  grid,
  *,
  sampler: str,
  loss_before: float,
  loss_after: float,
  checkpoint_step: int | None = None,
  overwrite: bool = False,
  **extra,
) -> str:
  """Writes the grid record atomically; an existing file is an error unless `overwrite`.

  Args:
    path: destination (see `grid_path`).
    grid: [N + 1] strictly decreasing sigmas ending with 0.
    sampler: the registry name of the sampler it was fitted for.
    loss_before, loss_after: the objective on the calibration batch, initial / fitted.
    checkpoint_step: the step of the parameters it was fitted on.
    overwrite: replace an existing file.
    **extra: other JSON-serialisable fields recorded as given (reference, batch size, ...).

  Returns:
    The path written.
  """
  sig = _check_sigmas(np.asarray(grid, np.float64).tolist(), path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
  num_steps = len(sig) - 1
  record = dict(
    extra,
    format=FORMAT,
    objective=OBJECTIVE,
    sampler=sampler,
    num_steps=num_steps,
    nfe=nfe_of(sampler, num_steps),
    sigmas=[float(s) for s in sig],
    loss_before=float(loss_before),
    loss_after=float(loss_after),
    checkpoint_step=None if checkpoint_step is None else int(checkpoint_step),
  )

  def write(p):
    with open(p, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2, sort_keys=True)

  return atomic_write(path, write, overwrite=True)


def load_grid(path: str, *, sampler: str | None = None, num_steps: int | None = None) -> dict:
  """Reads and checks a grid record; `record['sigmas']` is a float32 [N + 1] array.

  Args:
    path: the JSON file.
    sampler, num_steps: if given, the record must have been made for them.

  Raises:
    FileNotFoundError: no such file. ValueError: malformed, or made for another sampler or
      number of steps; every message names the file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"sigma grid file {path!r} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"sigma grid file {path!r} is not valid JSON: {e}") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ValueError(f"sigma grid file {path!r} is not a {FORMAT} record")
  for key in ("sampler", "num_steps", "sigmas"):
    if key not in record:
      raise ValueError(f"sigma grid file {path!r} has no {key!r}")
  sig = _check_sigmas(record["sigmas"], path)
  if len(sig) - 1 != record["num_steps"]:
    raise ValueError(
      f"sigma grid file {path!r}: {len(sig)} sigmas for num_steps={record['num_steps']}"
    )
  if sampler is not None and record["sampler"] != sampler:
    raise ValueError(
      f"sigma grid file {path!r} was made for sampler {record['sampler']!r}, not {sampler!r}"
    )
  if num_steps is not None and record["num_steps"] != num_steps:
    raise ValueError(
      f"sigma grid file {path!r} was made for num_steps={record['num_steps']} "
      f"(NFE {record.get('nfe')}), not num_steps={num_steps}"
    )
  return dict(record, sigmas=np.asarray(sig, np.float32))


def _check_sigmas(sigmas, path: str) -> list[float]:
  ok = isinstance(sigmas, list) and len(sigmas) >= 2
  ok = ok and all(isinstance(s, (int, float)) and math.isfinite(s) for s in sigmas)
  if ok:
    g = np.asarray(sigmas, np.float64)
    # Strictly decreasing in float32 too: the samplers run on the float32 grid.
    ok = g[-1] == 0.0 and np.all(np.diff(g) < 0) and np.all(np.diff(g.astype(np.float32)) < 0)
  if not ok:
    raise ValueError(
      f"sigma grid in {path!r} must be a list of >= 2 finite, strictly decreasing floats "
      f"(also in float32) ending with 0; got {sigmas!r}"
    )
  return [float(s) for s in sigmas]
