"""Stage 1 of latent diffusion: train and evaluate the KL autoencoder.

`train_autoencoder(config, workdir)` trains `AutoencoderKL` with LDM's first-stage loss
(reconstruction + kl_weight * KL; no LPIPS / GAN terms) using the same machinery as the
diffusion trainer: a jitted step over the device mesh (batch sharded, params replicated,
state donated), the grain input pipeline, orbax checkpoints with the iterator position
(periodic, final, on SIGTERM; resume from the workdir always wins) and `MetricWriter`.
At the end it writes a PNG grid of eval-split originals (top row) over their
reconstructions (bottom row) and the latent scale factor (1 / std of the train split's
posterior means, [LDM] App. G) to `workdir/latent_scale.json`, which stage 2 reads
through `jdiff.training.latents.load_codec`.

`evaluate_autoencoder(config, workdir)` reports reconstruction MSE and PSNR (data
range 2, images in [-1, 1]) over the whole eval split, reconstructing from the
posterior mean.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022, Sec. 3.1, App. G.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jdiff.models import autoencoder_losses as ae_losses
from jdiff.data import pipeline
from jdiff.models.autoencoder import AutoencoderKL, make_autoencoder, param_count
from jdiff.training import latents, sharding
from jdiff.training.checkpoint import Checkpointer
from jdiff.training.optim import make_optimizer
from jdiff.training.step import make_autoencoder_train_step
from jdiff.training.loop import train_loop
from jdiff.training.trainer import log_process_info
from jdiff.training.writers import MetricWriter, save_image_grid, write_scalars_once

Array = jax.Array
PyTree = Any
REQUIRED_SECTIONS = ("data", "autoencoder", "loss", "optim", "train", "eval")


@flax.struct.dataclass
class AutoencoderState:
  """Stage-1 training state; the step is the only clock (rng = fold_in(base, step))."""
  step: Array
  params: Any
  opt_state: optax.OptState


# ----------------------------------------------------------------------------- config

def validate_config(config) -> None:
  """Raises ValueError naming the bad key/value."""
  for section in REQUIRED_SECTIONS:
    if section not in config:
      raise ValueError(f"autoencoder config is missing the section {section!r}")
  loss = config.loss
  if loss.recon_loss not in ("l1", "l2"):
    raise ValueError(f"config.loss.recon_loss must be 'l1' or 'l2', got {loss.recon_loss!r}")
  if not loss.kl_weight >= 0:
    raise ValueError(f"config.loss.kl_weight must be >= 0, got {loss.kl_weight!r}")
  for key in ("perceptual_weight", "adversarial_weight"):
    if loss[key] != 0:
      raise ValueError(
          f"config.loss.{key}={loss[key]!r}: the LPIPS perceptual and PatchGAN adversarial "
          "terms of LDM are not implemented (LPIPS needs pretrained VGG weights, which "
          "cannot be downloaded here); set it to 0")
  t = config.train
  for key in ("num_steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
    value = t[key]
    if not isinstance(value, int) or value < (0 if key.endswith("every") else 1):
      raise ValueError(f"config.train.{key} must be a positive integer, got {value!r}")
  e = config.eval
  if not isinstance(e.batch_size, int) or e.batch_size < 1:
    raise ValueError(f"config.eval.batch_size must be a positive integer, got {e.batch_size!r}")
  if not isinstance(e.num_recon_images, int) or e.num_recon_images < 0:
    raise ValueError("config.eval.num_recon_images must be a non-negative integer, got "
                     f"{e.num_recon_images!r}")


def build_autoencoder(config, image_shape) -> AutoencoderKL:
  """The AutoencoderKL of `config.autoencoder` (preset + non-None overrides).

  `in_channels` defaults to the data's channel count.
  """
  a = config.autoencoder
  overrides = {k: v for k, v in a.overrides.items() if v is not None}
  if "ch_mult" in overrides:
    overrides["ch_mult"] = tuple(overrides["ch_mult"])
  if "dtype" in overrides:
    if overrides["dtype"] not in latents.DTYPES:
      raise ValueError(f"config.autoencoder.overrides.dtype must be one of "
                       f"{sorted(latents.DTYPES)}, got {overrides['dtype']!r}")
    overrides["dtype"] = latents.DTYPES[overrides["dtype"]]
  overrides.setdefault("in_channels", int(image_shape[-1]))
  module = make_autoencoder(a.preset, **overrides)
  latents.latent_shape_of(module, image_shape)  # validates size and channels
  return module


class _Context:
  """What training and evaluation share, derived from (config, workdir)."""

  def __init__(self, config, workdir: str):
    validate_config(config)
    self.config, self.workdir = config, os.path.abspath(workdir)
    d = config.data
    self.data_dir = d.data_dir or None
    self.image_size = d.image_size or None
    self.meta = pipeline.dataset_metadata(d.name, data_dir=self.data_dir,
                                          image_size=self.image_size)
    self.image_shape = tuple(self.meta.image_shape)
    self.module = build_autoencoder(config, self.image_shape)
    self.latent_shape = latents.latent_shape_of(self.module, self.image_shape)
    self.mesh = sharding.make_mesh()
    self.repl = sharding.replicated(self.mesh)
    self.data_sh = sharding.data_sharding(self.mesh)
    self.optimizer = make_optimizer(total_steps=config.train.num_steps, **config.optim)
    self.rng = jax.random.key(config.seed)
    self.init_rng = jax.random.key(config.seed, impl="rbg")  # fast init compile on CPU
    self.checkpointer = Checkpointer(os.path.join(self.workdir, latents.CKPT_DIR),
                                     max_to_keep=config.train.keep_checkpoints)

  def init_state(self) -> AutoencoderState:
    def init(rng):
      x = jnp.zeros((1, *self.image_shape), jnp.float32)
      params = self.module.init(rng, x, sample_posterior=False)["params"]
      return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=self.optimizer.init(params))
    return jax.jit(init, out_shardings=self.repl)(self.init_rng)

  def architecture(self) -> dict:
    return latents.architecture_record(self.config.autoencoder.preset, self.module,
                                       self.image_shape)

  def check_or_write_architecture(self) -> None:
    """Writes autoencoder.json, or checks that a resumed run has the same one."""
    path = os.path.join(self.workdir, latents.ARCH_FILE)
    record = self.architecture()
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        stored = json.load(f)
      if stored != json.loads(json.dumps(record)):
        raise ValueError(f"{path} describes another autoencoder ({stored}) than the config "
                         f"({record}); use a fresh --workdir")
    elif jax.process_index() == 0:
      latents.write_json(path, record)

  def reconstruct_fn(self):
    """Jitted (params, images [B, H, W, C]) -> (recon from the posterior mean, KL [B])."""
    def fn(params, x):
      recon, posterior = self.module.apply({"params": params}, x, sample_posterior=False)
      return recon, posterior.kl()
    return jax.jit(fn, in_shardings=(self.repl, self.data_sh),
                   out_shardings=(self.data_sh, self.data_sh))

  def eval_iterator(self, batch_size: int):
    sharding.check_global_batch(batch_size, self.mesh)
    return pipeline.make_eval_iterator(
        self.config.data.name, global_batch_size=batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        split=self.config.data.eval_split, data_dir=self.data_dir, image_size=self.image_size)


def make_state_train_step(module: AutoencoderKL, optimizer: optax.GradientTransformation, *,
                          recon_loss: str, kl_weight: float):
  """`step(state, images [B, H, W, C], rng) -> (state, metrics)`; rng folded with the step."""
  inner = make_autoencoder_train_step(module, optimizer, recon_loss=recon_loss,
                                                kl_weight=kl_weight)

  def step(state: AutoencoderState, images: Array, rng: Array):
    params, opt_state, metrics = inner(state.params, state.opt_state, images,
                                       jax.random.fold_in(rng, state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


# ----------------------------------------------------------------------------- training

def train_autoencoder(config: ml_collections.ConfigDict, workdir: str) -> AutoencoderState:
  """Trains the stage-1 autoencoder (resuming from `workdir`), returns the final state.

  Writes to `workdir`: autoencoder.json, checkpoints/, metrics.jsonl (+ TensorBoard),
  recon/recon_<step>.png (originals over reconstructions) and latent_scale.json.
  """
  log_process_info()
  ctx = _Context(config, workdir)
  cfg, mesh = config, ctx.mesh
  sharding.check_global_batch(cfg.train.batch_size, mesh)
  is_main = jax.process_index() == 0
  ctx.check_or_write_architecture()

  state = ctx.init_state()
  logging.info("autoencoder: %d parameters; images %s -> latents %s (f=%d)",
               param_count(state.params), ctx.image_shape, ctx.latent_shape,
               ctx.module.downsample_factor)
  train_iter = pipeline.make_train_iterator(
      cfg.data.name, global_batch_size=cfg.train.batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      split=cfg.data.train_split, data_dir=ctx.data_dir, image_size=ctx.image_size,
      random_flip=cfg.data.random_flip)
  ckpt = ctx.checkpointer
  state, start = ckpt.restore_or_keep(state, train_iter)

  train_step = jax.jit(
      make_state_train_step(ctx.module, ctx.optimizer, recon_loss=cfg.loss.recon_loss,
                            kl_weight=cfg.loss.kl_weight),
      in_shardings=(ctx.repl, ctx.data_sh, ctx.repl), out_shardings=(ctx.repl, ctx.repl),
      donate_argnums=(0,))
  train_rng = jax.random.fold_in(ctx.rng, 1)

  writer = MetricWriter(ctx.workdir)

  def step_fn(state):
    return train_step(state, sharding.to_global(next(train_iter)["image"], mesh), train_rng)

  def log(step, metrics, rate, eta_s):
    del eta_s
    if not is_main:
      return
    mean = {k: float(np.mean([m[k] for m in metrics]))
            for k in ("loss", "rec_loss", "kl", "mse", "psnr")}
    logging.info("step %d/%d  loss %.4f  rec %.4f  kl %.1f  psnr %.2f dB  %.1f img/s", step,
                 cfg.train.num_steps, mean["loss"], mean["rec_loss"], mean["kl"], mean["psnr"],
                 rate)
    writer.write_scalars(step, {**{f"train/{k}": v for k, v in mean.items()},
                                "train/img_per_s": rate,
                                "train/grad_norm": float(metrics[-1]["grad_norm"]),
                                "train/latent_std": float(metrics[-1]["latent_std"])})

  state, step, preempted = train_loop(
      state, step_fn, start=start, total=cfg.train.num_steps, batch_size=cfg.train.batch_size,
      log_every=cfg.train.log_every, ckpt_every=cfg.train.ckpt_every,
      save=lambda step, state: ckpt.save(step, state, train_iter), log=log,
      what="autoencoder loss")
  ckpt.wait()
  if step == cfg.train.num_steps and not preempted:
    _write_reconstructions(ctx, state.params, step)
    _write_scale_factor(ctx, state.params, step, writer)
  writer.close()
  ckpt.close()
  return state


def _local_params(params):
  """This process's copy of replicated params, replicated over its local devices."""
  return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0),
                                               latents.local_replicated()), params)


