"""EDM: preconditioning, loss and samplers against closed forms on Gaussian data.

For x0 ~ N(mu, s^2) per dimension and x = x0 + sigma n, the optimal denoiser is
D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) with error variance s^2 sigma^2 / (s^2 +
sigma^2), so the EDM loss lambda(sigma) E||D* - x0||^2 with lambda = (sigma^2 + sd^2) /
(sigma sd)^2 is (sigma^2 + sd^2) s^2 / (sd^2 (s^2 + sigma^2)): exactly 1 at every sigma when
s = sd, the design goal of the preconditioning ([EDM] Sec. 5).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import processes
from jdiff.models.bridge import make_model_fn
from jdiff.models.edm import EDMPrecond, edm_coefs
from jdiff.samplers import registry

MU, S = 0.3, 0.5


class OptimalF(nn.Module):
  """The network F whose preconditioned output is D*: it recovers (x, sigma) from its inputs."""

  sigma_data: float = 0.5
  scale: float = 250.0

  @nn.compact
  def __call__(self, x_in, c_noise, y=None, *, train=False):
    sigma = jnp.exp(4.0 * c_noise / self.scale)[:, None, None, None]
    c_skip, c_out, c_in, _ = edm_coefs(sigma, self.sigma_data)
    x = x_in / c_in
    d = MU + S**2 / (S**2 + sigma**2) * (x - MU)
    return (d - c_skip * x) / c_out


def _precond(sigma_data=0.5, uncertainty=False):
  m = EDMPrecond(
    OptimalF(sigma_data), sigma_data=sigma_data, c_noise_scale=250.0, uncertainty=uncertainty
  )
  x = jnp.zeros((1, 4, 4, 1))
  params = m.init(jax.random.key(0), x, jnp.ones((1,)), train=False)
  return m, params


def _loss(p, model_fn, t=None, n=2048, weighting="edm", sigma_data=0.5, **kw):
  def run(t):
    x0 = MU + S * jax.random.normal(jax.random.key(1), (n, 4, 4, 1))
    return processes.process_loss(
      p, model_fn, x0, jax.random.key(2), t=t, prediction="x0", weighting=weighting,
      sigma_data=sigma_data, **kw,
    )  # fmt: skip

  return jax.jit(run)(t)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_preconditioned_loss_of_the_optimal_denoiser_is_analytic(sigma_data):
  p = processes.ve()
  m, params = _precond(sigma_data)
  sigmas = jnp.array([0.01, 0.1, 0.5, 2.0, 20.0])
  t = jnp.repeat(sigmas, 2048 // 5 + 1)[:2048]
  loss = _loss(p, make_model_fn(m, params), t=t, sigma_data=sigma_data)
  want = (t**2 + sigma_data**2) * S**2 / (sigma_data**2 * (S**2 + t**2))
  for s in sigmas:  # Monte Carlo over 409 x 16 dims: ~2% standard error per level
    sel = np.asarray(t == s)
    np.testing.assert_allclose(float(jnp.mean(loss[sel])), float(want[sel][0]), rtol=0.06)
  # Over EDM's log-normal sigma (the training distribution): E_sigma of the same closed form.
  loss = jnp.mean(_loss(p, make_model_fn(m, params), n=8192, sigma_data=sigma_data))
  z = np.linspace(-6, 6, 4001)
  s = np.exp(-1.2 + 1.2 * z)
  exact = np.trapezoid(
    np.exp(-(z**2) / 2)
    / math.sqrt(2 * math.pi)
    * (s**2 + sigma_data**2)
    * S**2
    / (sigma_data**2 * (S**2 + s**2)),
    z,
  )
  np.testing.assert_allclose(float(loss), exact, rtol=0.03)
  if sigma_data == S:
    np.testing.assert_allclose(exact, 1.0, rtol=1e-6)


def test_edm_coefficients_match_table_1():
  s, sd = jnp.array([0.002, 0.5, 80.0]), 0.5
  c_skip, c_out, c_in, c_noise = edm_coefs(s, sd)
  np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, s * sd / np.sqrt(sd**2 + s**2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sd**2 + s**2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
  # The effective target (x0 - c_skip x) / c_out of F has unit variance when s_data = sd.
  x0 = sd * jax.random.normal(jax.random.key(0), (200000,))
  x = x0 + 3.0 * jax.random.normal(jax.random.key(1), x0.shape)
  c_skip, c_out, _, _ = edm_coefs(3.0, sd)
  np.testing.assert_allclose(float(jnp.var((x0 - c_skip * x) / c_out)), 1.0, rtol=0.02)


def test_uncertainty_weighting_is_edm2_eq_21():
  """The extra channel is u(sigma) (0 at init); loss = w / e^u ||D - x0||^2 + u."""
  p = processes.ve()
  m, params = _precond(uncertainty=True)
  out = m.apply(params, jnp.ones((2, 4, 4, 1)), jnp.array([0.1, 5.0]), train=False)
  assert out.shape == (2, 4, 4, 2)
  np.testing.assert_array_equal(out[..., 1], 0.0)
  u = 0.7
  params = jax.tree.map(lambda a: a, params)
  params["params"]["logvar"]["bias"] = jnp.full((1,), u)
  plain_m, plain_params = _precond()
  t = jnp.full((256,), 0.8)
  with_u = _loss(p, make_model_fn(m, params), t=t, n=256, uncertainty=True)
  plain = _loss(p, make_model_fn(plain_m, plain_params), t=t, n=256)
  np.testing.assert_allclose(with_u, plain / math.exp(u) + u, rtol=1e-5)


def _edm_reference(denoise, x_T, sigmas, keys, *, s_churn, s_tmin, s_tmax, s_noise):
  """NVlabs/edm `generate.py::edm_sampler` (Alg. 2; s_churn = 0 is Alg. 1), in float64."""
  n = len(sigmas) - 1
  x = np.asarray(x_T, np.float64) * math.sqrt(1 + sigmas[0] ** 2)  # jdiff's VP-convention start
  for i in range(n):
    t, t_next = sigmas[i], sigmas[i + 1]
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0
    t_hat = t + gamma * t
    noise = np.asarray(jax.random.normal(jax.random.fold_in(keys, i), x.shape), np.float64)
    x_hat = x + math.sqrt(max(t_hat**2 - t**2, 0.0)) * s_noise * noise
    d = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d
    if i < n - 1:
      d2 = (x_next - denoise(x_next, t_next)) / t_next
      x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    x = x_next
  return x


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_heun_and_edm_samplers_are_edm_algorithms_1_and_2(churn):
  """EDM's defaults (18 steps, rho 7, sigma in [0.002, 80]); Alg. 2 with its CIFAR-10 VP churn
  settings (S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003)."""
  p = processes.ve()
  m, params = _precond()
  model_fn = make_model_fn(m, params)
  x_T = jax.random.normal(jax.random.key(3), (4, 4, 4, 1))
  rng = jax.random.key(4)
  kw = dict(s_churn=churn, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  out = registry.sample(
    "edm", p, model_fn, x_T, rng, num_steps=18, spacing="karras", prediction="x0", **kw
  )
  ramp = np.linspace(0, 1, 18)
  sig = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  sigmas = np.concatenate([sig, [0.0]])
  exact_d = lambda x, s: MU + S**2 / (S**2 + s**2) * (x - MU)
  ref = _edm_reference(exact_d, x_T, sigmas, rng, **kw)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4)
  if churn == 0.0:
    heun = registry.sample(
      "heun", p, model_fn, x_T, rng, num_steps=18, spacing="karras", prediction="x0"
    )
    np.testing.assert_allclose(np.asarray(heun), np.asarray(out), rtol=1e-6, atol=1e-6)
