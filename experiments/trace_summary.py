r"""Where a step's time goes: the top ops of a `jax.profiler` trace, and the idle share.

Reads the newest ``*.trace.json.gz`` under a trace directory (what
``config.train.profile_steps`` writes under ``<workdir>/tensorboard``, or
``jax.profiler.trace(dir)``), keeps the complete events ("ph": "X") of the device
processes (``/device:GPU:0`` ...; on a CPU-only trace the ``/host:CPU`` events named like
HLO instructions, i.e. XLA:CPU's ops without the runtime's own events), and prints:

- the ops ranked by total time, each with its count and share of the op time, grouped by
  the HLO op that launched them (``args.hlo_op`` where the trace records it, as GPU
  kernels do) or else by the event's name;
- the same time by category (convolution, matmul, fusion, collective, copy, other), from
  the kernel and op names, and, given the compiled HLO text, by the JAX primitive that
  each op's ``op_name`` ends with;
- ``busy``: the union of the op intervals against the span from the first op's start to
  the last op's end. On a GPU, ``1 - busy`` is the time the device waited on the host or
  on launches, the first thing to read when MFU is low.

Usage::

  .venv/bin/python -m experiments.trace_summary runs/x/tensorboard --top=25
  .venv/bin/python -m experiments.trace_summary DIR --hlo=step.hlo.txt  # CPU: op_name
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Sequence

# On a host trace, XLA:CPU's ops are the events named like HLO instructions
# ("ynn_fusion", "dot.3", "loop_add_fusion.12"); the runtime's own events ("ThunkExecutor::
# Execute", "ParseArguments", "end: ...", the Python tracer's "$file:line") are not.
_HLO_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.[0-9]+)*$")
_CATEGORIES = (  # first match wins, on the lower-cased kernel/op name
  ("collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter", "collective")),
  ("convolution", ("conv", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "implicit_gemm")),
  ("matmul", ("gemm", "cutlass", "dot", "matmul", "ynn_fusion", "cublas", "sm90_xmma")),
  ("copy", ("memcpy", "memset", "copy", "transpose")),
  ("fusion", ("fusion", "triton", "loop_", "input_", "reduce")),
)


def newest_trace(trace_dir: str) -> str:
  """Path of the newest ``*.trace.json.gz`` under ``trace_dir``.

  Raises:
    FileNotFoundError: naming the directory, when it holds no trace.
  """
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir!r}")
  return max(files, key=os.path.getmtime)


def load_events(path: str) -> tuple[list[dict], dict[int, str], dict[tuple, str]]:
  """The complete events of a trace file, its process names (pid -> name) and its thread
  names ((pid, tid) -> name)."""
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace.get("traceEvents", [])
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  return [e for e in events if e.get("ph") == "X" and "dur" in e], processes, threads


def op_events(
  events: Sequence[dict], processes: dict[int, str], threads: dict[tuple, str]
) -> list[dict]:
  """The events of the device processes, or of the host CPU when there is no device.

  On a device, only its ``Stream ...`` lines count where it has them: the trace viewer's
  derived lines ("XLA Modules", "XLA Ops", "Steps") repeat the same time. On the host,
  only XLA:CPU's own pools ("tf_XLAEigen/...", "tf_XLAPjRtCpuClient/...") where named:
  the Python threads' events ("shard_args") are the runtime's.
  """
  device = {pid for pid, n in processes.items() if n.startswith("/device:")}
  host = {pid for pid, n in processes.items() if n.startswith("/host:")}
  pids, marker = (device, "Stream") if device else (host, "XLA")
  ops = [e for e in events if e["pid"] in pids and (device or _HLO_NAME.match(e["name"]))]
  lines = {k for k, n in threads.items() if k[0] in pids and marker in n}
  return [e for e in ops if (e["pid"], e.get("tid")) in lines] if lines else ops


def category(name: str) -> str:
  lower = name.lower()
  for cat, keys in _CATEGORIES:
    if any(k in lower for k in keys):
      return cat
  return "other"


def busy_fraction(events: Sequence[dict]) -> float:
  """Union of the events' [ts, ts + dur) over the span from the first start to the last end."""
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
  if not spans:
    return 0.0
  busy, cur_start, cur_end = 0.0, *spans[0]
  for start, end in spans[1:]:
    if start > cur_end:
      busy += cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  busy += cur_end - cur_start
  span = spans[-1][1] - spans[0][0]
  return busy / span if span > 0 else 1.0


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> ``op_name`` metadata, from a compiled module's ``as_text()``."""
  pattern = r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"'
  return {m.group(1): m.group(2) for m in re.finditer(pattern, hlo_text, re.M)}


