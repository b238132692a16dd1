"""Cluster scale: FSDP on a ('data', 'fsdp') mesh, gradient accumulation, mixed precision,
resume on another mesh, and a 2-process FSDP run stopped by SIGTERM.

Each multi-device check runs in one subprocess with simulated CPU devices (few, since
every one costs an interpreter start and compiles).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from conftest import launch_two_processes, run_python, xla_flags
from jax.sharding import PartitionSpec as P

from jdiff.training import sharding

# ----------------------------------------------------------------------------- the rule (pure)


def test_fsdp_rule_and_mesh_errors():
  assert sharding.fsdp_spec((3, 3, 64, 128), 4, min_size=1) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((256, 64), 4, min_size=1) == P("fsdp")
  assert sharding.fsdp_spec((64, 64), 4, min_size=1) == P(None, "fsdp")  # tie: the last
  assert sharding.fsdp_spec((3, 5, 7), 2, min_size=1) == P()  # nothing divisible
  assert sharding.fsdp_spec((128,), 4, min_size=1000) == P()  # small: replicated
  assert sharding.fsdp_spec((), 4, min_size=0) == P()
  assert sharding.fsdp_spec((256, 64), 1, min_size=1) == P()
  assert sharding.mesh_shape(8, data=-1, fsdp=4) == (2, 4)
  assert sharding.mesh_shape(8, data=2, fsdp=-1) == (2, 4)
  with pytest.raises(ValueError, match=r"data=2 x fsdp=2 = 4 devices, but there are 8"):
    sharding.mesh_shape(8, data=2, fsdp=2)
  with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the device count 8"):
    sharding.mesh_shape(8, data=-1, fsdp=3)
  with pytest.raises(ValueError, match=r"config.mesh.fsdp must be a positive integer or -1"):
    sharding.mesh_shape(8, data=-1, fsdp=0)


@pytest.mark.parametrize(
  "key,value,message",
  [
    # The config's own rules: tests/test_validate.py.
    ("train.grad_accum_steps", 3, "batch_size=8 must be a multiple of grad_accum_steps=3"),
  ],
)
def test_bad_scale_config(tmp_path, digits_dir, key, value, message):
  from test_training import tiny_config  # noqa: PLC0415

  from jdiff.runs.setup import Setup  # noqa: PLC0415

  with pytest.raises(ValueError, match=re.escape(message)):
    with Setup(tiny_config(digits_dir, **{key: value}), str(tmp_path / "w")) as setup:
      setup.train_iterator()


# ----------------------------------------------------------------------------- one step, 8 devices

# One Adam step from the same state on the same batch: a 1-device reference, data-parallel
# on 8 devices, FSDP on (2 data x 4 fsdp), FSDP with 2-step accumulation, and bf16 compute
# with bf16 moments.
# Tolerances: the paths differ only in the order of float32 sums (batch and gradient
# reductions over devices and microbatches, ~1e-7 relative). Adam's first update is
# g / (|g| + eps), which jumps at g = 0 for a tiny eps; with optim.eps = 1e-3 it is
# Lipschitz (1 / eps) in g, so a gradient error of ~1e-9 moves a parameter by ~lr * 1e-6
# = 2e-9, far below atol = 1e-6, while a real bug moves it by up to lr = 2e-3 (checked:
# the update itself is > 100 atol).
STEP_SCRIPT = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from jdiff.configs import tiny
from jdiff.runs import diffusion
from jdiff.runs.setup import Setup
from jdiff.training import sharding
from jdiff.training.step import make_train_step
from jdiff.data import pipeline
c = tiny.get_config(); c.data.data_dir = sys.argv[1]; c.train.batch_size = 16
c.optim.warmup_steps = 0; c.optim.eps = 1e-3; c.mesh.fsdp_min_size = 256
setup = Setup(c, sys.argv[2])
it = pipeline.make_train_iterator(c.data.name, global_batch_size=16, seed=0,
                                  data_dir=c.data.data_dir, image_size=16)
batch = {k: v for k, v in next(it).items() if k != "mask"}
state0 = jax.device_get(setup.init_state())

def run(mesh, *, k=1, optimizer=None, module=None):
  st0 = state0 if optimizer is None else state0.replace(opt_state=optimizer.init(state0.params))
  shapes = jax.eval_shape(lambda: st0)
  st_sh = sharding.fsdp_shardings(shapes, mesh, min_size=c.mesh.fsdp_min_size)
  data_sh = sharding.data_sharding(mesh)
  fn = make_train_step(module or setup.module, optimizer or setup.optimizer,
                       grad_accum_steps=k, micro_sharding=data_sh,
                       grad_shardings=st_sh.params, **diffusion.loss_kwargs(c))
  step = jax.jit(fn, in_shardings=(st_sh, data_sh, sharding.replicated(mesh),
                 sharding.replicated(mesh)), out_shardings=(st_sh, sharding.replicated(mesh)))
  state = jax.device_put(st0, st_sh)
  global_batch = sharding.to_global(batch, mesh)
  assert len(global_batch["image"].sharding.device_set) == mesh.size
  state, m = step(state, global_batch, setup.schedule, setup.keys.train)
  return state, float(m["loss"]), float(m["grad_norm"])

one = run(sharding.make_mesh_2d(jax.devices()[:1]))
data = run(sharding.make_mesh_2d(data=8, fsdp=1))
mesh = sharding.make_mesh_2d(data=2, fsdp=4)
fsdp = run(mesh)
accum = run(mesh, k=2)
print("LOSS", one[1], data[1], fsdp[1], accum[1], "GNORM", one[2], data[2], fsdp[2], accum[2])
ref = jax.device_get(one[0].params)
moved = max(float(np.max(np.abs(a - b))) for a, b in
            zip(jax.tree.leaves(ref), jax.tree.leaves(state0.params)))
assert moved > 100 * 1e-6, moved
for name, (st, loss, gnorm) in {"data": data, "fsdp": fsdp, "accum": accum}.items():
  np.testing.assert_allclose(loss, one[1], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(gnorm, one[2], rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(jax.device_get(st.params)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b in zip(jax.tree.leaves(jax.device_get(st.ema_params)),
                  jax.tree.leaves(jax.device_get(one[0].ema_params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)

# Really sharded: every array the rule splits has shards of 1/4 of its split dimension, in
# params, EMA and both Adam moments; they hold most of the parameters.
st = fsdp[0]
mu, nu = st.opt_state[1][0].mu, st.opt_state[1][0].nu
n_split = n_total = 0
for tree in (st.params, st.ema_params, mu, nu):
  for x in jax.tree.leaves(tree):
    spec = sharding.fsdp_spec(x.shape, 4, min_size=256)
    expect = tuple(n // 4 if ax == "fsdp" else n for n, ax in
                   zip(x.shape, tuple(spec) + (None,) * x.ndim))
    assert {s.data.shape for s in x.addressable_shards} == {expect}, (x.shape, spec)
    n_total += x.size
    n_split += x.size * (expect != x.shape)
print("SPLIT", n_split / n_total)
assert n_split > 0.9 * n_total

# Mixed precision: bf16 compute and bf16 first moments; f32 master params, EMA, second
# moments and loss. The output layer starts at zero (so the step-0 loss is the noise's
# whatever the dtype): compare the gradient norm, which bf16 changes (8-bit mantissa,
# relative error 2^-9 per rounding) but by less than 2e-2 through this small net.
from jdiff.training.optim import make_optimizer
c.model.dtype = "bfloat16"
from jdiff.runs.setup import build_model
bf = build_model(c, num_classes=None, channels=1)
opt = make_optimizer(total_steps=6, **{**c.optim, "mu_dtype": "bfloat16"})
mp = run(mesh, k=2, optimizer=opt, module=bf)
mu = mp[0].opt_state[1][0].mu
dtypes = {jnp.dtype(x.dtype).name for x in jax.tree.leaves(mp[0].params)}
dtypes |= {"ema:" + jnp.dtype(x.dtype).name for x in jax.tree.leaves(mp[0].ema_params)}
dtypes |= {"mu:" + jnp.dtype(x.dtype).name for x in jax.tree.leaves(mu)}
dtypes |= {"nu:" + jnp.dtype(x.dtype).name for x in jax.tree.leaves(mp[0].opt_state[1][0].nu)}
print("MP", mp[1], mp[2], sorted(dtypes))
assert dtypes == {"float32", "ema:float32", "mu:bfloat16", "nu:float32"}, dtypes
assert mp[2] != one[2]  # bf16 compute really ran
np.testing.assert_allclose(mp[2], one[2], rtol=2e-2)
setup.close()
print("OK")
"""


