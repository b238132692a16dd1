"""experiments/trace_summary.py: the op ranking and busy share of a real jax.profiler trace."""

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

  events, names = trace_summary.load_events(trace_summary.newest_trace(str(tmp_path)))
  ops = trace_summary.op_events(events, names)
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
