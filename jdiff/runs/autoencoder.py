"""Stage 1 of latent diffusion: train and evaluate the KL autoencoder of a stage-1 config.

`train_autoencoder(config, workdir)` trains `AutoencoderKL` with LDM's first-stage loss
(reconstruction + kl_weight * KL; no LPIPS / GAN terms) on the same machinery as the
diffusion runs (`Setup`, the jitted step over the device mesh, the grain pipeline,
`Checkpointer`, the host loop and `MetricWriter`). At the end it writes a PNG grid of
eval-split originals (top row) over their reconstructions (bottom row) and the latent
scale factor (1 / std of the train split's posterior means, [LDM] App. G) to
`workdir/latent_scale.json`, which stage 2 reads through `jdiff.runs.stage1.load_codec`.

`evaluate_autoencoder(config, workdir)` reports reconstruction MSE and PSNR (data
range 2, images in [-1, 1]) over the whole eval split, reconstructing from the
posterior mean.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022, Sec. 3.1, App. G.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jdiff.data import latents, pipeline
from jdiff.models import autoencoder_losses as ae_losses
from jdiff.runs import stage1
from jdiff.runs.setup import Setup, local_shardings, log_process_info, run_training
from jdiff.runs.train import MeanLogger, TrainMode, train
from jdiff.training import sharding
from jdiff.training.state import AutoencoderState, param_count
from jdiff.training.step import make_autoencoder_state_step
from jdiff.training.writers import MetricWriter, save_image_grid, write_scalars_once

KIND = "autoencoder"


# ----------------------------------------------------------------------------- training


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str) -> AutoencoderState:
  """Trains the stage-1 autoencoder (resuming from `workdir`), returns the final state.

  Writes to `workdir`: autoencoder.json, checkpoints/, metrics.jsonl (+ TensorBoard),
  recon/recon_<step>.png (originals over reconstructions) and latent_scale.json.
  """
  return run_training(config, workdir, KIND, _train)


def _train(setup: Setup, writer: MetricWriter) -> AutoencoderState:
  cfg, mesh = setup.config, setup.mesh
  stage1.check_or_write_architecture(
    setup.workdir,
    stage1.architecture_record(cfg.autoencoder.preset, setup.module, setup.image_shape),
  )

  def describe(state):
    return (
      f"autoencoder: {param_count(state.params)} parameters; images {setup.image_shape} -> "
      f"latents {setup.latent_shape} (f={setup.module.downsample_factor})"
    )

  def make_step(state, train_iter):
    del state
    train_step = jax.jit(
      make_autoencoder_state_step(
        setup.module, setup.optimizer, recon_loss=cfg.loss.recon_loss, kl_weight=cfg.loss.kl_weight
      ),
      in_shardings=(setup.repl, setup.data_sh, setup.repl),
      out_shardings=(setup.repl, setup.repl),
      donate_argnums=(0,),
    )

    def step_fn(state):
      images = sharding.to_global(next(train_iter)["image"], mesh)
      return train_step(state, images, setup.keys.train)

    return step_fn

  def finish(step, state):
    params = _local_params(state.params)
    path = _write_reconstructions(setup, params, step)
    if path is not None:
      writer.write_image(step, "autoencoder/reconstructions", path)
    _write_scale_factor(setup, params, step, writer)

  logger = MeanLogger(
    writer,
    cfg.train.num_steps,
    means=(
      ("loss", "loss %.4f"),
      ("rec_loss", "rec %.4f"),
      ("kl", "kl %.1f"),
      ("mse", None),
      ("psnr", "psnr %.2f dB"),
    ),
    extra=("latent_std",),
  )
  mode = TrainMode(describe, make_step, logger, finish=finish, what="autoencoder loss")
  return train(setup, writer, mode)


def _local_params(params):
  """This process's copy of replicated params, replicated over its local devices."""
  local = sharding.replicated(sharding.local_mesh())
  return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), local), params)


def _write_reconstructions(setup: Setup, params, step: int) -> str | None:
  """PNG grid: the first `num_recon_images` eval images (top) over their reconstructions."""
  n = setup.config.eval.num_recon_images
  if not n or jax.process_index() != 0:
    return None
  d = setup.config.data
  images = next(
    pipeline.make_eval_iterator(
      d.name,
      global_batch_size=n,
      split=d.eval_split,
      data_dir=setup.data_dir,
      image_size=setup.image_size,
    )
  )["image"]
  fn = jax.jit(lambda p, x: setup.module.apply({"params": p}, x, sample_posterior=False)[0])
  recon = np.clip(np.asarray(jax.device_get(fn(params, images))), -1.0, 1.0)
  path = save_image_grid(
    os.path.join(setup.workdir, "recon", f"recon_{step:07d}.png"),
    np.concatenate([images, recon]),
    ncols=n,
  )
  logging.info("wrote reconstructions %s", path)
  return path


def _write_scale_factor(setup: Setup, params, step: int, writer: MetricWriter) -> float:
  """Computes 1 / std of the train split's posterior means and stores it."""
  d = setup.config.data
  scale, n = latents.scale_factor_of_split(
    setup.module,
    params,
    d.name,
    split=d.train_split,
    data_dir=setup.data_dir,
    image_size=setup.image_size,
    shardings=local_shardings(),
  )
  if jax.process_index() == 0:
    stage1.write_scale_factor(
      setup.workdir,
      {
        "scale_factor": scale,
        "latent_std": 1.0 / scale,
        "step": step,
        "split": d.train_split,
        "num_examples": n,
        "statistic": "posterior mean",
      },
    )
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
  with Setup(config, workdir, kind=KIND) as setup:
    params, step = setup.restore_params("params")
    results = _evaluate(setup, params)
  logging.info("autoencoder eval at step %d: %s", step, results)
  write_scalars_once(setup.workdir, step, results)
  return results


def _evaluate(setup: Setup, params) -> dict[str, float]:
  repl, data_sh = setup.repl, setup.data_sh

  @functools.partial(jax.jit, in_shardings=(repl, data_sh, data_sh), out_shardings=repl)
  def sums(params, x, mask):
    recon, posterior = setup.module.apply({"params": params}, x, sample_posterior=False)
    # Scored as the images a user gets: clipped to the data range [-1, 1].
    err = ae_losses.mse(x, jnp.clip(recon, -1.0, 1.0))
    m = mask.astype(jnp.float32)
    psnr = jnp.where(mask, ae_losses.psnr_from_mse(jnp.where(mask, err, 1.0)), 0.0)
    return {
      "mse": jnp.sum(err * m),
      "psnr": jnp.sum(psnr),
      "kl": jnp.sum(posterior.kl() * m),
      "count": jnp.sum(m),
    }

  total = {"mse": 0.0, "psnr": 0.0, "kl": 0.0, "count": 0.0}
  batch_size = setup.config.eval.batch_size
  meter = setup.eval_progress(batch_size)
  for batch in setup.eval_iterator(batch_size):
    batch = sharding.to_global({"image": batch["image"], "mask": batch["mask"]}, setup.mesh)
    for k, v in jax.device_get(sums(params, batch["image"], batch["mask"])).items():
      total[k] += float(v)
    meter.update(1)
  meter.close()
  count = max(total["count"], 1.0)
  mse = total["mse"] / count
  return {
    "eval/mse": mse,
    "eval/psnr": total["psnr"] / count,
    "eval/psnr_of_mse": float(ae_losses.psnr_from_mse(mse)),
    "eval/kl": total["kl"] / count,
    "eval/examples": total["count"],
  }