def test_fsdp_accumulation_and_mixed_precision_match_one_device(tmp_path, digits_dir):
  proc = run_python(["-c", STEP_SCRIPT, digits_dir, str(tmp_path / "w")], devices=8, timeout=1500)
  assert "OK" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- resume elsewhere

SCALE = {"mesh.fsdp_min_size": 256, "optim.warmup_steps": 0, "optim.eps": 1e-3}

RESUME_SCRIPT = r"""
import shutil, sys
from jdiff.configs import tiny
from jdiff.runs import diffusion
def cfg(**kw):
  c = tiny.get_config(); c.data.data_dir = sys.argv[1]
  c.mesh.fsdp_min_size = 256; c.optim.warmup_steps = 0; c.optim.eps = 1e-3
  for k, v in kw.items():
    sec, key = k.split(".")
    c[sec][key] = v
  return c
wd = sys.argv[2]
s = diffusion.train_and_evaluate(cfg(**{"mesh.data": 2, "mesh.fsdp": 2, "train.num_steps": 3}), wd)
print("AT3", repr(diffusion.params_checksum(s.params)))
shutil.copytree(wd, wd + "_one")
shutil.copytree(wd, wd + "_data4")
diffusion.train_and_evaluate(cfg(**{"mesh.data": 2, "mesh.fsdp": 2}), wd)
diffusion.train_and_evaluate(cfg(**{"mesh.data": 4, "mesh.fsdp": 1}), wd + "_data4")
"""


