r"""Train-step time and MFU (bf16) of `ddpm_cifar10` and the ADM ImageNet-64 U-Net on a GPU.

One call measures both models with jdiff's real train step (forward, backward, Adam, EMA;
jitted, donated) on every local device (FSDP over all of them when --fsdp, else data-
parallel): compile time apart, then --steps timed steps after --warmup, twice: blocked (a
wait after each step, the median) and pipelined (one wait after all, total / steps).
MFU = (model FLOPs per step from XLA's cost analysis of the compiled step) / (pipelined step
time x the device's bf16 dense peak x devices). The peak is taken from --peak_tflops, or
from a table of known GPUs by `device_kind` (H100/H200 SXM: 989 TFLOP/s dense bf16, A100:
312).

Usage (a GPU session, one call; `experiments/gpu_benchmarks.sh` runs the whole set)::

  .venv/bin/python -m experiments.benchmark_mfu --models=ddpm_cifar10,adm_imagenet64,dit_b2
  .venv/bin/python -m experiments.benchmark_mfu --models=dit_b2 \
      --variants="base|attn=cudnn|prng=rbg|res=bfloat16|attn=cudnn,prng=rbg,res=bfloat16"

`--variants` measures settings one at a time against the command line's: each `|` item
overrides some of attn (attention_impl), norm (norm_impl), prng (prng_impl), res (DiT's
residual_dtype), batch, mu (Adam's moment dtype) and accum (grad_accum_steps). The variants of
a model compile together in threads, then run one by one; the table names the attention that
was actually compiled (cuDNN's fused kernel or XLA's).

`dit_b2` / `dit_xl2` are DiT-B/2 and XL/2 on 32 x 32 x 4 latents (1000 classes, learned
sigma), a transformer for comparison with the convolutional U-Nets.

With ``--profile_dir=DIR`` each model's timing is followed by 3 traced steps and their
top kernels, categories and device-busy share (``experiments/trace_summary.py``): the
MFU and its diagnosis in the same call.

Goal: >= 45 % MFU in bf16 on one GPU. Not measured on the CPU machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import time

import jax
import jax.numpy as jnp

from experiments import benchmark_memory, trace_summary
from jdiff.models.dit import make_dit
from jdiff.schedules import get_schedule
from jdiff.training import loop, prng, sharding
from jdiff.training.optim import make_optimizer
from jdiff.training.state import init_train_state, param_count
from jdiff.training.step import make_train_step

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
BATCH = {"ddpm_cifar10": 128, "adm_imagenet64": 32, "dit_b2": 256, "dit_xl2": 64}  # per device
# DiT on ImageNet-256's 32 x 32 x 4 latents, class-conditional with learned sigma (the paper's).
DIT = {"dit_b2": "B/2", "dit_xl2": "XL/2"}


def build(
  name: str,
  dtype: str,
  attention_impl: str = "xla",
  norm_impl: str = "flax",
  residual_dtype: str = "float32",
):
  """(module, image shape) of a U-Net preset of benchmark_memory or a DiT preset (DiT has
  no GroupNorm: `norm_impl` applies to the U-Nets only, `residual_dtype` to DiT only)."""
  if name in DIT:
    module = make_dit(
      DIT[name],
      num_classes=1000,
      learn_sigma=True,
      dtype=jnp.dtype(dtype),
      attention_impl=attention_impl,
      residual_dtype=jnp.dtype(residual_dtype),
    )
    return module, (32, 32, 4)
  return benchmark_memory.build(name, dtype, attention_impl=attention_impl, norm_impl=norm_impl)


def _peak(kind: str, override: float) -> float:
  if override:
    return override * 1e12
  for name, tflops in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12
  raise SystemExit(f"unknown device kind {kind!r}: pass --peak_tflops")


def step_flops(compiled) -> float:
  """One device's FLOPs per call of a compiled program (XLA's cost analysis; a loop's body
  counts once, whatever its trip count)."""
  return float((compiled.cost_analysis() or {}).get("flops", float("nan")))


def model_flops(jitted, k: int, compiled, *args) -> float:
  """FLOPs per step of the k-microbatch step `compiled` (`jitted(k)`, called on `args`).

  Cost analysis counts a scan's body once, so under accumulation (k > 1) it would report
  about 1 / k of the work: count the same batch's step without accumulation instead (only
  compiled; it is the same computation up to the k - 1 extra gradient additions).
  """
  if k == 1:
    return step_flops(compiled)
  return step_flops(jitted(1).lower(*args).compile())


def time_steps(step, state, n: int, *, blocked: bool):
  """Seconds per step of `state, metrics = step(state)` over n steps -> (state, seconds).

  blocked: wait for each step (the latency, host dispatch included: the median); else
  dispatch all n and wait once at the end (the throughput of a training loop, whose host
  dispatch overlaps the device's work: total / n).
  """
  times, t_all = [], time.perf_counter()
  for _ in range(n):
    t0 = time.perf_counter()
    state, m = step(state)
    if blocked:
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t0)
  jax.block_until_ready(state)
  return state, statistics.median(times) if blocked else (time.perf_counter() - t_all) / n


VARIANT_KEYS = {
  "attn": "attention_impl",
  "norm": "norm_impl",
  "prng": "prng_impl",
  "batch": "batch",
  "mu": "mu_dtype",
  "accum": "grad_accum_steps",
  "res": "residual_dtype",
}


def parse_variants(spec: str, args) -> list[dict]:
  """`--variants` "base|attn=cudnn|norm=colsum,prng=rbg" -> one settings dict per variant:
  the command line's settings with the variant's on top ("base": none changed)."""
  base = {v: getattr(args, v) for v in VARIANT_KEYS.values()}
  out = []
  for item in filter(None, (x.strip() for x in spec.split("|"))):
    settings, label = dict(base), item
    for kv in item.split(","):
      if kv == "base":
        continue
      key, sep, value = kv.partition("=")
      if not sep or key not in VARIANT_KEYS:
        raise SystemExit(f"--variants: bad setting {kv!r} in {item!r}; keys: {list(VARIANT_KEYS)}")
      field = VARIANT_KEYS[key]
      settings[field] = int(value) if field in ("batch", "grad_accum_steps") else value
    out.append(dict(settings, label=label))
  return out


def prepare(name: str, v: dict, args) -> dict:
  """Builds variant `v` of model `name`: its state, batch and lowered step (not compiled)."""
  module, image_shape = build(
    name, args.dtype, v["attention_impl"], v["norm_impl"], v["residual_dtype"]
  )
  n = jax.device_count()
  mesh = sharding.make_mesh_2d(fsdp=n if args.fsdp else 1)
  optimizer = make_optimizer(lr=1e-4, mu_dtype=v["mu_dtype"])
  conditional = module.num_classes is not None
  key = jax.random.key(0)
  step_key = prng.base_key(0, v["prng_impl"])
  sample = jnp.zeros((1, *image_shape))

  def init(k):
    return init_train_state(
      module, optimizer, k, sample, num_classes=module.num_classes if conditional else None
    )

  shapes = jax.eval_shape(init, key)
  state_sh = sharding.fsdp_shardings(shapes, mesh)
  data_sh, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
  b = (v["batch"] or BATCH[name]) * n
  if args.count_only:  # abstract inputs: compile for this backend, run nothing
    state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh
    )
    batch = {
      "image": jax.ShapeDtypeStruct((b, *image_shape), jnp.float32, sharding=data_sh),
      "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data_sh),
    }
  else:
    state = jax.jit(init, out_shardings=state_sh)(key)
    batch = {
      "image": jax.device_put(jax.random.normal(key, (b, *image_shape)), data_sh),
      "label": jax.device_put(jnp.arange(b, dtype=jnp.int32) % 1000, data_sh),
    }
  schedule = get_schedule("linear", 1000)

  def jitted(k):
    return jax.jit(
      make_train_step(
        module,
        optimizer,
        null_label=module.null_label if conditional else None,
        grad_accum_steps=k,
        micro_sharding=data_sh,
        grad_shardings=state_sh.params,
        learn_sigma=module.learn_sigma,
      ),
      in_shardings=(state_sh, data_sh, repl, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
    )

  call = (state, batch, schedule, step_key)
  k = v["grad_accum_steps"]
  return dict(
    name=name, v=v, b=b, shapes=shapes, call=call, jitted=jitted, lowered=jitted(k).lower(*call)
  )


def attention_used(hlo_text: str) -> str:
  """'cudnn' when the compiled program calls cuDNN's fused attention, else 'xla'."""
  return "cudnn" if "__cudnn$fmha" in hlo_text else "xla"


def compile_all(prepared: list[dict], threads: int) -> None:
  """Compiles every prepared step, `threads` at a time (XLA compiles outside the GIL)."""

  def one(p):
    t0 = time.perf_counter()
    p["compiled"] = p.pop("lowered").compile()
    p["compile_s"] = time.perf_counter() - t0

  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    list(pool.map(one, prepared))


def measure(p: dict, args, profile: bool) -> dict:
  """Times (and with `profile`, traces) one compiled variant -> its table row."""
  name, v, b, compiled = p["name"], p["v"], p["b"], p["compiled"]
  k = v["grad_accum_steps"]
  flops = model_flops(p["jitted"], k, compiled, *p["call"])
  if args.count_only:
    print(
      f"{name}: batch {b}, {flops:.6e} FLOPs per step (XLA cost analysis, "
      f"{jax.devices()[0].platform})",
      flush=True,
    )
    return {}
  if name in args.flops:  # a count from another backend (GPU cost analysis may skip cuDNN
    # calls), given at the model's default batch and scaled linearly to this one
    xla_flops = flops
    flops = args.flops[name] * b / (BATCH[name] * jax.device_count())
    print(f"{name} [{v['label']}]: XLA here counts {xla_flops:.4e} FLOPs; MFU uses {flops:.4e}")
  state, batch, schedule, key = p.pop("call")
  hlo = compiled.as_text()
  run = lambda st: compiled(st, batch, schedule, key)  # noqa: E731
  for _ in range(args.warmup):
    state, m = run(state)
  jax.block_until_ready(state)
  state, blocked = time_steps(run, state, args.steps, blocked=True)
  state, dt = time_steps(run, state, args.steps, blocked=False)
  busy = float("nan")
  if profile:  # a few more steps under the profiler, then where their time went
    trace_dir = os.path.join(args.profile_dir, name)
    loop.start_trace(trace_dir)
    for _ in range(3):
      state, m = run(state)
    jax.block_until_ready((state, m))
    jax.profiler.stop_trace()
    trace = trace_summary.newest_trace(trace_dir)
    events = trace_summary.op_events(*trace_summary.load_events(trace))
    summary = trace_summary.summarize(events, trace_summary.hlo_op_names(hlo))
    busy = summary["busy"]
    print(
      f"{name} [{v['label']}], 3 profiled steps:\n{trace_summary.format_summary(summary, 20)}",
      flush=True,
    )
  del state
  # cost_analysis of an SPMD program counts one device's FLOPs.
  peak = _peak(jax.devices()[0].device_kind, args.peak_tflops)
  return dict(
    model=name,
    variant=v["label"],
    params=param_count(p["shapes"].params),
    batch=b,
    compile_s=p["compile_s"],
    blocked_ms=blocked * 1e3,
    step_ms=dt * 1e3,
    img_s=b / dt,
    tflops=flops / dt / 1e12,
    mfu=flops / dt / peak,
    busy=busy,
    attention=attention_used(hlo),
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="ddpm_cifar10,adm_imagenet64")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--mu_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=0, help="per device (0: the model's default)")
  p.add_argument("--grad_accum_steps", type=int, default=1)
  p.add_argument("--attention_impl", default="xla", help="auto | xla | cudnn | chunked")
  p.add_argument("--norm_impl", default="flax", help="flax | colsum (U-Nets' GroupNorm)")
  p.add_argument("--prng_impl", default="threefry", help="threefry | rbg | unsafe_rbg")
  p.add_argument("--residual_dtype", default="float32", help="DiT's residual stream")
  p.add_argument(
    "--variants",
    default="base",
    help="'|'-separated variants of the settings above, measured for every model, e.g. "
    "'base|attn=cudnn|norm=colsum|prng=rbg|batch=512,mu=bfloat16' (keys: "
    + ", ".join(VARIANT_KEYS)
    + ")",
  )
  p.add_argument("--compile_threads", type=int, default=4, help="variants compiled at once")
  p.add_argument("--fsdp", action="store_true", help="shard the state over all devices")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak per device")
  p.add_argument(
    "--profile_dir",
    default="",
    help="also trace 3 steps of each model's first variant into DIR/<model> and print "
    "their top ops and the device's busy share",
  )
  p.add_argument(
    "--count_only",
    action="store_true",
    help="print each step's FLOPs (compile only, e.g. on the CPU) and exit",
  )
  p.add_argument(
    "--flops",
    default="",
    help="NAME=FLOPS,... per-step counts at the model's default batch to use for MFU "
    "instead of this backend's (scaled linearly with the batch)",
  )
  args = p.parse_args()
  args.flops = {
    k: float(v) for k, v in (kv.split("=") for kv in filter(None, args.flops.split(",")))
  }
  variants = parse_variants(args.variants, args)
  kind = jax.devices()[0].device_kind
  print(f"{jax.device_count()} x {kind}, {args.dtype}, jax {jax.__version__}")
  header = (
    "| model | variant | attention used | params | batch | compile s | blocked ms "
    "| pipelined ms | img/s | TFLOP/s/dev | MFU | busy |"
  )
  rows = []
  for name in args.models.split(","):  # one model at a time: its variants compile together
    prepared = [prepare(name, v, args) for v in variants]
    compile_all(prepared, args.compile_threads)
    for i, prep in enumerate(prepared):
      r = measure(prep, args, profile=bool(args.profile_dir) and i == 0)
      if r:
        busy = "-" if r["busy"] != r["busy"] else f"{100 * r['busy']:.0f} %"
        rows.append(
          f"| {r['model']} | {r['variant']} | {r['attention']} | {r['params'] / 1e6:.1f}M | "
          f"{r['batch']} | {r['compile_s']:.1f} | {r['blocked_ms']:.1f} | {r['step_ms']:.1f} | "
          f"{r['img_s']:.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f} % | {busy} |"
        )
        print(rows[-1], flush=True)
    del prepared
  if rows:
    print("\n".join((header, "|---" * 12 + "|", *rows)), flush=True)


if __name__ == "__main__":
  main()
