"""Tests of `jdiff.distill` against the maths, on Gaussian data N(mu, s^2 I) where the optimal
denoiser, the teacher's DDIM map and the consistency function are all known in closed form:

  E[x0 | x_ve = x] = mu + (x - mu) s^2 / (s^2 + sigma^2)                         (VE view),
  f(x, sigma) = mu + (x - mu) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2)      (PF-ODE flow map),

the second because the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma = (x - mu) sigma / (s^2 +
sigma^2) keeps (x - mu) / sqrt(s^2 + sigma^2) constant.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, distill, schedules
from jdiff.samplers.ddim import ddim_sample, ddim_step
from jdiff.samplers.denoisers import make_denoiser
from tests import analytic

MU, S = 0.5, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


# ----------------------------------------------------------------------------- progressive


def _teacher(schedule, prediction="eps"):
  """The exact model E[eps | z_t] (or x0, v) of N(MU, S^2) at fractional t [B]."""

  def model_fn(z, t, cond=None):
    del cond
    ab = continuous.alpha_bar_at(schedule, t)
    eps = analytic.gaussian_eps_at_alpha_bar(ab, z, MU, S)
    x0 = analytic.gaussian_x0_at_alpha_bar(ab, z, MU, S)
    ab = ab[:, None]
    return {"eps": eps, "x0": x0, "v": jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[prediction]

  return model_fn


def _ab64(schedule, t):
  return np.float64(continuous.alpha_bar_at(schedule, jnp.float32(t)))


def _ddim64(schedule, z, t, t_next):
  """An exact DDIM step of the Gaussian teacher, float64 NumPy (independent of jdiff)."""
  ab, ab_n = _ab64(schedule, t), _ab64(schedule, t_next)
  a, s, a_n, s_n = math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_n), math.sqrt(1 - ab_n)
  x0 = MU + a * S**2 * (z - a * MU) / (a**2 * S**2 + s**2)
  return a_n * x0 + s_n * (z - a * x0) / s


# At t = T - 1 (i = N) the cosine schedule's alpha is 5e-5: an eps-teacher's x0 = (z - s eps) / a
# amplifies float32 rounding 2e4-fold there, which is why [PD] distils x- or v-models.
@pytest.mark.parametrize(
  "num_steps, i, prediction",
  [(4, 4, "v"), (4, 4, "x0"), (4, 1, "eps"), (8, 5, "eps"), (16, 9, "v")],
)
def test_pd_target_is_two_exact_teacher_steps(num_steps, i, prediction):
  sched = schedules.cosine(1000)
  t = i * 1000 / num_steps - 1.0
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 4)), np.float64)
  tb = jnp.full((3,), t, jnp.float32)
  teacher = _teacher(sched, prediction)
  x_tgt, z_next = distill.pd_target(
    sched, teacher, jnp.asarray(z, jnp.float32), tb, num_steps=num_steps, prediction=prediction
  )
  h = 500.0 / num_steps
  want_next = _ddim64(sched, _ddim64(sched, z, t, t - h), t - h, t - 2 * h)
  np.testing.assert_allclose(z_next, want_next, rtol=2e-5, atol=2e-5)
  ab, ab_n = _ab64(sched, t), _ab64(sched, t - 2 * h)
  r = math.sqrt(1 - ab_n) / math.sqrt(1 - ab)
  want_x = (want_next - r * z) / (math.sqrt(ab_n) - r * math.sqrt(ab))
  np.testing.assert_allclose(x_tgt, want_x, rtol=1e-4, atol=1e-4)
  # One student DDIM step (jdiff's sampler, x0-prediction = the target) lands on the teacher's
  # two-step result.
  student = lambda zz, tt, c: distill.pd_target(
    sched, teacher, zz, tt, num_steps=num_steps, prediction=prediction
  )[0]
  one, _ = ddim_step(
    make_denoiser(sched, student, space="vp", prediction="x0"),
    jnp.asarray(z, jnp.float32), jnp.float32(t), jnp.float32(t - 2 * h), jnp.zeros((3, 4)),
  )  # fmt: skip
  np.testing.assert_allclose(one, want_next, rtol=2e-5, atol=2e-5)


def test_pd_target_with_clipping_is_two_clipped_teacher_steps():
  # With clip_x0 the target is two steps of the teacher as its DDIM sampler runs with
  # sample.clip_x0: x0_hat clipped to [-c, c], eps_hat recomputed from it. A teacher whose
  # x0_hat leaves [-1, 1] (z of std 3) is where it matters; float64 NumPy reference.
  sched, c, t, h = schedules.cosine(1000), 1.0, 499.0, 125.0
  z = 3.0 * np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 5)), np.float64)

  def ddim_clipped(z, t, t_next):
    ab, ab_n = _ab64(sched, t), _ab64(sched, t_next)
    a, s, a_n, s_n = math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_n), math.sqrt(1 - ab_n)
    x0 = np.clip(MU + a * S**2 * (z - a * MU) / (a**2 * S**2 + s**2), -c, c)
    return a_n * x0 + s_n * (z - a * x0) / s

  z_mid = ddim_clipped(z, t, t - h)
  want_next = ddim_clipped(z_mid, t - h, t - 2 * h)
  tb = jnp.full((4,), t, jnp.float32)
  _, got = distill.pd_target(
    sched, _teacher(sched, "v"), jnp.asarray(z, jnp.float32), tb, num_steps=4, prediction="v",
    clip_x0=c,
  )  # fmt: skip
  np.testing.assert_allclose(got, want_next, rtol=2e-5, atol=2e-5)
  _, unclipped = distill.pd_target(
    sched, _teacher(sched, "v"), jnp.asarray(z, jnp.float32), tb, num_steps=4, prediction="v"
  )
  assert np.max(np.abs(np.asarray(unclipped) - want_next)) > 1e-2  # the clip was active
  # The same two steps through jdiff's DDIM sampler with clipping.
  den = make_denoiser(sched, _teacher(sched, "v"), space="vp", prediction="v", clip_x0=c)
  grid = jnp.asarray([t, t - h, t - 2 * h], jnp.float32)
  x = jnp.asarray(z, jnp.float32)
  for a, b in zip(grid[:-1], grid[1:], strict=True):
    x, _ = ddim_step(den, x, a, b, jnp.zeros_like(x))
  np.testing.assert_allclose(got, x, rtol=2e-5, atol=2e-5)


def test_exact_student_ddim_sample_equals_teacher_at_twice_the_steps():
  # A student that outputs the PD target (x0-prediction) sampled with jdiff's DDIM on its own
  # N-step grid reproduces the teacher's DDIM on the 2N-step grid, end to end.
  sched = schedules.cosine(1000)
  teacher = _teacher(sched, "v")
  student = lambda z, t, c: distill.pd_target(sched, teacher, z, t, num_steps=4, prediction="v")[0]
  x_T = jax.random.normal(jax.random.PRNGKey(5), (6, 3))
  rng = jax.random.PRNGKey(0)
  vp = lambda fn, prediction: make_denoiser(sched, fn, space="vp", prediction=prediction)
  got = ddim_sample(vp(student, "x0"), x_T, distill.student_grid(1000, 4), rng)
  want = ddim_sample(vp(teacher, "v"), x_T, distill.student_grid(1000, 8), rng)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # ... which the teacher's own 4-step DDIM does not.
  teacher4 = ddim_sample(vp(teacher, "v"), x_T, distill.student_grid(1000, 4), rng)
  assert np.max(np.abs(np.asarray(teacher4) - np.asarray(want))) > 1e-2


def test_student_grid_and_power_of_two():
  np.testing.assert_array_equal(distill.student_grid(1000, 4), [999, 749, 499, 249, -1])
  g = distill.student_grid(1000, 8)
  np.testing.assert_allclose(g[::2], distill.student_grid(1000, 4))  # rounds nest
  for bad in (0, 3, 6, 12, 2.0):
    with pytest.raises(ValueError, match=f"N={bad!r}"):
      distill.check_num_steps(bad)
  sched = schedules.cosine(1000)
  with pytest.raises(ValueError, match="N=6"):
    teacher = _teacher(sched)
    distill.pd_loss(sched, teacher, teacher, jnp.zeros((2, 3)), jax.random.PRNGKey(0), num_steps=6)
  with pytest.raises(ValueError, match="N=1024.*T=1000"):
    distill.pd_target(sched, teacher, jnp.zeros((2, 3)), jnp.zeros(2), num_steps=1024)


def test_pd_loss_zero_for_exact_student_and_weights():
  sched = schedules.cosine(1000)
  teacher = _teacher(sched)
  x0 = MU + S * jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  rng = jax.random.PRNGKey(2)

  def exact(offset):
    return lambda z, t, c: distill.pd_target(sched, teacher, z, t, num_steps=8)[0] + offset

  kw = dict(num_steps=8, student_prediction="x0")
  loss = jax.jit(lambda x, r: distill.pd_loss(sched, exact(0.0), teacher, x, r, **kw))(x0, rng)
  assert loss.shape == (16,)
  np.testing.assert_allclose(loss, 0.0, atol=1e-8)
  # N = 1 always draws t = T - 1: the weights are max(SNR, 1) and 1 + SNR at that t.
  snr = 1.0 / float(continuous.t_to_sigma(sched, jnp.float32(999.0))) ** 2
  for weighting, w in (("truncated_snr", max(snr, 1.0)), ("snr_plus_one", 1.0 + snr)):
    off = lambda z, t, c: distill.pd_target(sched, teacher, z, t, num_steps=1)[0] + 0.1
    got = distill.pd_loss(
      sched, off, teacher, x0, rng, num_steps=1, student_prediction="x0", weighting=weighting
    )
    np.testing.assert_allclose(got, 0.01 * w, rtol=1e-4)
  # vmap over keys equals a loop; a v-student's gradient is finite.
  keys = jax.random.split(rng, 3)
  vm = jax.vmap(lambda r: distill.pd_loss(sched, exact(0.1), teacher, x0, r, **kw))(keys)
  for k in range(3):
    np.testing.assert_allclose(
      vm[k], distill.pd_loss(sched, exact(0.1), teacher, x0, keys[k], **kw), rtol=1e-5
    )
  grad = jax.grad(
    lambda w: jnp.mean(distill.pd_loss(sched, lambda z, t, c: w * z, teacher, x0, rng, num_steps=4))
  )(0.3)
  assert np.isfinite(grad) and grad != 0


# ----------------------------------------------------------------------------- consistency


def _exact_f(params, x, sigma):
  del params
  sig = jnp.asarray(sigma, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return MU + (x - MU) * math.sqrt(S**2 + SIGMA_MIN**2) / jnp.sqrt(S**2 + sig**2)


def _exact_denoiser(x, sigma):
  sig = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
  sig = sig.reshape((-1,) + (1,) * (x.ndim - 1))
  return MU + (x - MU) * S**2 / (S**2 + sig**2)


def test_cm_coefs_and_boundary_condition():
  c_skip, c_out, c_in = distill.cm_coefs(jnp.float32(1.0), sigma_min=0.002, sigma_data=0.5)
  np.testing.assert_allclose(c_skip, 0.25 / (0.998**2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c_out, 0.5 * 0.998 / math.sqrt(1.25), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / math.sqrt(1.25), rtol=1e-6)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
  for net in (lambda xi, s: 1e6 * xi + 7.0, lambda xi, s: jnp.full_like(xi, jnp.inf)):
    f = distill.consistency_fn(net, sigma_min=0.002, sigma_data=0.5)
    np.testing.assert_array_equal(f(x, 0.002), x)
    np.testing.assert_array_equal(f(x, jnp.full((3,), 0.002)), x)
  # Away from sigma_min: f = c_skip x + c_out F(c_in x, sigma) with F seen through its inputs.
  f = distill.consistency_fn(lambda xi, s: 2.0 * xi + s[:, None, None, None])
  sig = np.array([0.5, 3.0, 80.0])
  cs, co, ci = (np.asarray(c)[:, None, None, None] for c in distill.cm_coefs(sig))
  want = cs * np.asarray(x) + co * (2.0 * ci * np.asarray(x) + sig[:, None, None, None])
  np.testing.assert_allclose(f(x, jnp.asarray(sig)), want, rtol=1e-5, atol=1e-6)


def test_pseudo_huber_against_numpy():
  x, y = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3, 3, 2))
  d = 18
  c = 0.00054 * math.sqrt(d)
  sq = np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(distill.pseudo_huber(x, y), np.sqrt(sq + c**2) - c, rtol=1e-5)
  np.testing.assert_allclose(distill.pseudo_huber(x, x), 0.0, atol=1e-7)


def test_karras_levels_and_curriculum():
  lv = np.asarray(distill.karras_levels(18))
  np.testing.assert_allclose([lv[0], lv[-1]], [SIGMA_MIN, SIGMA_MAX], rtol=1e-5)
  assert np.all(np.diff(lv) > 0)
  i = np.arange(18)
  lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
  np.testing.assert_allclose(lv, (lo + i / 17 * (hi - lo)) ** 7, rtol=1e-5)
  padded = jax.jit(lambda n: distill.karras_levels(n, size=40))(jnp.int32(18))
  np.testing.assert_allclose(padded[:18], lv, rtol=1e-6)
  np.testing.assert_allclose(padded[18:], SIGMA_MAX, rtol=1e-5)
  # [iCT] eq. 5: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)).
  for total, s0, s1 in ((800, 10, 1280), (1000, 10, 1280), (100, 2, 150), (90, 16, 64)):
    kp = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    ks = np.arange(0, 3 * total)
    want = [min(s0 * 2 ** (k // kp), s1) + 1 for k in ks]
    got = jax.jit(lambda k, t=total, a=s0, b=s1: distill.ict_num_levels(k, t, s0=a, s1=b))(ks)
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="total_steps=7"):
    distill.ict_num_levels(0, 7)
  assert int(distill.ict_num_levels(0, 800)) == 11 and int(distill.ict_num_levels(800, 800)) == 1281


def test_log_normal_level_probs():
  n = 11
  lv = distill.karras_levels(n, size=20)
  p = np.asarray(distill.log_normal_level_probs(lv, n, p_mean=-1.1, p_std=2.0))
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  assert np.all(p[n - 1 :] == 0)
  e = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in np.asarray(lv[:n], np.float64)]
  want = np.diff(e) / (e[-1] - e[0])
  np.testing.assert_allclose(p[: n - 1], want, rtol=1e-4, atol=1e-7)
  idx = distill.sample_level_index(jax.random.PRNGKey(0), lv, n, 40000, sampling="log_normal")
  freq = np.bincount(np.asarray(idx), minlength=19) / 40000
  np.testing.assert_allclose(freq, p, atol=0.01)


def test_cd_loss_vanishes_for_exact_consistency_function():
  x0 = MU + S * jax.random.normal(jax.random.PRNGKey(0), (1024, 4))
  rng = jax.random.PRNGKey(1)
  p = jnp.zeros(())

  def loss(solver, n, f=_exact_f):
    return float(jnp.mean(distill.consistency_distillation_loss(
      f, p, p, _exact_denoiser, x0, rng, num_levels=n, solver=solver, metric="l2",
      weighting="uniform")))  # fmt: skip

  # With the exact f and D the loss is the squared one-step error of the teacher's ODE step,
  # mapped by f: O(h^3)^2 = O(h^6) for Heun, O(h^2)^2 = O(h^4) for Euler. Doubling N halves h.
  heun = [loss("heun", n) for n in (36, 72, 144)]
  euler = [loss("euler", n) for n in (36, 72)]
  assert 40 < heun[0] / heun[1] < 100 and 40 < heun[1] / heun[2] < 100, heun
  assert 10 < euler[0] / euler[1] < 25, euler
  assert heun[2] < 1e-9
  wrong = loss("heun", 144, lambda q, x, s: _exact_f(q, x, s) + 0.01 * jnp.sqrt(s)[:, None])
  assert heun[2] < 1e-3 * wrong, (heun[2], wrong)
  jitted = jax.jit(lambda x, r: distill.consistency_distillation_loss(
    _exact_f, p, p, _exact_denoiser, x, r, num_levels=18))(x0, rng)  # fmt: skip
  assert jitted.shape == (1024,) and np.all(np.isfinite(jitted))


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_multistep_sampler_reaches_the_data(num_steps):
  levels = distill.sampling_levels(num_steps)
  assert levels.shape == (num_steps,) and float(levels[0]) == pytest.approx(SIGMA_MAX)
  n = 8192
  x_T = jax.random.normal(jax.random.PRNGKey(num_steps), (n, 4))
  f = lambda x, s: _exact_f(None, x, s)
  out = np.asarray(jax.jit(distill.consistency_sample, static_argnums=0)(
    f, x_T, levels, jax.random.PRNGKey(7)), np.float64)  # fmt: skip
  # Starting from N(0, T^2) instead of N(mu, s^2 + T^2) biases the mean by mu k, k = f's slope.
  k = math.sqrt(S**2 + SIGMA_MIN**2) / math.sqrt(S**2 + SIGMA_MAX**2)
  se = S / math.sqrt(out.size)
  assert abs(out.mean() - MU) < 5 * se + MU * k
  assert abs(out.std() - math.sqrt(S**2 + SIGMA_MIN**2)) < 5 * S / math.sqrt(2 * out.size)


def test_consistency_step_is_alg1():
  f = lambda x, s: _exact_f(None, x, s)
  x, z = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 3))
  got = distill.consistency_step(f, x, 5.0, 0.8, z)
  want = f(x, 5.0) + math.sqrt(0.8**2 - SIGMA_MIN**2) * z
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(distill.consistency_step(f, x, 5.0, SIGMA_MIN, z), f(x, 5.0))


def _net(params, x_in, sigma):
  return params["w"] * x_in + params["b"] * jnp.log(sigma)[:, None]


def test_ct_loss_gradient_jit_vmap():
  f_apply = lambda params, x, s: distill.consistency_fn(lambda xi, ss: _net(params, xi, ss))(x, s)
  params = {"w": jnp.float32(0.7), "b": jnp.float32(0.1)}
  x0 = MU + S * jax.random.normal(jax.random.PRNGKey(0), (8, 6))
  rng = jax.random.PRNGKey(1)

  def mean_loss(pr, step):
    return jnp.mean(distill.consistency_training_loss(
      f_apply, pr, pr, x0, rng, step=step, total_steps=800))  # fmt: skip

  g = jax.jit(jax.grad(mean_loss))(params, jnp.int32(450))
  assert all(np.isfinite(v) and v != 0 for v in jax.tree.leaves(g))
  keys = jax.random.split(rng, 3)
  ct = lambda r: distill.consistency_training_loss(
    f_apply, params, params, x0, r, step=100, total_steps=800)  # fmt: skip
  vm = jax.jit(jax.vmap(ct))(keys)
  assert vm.shape == (3, 8)
  for k in range(3):
    np.testing.assert_allclose(vm[k], ct(keys[k]), rtol=1e-5)
  # The target branch is under stop_gradient: only the online params get a gradient.
  g_t = jax.grad(lambda tp: jnp.mean(distill.consistency_training_loss(
    f_apply, params, tp, x0, rng, step=100, total_steps=800)))(params)  # fmt: skip
  assert all(v == 0 for v in jax.tree.leaves(g_t))
  cd = lambda r: distill.consistency_distillation_loss(
    f_apply, params, params, _exact_denoiser, x0, r, num_levels=18)  # fmt: skip
  np.testing.assert_allclose(jax.vmap(cd)(keys)[1], cd(keys[1]), rtol=1e-5)
