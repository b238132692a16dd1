r"""Throughput benchmark of the jdiff U-Net (and optionally diffusers' UNet2DModel).

Prints compile time, train-step (forward + backward + Adam, jitted, donated)
and forward images/s as medians over timed repeats after warm-up, the model's
FLOPs per image (XLA's cost analysis of the direct-convolution network) and
model-FLOP utilisation (MFU) against a matmul peak measured in the same run.
``--conv_impl`` picks ``UNet.conv_impl`` (default "auto": Winograd for float32
on CPU). With ``--peer`` it measures diffusers' PyTorch ``UNet2DModel`` of the
same architecture in the same process, interleaved, and prints the ratios.

Usage::

  .venv/bin/python -m experiments.benchmark_unet --preset=ddpm_cifar10 --batch=8 --peer
  .venv/bin/python -m experiments.benchmark_unet --preset=digits_small --batch=64 --peer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# XLA CPU flags must be set before jax is imported. They are appended to any
# user-provided XLA_FLAGS (a user value of the same flag wins, as it comes last).
_DEFAULT_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=true",)


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="ddpm_cifar10")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument(
    "--resolution",
    type=int,
    default=None,
    help="image side (default: 32 for cifar presets, 16 for digits)",
  )
  p.add_argument(
    "--channels",
    type=int,
    default=None,
    help="image channels (default: 3 for cifar presets, 1 for digits)",
  )
  p.add_argument("--steps", type=int, default=5, help="timed repeats (median taken)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compile")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--remat", action="store_true")
  p.add_argument(
    "--conv_impl",
    default="auto",
    choices=("auto", "xla", "winograd"),
    help="UNet.conv_impl for the 3x3 convs (auto: Winograd for float32 on CPU)",
  )
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the peer")
  p.add_argument(
    "--peer", action="store_true", help="also time diffusers' UNet2DModel (needs torch + diffusers)"
  )
  p.add_argument("--no_jdiff", action="store_true", help="only time the peer")
  p.add_argument(
    "--xla_flags",
    default=" ".join(_DEFAULT_XLA_FLAGS),
    help="extra XLA_FLAGS set before importing jax",
  )
  return p.parse_args(argv)


def _median_time(fn, steps: int) -> float:
  ts = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _defaults(args):
  small = args.preset.startswith("digits")
  res = args.resolution or (16 if small else 32)
  ch = args.channels or (1 if small else 3)
  return res, ch


def _matmul_peak(steps: int, n: int = 2048) -> float:
  """Median f32 GFLOP/s of a jitted n x n matmul (the machine's practical peak)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  dt = _median_time(lambda: f(a, b).block_until_ready(), max(steps, 5))
  return 2 * n**3 / dt / 1e9


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca.get("flops", float("nan"))) if ca else float("nan")


def _interleaved(results, args) -> None:
  """Times each contender's train step, then forward, alternating contenders per
  repeat so that load from other processes hits all of them alike; stores the
  median images/s."""
  for kind in ("train", "fwd"):
    fns = [r[f"run_{kind}"] for r in results]
    for f in fns:
      for _ in range(args.warmup):
        f()
    times = [[] for _ in fns]
    for _ in range(args.steps):
      for f, ts in zip(fns, times):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    for r, ts in zip(results, times):
      r[f"{kind}_ips"] = args.batch / statistics.median(ts)