def test_resume_on_other_meshes(tmp_path, digits_dir):
  """Saved on (2 data x 2 fsdp) at step 3, resumed on (4 data) and on 1 device."""
  from test_training import read_metrics, restore_state, tiny_config  # noqa: PLC0415

  from jdiff.runs import diffusion  # noqa: PLC0415

  wd = str(tmp_path / "run")
  proc = run_python(["-c", RESUME_SCRIPT, digits_dir, wd], devices=4, timeout=1500)
  sums = dict(re.findall(r"^(AT3) (\S+)$", proc.stdout, re.M))
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]

  one = wd + "_one"
  cfg = tiny_config(digits_dir, **SCALE)
  at3 = restore_state(one, cfg)  # onto 1 device, from FSDP shards: bit-exact
  assert int(at3.step) == 3 and repr(diffusion.params_checksum(at3.params)) == sums["AT3"]
  state = diffusion.train_and_evaluate(cfg, one)
  assert int(state.step) == 6
  # Steps 4..6 continue the same data stream on every mesh: the losses and parameters agree
  # up to the reduction order (float32, see STEP_SCRIPT for the tolerance).
  losses = {
    name: {r["step"]: r["train/loss"] for r in read_metrics(d) if "train/loss" in r}
    for name, d in (("ref", wd), ("one", one), ("data4", wd + "_data4"))
  }
  for name in ("one", "data4"):
    np.testing.assert_allclose(losses[name][6], losses["ref"][6], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(losses[name][4], losses["ref"][4], rtol=1e-5, err_msg=name)
  ref = restore_state(wd, cfg)
  for other in (state, restore_state(wd + "_data4", cfg)):
    assert int(other.step) == 6
    for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(ref.params), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 2 processes


def _finish(procs, timeout=1500):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  bad = [(i, p.returncode, err[-3000:]) for i, (p, err) in enumerate(zip(procs, outs))]
  assert all(p.returncode == 0 for p in procs), [b for b in bad if b[1] != 0]
  return outs


def _steps_logged(wd) -> list[int]:
  path = os.path.join(wd, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


def _sigterm_when(procs, victim, ready, timeout=1200):
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs) and not ready():
    time.sleep(0.2)
  procs[victim].send_signal(signal.SIGTERM)
  outs = _finish(procs)
  steps = [re.search(r"SIGTERM: saved checkpoint (\d+)", e) for e in outs]
  assert all(steps), [e[-2000:] for e in outs]
  assert steps[0].group(1) == steps[1].group(1)
  return int(steps[0].group(1)), outs


def test_two_processes_fsdp_sigterm_and_resume(tmp_path, digits_dir):
  """gloo on 127.0.0.1, 2 processes x 2 devices, mesh (2 data x 2 fsdp); SIGTERM to one.

  Run 1: JAX's preemption service (on by default with jax.distributed) tells both processes,
  which stop at the same step with no per-step collective and save one checkpoint. Run 2
  resumes both from it with the service off, so the processes agree every 3 steps
  (`train.preemption_check_every`); a SIGTERM to the other process stops both at the same
  multiple of 3, with the same parameters.
  """
  wd = str(tmp_path / "dist")
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(2),
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
  )
  overrides = {
    **SCALE,
    "mesh.fsdp": 2,
    "train.num_steps": 400,
    "train.ckpt_every": 0,
    "train.log_every": 1,
    "train.preemption_check_every": 3,
  }
  procs = launch_two_processes(wd, digits_dir, env, **overrides)
  step, _ = _sigterm_when(procs, 1, lambda: len(_steps_logged(wd)) >= 1)
  assert 1 <= step < 400
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == [str(step)]

  env["JAX_ENABLE_PREEMPTION_SERVICE"] = "false"
  procs = launch_two_processes(wd, digits_dir, env, **overrides)
  step2, outs = _sigterm_when(procs, 0, lambda: max(_steps_logged(wd)) > step)
  for err in outs:
    assert "resumed from" in err and f"at step {step}" in err
  assert step2 > step and step2 % 3 == 0
  sums = [re.search(rf"params checksum (\S+) at step {step2}", e).group(1) for e in outs]
  assert sums[0] == sums[1]
  shutil.rmtree(wd)


