"""Flow matching against closed forms on Gaussian data x0 ~ N(MU, S^2) per dimension.

With x_t = (1 - t) x0 + t eps, the optimal velocity is u*(x, t) = E[eps - x0 | x_t] and its loss
is Var[eps - x0 | x_t] = S^2 / ((1 - t)^2 S^2 + t^2) (the Gaussian conditional variance; the
numerator (1 + S^2)((1 - t)^2 S^2 + t^2) - (t - (1 - t) S^2)^2 simplifies to S^2). For S = 1 its
mean over t ~ U(0, 1) is arctan(1) - arctan(-1) = pi / 2. The ODE dx/dt = u* transports
N(0, 1) at t = 1 to the data by the monotone map x0 = MU + S x1.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import flow, processes
from jdiff.samplers import registry

MU = 0.4


def optimal_velocity(s_data):
  def model_fn(x_t, tm, cond):
    t = (tm / 1000.0)[:, None]
    var = (1 - t) ** 2 * s_data**2 + t**2
    x0 = MU + (1 - t) * s_data**2 / var * (x_t - (1 - t) * MU)
    eps = MU * 0 + (t / var) * (x_t - (1 - t) * MU)
    return eps - x0

  return model_fn


@pytest.mark.parametrize("s_data", [0.5, 1.0])
def test_optimal_velocity_loss_is_the_closed_form(s_data):
  p = processes.flow(t_sampler="uniform")
  x0 = MU + s_data * jax.random.normal(jax.random.key(0), (4000, 16))
  ts = jnp.array([0.05, 0.3, 0.6, 0.95])
  t = jnp.repeat(ts, 1000)
  loss = jax.jit(
    lambda t: processes.process_loss(
      p, optimal_velocity(s_data), x0, jax.random.key(1), t=t, prediction="velocity"
    )
  )(t)
  want = s_data**2 / ((1 - ts) ** 2 * s_data**2 + ts**2)
  got = jnp.mean(loss.reshape(4, 1000), axis=1)
  np.testing.assert_allclose(got, want, rtol=0.03)
  if s_data == 1.0:  # the mean over uniform t is pi / 2
    loss = jax.jit(
      lambda: processes.process_loss(
        p, optimal_velocity(1.0), x0, jax.random.key(2), prediction="velocity"
      )
    )()
    np.testing.assert_allclose(float(jnp.mean(loss)), math.pi / 2, rtol=0.02)


def test_ode_flows_the_gaussian_to_the_exact_target():
  """Euler in t converges at order 1, Heun at order 2, to MU + S x1; DPM-Solver++ and UniPC
  sample the same flow model through its denoiser (from t_max, where the law is ~N(0, 1))."""
  p, s = processes.flow(), 0.5
  model_fn = optimal_velocity(s)
  x1 = jax.random.normal(jax.random.key(0), (64, 1))
  want = MU + s * x1
  for fn, order in ((flow.flow_euler_sample, 1), (flow.flow_heun_sample, 2)):
    errs = []
    for n in (16, 32):
      out = jax.jit(lambda x, fn=fn, n=n: fn(p, model_fn, x, jax.random.key(1), num_steps=n))(x1)
      errs.append(float(jnp.max(jnp.abs(out - want))))
    assert math.log2(errs[0] / errs[1]) > order - 0.3, (fn.__name__, errs)
  # A shifted grid still converges (SD3's shift 3: more steps near t = 1).
  g = flow.time_grid(4, shift=3.0)
  np.testing.assert_allclose(g, [1.0, 0.9, 0.75, 0.5, 0.0], rtol=1e-6)  # 3t / (1 + 2t)
  out = flow.flow_heun_sample(p, model_fn, x1, jax.random.key(1), num_steps=32, shift=3.0)
  np.testing.assert_allclose(out, want, atol=0.03)  # its last (Euler) step is 3x longer
  s0 = float(processes.sigma_min_max(p)[1])
  start = x1 * math.sqrt(1 + s0**2)  # the sigma-grid samplers' start at sigma_max = 80
  exact = MU + (start - MU) * s / math.sqrt(s**2 + s0**2)
  for name in ("dpmpp_2m", "unipc"):
    out = registry.sample(
      name,
      p,
      model_fn,
      x1,
      jax.random.key(1),
      num_steps=32,
      spacing="log_snr",
      prediction="velocity",
      final_sigma="zero",
    )
    np.testing.assert_allclose(out, exact, atol=0.02)  # orders: test_processes.py


def test_flow_velocity_from_other_predictions_and_clipping():
  p = processes.flow()
  x = jnp.array([[0.3], [-2.0]])
  t = jnp.array([0.25, 0.8])
  x0, eps = jnp.array([[0.9], [-0.5]]), jnp.array([[-1.2], [0.4]])
  for pred in ("eps", "x0", "velocity"):
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps
    out = processes.target(p, x0, t, eps, prediction=pred)
    np.testing.assert_allclose(processes.to_x0(p, xt, t, out, prediction=pred), x0, rtol=1e-5)
  u = flow.make_velocity(p, lambda a, b, c: jnp.full_like(a, 2.0), clip_x0=1.0)(x, 0.5)
  # x0 = x - t u = [-0.7, -3.0] -> clipped [-0.7, -1.0]; u = (x - x0_clipped) / t
  np.testing.assert_allclose(u, [[2.0], [-2.0]], rtol=1e-6)
  with pytest.raises(ValueError, match="'flow' process"):
    flow.make_velocity(processes.ve(), lambda a, b, c: a)


def test_reflow_pairs_are_straight():
  """On the pairs of the exact flow (x0 = MU + S x1) the straight velocity x1 - x0 is a function
  of x_t, so the reflow loss of that field is 0 while the independent coupling's is not."""
  p, s = processes.flow(t_sampler="uniform"), 0.5
  x1 = jax.random.normal(jax.random.key(0), (256, 4))
  teacher = lambda x, r: flow.flow_heun_sample(p, optimal_velocity(s), x, r, num_steps=32)
  pairs = flow.reflow_pairs(teacher, x1, jax.random.key(1))
  x0, noise = flow.split_pairs(pairs)
  np.testing.assert_array_equal(noise, x1)
  np.testing.assert_allclose(x0, MU + s * x1, atol=5e-3)  # Heun, 32 steps

  def straight(x_t, tm, cond):  # x_t = (1 - t)(MU + S x1) + t x1  =>  solve for x1
    t = (tm / 1000.0)[:, None]
    z = (x_t - (1 - t) * MU) / ((1 - t) * s + t)
    return z - (MU + s * z)

  loss = processes.process_loss(
    p, straight, MU + s * x1, jax.random.key(2), noise=x1, prediction="velocity"
  )
  np.testing.assert_allclose(loss, 0.0, atol=1e-9)
  indep = processes.process_loss(p, straight, x0, jax.random.key(2), prediction="velocity")
  assert float(jnp.mean(indep)) > 0.1
