"""experiments/trace_summary.py: the op ranking and busy share of a real jax.profiler trace."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from experiments import trace_summary


def _events(*spans):
  return [{"name": f"op{i}", "ts": s, "dur": e - s} for i, (s, e) in enumerate(spans)]


def test_busy_fraction_is_the_union_of_intervals():
  # [0, 15) and [20, 30) are busy out of the span [0, 30): 25 / 30.
  assert trace_summary.busy_fraction(_events((0, 10), (5, 15), (20, 30))) == pytest.approx(25 / 30)
  # Nested and touching intervals: [0, 10) all busy.
  assert trace_summary.busy_fraction(_events((0, 10), (2, 3), (10, 10))) == pytest.approx(1.0)
  assert trace_summary.busy_fraction([]) == 0.0


def test_categories():
  assert trace_summary.category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
  assert trace_summary.category("cudnn::xmma_fprop_implicit_gemm_indexed") == "convolution"
  assert trace_summary.category("ncclDevKernel_AllReduce_Sum_f32") == "collective"
  assert trace_summary.category("loop_multiply_fusion_3") == "fusion"
  assert trace_summary.category("something_else") == "other"


def test_missing_trace_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    trace_summary.newest_trace(str(tmp_path))


def test_real_cpu_trace_ranks_the_matmul_first(tmp_path):
  """A 1024^3 matmul (2.1 GFLOP) next to a 1024-element add: the matmul must dominate."""
  a = jax.random.normal(jax.random.key(0), (1024, 1024))
  v = jnp.ones((1024,))
  f = jax.jit(lambda a, v: (a @ a, v + 1.0))
  compiled = f.lower(a, v).compile()
  jax.block_until_ready(compiled(a, v))
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(3):
    jax.block_until_ready(compiled(a, v))
  jax.profiler.stop_trace()

  loaded = trace_summary.load_events(trace_summary.newest_trace(str(tmp_path)))
  ops = trace_summary.op_events(*loaded)
  op_names = trace_summary.hlo_op_names(compiled.as_text())
  summary = trace_summary.summarize(ops, op_names)
  times = [u for _, u, _, _ in summary["ops"]]
  assert times == sorted(times, reverse=True)
  top, us, count, share = summary["ops"][0]
  assert "dot_general" in top or "matmul" in top, summary["ops"][:3]
  assert count == 3  # one event per execution
  assert share > 0.5
  assert summary["categories"]["matmul"] >= us
  assert max(summary["primitives"], key=summary["primitives"].get) == "dot_general"
  assert 0.0 < summary["busy"] <= 1.0
  assert sum(u for _, u, _, _ in summary["ops"]) == pytest.approx(summary["total_us"])
  text = trace_summary.format_summary(summary, top=1)
  assert "device busy" in text and text.count("\n| ") == 1 + 1  # the header and the top row


def test_gpu_trace_counts_stream_kernels_once(tmp_path):
  """A GPU-shaped trace: kernels on a stream, the same time again on a derived "XLA Ops"
  line, and host events; only the stream's kernels count, grouped by their hlo_op."""
  meta = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
  ]
  kernels = [  # conv 0-60 (two kernels of one HLO op), gemm 70-90, idle 60-70 and 90-100
    ("cudnn::xmma_fprop_implicit_gemm", "convolution.1", 0, 40),
    ("cudnn::xmma_fprop_implicit_gemm", "convolution.1", 40, 20),
    ("sm90_xmma_gemm_bf16", "fusion.3", 70, 20),
    ("loop_add_fusion", "add.4", 100, 0),
  ]
  events = [
    {"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": ts, "dur": d, "args": {"hlo_op": op}}
    for n, op, ts, d in kernels
  ]
  events += [{**e, "tid": 9, "name": e["args"]["hlo_op"]} for e in events]  # derived line
  events.append({"ph": "X", "pid": 2, "tid": 1, "name": "dot.1", "ts": 0, "dur": 500})
  path = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)

  loaded = trace_summary.load_events(trace_summary.newest_trace(str(tmp_path)))
  summary = trace_summary.summarize(trace_summary.op_events(*loaded))
  assert summary["total_us"] == 80
  assert [(op, us, n) for op, us, n, _ in summary["ops"]] == [
    ("convolution.1", 60, 2),
    ("fusion.3", 20, 1),
    ("add.4", 0, 1),
  ]
  assert summary["categories"] == {"convolution": 60, "matmul": 20, "fusion": 0}
  assert summary["busy"] == pytest.approx(80 / 100)