def _write_reconstructions(ctx: _Context, params, step: int) -> str | None:
  """PNG grid: the first `num_recon_images` eval images (top) over their reconstructions."""
  n = ctx.config.eval.num_recon_images
  if not n or jax.process_index() != 0:
    return None
  d = ctx.config.data
  images = next(pipeline.make_eval_iterator(d.name, global_batch_size=n, split=d.eval_split,
                                            data_dir=ctx.data_dir,
                                            image_size=ctx.image_size))["image"]
  fn = jax.jit(lambda p, x: ctx.module.apply({"params": p}, x, sample_posterior=False)[0])
  recon = np.clip(np.asarray(jax.device_get(fn(_local_params(params), images))), -1.0, 1.0)
  path = save_image_grid(os.path.join(ctx.workdir, "recon", f"recon_{step:07d}.png"),
                         np.concatenate([images, recon]), ncols=n)
  logging.info("wrote reconstructions %s", path)
  return path


def _write_scale_factor(ctx: _Context, params, step: int, writer: MetricWriter) -> float:
  """Computes 1 / std of the train split's posterior means and stores it."""
  d = ctx.config.data
  scale, n = latents.scale_factor_of_split(ctx.module, _local_params(params), d.name,
                                           split=d.train_split, data_dir=ctx.data_dir,
                                           image_size=ctx.image_size)
  if jax.process_index() == 0:
    latents.write_json(os.path.join(ctx.workdir, latents.SCALE_FILE),
                       {"scale_factor": scale, "latent_std": 1.0 / scale, "step": step,
                        "split": d.train_split, "num_examples": n,
                        "statistic": "posterior mean"})
    writer.write_scalars(step, {"latent/scale_factor": scale})
  logging.info("latent scale factor %.6f (1 / std of %d train latents)", scale, n)
  return scale


