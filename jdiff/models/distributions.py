"""The diagonal Gaussian posterior q(z | x) of the KL autoencoder (LDM's
`ldm/modules/distributions/distributions.py` `DiagonalGaussianDistribution`, NHWC).

References:
  [VAE] Kingma, Welling. Auto-Encoding Variational Bayes, ICLR 2014, App. B
    (closed-form KL between diagonal Gaussians and N(0, I)).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# LDM's clip range for the posterior log-variance (ldm/modules/distributions).
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


@flax.struct.dataclass
class DiagonalGaussian:
  """Diagonal Gaussian q(z | x) = N(mean, exp(logvar)), a pytree.

  Build it with `DiagonalGaussian.create(mean, logvar)` or
  `DiagonalGaussian.from_moments(moments)`, which clip `logvar` to [-30, 20] as
  LDM's `DiagonalGaussianDistribution`; the raw constructor stores values as given.

  Attributes:
    mean: [B, h, w, C] float32.
    logvar: [B, h, w, C] float32, natural-log variance.
  """

  mean: Array
  logvar: Array

  @classmethod
  def create(cls, mean: Array, logvar: Array) -> DiagonalGaussian:
    """Returns the posterior with `logvar` clipped to [LOGVAR_MIN, LOGVAR_MAX]."""
    mean = jnp.asarray(mean)
    logvar = jnp.asarray(logvar)
    if mean.shape != logvar.shape:
      raise ValueError(f"mean shape {mean.shape} != logvar shape {logvar.shape}")
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @classmethod
  def from_moments(cls, moments: Array) -> DiagonalGaussian:
    """Splits [..., 2C] moments into mean (first C channels) and logvar (last C).

    This is LDM's `torch.chunk(parameters, 2, dim=1)` in NHWC layout.
    """
    if moments.shape[-1] % 2:
      raise ValueError(f"moments need an even channel count, got shape {moments.shape}")
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls.create(mean, logvar)

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: Array) -> Array:
    """Draws z = mean + std * eps, eps ~ N(0, I) (reparameterised). [B, h, w, C]."""
    eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
    return self.mean + self.std * eps

  def mode(self) -> Array:
    """Returns the mean (the mode of a Gaussian). [B, h, w, C]."""
    return self.mean

  def kl(self) -> Array:
    """KL(q || N(0, I)) summed over all non-batch axes, [B].

    KL = 0.5 * sum(mean^2 + var - 1 - logvar)   ([VAE] App. B).
    """
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)

  def nll(self, x: Array) -> Array:
    """Negative log-density -log q(x) summed over all non-batch axes, [B] (nats)."""
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(
      np.log(2.0 * np.pi) + self.logvar + jnp.square(x - self.mean) / self.var, axis=axes
    )