def summarize(events: Sequence[dict], op_names: dict[str, str] | None = None) -> dict:
  """Op time by op and by category, and the busy fraction.

  Args:
    events: complete events of one kind of process (``op_events``).
    op_names: optional instruction -> op_name map (``hlo_op_names``) shown beside the
      instruction names of a CPU trace.

  Returns:
    ``{"ops": [(op, total_us, count, share)], "categories": {cat: total_us},
    "primitives": {primitive: total_us}, "total_us": float, "busy": float}``, ops
    sorted by total time; ``primitives`` (the last part of each op's ``op_name``, e.g.
    ``dot_general``, ``conv_general_dilated``) is empty without ``op_names``.
  """
  total, count, cats = collections.Counter(), collections.Counter(), collections.Counter()
  prims = collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op") or e["name"]
    total[op] += e["dur"]
    count[op] += 1
    cats[category(f"{e['name']} {op}")] += e["dur"]
    if op_names:
      prims[op_names.get(op, "?").rsplit("/", 1)[-1]] += e["dur"]
  all_us = float(sum(total.values()))
  ops = [
    (f"{op}  [{op_names[op]}]" if op_names and op in op_names else op, us, count[op], us / all_us)
    for op, us in total.most_common()
  ]
  return dict(
    ops=ops,
    categories=dict(cats),
    primitives=dict(prims),
    total_us=all_us,
    busy=busy_fraction(events),
  )


def format_summary(summary: dict, top: int = 25) -> str:
  lines = [
    f"op time {summary['total_us'] / 1e3:.1f} ms; device busy {100 * summary['busy']:.1f} % "
    "of the span from the first op to the last",
    "by category: "
    + ", ".join(
      f"{k} {100 * v / summary['total_us']:.1f} %"
      for k, v in sorted(summary["categories"].items(), key=lambda kv: -kv[1])
    ),
  ]
  if summary["primitives"]:
    lines.append(
      "by JAX primitive: "
      + ", ".join(
        f"{k} {100 * v / summary['total_us']:.1f} %"
        for k, v in sorted(summary["primitives"].items(), key=lambda kv: -kv[1])[:8]
      )
    )
  lines += [
    "| op | ms | count | share |",
    "|---|---|---|---|",
  ]
  for op, us, n, share in summary["ops"][:top]:
    lines.append(f"| {op[:120]} | {us / 1e3:.2f} | {n} | {100 * share:.1f} % |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("trace_dir", help="a directory holding a jax.profiler trace")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--hlo", default="", help="compiled HLO text, to name a CPU trace's ops")
  args = p.parse_args(argv)
  try:
    path = newest_trace(args.trace_dir)
  except FileNotFoundError as e:
    raise SystemExit(f"trace_summary: {e}") from None
  ops = op_events(*load_events(path))
  op_names = None
  if args.hlo:
    try:
      with open(args.hlo) as f:
        op_names = hlo_op_names(f.read())
    except OSError as e:
      raise SystemExit(f"trace_summary: cannot read --hlo={args.hlo!r}: {e.strerror}") from None
  print(path)
  print(format_summary(summarize(ops, op_names), args.top))


if __name__ == "__main__":
  main()
