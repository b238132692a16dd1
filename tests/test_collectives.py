"""What the partitioner inserts into the compiled train step on 4 simulated devices.

One subprocess (simulated CPU devices need their own interpreter) compiles the tiny U-Net's
train step on several meshes and prints the collectives counted by `jdiff.training.hlo`;
the tests read its JSON line. It also runs one accumulated step on 4 devices against the
whole-batch step on 1 device.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_python, xla_flags

from jdiff.training import hlo

SCRIPT = r"""
import json, sys, jax, jax.numpy as jnp, numpy as np
from jdiff import schedules
from jdiff.configs import tiny
from jdiff.runs import diffusion
from jdiff.runs.setup import build_model
from jdiff.training import hlo, sharding
from jdiff.training.optim import make_optimizer
from jdiff.training.state import init_train_state
from jdiff.training.step import make_train_step

B = 16
out = {}
schedule = schedules.linear(num_steps=50)
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(-1, 1, (B, 16, 16, 1)).astype(np.float32),
         "label": np.zeros((B,), np.int32)}

def build(data, fsdp, k, dtype="float32", devices=None):
  c = tiny.get_config(); c.model.dtype = dtype
  c.optim.warmup_steps = 0; c.optim.eps = 1e-3
  module = build_model(c, num_classes=None, channels=1)
  opt = make_optimizer(total_steps=6, **c.optim)
  mesh = sharding.make_mesh_2d(devices, data=data, fsdp=fsdp)
  state = init_train_state(module, opt, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  st_sh = sharding.fsdp_shardings(state, mesh, min_size=256)
  data_sh, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
  fn = make_train_step(module, opt, grad_accum_steps=k, micro_sharding=data_sh,
                       grad_shardings=st_sh.params, **diffusion.loss_kwargs(c))
  step = jax.jit(fn, in_shardings=(st_sh, data_sh, repl, repl), out_shardings=(st_sh, repl))
  return step, jax.device_put(state, st_sh), mesh

def counts(name, *args):
  step, state, mesh = build(*args)
  text = step.lower(state, sharding.to_global(batch, mesh), schedule,
                    jax.random.key(1)).compile().as_text()
  r = hlo.collectives(text)
  out[name] = {"loop": dict(r["loop"]), "outside": dict(r["outside"]),
               "dtypes": {f"{op}:{dt}": n for (op, dt), n in r["dtypes"].items()}}

def run(*args):
  step, state, mesh = build(*args)
  new, m = step(state, sharding.to_global(batch, mesh), schedule, jax.random.key(1))
  return jax.device_get(new.params), float(m["loss"]), jax.device_get(state.params)

for name in sys.argv[1:]:
  if name == "numerics":
    one, loss1, start = run(1, 1, 1, "float32", jax.devices()[:1])
    acc, loss4, _ = run(4, 1, 4)
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(one), jax.tree.leaves(start)))
    err = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(one), jax.tree.leaves(acc)))
    out[name] = {"loss": [loss1, loss4], "moved": moved, "err": err}
  else:
    data, fsdp, k, dtype = name.split("_")
    counts(name, int(data), int(fsdp), int(k), dtype)
print("JSON" + json.dumps(out))
"""

CASES = ("4_1_4_float32", "1_4_1_float32")


def _json(proc):
  return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")][-1][4:])


@pytest.fixture(scope="module")
def compiled():
  return _json(run_python(["-c", SCRIPT, *CASES, "numerics"], devices=4, timeout=1200))


def test_fsdp_gathers_bfloat16_parameters(tmp_path):
  """mesh.fsdp=4, model.dtype=bfloat16: the partitioner already casts the parameters on their
  shards, so the all-gathers it inserts move bfloat16 (read right after SPMD partitioning;
  XLA:CPU itself later widens bf16 collectives to f32, hence the f32 gathers in the final CPU
  program). A guard: an explicit cast before the gather changed nothing here."""
  dump = tmp_path / "dump"
  flags = f"{xla_flags(4)} --xla_dump_to={dump} "
  flags += "--xla_dump_hlo_pass_re=spmd-partitioning"
  env = {"XLA_FLAGS": flags, "JAX_ENABLE_COMPILATION_CACHE": "false"}  # compile: dump
  run_python(["-c", SCRIPT, "1_4_1_bfloat16"], devices=4, env=env)
  (path,) = dump.glob("*jit_train_step*after_spmd-partitioning*.txt")
  dtypes = hlo.collectives(path.read_text())["dtypes"]
  gathers = {dt: n for (op, dt), n in dtypes.items() if op == "all-gather"}
  assert gathers.get("bf16", 0) >= 0.8 * sum(gathers.values()), gathers


def test_accumulation_reduces_gradients_once_after_the_loop(compiled):
  """Data-parallel, 4 devices, grad_accum_steps=4: no all-reduce in the scan's body, one after
  it (the gradients and the loss, combined). test_scale's STEP_SCRIPT checks the (2 data x 4
  fsdp) accumulation against one device."""
  acc = compiled["4_1_4_float32"]
  assert acc["loop"].get("all-reduce", 0) == 0, acc
  assert acc["outside"].get("all-reduce", 0) == 1, acc


def test_fsdp_step_has_no_all_to_all(compiled):
  """mesh.fsdp=4: activations stay split over the batch (the q/k/v kernels are stacked, not
  concatenated along their split axis; module outputs are constrained to the batch
  sharding). Before: 17 all-to-alls in this tiny U-Net's step."""
  fsdp = compiled["1_4_1_float32"]
  assert fsdp["outside"].get("all-to-all", 0) == 0 and not fsdp["loop"], fsdp
  assert fsdp["outside"].get("all-gather", 0) > 0  # really FSDP