# ----------------------------------------------------------------------------- evaluation

def evaluate_autoencoder(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Reconstruction MSE / PSNR / KL over the whole eval split from the latest checkpoint.

  Returns:
    {'eval/mse': mean per-pixel squared error (reconstructions clipped to [-1, 1]),
    'eval/psnr': mean per-example PSNR (dB, data range 2), 'eval/psnr_of_mse': PSNR of
    the mean MSE, 'eval/kl': mean KL per example (nats), 'eval/examples'}; also
    written to metrics.jsonl.

  Raises:
    FileNotFoundError: no checkpoint in `workdir`.
  """
  log_process_info()
  ctx = _Context(config, workdir)
  latents.latest_checkpoint_step(ctx.workdir)  # clear error when there is none
  params, step = latents.restore_autoencoder_params(ctx.workdir, ctx.module, ctx.image_shape,
                                                    sharding=ctx.repl)
  recon_fn = ctx.reconstruct_fn()

  @functools.partial(jax.jit, in_shardings=(ctx.data_sh, ctx.data_sh, ctx.data_sh, ctx.data_sh),
                     out_shardings=ctx.repl)
  def sums(x, recon, kl, mask):
    # Scored as the images a user gets: clipped to the data range [-1, 1].
    err = ae_losses.mse(x, jnp.clip(recon, -1.0, 1.0))
    m = mask.astype(jnp.float32)
    psnr = jnp.where(mask, 10.0 * jnp.log10(4.0 / jnp.where(mask, err, 1.0)), 0.0)
    return {"mse": jnp.sum(err * m), "psnr": jnp.sum(psnr),
            "kl": jnp.sum(kl * m), "count": jnp.sum(m)}

  total = {"mse": 0.0, "psnr": 0.0, "kl": 0.0, "count": 0.0}
  for batch in ctx.eval_iterator(config.eval.batch_size):
    batch = sharding.to_global({"image": batch["image"], "mask": batch["mask"]}, ctx.mesh)
    recon, kl = recon_fn(params, batch["image"])
    for k, v in jax.device_get(sums(batch["image"], recon, kl, batch["mask"])).items():
      total[k] += float(v)
  count = max(total["count"], 1.0)
  mse = total["mse"] / count
  results = {"eval/mse": mse, "eval/psnr": total["psnr"] / count,
             "eval/psnr_of_mse": float(10.0 * np.log10(4.0 / mse)),
             "eval/kl": total["kl"] / count, "eval/examples": total["count"]}
  logging.info("autoencoder eval at step %d: %s", step, results)
  write_scalars_once(ctx.workdir, step, results)
  ctx.checkpointer.close()
  return results
