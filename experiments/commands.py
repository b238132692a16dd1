"""The README's commands as subprocesses, for the benchmarks that time them as a user sees them.

No flags here: benchmark scripts with their own flags import these helpers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

_QUALITY = re.compile(r"FD ([\d.]+)\s+IS ([\d.]+).*?precision ([\d.]+)\s+recall ([\d.]+)")


def run_main(args: list[str], log: str) -> tuple[float, str]:
  """Runs `python -m experiments.main *args`, its output to `log`; (wall s, output)."""
  t0 = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.main", *args], capture_output=True, text=True
  )
  wall = time.perf_counter() - t0
  with open(log, "w", encoding="utf-8") as f:
    f.write(proc.stdout + proc.stderr)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(args)} failed (rc {proc.returncode}); log: {log}")
  return wall, proc.stdout + proc.stderr


def fid(
  config: str, workdir: str, sampler: str, steps: int, log: str, num_samples: int, extra=()
) -> dict:
  """`--mode=fid` of `workdir` with `sampler` in `steps` steps: FD, IS, precision, recall,
  the held-out data's FD and the command's wall time (None when read back from an existing
  `log` of a finished run instead of running again)."""
  if os.path.exists(log):
    with open(log, encoding="utf-8") as f:
      out = f.read()
    if _QUALITY.search(out):
      return _row(out, None, log)
  args = [f"--config={config}", f"--workdir={workdir}", "--mode=fid"]
  args += [f"--config.sample.sampler={sampler}", f"--config.sample.num_steps={steps}"]
  args += [f"--config.eval.num_samples={num_samples}", *extra]
  wall, out = run_main(args, log)
  return _row(out, wall, log)


def _row(out: str, wall: float | None, log: str) -> dict:
  m = _QUALITY.findall(out)
  if not m:
    raise RuntimeError(f"no quality line in {log}")
  fd, is_, precision, recall = (float(v) for v in m[-1])
  held = re.findall(r"real held-out data: FD ([\d.]+)", out)
  row = dict(fd=fd, is_=is_, precision=precision, recall=recall, wall=wall)
  row["heldout_fd"] = float(held[-1]) if held else None
  return row