def bench_jdiff(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from jdiff.models.bridge import make_model_fn
  from jdiff.models.unet import make_unet
  from jdiff.ops.winograd import resolve_conv_impl

  res, chans = _defaults(args)
  b = args.batch
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  net = make_unet(args.preset, dtype=dtype, remat=args.remat, conv_impl=args.conv_impl)
  cond = net.num_classes is not None
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (b, res, res, chans), jnp.float32)
  t = jax.random.randint(jax.random.key(1), (b,), 0, 1000)
  y = jnp.arange(b) % net.num_classes if cond else None
  params = jax.jit(lambda: net.init(rng, x, t, y, train=False)["params"])()
  nparams = sum(p.size for p in jax.tree.leaves(params))
  tx = optax.adam(2e-4)
  opt_state = tx.init(params)

  def steps(net):
    """(train_step, forward) of `net`: forward + backward + Adam, and eval forward."""

    def loss_fn(params, x, t, y, rng):
      eps = jax.random.normal(jax.random.fold_in(rng, 1), x.shape, x.dtype)
      model_fn = make_model_fn(net, params, train=True, rng=jax.random.fold_in(rng, 2))
      out = model_fn(x + eps, t, y).astype(jnp.float32)
      return jnp.mean((out - eps) ** 2)

    def train_step(params, opt_state, x, t, y, rng):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, t, y, rng)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    def forward(params, x, t, y):
      return make_model_fn(net, params, train=False)(x, t, y)

    return train_step, forward

  train_step, forward = steps(net)
  train_jit = jax.jit(train_step, donate_argnums=(0, 1))
  fwd_jit = jax.jit(forward)

  t0 = time.perf_counter()
  train_c = train_jit.lower(params, opt_state, x, t, y, rng).compile()
  compile_train = time.perf_counter() - t0
  t0 = time.perf_counter()
  fwd_c = fwd_jit.lower(params, x, t, y).compile()
  compile_fwd = time.perf_counter() - t0

  # Model FLOPs: those of the direct-convolution network (XLA's cost analysis
  # of the unoptimised HLO), whatever conv_impl runs. Winograd executes 16/36
  # of the 3x3 convs' multiplies, so its utilisation can exceed 100%.
  train_ref, fwd_ref = steps(make_unet(args.preset, dtype=dtype, conv_impl="xla"))
  train_flops = _flops(jax.jit(train_ref).lower(params, opt_state, x, t, y, rng))
  fwd_flops = _flops(jax.jit(fwd_ref).lower(params, x, t, y))

  state = [params, opt_state]

  def run_train():
    p, o, loss = train_c(state[0], state[1], x, t, y, rng)
    loss.block_until_ready()
    state[0], state[1] = p, o

  def run_fwd():
    fwd_c(state[0], x, t, y).block_until_ready()

  return dict(
    params=nparams,
    compile_train=compile_train,
    compile_fwd=compile_fwd,
    run_train=run_train,
    run_fwd=run_fwd,
    conv_impl=resolve_conv_impl(args.conv_impl, dtype),
    train_flops=train_flops / b,
    fwd_flops=fwd_flops / b,
  )