def test_preemption_agreement_every_n_steps_without_the_service(monkeypatch):
  """Several processes without JAX's preemption service: the SIGTERM flag is agreed by one
  allgather every `check_every` steps (not every step), and any process's flag stops all
  (the call pattern, in-process; the 2-process test above runs it for real)."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from jdiff.training import loop  # noqa: PLC0415

  calls = []
  other_flag = [False]

  def allgather(x):  # this process's flag and a second process's
    calls.append(int(x[0]))
    return np.array([[bool(x[0])], [other_flag[0]]])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(loop, "preemption_service_running", lambda: False)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  with loop.Preemption(check_every=3) as p:
    assert not p.sync_point
    assert [p.should_stop(s) for s in (4, 5, 6)] == [False, False, False]
    assert len(calls) == 1  # one collective in three steps, at step 6
    other_flag[0] = True  # the other process got SIGTERM
    assert [p.should_stop(s) for s in (7, 8)] == [False, False]  # acted on at the next check
    assert p.should_stop(9) and len(calls) == 2
    other_flag[0] = False
    p.requested = True  # this process got it
    assert p.should_stop(12) and calls[-1] == 1


# ----------------------------------------------------------------------------- profiling


def test_profile_steps_write_a_tensorboard_trace(tmp_path):
  """train_loop(profile_steps=(1, 3)) traces steps 2..3 into <dir>/plugins/profile/<run>/."""
  import jax.numpy as jnp  # noqa: PLC0415

  from jdiff.training.loop import train_loop  # noqa: PLC0415

  step = jax.jit(lambda s: (s + 1.0, {"loss": jnp.sum(s)}))
  saved = []
  state, last, preempted = train_loop(
    jnp.zeros((4,)),
    step,
    start=0,
    total=4,
    batch_size=1,
    log_every=2,
    ckpt_every=0,
    save=lambda s, st: saved.append(s),
    log=lambda *a: None,
    profile_steps=(1, 3),
    profile_dir=str(tmp_path / "tb"),
  )
  assert last == 4 and not preempted and saved == [4]
  np.testing.assert_array_equal(np.asarray(state), 4.0)
  runs = os.listdir(tmp_path / "tb" / "plugins" / "profile")
  assert len(runs) == 1
  files = os.listdir(tmp_path / "tb" / "plugins" / "profile" / runs[0])
  assert any(f.endswith(".xplane.pb") for f in files), files
  # Exactly steps 2..3 ran under the profiler: every XLA op of the step twice.
  from experiments import trace_summary  # noqa: PLC0415

  loaded = trace_summary.load_events(trace_summary.newest_trace(str(tmp_path / "tb")))
  ops = trace_summary.summarize(trace_summary.op_events(*loaded))["ops"]
  assert ops and {n for _, _, n, _ in ops} == {2}, ops
  with pytest.raises(ValueError, match=r"profile_steps=\(1, 3\) needs a profile directory"):
    train_loop(
      jnp.zeros(()),
      step,
      start=0,
      total=1,
      batch_size=1,
      log_every=1,
      ckpt_every=0,
      save=lambda *a: None,
      log=lambda *a: None,
      profile_steps=(1, 3),
    )
