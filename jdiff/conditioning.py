"""Image conditioning for image-conditioned U-Nets (`UNet(image_cond_channels=...)`).

Super-resolution ([SR3], cascades [CDM]): the model sees x_t concatenated with the
low-resolution image upsampled to x's size, noised by *noise-conditioning augmentation*
([CDM] Sec. 3.3), and the augmentation level as one more constant channel (its conditioning
input), so C + 1 conditioning channels:

  lr_aug = sqrt(1 - a^2) up(lr) + a n,   cond = [lr_aug, a],   a ~ U[0, aug_max] in training;

at sampling a is fixed (`aug_level`, small): the model then tolerates the base model's
artifacts instead of trusting the low-res input exactly ([CDM] Sec. 3.3, Fig. 6).

Mask-conditioned inpainting models take [known (1 - mask), mask], also C + 1 channels
(mask: 1 = generate, as `jdiff.samplers.editing`).

References:
  [SR3] Saharia et al. Image Super-Resolution via Iterative Refinement, 2021, Sec. 2.
  [CDM] Ho, Saharia, Chan, Fleet, Norouzi, Salimans. Cascaded Diffusion Models for High
    Fidelity Image Generation, 2021, Sec. 3.3 (conditioning augmentation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
UPSAMPLE = "bilinear"


def downsample(x: Array, factor: int) -> Array:
  """Average pooling by an integer factor: [B, H, W, C] -> [B, H / f, W / f, C]."""
  b, h, w, c = x.shape
  if factor < 1 or h % factor or w % factor:
    raise ValueError(f"cannot downsample {h}x{w} by factor {factor}: it must divide both")
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample(x: Array, size: tuple[int, int], method: str = UPSAMPLE) -> Array:
  """Resizes [B, h, w, C] to [B, *size, C] (`jax.image.resize`; 'bilinear' or 'bicubic')."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, *size, c), method=method)


def superres_cond(lowres: Array, size: tuple[int, int], level: Array, noise: Array) -> Array:
  """[B, H, W, C + 1]: the augmented upsampled low-res image and its level a as a channel.

  Args:
    lowres: [B, h, w, C] in [-1, 1].
    size: (H, W) of the model's output.
    level: scalar or [B] augmentation level a in [0, 1).
    noise: [B, H, W, C] standard normal.
  """
  up = upsample(lowres.astype(jnp.float32), size)
  a = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (up.shape[0],))[:, None, None, None]
  aug = jnp.sqrt(1.0 - a**2) * up + a * noise.astype(jnp.float32)
  return jnp.concatenate([aug, jnp.broadcast_to(a, up.shape[:-1] + (1,))], axis=-1)


def inpaint_cond(known: Array, mask: Array) -> Array:
  """[B, H, W, C + 1]: [known (1 - mask), mask] for a mask-conditioned model."""
  m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), known.shape[:-1] + (1,))
  return jnp.concatenate([known.astype(jnp.float32) * (1.0 - m), m], axis=-1)


def make_superres_cond_fn(factor: int, aug_max: float) -> Callable[[Array, Array], Array]:
  """The training conditioning `cond_fn(images [B, H, W, C], rng) -> [B, H, W, C + 1]`.

  The low-res input is `downsample(images, factor)`; its augmentation level is drawn
  uniformly in [0, aug_max] per example.
  """
  if not 0.0 <= aug_max < 1.0:
    raise ValueError(f"superres aug_max must be in [0, 1), got {aug_max}")

  def cond_fn(images: Array, rng: Array) -> Array:
    k_level, k_noise = jax.random.split(rng)
    level = jax.random.uniform(k_level, (images.shape[0],), maxval=aug_max)
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    return superres_cond(downsample(images, factor), images.shape[1:3], level, noise)

  return cond_fn