def test_accumulated_step_equals_the_whole_batch_step(compiled):
  """One Adam step: 4 devices x 4 microbatches against 1 device x the whole batch (float32
  sums in another order; optim.eps = 1e-3 keeps Adam's first step Lipschitz, see
  test_scale.STEP_SCRIPT)."""
  r = compiled["numerics"]
  assert abs(r["loss"][0] - r["loss"][1]) <= 1e-5 * abs(r["loss"][0]), r
  assert r["moved"] > 100 * 1e-6, r
  assert r["err"] < 1e-6, r


def test_hlo_counter_on_a_handwritten_module():
  """The counter itself: a collective in a while body (through a call) vs outside, tuple
  and async forms, dtypes."""
  text = """HloModule m

%inner (p: f32[4]) -> f32[4] {
  %p = f32[4] parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%p), replica_groups={{0,1}}, to_apply=%add
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %c = f32[4] call(%x), to_apply=%inner
  ROOT %g = bf16[8]{0} all-gather(%y), dimensions={0}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
  %s = (f32[4], bf16[2]) all-reduce-start(%a, %b), to_apply=%add
  %d = (f32[4], bf16[2]) all-reduce-done(%s)
  ROOT %x = f32[4]{0} all-to-all(%a), dimensions={0}
}
"""
  r = hlo.collectives(text)
  assert r["loop"] == {"all-reduce": 1, "all-gather": 1}
  assert r["outside"] == {"all-reduce": 1, "all-to-all": 1}
  assert r["dtypes"][("all-reduce", "bf16")] == 1 and r["dtypes"][("all-gather", "bf16")] == 1


def test_benchmark_flops_count_the_whole_accumulated_step():
  """XLA's cost analysis counts a scan's body once: a 4-microbatch step reports ~1/4 of the
  FLOPs of the same batch's plain step; benchmark_mfu.model_flops counts the whole step."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from experiments import benchmark_mfu  # noqa: PLC0415
  from jdiff import schedules  # noqa: PLC0415
  from jdiff.training.state import init_train_state  # noqa: PLC0415
  from jdiff.training.step import make_train_step  # noqa: PLC0415

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
      return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(64)(x)))

  module, opt = Net(), optax.sgd(0.1)
  state = init_train_state(module, opt, jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
  args = (state, {"image": jnp.zeros((32, 4, 4, 8))}, schedules.linear(50), jax.random.key(1))

  def jitted(k):
    return jax.jit(make_train_step(module, opt, grad_accum_steps=k))

  plain = benchmark_mfu.step_flops(jitted(1).lower(*args).compile())
  accumulated = jitted(4).lower(*args).compile()
  assert benchmark_mfu.step_flops(accumulated) < 0.5 * plain  # the body, once
  np.testing.assert_allclose(benchmark_mfu.model_flops(jitted, 4, accumulated, *args), plain)


def test_benchmark_times_blocked_and_pipelined_steps():
  """time_steps: blocked waits after each step (median), pipelined once after n (total / n);
  both run the n steps on the state."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments import benchmark_mfu  # noqa: PLC0415

  waits = []
  step = jax.jit(lambda s: (s + 1, {"loss": jnp.sum(s)}))
  real = jax.block_until_ready

  def counting(x):
    waits.append(1)
    return real(x)

  jax.block_until_ready = counting
  try:
    state, blocked = benchmark_mfu.time_steps(step, jnp.zeros(()), 5, blocked=True)
    n_blocked = len(waits)
    state, piped = benchmark_mfu.time_steps(step, state, 5, blocked=False)
  finally:
    jax.block_until_ready = real
  assert float(state) == 10 and blocked > 0 and piped > 0
  assert n_blocked == 6 and len(waits) - n_blocked == 1


def test_benchmark_variants_change_one_setting_each():
  """--variants: each '|' item is the command line's settings with its own on top; a bad key
  is one line naming it; the attention actually compiled is read from the program."""
  import argparse  # noqa: PLC0415

  import pytest  # noqa: PLC0415

  from experiments import benchmark_mfu  # noqa: PLC0415

  args = argparse.Namespace(
    attention_impl="xla", norm_impl="flax", prng_impl="threefry", batch=0,
    mu_dtype="float32", grad_accum_steps=1, residual_dtype="float32",
  )  # fmt: skip
  base, cudnn, both = benchmark_mfu.parse_variants("base|attn=cudnn|norm=colsum,batch=512", args)
  assert base == {**vars(args), "label": "base"}
  assert cudnn == {**vars(args), "attention_impl": "cudnn", "label": "attn=cudnn"}
  assert both["norm_impl"] == "colsum" and both["batch"] == 512 and both["prng_impl"] == "threefry"
  with pytest.raises(SystemExit, match="'flash=1'"):
    benchmark_mfu.parse_variants("base|flash=1", args)
  assert benchmark_mfu.attention_used('custom_call_target="__cudnn$fmhaSoftmax"') == "cudnn"
  assert benchmark_mfu.attention_used("dot(...), exponential(...)") == "xla"
