"""Tests of the fast samplers (Karras / DPM-Solver++ / PC), sigma grids and sigma helpers.

The reference is analytic: for Gaussian data N(mu, s^2 I) the probability-flow ODE has the
closed-form flow map x0 = mu + (x_ve(sigma_max) - mu) s / sqrt(s^2 + sigma_max^2), so the
deterministic samplers are checked sample by sample (error -> 0 at their order); the
stochastic ones are checked in distribution (moments / 2-Wasserstein between Gaussian fits,
and a KS test against a 1-D Gaussian-mixture CDF).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, diffusion, processes, schedules
from jdiff.samplers import denoisers, dpm_solver, euler, grids, pc, registry, unipc
from jdiff.samplers.registry import make_grid
from tests import analytic

SCHED = schedules.linear(1000)
MU, S = 0.5, 0.3
W, MEANS, STDS = [0.3, 0.7], [-0.6, 0.5], [0.15, 0.2]


def gauss_model(x, t, cond=None):
  del cond
  return analytic.gaussian_eps_at_alpha_bar(continuous.alpha_bar_at(SCHED, t), x, MU, S)


def mixture_model(x, t, cond=None):
  del cond
  return analytic.mixture_eps_at_alpha_bar(continuous.alpha_bar_at(SCHED, t), x, W, MEANS, STDS)


def exact_flow(x_T):
  smax = continuous.sigma_min_max(SCHED)[1]
  return MU + (x_T * jnp.sqrt(1.0 + smax**2) - MU) * S / jnp.sqrt(S**2 + smax**2)


X_T = jax.random.normal(jax.random.PRNGKey(0), (512, 2))


def run_sampler(
  fn, schedule, model, x_T, rng, *, num_steps=20, spacing=None, grid=None, prediction="eps",
  final_sigma="zero", **opts,
):  # fmt: skip
  """Builds the denoiser and the grid (Karras by default; pc: 'trailing'), runs `fn` from x_T."""
  space = "vp" if fn is pc.pc_sample else "ve"
  spacing = spacing or ("trailing" if space == "vp" else "karras")
  den = denoisers.make_denoiser(schedule, model, space=space, prediction=prediction)
  g = make_grid(
    schedule, space, num_steps=num_steps, grid=grid, spacing=spacing, final_sigma=final_sigma
  )
  return fn(den, grids.ve_start(x_T, g) if space == "ve" else x_T, g, rng, **opts)


@functools.cache
def _run(name, n, model=gauss_model, batch=512, **kw):
  fn = next(getattr(m, name) for m in (euler, dpm_solver, unipc, pc) if hasattr(m, name))
  kw = dict(kw)
  x_T = (
    X_T
    if batch == 512
    else jax.random.normal(jax.random.PRNGKey(0), (batch,) + kw.pop("event", (2,)))
  )
  out = jax.jit(lambda x, r: run_sampler(fn, SCHED, model, x, r, num_steps=n, **kw))(
    x_T, jax.random.PRNGKey(1)
  )
  return np.asarray(out), x_T


# ----------------------------------------------------------------------------- helpers / grids


def test_t_to_sigma_matches_schedule_and_inverts():
  t = jnp.arange(0, 1000, 37)
  np.testing.assert_allclose(continuous.t_to_sigma(SCHED, t), SCHED.sigmas[t], rtol=1e-5)
  tf = jnp.linspace(0.0, 999.0, 101)
  np.testing.assert_allclose(
    continuous.sigma_to_t(SCHED, continuous.t_to_sigma(SCHED, tf)), tf, atol=2e-3
  )
  np.testing.assert_allclose(
    continuous.alpha_bar_at(SCHED, jnp.array([-1, 0, 999])),
    [1.0, SCHED.alphas_cumprod[0], SCHED.alphas_cumprod[999]],
    rtol=1e-4,
  )
  assert float(continuous.sigma_to_t(SCHED, 0.0)) == -1.0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_to_x0_eps_matches_core_at_integer_t(prediction):
  x = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
  pred = jax.random.normal(jax.random.PRNGKey(3), (6, 3))
  t = jnp.array([0, 10, 100, 500, 900, 999])
  want = diffusion.to_x0_eps(SCHED, x, t, pred, prediction=prediction)
  got = continuous.to_x0_eps(SCHED, x, t.astype(jnp.float32), pred, prediction=prediction)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3)


def test_karras_sigmas_closed_form():
  got = np.asarray(grids.karras_sigmas(0.002, 80.0, 6, rho=7.0))
  i = np.arange(6)
  want = (80.0 ** (1 / 7) + i / 5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  np.testing.assert_allclose(got[:-1], want, rtol=1e-5)
  assert got[-1] == 0.0


@pytest.mark.parametrize("spacing", grids.SIGMA_SPACINGS)
def test_sigma_grid_shapes_and_ends(spacing):
  g = np.asarray(grids.sigma_grid(SCHED, 8, spacing=spacing))
  assert g.shape == (9,) and g[-1] == 0.0 and np.all(np.diff(g) < 0)
  smin, smax = map(float, continuous.sigma_min_max(SCHED))
  if spacing != "quadratic":  # DDIM's quadratic grid stops at 0.8 T.
    np.testing.assert_allclose(g[0], smax, rtol=1e-4)
  if spacing in ("karras", "log_snr", "uniform"):
    np.testing.assert_allclose(g[-2], smin, rtol=1e-4)
  if spacing == "log_snr":
    np.testing.assert_allclose(np.diff(np.log(g[:-1])), np.log(smin / smax) / 7, rtol=1e-4)
  if spacing == "trailing":
    np.testing.assert_allclose(
      g[:-1], SCHED.sigmas[grids.timestep_grid(1000, 8, spacing="trailing")[:-1]], rtol=1e-5
    )


def _round_half_even(num: np.ndarray, den: int) -> np.ndarray:
  """round(num / den) with ties to even, in integers (num >= 0)."""
  q, r = np.divmod(num, den)
  return q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1)))


def _reference_timesteps(t: int, n: int, spacing: str) -> np.ndarray:
  """The papers' definitions, in integer arithmetic (or DDIM's own float code), increasing."""
  i = np.arange(n, dtype=np.int64)
  if spacing == "leading":
    return i * (t // n)
  if spacing == "trailing":  # diffusers: round(arange(T, 0, -T / N)) - 1 with exact steps
    return (_round_half_even(t * (n - i), n) - 1)[::-1]
  if spacing == "linspace":
    return _round_half_even(i * (t - 1), max(n - 1, 1))
  ddim = [int(v) for v in np.linspace(0, np.sqrt(t * 0.8), n) ** 2]  # [DDIM]'s repo
  out = []
  for v in ddim:  # a repeated timestep moves to the next free one
    out.append(v if not out or v > out[-1] else out[-1] + 1)
  return np.array(out)


@pytest.mark.parametrize("spacing", grids.SPACINGS)
def test_timestep_grid_exact_for_every_n(spacing):
  t = 1000
  for n in range(1, t + 1):
    ts = grids.timesteps(t, n, spacing=spacing)
    assert ts.shape == (n,) and np.all(np.diff(ts) > 0) and ts[0] >= 0 and ts[-1] <= t - 1, n
    np.testing.assert_array_equal(ts, _reference_timesteps(t, n, spacing), err_msg=str(n))
  if spacing == "trailing":  # [Lin24]: reaches the last timestep; these N used to raise
    for n in (61, 103, 121, 122, 201):
      assert grids.timesteps(t, n, spacing=spacing)[-1] == t - 1
  if spacing == "quadratic":  # DDIM's grid itself where it has no repeats
    np.testing.assert_array_equal(
      grids.timesteps(t, 10, spacing=spacing), (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int)
    )
  g = np.asarray(grids.timestep_grid(t, 7, spacing=spacing))
  np.testing.assert_array_equal(
    g, np.concatenate([_reference_timesteps(t, 7, spacing)[::-1], [-1]])
  )


def test_grid_errors():
  with pytest.raises(ValueError, match="cosine"):
    grids.sigma_grid(SCHED, 5, spacing="cosine")
  with pytest.raises(ValueError, match="num_steps"):
    grids.sigma_grid(SCHED, 0)
  with pytest.raises(ValueError, match="1001"):
    grids.timesteps(1000, 1001, spacing="trailing")
  with pytest.raises(ValueError, match="offset=5"):
    grids.timesteps(1000, 1000, spacing="leading", offset=5)
  with pytest.raises(ValueError, match="end with 0"):
    run_sampler(
      euler.euler_sample,
      SCHED,
      gauss_model,
      X_T,
      jax.random.PRNGKey(0),
      grid=jnp.array([10.0, 1.0, 0.1]),
    )
  with pytest.raises(ValueError, match="n_corrector"):
    run_sampler(pc.pc_sample, SCHED, gauss_model, X_T, jax.random.PRNGKey(0), n_corrector=-1)


# ----------------------------------------------------------------------------- ODE samplers


@pytest.mark.parametrize("name,min_ratio", [("euler_sample", 1.7), ("heun_sample", 3.0)])
def test_ode_samplers_converge_to_exact_flow_map(name, min_ratio):
  exact = np.asarray(exact_flow(X_T))
  errs = [np.mean(np.abs(_run(name, n, spacing="log_snr")[0] - exact)) for n in (20, 40, 80)]
  assert errs[0] > errs[1] > errs[2], errs
  assert errs[2] < 0.02, errs
  # Order of convergence: halving the step divides the error by ~2^order.
  assert errs[1] / errs[2] > min_ratio, errs


def exact_flow_to_sigma_min(x_T):
  """The exact PF-ODE flow of Gaussian data from sigma_max to sigma_min (VE sample)."""
  smin, smax = continuous.sigma_min_max(SCHED)
  return MU + (x_T * jnp.sqrt(1.0 + smax**2) - MU) * jnp.sqrt(S**2 + smin**2) / jnp.sqrt(
    S**2 + smax**2
  )


# (sampler, options, step counts, order). final_sigma='sigma_min' makes every call a solver
# step that ends at sigma_min, where the exact flow is known: the jump sigma_min -> 0 returns
# D(x; sigma_min), a 1st-order step whose error (~1e-4 here) would floor the measurement.
# unipc takes that jump from sigma_min (`unipc_sample`), so its reference is D(exact; sigma_min).
# UniC raises the predictor's order by one ([UniPC] Thm 3.1): UniPC-p is of order p + 1.
ORDER_CASES = [
  ("dpmpp_2m_sample", {}, (20, 40, 80), 2),
  ("dpmpp_3m_sample", {}, (20, 40, 80), 3),
  ("unipc_sample", dict(order=1), (20, 40, 80), 2),
  ("unipc_sample", dict(order=2), (20, 40, 80), 3),
  ("unipc_sample", dict(order=3), (40, 80, 160), 4),
]


@pytest.mark.parametrize(
  "name,kw,steps,order", ORDER_CASES, ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES]
)
def test_multistep_order_of_convergence(name, kw, steps, order):
  """The global error ratio when h halves is ~2^order: >= 6.5 demands 3rd order; a 2nd-order
  method must stay below it (2M and the old 3M, whose h^2 D'' term was halved, give ~4)."""
  exact = np.asarray(exact_flow_to_sigma_min(X_T))
  kw = dict(kw, spacing="log_snr", final_sigma="sigma_min")
  if name == "unipc_sample":
    kw["lower_order_final"] = False  # its 1st-order last steps would mask the order
    # unipc returns D(x; sigma_min), linear in x for Gaussian data: the error keeps its order.
    smin = continuous.sigma_min_max(SCHED)[0]
    exact = np.asarray(continuous.make_denoiser(SCHED, gauss_model)(jnp.asarray(exact), smin))
  errs = [np.mean(np.abs(_run(name, n, **kw)[0] - exact)) for n in steps]
  ratios = [errs[0] / errs[1], errs[1] / errs[2]]
  if order >= 3:
    assert min(ratios) >= 6.5, (errs, ratios)
  else:
    assert 3.0 < min(ratios) and max(ratios) < 6.5, (errs, ratios)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_prediction_kinds_agree(prediction):

  def model(x, t, cond=None):
    ab = continuous.alpha_bar_at(SCHED, t)
    x0 = analytic.gaussian_x0_at_alpha_bar(ab, x, MU, S)
    if prediction == "x0":
      return x0
    eps = analytic.gaussian_eps_at_alpha_bar(ab, x, MU, S)
    abb = ab[:, None]
    return jnp.sqrt(abb) * eps - jnp.sqrt(1 - abb) * x0

  key = jax.random.PRNGKey(0)
  ref = run_sampler(euler.heun_sample, SCHED, gauss_model, X_T[:64], key, num_steps=10)
  got = run_sampler(
    euler.heun_sample, SCHED, model, X_T[:64], key, num_steps=10, prediction=prediction
  )
  np.testing.assert_allclose(got, ref, atol=2e-3)


# ----------------------------------------------------------------------------- stochastic


def _gauss_w2(samples):
  """2-Wasserstein between the Gaussian fit of samples [n, d] and N(MU, S^2 I)."""
  from scipy import linalg

  m = samples.mean(0)
  c = np.cov(samples.T)
  root = np.real(linalg.sqrtm(c))
  return math.sqrt(
    max(np.sum((m - MU) ** 2) + np.trace(c) + 2 * S**2 - 2 * S * np.trace(root), 0.0)
  )


STOCHASTIC = [
  ("euler_ancestral_sample", {}),
  ("edm_sample", dict(s_churn=20.0, s_tmin=0.05, s_tmax=50.0)),
  ("dpmpp_2m_sde_sample", {}),
  ("dpmpp_3m_sample", dict(eta=1.0)),
  ("pc_sample", dict(n_corrector=1, snr=0.1)),
]


@pytest.mark.parametrize("name,kw", STOCHASTIC)
def test_stochastic_samplers_converge_in_distribution(name, kw):
  few = _gauss_w2(_run(name, 4, batch=4000, **kw)[0])
  many = _gauss_w2(_run(name, 100, batch=4000, **kw)[0])
  # Sampling noise of the W2 of a 2-D Gaussian fit with n = 4000 is ~0.01.
  assert many < 0.03, (few, many)
  assert many < few, (few, many)


@pytest.mark.parametrize("name,kw", [("dpmpp_2m_sde_sample", {}), ("heun_sample", {})])
def test_mixture_ks(name, kw):
  from scipy import stats

  x, _ = _run(name, 60, model=mixture_model, batch=3000, event=(1,), **kw)
  res = stats.kstest(x[:, 0], lambda v: analytic.mixture_cdf_1d(v, W, MEANS, STDS))
  assert res.statistic < 0.035, res


# ----------------------------------------------------------------------------- NFE and steps


def _count_calls(sample_fn, **kw):
  calls = []

  def model(x, t, cond=None):
    jax.debug.callback(lambda: calls.append(1))
    return gauss_model(x, t, cond)

  jax.block_until_ready(
    jax.jit(lambda x: run_sampler(sample_fn, SCHED, model, x, jax.random.PRNGKey(0), **kw))(X_T[:4])
  )
  return len(calls)


@pytest.mark.parametrize(
  "fn,kw,nfe",
  [
    (euler.heun_sample, dict(num_steps=7), 13),
    (euler.edm_sample, dict(num_steps=7, s_churn=10.0), 13),
    (dpm_solver.dpmpp_3m_sample, dict(num_steps=7, eta=1.0), 7),
    (pc.pc_sample, dict(num_steps=7, n_corrector=2), 21),
  ],
)
def test_nfe(fn, kw, nfe):
  assert _count_calls(fn, **kw) == nfe


def test_euler_ancestral_replays_with_explicit_noise():
  rng = jax.random.PRNGKey(5)
  x_T = X_T[:16]
  out = run_sampler(euler.euler_ancestral_sample, SCHED, gauss_model, x_T, rng, num_steps=5)

  @jax.jit
  def replay(x_T):
    grid = grids.sigma_grid(SCHED, 5)
    den = continuous.make_denoiser(SCHED, gauss_model)
    x = x_T * jnp.sqrt(1 + grid[0] ** 2)
    for i in range(5):  # a Python loop on purpose: the reference is not the driver
      noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
      x = euler.euler_ancestral_step(den, x, grid[i], grid[i + 1], noise)
    return x

  np.testing.assert_allclose(out, replay(x_T), rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_first_step_is_ddim():
  """The first (1st-order) DPM-Solver++ step equals DDIM (eta = 0) between the same levels."""
  grid = grids.sigma_grid(SCHED, 4)
  den = continuous.make_denoiser(SCHED, gauss_model)
  x = X_T[:16] * jnp.sqrt(1 + grid[0] ** 2)
  st = dpm_solver.dpmpp_2m_step(den, dpm_solver.init_state(x), grid[0], grid[1])
  ab0, ab1 = 1 / (1 + grid[0] ** 2), 1 / (1 + grid[1] ** 2)
  x_t = x * jnp.sqrt(ab0)
  t0 = continuous.sigma_to_t(SCHED, grid[0])
  x0, eps = continuous.to_x0_eps_at(ab0, x_t, gauss_model(x_t, jnp.full((16,), t0)))
  ddim = jnp.sqrt(ab1) * x0 + jnp.sqrt(1 - ab1) * eps
  np.testing.assert_allclose(st.x * jnp.sqrt(ab1), ddim, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- final sigma, lower order, UniPC


def test_sigma_grid_final_sigma_min():
  smin, smax = map(float, continuous.sigma_min_max(SCHED))
  g = np.asarray(grids.sigma_grid(SCHED, 5, spacing="log_snr", final="sigma_min"))
  assert g.shape == (6,) and np.all(np.diff(g) < 0)
  np.testing.assert_allclose([g[0], g[-1]], [smax, smin], rtol=1e-4)
  np.testing.assert_allclose(np.diff(np.log(g)), np.log(smin / smax) / 5, rtol=1e-4)
  with pytest.raises(ValueError, match="final"):
    grids.sigma_grid(SCHED, 5, final="one")
  with pytest.raises(ValueError, match="explicit grid"):
    run_sampler(
      dpm_solver.dpmpp_2m_sample,
      SCHED,
      gauss_model,
      X_T,
      jax.random.PRNGKey(0),
      grid=jnp.array([10.0, 1.0, 0.0]),
      final_sigma="sigma_min",
    )


@pytest.mark.parametrize("spacing", grids.SIGMA_SPACINGS)
@pytest.mark.parametrize("n", [1, 4, 10, 25])
def test_final_sigma_min_ends_at_sigma_of_t0_on_every_spacing(spacing, n):
  """diffusers' final_sigmas_type='sigma_min': the last level is sigma(t = 0) on any spacing
  (the N + 1-level grid of the spacing, its smallest level moved to t = 0)."""
  smin = float(continuous.sigma_min_max(SCHED)[0])
  g = np.asarray(grids.sigma_grid(SCHED, n, spacing=spacing, final="sigma_min"))
  full = np.asarray(grids.sigma_grid(SCHED, n + 1, spacing=spacing))
  assert g.shape == (n + 1,) and np.all(np.diff(g) < 0), g
  np.testing.assert_allclose(g[-1], smin, rtol=1e-5)
  np.testing.assert_allclose(g[:-1], full[:-2], rtol=1e-6)


def test_final_sigma_min_last_step_is_a_solver_step():
  """With final_sigma='sigma_min', N calls take N solver steps and stop at sigma_min."""
  n = 4
  out = run_sampler(
    dpm_solver.dpmpp_2m_sample,
    SCHED,
    gauss_model,
    X_T[:16],
    jax.random.PRNGKey(0),
    num_steps=n,
    spacing="log_snr",
    final_sigma="sigma_min",
  )
  grid = grids.sigma_grid(SCHED, n, spacing="log_snr", final="sigma_min")
  den = continuous.make_denoiser(SCHED, gauss_model)
  st = dpm_solver.init_state(X_T[:16] * jnp.sqrt(1 + grid[0] ** 2))
  for i in range(n):  # a Python loop on purpose: the reference is not the driver
    st = dpm_solver.dpmpp_2m_step(den, st, grid[i], grid[i + 1])
  np.testing.assert_allclose(out, st.x, rtol=1e-5, atol=1e-5)
  assert _count_calls(dpm_solver.dpmpp_2m_sample, num_steps=n, final_sigma="sigma_min") == n


def test_dpmpp_3m_max_order_1_is_ddim():
  """lower_order_final's 1st-order step: 3M with max_order=1 and a full history is DDIM."""
  grid = grids.sigma_grid(SCHED, 6, spacing="log_snr")
  den = continuous.make_denoiser(SCHED, gauss_model)
  st = dpm_solver.init_state(X_T[:16] * jnp.sqrt(1 + grid[0] ** 2))
  for i in range(2):
    st = dpm_solver.dpmpp_3m_step(den, st, grid[i], grid[i + 1])
  got = dpm_solver.dpmpp_3m_step(den, st, grid[2], grid[3], max_order=1)
  ab0, ab1 = 1 / (1 + grid[2] ** 2), 1 / (1 + grid[3] ** 2)
  x_t = st.x * jnp.sqrt(ab0)
  t0 = continuous.sigma_to_t(SCHED, grid[2])
  x0, eps = continuous.to_x0_eps_at(ab0, x_t, gauss_model(x_t, jnp.full((16,), t0)))
  ddim = jnp.sqrt(ab1) * x0 + jnp.sqrt(1 - ab1) * eps
  np.testing.assert_allclose(got.x * jnp.sqrt(ab1), ddim, rtol=1e-4, atol=1e-5)
  full = dpm_solver.dpmpp_3m_step(den, st, grid[2], grid[3])
  assert np.max(np.abs(np.asarray(full.x - got.x))) > 1e-4  # the cap did something