def _peer_config(args, chans):
  """diffusers UNet2DModel kwargs of the same architecture as the jdiff preset."""
  from jdiff.models.unet import PRESETS

  cfg = PRESETS[args.preset]
  ch, mult = cfg["ch"], tuple(cfg["ch_mult"])
  res, _ = _defaults(args)
  heights = [res // 2**i for i in range(len(mult))]
  attn = [h in cfg["attn_resolutions"] for h in heights]
  if cfg.get("use_scale_shift_norm") or cfg.get("resblock_updown") or cfg.get("learn_sigma"):
    raise ValueError(f"--peer supports DDPM-style presets only, not {args.preset!r}")
  if cfg.get("num_heads", 1) != 1:
    raise ValueError("--peer maps single-head presets only")
  return dict(
    sample_size=res,
    in_channels=chans,
    out_channels=chans,
    layers_per_block=cfg["num_res_blocks"],
    block_out_channels=tuple(ch * m for m in mult),
    down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
    up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
    dropout=cfg.get("dropout", 0.0),
    norm_num_groups=cfg.get("num_groups", 32),
    attention_head_dim=None,  # one head of all channels, as DDPM
    num_class_embeds=None,
  )


def bench_peer(args) -> dict | None:
  # Idle OpenMP workers of the peer must not spin on the cores while jdiff's
  # repeat runs right after (a measurable slowdown of jdiff, see BENCHMARKS.md);
  # PASSIVE leaves the peer's own throughput unchanged. Set before torch loads
  # its OpenMP runtime.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import torch
    from diffusers import UNet2DModel
  except ImportError as e:  # optional peer
    print(f"peer skipped: {e}", file=sys.stderr)
    return None
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  res, chans = _defaults(args)
  b = args.batch
  model = UNet2DModel(**_peer_config(args, chans))
  nparams = sum(p.numel() for p in model.parameters())
  opt = torch.optim.Adam(model.parameters(), lr=2e-4)
  x = torch.randn(b, chans, res, res)
  t = torch.randint(0, 1000, (b,))

  def run_train():
    model.train()
    eps = torch.randn_like(x)
    out = model(x + eps, t).sample
    loss = torch.mean((out - eps) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def run_fwd():
    model.eval()
    with torch.no_grad():
      model(x, t)

  return dict(
    params=nparams,
    run_train=run_train,
    run_fwd=run_fwd,
    version=f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
  )


def main(argv=None):
  args = _parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (args.xla_flags + " " + os.environ.get("XLA_FLAGS", "")).strip()
  import jax

  print(
    f"# preset={args.preset} batch={args.batch} dtype={args.dtype} remat={args.remat} "
    f"steps={args.steps} warmup={args.warmup} jax={jax.__version__} "
    f"backend={jax.default_backend()} cpus={os.cpu_count()} "
    f"XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'"
  )
  peak = _matmul_peak(args.steps)
  print(f"matmul peak (2048^3 f32, median): {peak:.1f} GFLOP/s")
  r = None
  if not args.no_jdiff:
    r = bench_jdiff(args)
  p = bench_peer(args) if args.peer else None
  _interleaved([v for v in (r, p) if v is not None], args)
  peak = max(peak, _matmul_peak(args.steps))  # practical peak: best of start/end
  print(f"matmul peak after the runs (max of both): {peak:.1f} GFLOP/s")
  if r:
    print(f"jdiff params: {r['params']:,}")
    print(f"jdiff compile: train step {r['compile_train']:.1f} s, forward {r['compile_fwd']:.1f} s")
    print(f"jdiff conv_impl: {r['conv_impl']} (--conv_impl={args.conv_impl})")
    print(
      f"model FLOPs/image (direct convs, XLA cost analysis): train step "
      f"{r['train_flops'] / 1e9:.2f} G, forward {r['fwd_flops'] / 1e9:.2f} G"
    )
    for k in ("train", "fwd"):
      util = r[f"{k}_ips"] * r[f"{k}_flops"] / 1e9 / peak
      print(
        f"jdiff {k}: {r[f'{k}_ips']:.2f} img/s, {r[f'{k}_ips'] * r[f'{k}_flops'] / 1e9:.1f} "
        f"model GFLOP/s, model-FLOP utilisation {100 * util:.0f}% of matmul peak"
      )
  if p is not None:
    print(f"peer ({p['version']}, {args.threads} threads) params: {p['params']:,}")
    print(f"peer train: {p['train_ips']:.2f} img/s, forward: {p['fwd_ips']:.2f} img/s")
  # Markdown row.
  print()
  print(
    "| preset | batch | dtype | conv | params | compile train/fwd (s) | train img/s | "
    "fwd img/s | model GFLOP/img train/fwd | MFU train/fwd | peer train img/s | "
    "peer fwd img/s | ratio train | ratio fwd |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  cells = [args.preset, str(args.batch), args.dtype, r["conv_impl"] if r else "-"]
  if r:
    cells += [
      f"{r['params']:,}",
      f"{r['compile_train']:.1f} / {r['compile_fwd']:.1f}",
      f"{r['train_ips']:.2f}",
      f"{r['fwd_ips']:.2f}",
      f"{r['train_flops'] / 1e9:.2f} / {r['fwd_flops'] / 1e9:.2f}",
      f"{100 * r['train_ips'] * r['train_flops'] / 1e9 / peak:.0f}% / "
      f"{100 * r['fwd_ips'] * r['fwd_flops'] / 1e9 / peak:.0f}%",
    ]
  else:
    cells += ["-"] * 6
  if p:
    cells += [f"{p['train_ips']:.2f}", f"{p['fwd_ips']:.2f}"]
    if r:
      cells += [f"{r['train_ips'] / p['train_ips']:.2f}", f"{r['fwd_ips'] / p['fwd_ips']:.2f}"]
    else:
      cells += ["-", "-"]
  else:
    cells += ["-"] * 4
  print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
