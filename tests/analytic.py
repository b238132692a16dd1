"""Closed-form optimal denoisers and exact densities for Gaussian and Gaussian-mixture data.

For data x0 ~ sum_k w_k N(m_k, diag(s_k^2)) and the variance-preserving forward process
x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, every marginal q(x_t) is again a Gaussian mixture:

  x_t | k ~ N(sqrt(ab) m_k, diag(ab s_k^2 + 1 - ab)),

so the MMSE ("optimal") predictors are available in closed form:

  E[eps | x_t, k] = sqrt(1 - ab) (x_t - sqrt(ab) m_k) / (ab s_k^2 + 1 - ab),
  E[eps | x_t]    = sum_k r_k(x_t) E[eps | x_t, k],   r_k = posterior responsibilities,
  score(x_t)      = -E[eps | x_t] / sqrt(1 - ab)       (Tweedie / Vincent 2011).

A single Gaussian is the K = 1 mixture. These are the reference denoisers for the sampler
and loss tests: a sampler driven by the exact eps must reproduce the data distribution up to
its discretisation error.

API (all pure JAX; ``alpha_bar`` is a scalar or [B] array, ``x`` is [B, *event]):
  * ``mixture_eps_at_alpha_bar(alpha_bar, x, weights, means, stds)`` -> E[eps | x_t], [B, *event]
  * ``gaussian_eps_at_alpha_bar(alpha_bar, x, mu, sigma)``           -> same for one Gaussian
  * ``mixture_x0_at_alpha_bar`` / ``gaussian_x0_at_alpha_bar``        -> E[x0 | x_t]
  * ``mixture_score_at_alpha_bar``                                    -> grad log q(x_t)
  * ``mixture_denoiser_at_sigma(sigma, x, ...)``: E[x0 | x0 + sigma n = x] (VE / EDM view)
  * ``gaussian_eps_fn(schedule, mu, sigma)`` / ``mixture_eps_fn(schedule, weights, means, stds)``
    -> ``model_fn(x_t, t, cond)`` for integer t [B] (0-indexed, jdiff's convention), plus
    ``*_x0_fn`` / ``*_v_fn`` for the other prediction targets.
  * exact log-densities: ``gaussian_log_prob``, ``mixture_log_prob``,
    ``mixture_marginal_log_prob(alpha_bar, x, ...)`` (log q(x_t)), and the 1-D CDF
    ``mixture_cdf_1d`` for KS tests; ``mixture_sample`` draws exact samples.
  * ``gaussian_posterior_x0_variance(alpha_bar, sigma)``: Var[x0 | x_t] (= the MMSE of x0).

Parameters: ``weights`` [K] (normalised internally); ``means`` [K, *event] or [K] (a scalar
per component, broadcast over the event); ``stds`` [K], [K, *event] or a scalar (diagonal
per-component standard deviations; 0 is allowed for point masses while 1 - ab > 0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

__all__ = [
  "gaussian_eps_at_alpha_bar",
  "gaussian_x0_at_alpha_bar",
  "gaussian_posterior_x0_variance",
  "mixture_eps_at_alpha_bar",
  "mixture_x0_at_alpha_bar",
  "mixture_score_at_alpha_bar",
  "mixture_denoiser_at_sigma",
  "gaussian_eps_fn",
  "gaussian_x0_fn",
  "gaussian_v_fn",
  "mixture_eps_fn",
  "mixture_x0_fn",
  "mixture_v_fn",
  "gaussian_log_prob",
  "mixture_log_prob",
  "mixture_marginal_log_prob",
  "mixture_cdf_1d",
  "mixture_sample",
]


def _bcast(a, x):
  """A scalar or [B] per-example value reshaped to broadcast against x [B, *event]."""
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _params(x, weights, means, stds):
  """Normalised weights [K] and means / stds as [K, *event] float32."""
  event = x.shape[1:]
  w = jnp.asarray(weights, jnp.float32)
  w = w / jnp.sum(w)
  k = w.shape[0]
  m = jnp.asarray(means, jnp.float32)
  m = m.reshape((k,) + (1,) * len(event)) if m.ndim == 1 and event else m
  m = jnp.broadcast_to(m.reshape(m.shape + (1,) * (1 + len(event) - m.ndim)), (k,) + event)
  s = jnp.asarray(stds, jnp.float32)
  s = jnp.broadcast_to(s, (k,)) if s.ndim == 0 else s
  s = jnp.broadcast_to(s.reshape(s.shape + (1,) * (1 + len(event) - s.ndim)), (k,) + event)
  return w, m, s


def _expand(resp, a):
  """Responsibilities [B, K] reshaped to broadcast against a [B, K, *event]."""
  return resp.reshape(resp.shape + (1,) * (a.ndim - 2))


def _components(alpha_bar, x, weights, means, stds):
  """Per-component marginal mean / variance of x_t and responsibilities r_k(x_t) [B, K]."""
  x = jnp.asarray(x, jnp.float32)
  w, m, s = _params(x, weights, means, stds)
  ab = _bcast(alpha_bar, x)[:, None] if jnp.ndim(alpha_bar) else _bcast(alpha_bar, x)
  mean_k = jnp.sqrt(ab) * m[None]  # [B or 1, K, *event]
  var_k = ab * s[None] ** 2 + (1.0 - ab)  # [B or 1, K, *event]
  axes = tuple(range(2, x.ndim + 1))
  xe = x[:, None]
  log_n = -0.5 * jnp.sum((xe - mean_k) ** 2 / var_k + jnp.log(2 * math.pi * var_k), axis=axes)
  resp = jax.nn.softmax(jnp.log(w)[None] + log_n, axis=1)  # [B, K]
  return x, ab, w, m, s, mean_k, var_k, resp


def mixture_eps_at_alpha_bar(alpha_bar, x, weights, means, stds):
  """E[eps | x_t = x] at noise level alpha_bar for mixture data, [B, *event] float32."""
  x, ab, _, _, _, mean_k, var_k, resp = _components(alpha_bar, x, weights, means, stds)
  eps_k = jnp.sqrt(1.0 - ab) * (x[:, None] - mean_k) / var_k
  return jnp.sum(_expand(resp, eps_k) * eps_k, axis=1)


def mixture_x0_at_alpha_bar(alpha_bar, x, weights, means, stds):
  """E[x0 | x_t = x] for mixture data, [B, *event] float32.

  Computed per component (Gaussian conditioning), so it stays finite at alpha_bar -> 0.
  """
  x, ab, _, m, s, mean_k, var_k, resp = _components(alpha_bar, x, weights, means, stds)
  x0_k = m[None] + jnp.sqrt(ab) * s[None] ** 2 * (x[:, None] - mean_k) / var_k
  return jnp.sum(_expand(resp, x0_k) * x0_k, axis=1)


def mixture_score_at_alpha_bar(alpha_bar, x, weights, means, stds):
  """grad_x log q_t(x) for mixture data, [B, *event]."""
  x = jnp.asarray(x, jnp.float32)
  return -mixture_eps_at_alpha_bar(alpha_bar, x, weights, means, stds) / jnp.sqrt(
    1.0 - _bcast(alpha_bar, x)
  )


def mixture_denoiser_at_sigma(sigma, x, weights, means, stds):
  """E[x0 | x0 + sigma n = x] (variance-exploding / EDM parameterisation), [B, *event].

  The VE variable x = x0 + sigma n is the VP variable scaled by sqrt(1 + sigma^2), with
  alpha_bar = 1 / (1 + sigma^2).
  """
  x = jnp.asarray(x, jnp.float32)
  sig = _bcast(sigma, x)
  ab = 1.0 / (1.0 + jnp.asarray(sigma, jnp.float32) ** 2)
  return mixture_x0_at_alpha_bar(ab, x / jnp.sqrt(1.0 + sig**2), weights, means, stds)


def gaussian_eps_at_alpha_bar(alpha_bar, x, mu, sigma):
  """E[eps | x_t = x] for x0 ~ N(mu, diag(sigma^2)) (mu, sigma scalars or [*event]).

  E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab sigma^2 + 1 - ab).
  """
  x = jnp.asarray(x, jnp.float32)
  ab = _bcast(alpha_bar, x)
  mu, sigma = jnp.asarray(mu, jnp.float32), jnp.asarray(sigma, jnp.float32)
  return jnp.sqrt(1.0 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * sigma**2 + 1.0 - ab)


def gaussian_x0_at_alpha_bar(alpha_bar, x, mu, sigma):
  """E[x0 | x_t = x] = mu + sqrt(ab) sigma^2 (x_t - sqrt(ab) mu) / (ab sigma^2 + 1 - ab)."""
  x = jnp.asarray(x, jnp.float32)
  ab = _bcast(alpha_bar, x)
  mu, sigma = jnp.asarray(mu, jnp.float32), jnp.asarray(sigma, jnp.float32)
  return mu + jnp.sqrt(ab) * sigma**2 * (x - jnp.sqrt(ab) * mu) / (ab * sigma**2 + 1.0 - ab)


def gaussian_posterior_x0_variance(alpha_bar, sigma):
  """Var[x0 | x_t] = sigma^2 (1 - ab) / (ab sigma^2 + 1 - ab), per dimension (NumPy, float64).

  This is the minimum mean squared error of any x0-predictor; the eps MMSE is it times SNR.
  """
  ab = np.asarray(alpha_bar, np.float64)
  s2 = np.asarray(sigma, np.float64) ** 2
  return s2 * (1.0 - ab) / (ab * s2 + 1.0 - ab)


def _ab_of_t(schedule, t):
  return schedule.alphas_cumprod[jnp.asarray(t)]


def _v_from(ab, x, eps, x0):
  ab = _bcast(ab, x)
  return jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0


def _model_fn(schedule, eps_at, x0_at, prediction):
  """model_fn(x_t, t, cond) -> E[prediction | x_t] at integer t [B], from eps_at(ab, x) and
  x0_at(ab, x); v = sqrt(ab) E[eps|x_t] - sqrt(1-ab) E[x0|x_t]."""

  def model_fn(x_t, t, cond=None):
    del cond
    ab = _ab_of_t(schedule, t)
    if prediction == "eps":
      out = eps_at(ab, x_t)
    elif prediction == "x0":
      out = x0_at(ab, x_t)
    else:
      out = _v_from(ab, x_t, eps_at(ab, x_t), x0_at(ab, x_t))
    return out.astype(x_t.dtype)

  return model_fn


def _gaussian_fn(schedule, mu, sigma, prediction):
  return _model_fn(
    schedule,
    lambda ab, x: gaussian_eps_at_alpha_bar(ab, x, mu, sigma),
    lambda ab, x: gaussian_x0_at_alpha_bar(ab, x, mu, sigma),
    prediction,
  )


def _mixture_fn(schedule, weights, means, stds, prediction):
  return _model_fn(
    schedule,
    lambda ab, x: mixture_eps_at_alpha_bar(ab, x, weights, means, stds),
    lambda ab, x: mixture_x0_at_alpha_bar(ab, x, weights, means, stds),
    prediction,
  )


def gaussian_eps_fn(schedule, mu, sigma):
  """model_fn(x_t, t, cond) -> E[eps | x_t] for x0 ~ N(mu, sigma^2), integer t [B]."""
  return _gaussian_fn(schedule, mu, sigma, "eps")


def gaussian_x0_fn(schedule, mu, sigma):
  """model_fn(x_t, t, cond) -> E[x0 | x_t] for x0 ~ N(mu, sigma^2)."""
  return _gaussian_fn(schedule, mu, sigma, "x0")


def gaussian_v_fn(schedule, mu, sigma):
  """model_fn(x_t, t, cond) -> E[v | x_t] = sqrt(ab) E[eps|x_t] - sqrt(1-ab) E[x0|x_t]."""
  return _gaussian_fn(schedule, mu, sigma, "v")


def mixture_eps_fn(schedule, weights, means, stds):
  """model_fn(x_t, t, cond) -> E[eps | x_t] for mixture data, integer t [B]."""
  return _mixture_fn(schedule, weights, means, stds, "eps")


def mixture_x0_fn(schedule, weights, means, stds):
  """model_fn(x_t, t, cond) -> E[x0 | x_t] for mixture data."""
  return _mixture_fn(schedule, weights, means, stds, "x0")


def mixture_v_fn(schedule, weights, means, stds):
  """model_fn(x_t, t, cond) -> E[v | x_t] for mixture data."""
  return _mixture_fn(schedule, weights, means, stds, "v")


# ----------------------------------------------------------------------------- densities


def gaussian_log_prob(x, mu, sigma):
  """log N(x; mu, diag(sigma^2)) summed over the event dims, [B] (NumPy float64)."""
  x = np.asarray(x, np.float64)
  lp = stats.norm.logpdf(x, loc=np.asarray(mu, np.float64), scale=np.asarray(sigma, np.float64))
  return lp.reshape(x.shape[0], -1).sum(axis=1)


def mixture_marginal_log_prob(alpha_bar, x, weights, means, stds):
  """log q_t(x) of the noised mixture at alpha_bar (alpha_bar = 1: the data), [B] (JAX)."""
  x, _, w, _, _, mean_k, var_k, _ = _components(alpha_bar, x, weights, means, stds)
  axes = tuple(range(2, x.ndim + 1))
  log_n = -0.5 * jnp.sum(
    (x[:, None] - mean_k) ** 2 / var_k + jnp.log(2 * math.pi * var_k), axis=axes
  )
  return jax.scipy.special.logsumexp(jnp.log(w)[None] + log_n, axis=1)


def mixture_log_prob(x, weights, means, stds):
  """log p(x) of the mixture data distribution, [B] (stds must be > 0)."""
  return mixture_marginal_log_prob(1.0, x, weights, means, stds)


def mixture_cdf_1d(x, weights, means, stds):
  """CDF of a 1-D mixture (NumPy float64; for scipy.stats.kstest)."""
  w = np.asarray(weights, np.float64)
  w = w / w.sum()
  m, s = np.asarray(means, np.float64), np.broadcast_to(np.asarray(stds, np.float64), w.shape)
  x = np.asarray(x, np.float64)
  return np.sum(w * stats.norm.cdf(x[..., None], loc=m, scale=s), axis=-1)


def mixture_sample(rng, n, weights, means, stds, event_shape=()):
  """n exact samples of the mixture: (x [n, *event] float32, component ids [n] int32)."""
  k_rng, n_rng = jax.random.split(rng)
  proto = jnp.zeros((1,) + tuple(event_shape), jnp.float32)
  w, m, s = _params(proto, weights, means, stds)
  ks = jax.random.choice(k_rng, w.shape[0], (n,), p=w).astype(jnp.int32)
  z = jax.random.normal(n_rng, (n,) + tuple(event_shape), jnp.float32)
  return m[ks] + s[ks] * z, ks