def test_dpmpp_3m_lower_order_final_wiring():
  n = 5
  out = run_sampler(
    dpm_solver.dpmpp_3m_sample,
    SCHED,
    gauss_model,
    X_T[:16],
    jax.random.PRNGKey(0),
    num_steps=n,
    spacing="log_snr",
    lower_order_final=True,
  )
  grid = grids.sigma_grid(SCHED, n, spacing="log_snr")
  den = continuous.make_denoiser(SCHED, gauss_model)
  st = dpm_solver.init_state(X_T[:16] * jnp.sqrt(1 + grid[0] ** 2))
  for i in range(n):
    st = dpm_solver.dpmpp_3m_step(den, st, grid[i], grid[i + 1], max_order=min(3, n - i))
  np.testing.assert_allclose(out, st.x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final_sigma", ["zero", "sigma_min"])
def test_unip2_without_corrector_is_dpmpp_2m(final_sigma):
  """[UniPC]: UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M) (at the same orders, so no
  lower order at the end: 2M's last step is 2nd order when it does not jump to 0)."""
  kw = dict(num_steps=7, spacing="log_snr", final_sigma=final_sigma)
  a = run_sampler(
    unipc.unipc_sample,
    SCHED,
    mixture_model,
    X_T,
    jax.random.PRNGKey(0),
    corrector=False,
    lower_order_final=False,
    **kw,
  )
  b = run_sampler(
    dpm_solver.dpmpp_2m_sample, SCHED, mixture_model, X_T, jax.random.PRNGKey(0), **kw
  )
  if final_sigma == "sigma_min":  # unipc then steps on to 0: the denoiser's x0 at sigma_min
    smin = grids.sigma_grid(SCHED, 7, spacing="log_snr", final="sigma_min")[-1]
    b = continuous.make_denoiser(SCHED, mixture_model)(b, smin)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unic_1_closed_form():
  """UniC-1 (bh2) after a 1st-order step: x_c = e^-h x_prev + (1 - e^-h)(D_0 + D_1) / 2."""
  grid = grids.sigma_grid(SCHED, 6, spacing="log_snr")
  den = continuous.make_denoiser(SCHED, gauss_model)
  x0 = X_T[:16] * jnp.sqrt(1 + grid[0] ** 2)
  st = unipc.unipc_step(den, unipc.unipc_init_state(x0, order=2), grid[0], grid[1])
  st2 = unipc.unipc_step(den, st, grid[1], grid[2])
  d0, d1 = den(x0, grid[0]), den(st.x, grid[1])
  r = grid[1] / grid[0]
  want = r * x0 + (1 - r) * 0.5 * (d0 + d1)
  np.testing.assert_allclose(st2.x_prev, want, rtol=1e-5, atol=1e-5)


def test_unipc_nfe_and_errors():
  assert _count_calls(unipc.unipc_sample, num_steps=7) == 7
  # sigma_min: one call more, the denoiser at sigma_min (test_unipc_lands_on_clean_sample).
  assert _count_calls(unipc.unipc_sample, num_steps=7, final_sigma="sigma_min") == 8
  with pytest.raises(ValueError, match="order"):
    run_sampler(unipc.unipc_sample, SCHED, gauss_model, X_T, jax.random.PRNGKey(0), order=4)
  with pytest.raises(ValueError, match="bh3"):
    run_sampler(unipc.unipc_sample, SCHED, gauss_model, X_T, jax.random.PRNGKey(0), variant="bh3")


def test_unipc_lands_on_clean_sample():
  """Issue 23.6: unipc's grid ends at sigma_min; its last step now lands on the denoiser's
  clipped x0 there (before: the sample at sigma_min, up to 1.02 with clip_x0 = 1)."""
  n, key = 6, jax.random.PRNGKey(0)
  x_T = X_T  # N(0.5, 0.3^2) data has mass above 1; the clipping must hold it
  out = np.asarray(registry.sample("unipc", SCHED, gauss_model, x_T, key, num_steps=n, clip_x0=1.0))
  assert np.abs(out).max() <= 1.0
  grid = grids.sigma_grid(SCHED, n, spacing="log_snr", final="sigma_min")
  den = continuous.make_denoiser(SCHED, gauss_model, clip_x0=1.0)
  st = unipc.unipc_init_state(grids.ve_start(x_T, grid), order=2)
  for i in range(n):  # a Python loop on purpose: the reference is not the driver
    st = unipc.unipc_step(den, st, grid[i], grid[i + 1], max_order=n - i)
  np.testing.assert_allclose(out, den(st.x, grid[-1]), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(st.x)).max() > 1.0  # the sample at sigma_min itself overshoots


def test_sigma_grid_errors_name_the_cause():
  """Issue 23.5: 'quadratic' on a process was an AttributeError; final='sigma_min' with the
  integer spacings at N = T asked for N + 1 = T + 1 timesteps and said so (misleadingly)."""
  with pytest.raises(ValueError, match="'quadratic' takes the integer timesteps.*Process"):
    grids.sigma_grid(processes.flow(), 4, spacing="quadratic")
  sch = schedules.cosine(10)
  for spacing in ("trailing", "quadratic"):
    with pytest.raises(ValueError, match="num_steps must be <= T - 1 = 9; got num_steps=10"):
      grids.sigma_grid(sch, 10, spacing=spacing, final="sigma_min")
    g = np.asarray(grids.sigma_grid(sch, 9, spacing=spacing, final="sigma_min"))
    np.testing.assert_allclose(g, continuous.t_to_sigma(sch, np.arange(9.0, -1.0, -1.0)))
