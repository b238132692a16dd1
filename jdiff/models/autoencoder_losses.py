"""Losses and metrics of the first (autoencoder) stage of latent diffusion.

Convention (LDM's `LPIPSWithDiscriminator`, `ldm/modules/losses/contperceptual.py`,
with the learned output log-variance fixed at 0 and without its perceptual and
adversarial terms): per example, the reconstruction term is summed over all pixels
and channels, and so is the KL; both are then averaged over the batch:

  loss = mean_b [ sum_pixels rec(x_b, x̂_b) ] + kl_weight * mean_b [ KL(q(z|x_b) || N(0, I)) ]

with rec = |x - x̂| ('l1', LDM's choice) or (x - x̂)^2 ('l2'). `kl_weight` = 1e-6 is
SD's / LDM KL-f8's setting. Because both terms are sums, the balance between them
does not depend on the image or latent size.

Not implemented: LDM's LPIPS perceptual term and its PatchGAN adversarial term (both
off here: LPIPS needs a pretrained VGG we cannot download, and a discriminator is a
second model and optimiser). Reconstructions trained with L1/L2 only are blurrier
than SD's VAE.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022, Sec. 3.1, App. G (latent rescaling by 1 / std, SD's 0.18215).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.distributions import DiagonalGaussian

Array = jax.Array
PyTree = Any

RECON_LOSSES = ("l1", "l2")


def _check_pair(x: Array, recon: Array) -> None:
  if x.shape != recon.shape:
    raise ValueError(f"x shape {x.shape} != recon shape {recon.shape}")
  if x.ndim < 2:
    raise ValueError(f"expected batched images [B, ...], got shape {x.shape}")


def mse(x: Array, recon: Array) -> Array:
  """Per-example mean squared error over all non-batch axes, [B] (float32)."""
  _check_pair(x, recon)
  d = jnp.asarray(x, jnp.float32) - jnp.asarray(recon, jnp.float32)
  return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def psnr_from_mse(mse: Array | float, *, data_range: float = 2.0) -> Array:
  """Peak signal-to-noise ratio in dB of a mean squared error (any shape, elementwise).

  PSNR = 10 log10(data_range^2 / MSE). The default data_range = 2 is for images in
  [-1, 1]; use 1.0 for [0, 1] or 255.0 for uint8 scale. MSE = 0 gives +inf. Pass
  per-example MSEs [B] for per-example PSNRs, or one aggregated MSE for the PSNR of
  the mean MSE (which is not the mean of the per-example PSNRs).
  """
  if not data_range > 0:
    raise ValueError(f"data_range must be positive, got {data_range!r}")
  return 10.0 * jnp.log10(data_range**2 / jnp.asarray(mse, jnp.float32))


def psnr(x: Array, recon: Array, *, data_range: float = 2.0) -> Array:
  """Per-example PSNR in dB, [B]: `psnr_from_mse` of the per-example `mse`."""
  return psnr_from_mse(mse(x, recon), data_range=data_range)


def reconstruction_loss(x: Array, recon: Array, *, recon_loss: str = "l1") -> Array:
  """Per-example reconstruction error summed over all non-batch axes, [B]."""
  _check_pair(x, recon)
  if recon_loss not in RECON_LOSSES:
    raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
  d = jnp.asarray(x, jnp.float32) - jnp.asarray(recon, jnp.float32)
  err = jnp.abs(d) if recon_loss == "l1" else jnp.square(d)
  return jnp.sum(err, axis=tuple(range(1, d.ndim)))


def autoencoder_loss(
  recon: Array,
  x: Array,
  posterior: DiagonalGaussian,
  *,
  recon_loss: str = "l1",
  kl_weight: float = 1e-6,
) -> tuple[Array, dict[str, Array]]:
  """LDM's first-stage loss without the perceptual and adversarial terms.

  loss = mean_b sum_pixels rec + kl_weight * mean_b KL_b (see the module docstring).

  Args:
    recon: reconstructions [B, H, W, C].
    x: targets [B, H, W, C], e.g. in [-1, 1].
    posterior: q(z | x) over [B, h, w, c].
    recon_loss: 'l1' (|x - x̂|, LDM) or 'l2' ((x - x̂)^2).
    kl_weight: weight of the KL term (1e-6 in SD's VAE).

  Returns:
    (scalar loss, metrics) with metrics 'loss', 'rec_loss' (batch mean of the
    per-example sum), 'kl' (batch mean), 'mse' (per-pixel), 'psnr' (dB, data range 2)
    and 'latent_std' (posterior mean's std), all float32 scalars.
  """
  if kl_weight < 0:
    raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
  if posterior.mean.shape[0] != x.shape[0]:
    raise ValueError(f"posterior batch {posterior.mean.shape[0]} != image batch {x.shape[0]}")
  rec = jnp.mean(reconstruction_loss(x, recon, recon_loss=recon_loss))
  kl = jnp.mean(posterior.kl())
  loss = rec + kl_weight * kl
  err = mse(x, recon)
  metrics = {
    "loss": loss,
    "rec_loss": rec,
    "kl": kl,
    "mse": jnp.mean(err),
    "psnr": jnp.mean(psnr_from_mse(err)),
    "latent_std": jnp.std(posterior.mean),
  }
  return loss, metrics


def latent_scale_factor(latents: Array) -> float:
  """The factor that gives latents unit standard deviation: 1 / std(latents).

  [LDM] App. G / SD: computed once from a batch of encoder outputs (SD used the
  posterior samples of a batch and got 0.18215), then the diffusion model sees
  `latents * factor` and the decoder gets `z / factor`. The std is over all
  elements (one scalar), computed in float64 on the host.

  Args:
    latents: [B, h, w, c] posterior samples (or modes) of representative data.

  Returns:
    1 / std as a Python float.
  """
  a = np.asarray(latents, dtype=np.float64)
  if a.size < 2:
    raise ValueError(f"need at least 2 latent values, got shape {a.shape}")
  std = float(a.std())
  if not np.isfinite(std) or std == 0.0:
    raise ValueError(f"latents have std {std}; cannot compute a scale factor")
  return 1.0 / std
