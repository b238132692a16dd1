"""EDM preconditioning: a wrapper that turns any network into the denoiser D(x; sigma).

  D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))     [EDM] eq. 7

with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 ([EDM] Table 1, sd = sigma_data). The
wrapped network F is any module called as `net(x, t, y, *, train)` (the U-Net, the DiT); F's
effective target (x0 - c_skip x) / c_out has unit variance at every sigma, which is the point.

With `uncertainty=True` the wrapper also returns EDM2's learned log-variance u(sigma) ([EDM2]
Sec. 5, eq. 21): a linear layer on Fourier features of c_noise, as one extra output channel
(broadcast over the image), which `processes.process_loss(..., uncertainty=True)` reads.
Samplers see only the first C channels (the `learn_sigma` property below tells
`samplers.registry` so).

The wrapper is a model of the VE process (`processes.ve`): it is called at the process time,
which is sigma itself, with the noisy x = x0 + sigma eps, and predicts x0.

References:
  [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based
    Generative Models, 2022, Table 1, eq. 7.
  [EDM2] Karras et al. Analyzing and Improving the Training Dynamics of Diffusion Models,
    2024, Sec. 5 (uncertainty-based loss weighting).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import timestep_embedding

Array = jax.Array


def edm_coefs(sigma: Array, sigma_data: float) -> tuple[Array, Array, Array, Array]:
  """(c_skip, c_out, c_in, c_noise) at sigma (any shape), float32 ([EDM] Table 1)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  sd2 = sigma_data**2
  c_skip = sd2 / (sigma**2 + sd2)
  c_out = sigma * sigma_data * jax.lax.rsqrt(sigma**2 + sd2)
  c_in = jax.lax.rsqrt(sigma**2 + sd2)
  return c_skip, c_out, c_in, jnp.log(sigma) / 4.0


class EDMPrecond(nn.Module):
  """`D(x [B, H, W, C], sigma [B], y [B] | None, *, train) -> [B, H, W, C (+1)]`.

  Attributes:
    net: the wrapped network F, `net(x, t, y, *, train)` with C output channels.
    sigma_data: the data's standard deviation (0.5 for images in [-1, 1], [EDM]).
    c_noise_scale: F sees c_noise * c_noise_scale as its time (1 in [EDM]; a U-Net whose
      sinusoidal embedding was designed for DDPM's t in [0, 1000) sees the same spread of
      phases with 250, i.e. ln(sigma) * 62.5).
    uncertainty: also return EDM2's log-variance u(sigma) as one extra channel.
  """

  net: nn.Module
  sigma_data: float = 0.5
  c_noise_scale: float = 1.0
  uncertainty: bool = False

  @property
  def learn_sigma(self) -> bool:
    """The output has extra channels beyond the denoised image (the sampler drops them)."""
    return self.uncertainty

  @property
  def num_classes(self) -> Any:
    return getattr(self.net, "num_classes", None)

  @nn.compact
  def __call__(self, x: Array, sigma: Array, y: Array | None = None, *, train: bool) -> Array:
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c_skip, c_out, c_in, c_noise = edm_coefs(sigma, self.sigma_data)
    b = lambda c: c.reshape(c.shape + (1,) * (x.ndim - 1))  # [B] over images or signals
    f = self.net(
      (b(c_in) * x).astype(x.dtype), c_noise * self.c_noise_scale, y, train=train
    ).astype(jnp.float32)
    d = b(c_skip) * x.astype(jnp.float32) + b(c_out) * f
    if not self.uncertainty:
      return d
    feats = timestep_embedding(c_noise * 250.0, 128)
    u = nn.Dense(1, kernel_init=nn.initializers.zeros, name="logvar")(feats)
    return jnp.concatenate([d, jnp.broadcast_to(b(u[:, 0]), x.shape[:-1] + (1,))], axis=-1)
