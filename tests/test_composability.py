"""The primitives compose with pmap, shard_map, vmap and jit, and keep bfloat16.

The mapped checks need 4 fake CPU devices, which XLA only creates if
`XLA_FLAGS=--xla_force_host_platform_device_count=4` is set before jax initialises its
backends; they therefore run once in a subprocess (shared by the tests below through a
module-scoped fixture) that prints its measurements as JSON.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

from jdiff import diffusion, losses, samplers, schedules
from tests import analytic

ROOT = pathlib.Path(__file__).resolve().parents[1]

_MAPPED = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jdiff import losses, samplers, schedules
from tests import analytic

assert jax.device_count() == 4, jax.devices()
s = schedules.cosine(100)
f = analytic.gaussian_eps_fn(s, 0.1, 0.5)
k0, k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 4)
x0 = jax.random.normal(k0, (4, 8, 3))
x_t = jax.random.normal(k1, (4, 8, 3))
noise = jax.random.normal(k2, (4, 8, 3))
rngs = jax.random.split(k3, 4)
out = {}
f32 = lambda a: jnp.asarray(a, jnp.float32)
diff = lambda a, b: float(jnp.max(jnp.abs(f32(a) - f32(b))))

loss = lambda x, r: losses.denoising_loss(s, f, x, r, prediction="eps")
ref_loss = jnp.stack([loss(x0[i], rngs[i]) for i in range(4)])
out["pmap_loss"] = diff(jax.pmap(loss)(x0, rngs), ref_loss)
out["vmap_loss"] = diff(jax.vmap(loss)(x0, rngs), ref_loss)

den = samplers.VPDenoiser(s, f)
ddpm = lambda x, n: samplers.ddpm_step(den, x, 37, n, variance="fixed_large")[0]
ddim = lambda x, n: samplers.ddim_step(den, x, 60, 20, n, eta=0.5)[0]
flat = lambda a: a.reshape(32, 3)
for name, step in (("ddpm", ddpm), ("ddim", ddim)):
  ref = step(flat(x_t), flat(noise))
  out["pmap_" + name] = diff(flat(jax.pmap(step)(x_t, noise)), ref)
  out["vmap_" + name] = diff(flat(jax.vmap(step)(x_t, noise)), ref)

mesh = Mesh(np.array(jax.devices()), ("d",))
sm_loss = jax.jit(jax.shard_map(lambda x, r: loss(x[0], r[0])[None], mesh=mesh,
                                in_specs=(P("d"), P("d")), out_specs=P("d")))
out["shard_map_loss"] = diff(sm_loss(x0, rngs), ref_loss)
for name, step in (("ddpm", ddpm), ("ddim", ddim)):
  sm = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
  out["shard_map_" + name] = diff(sm(flat(x_t), flat(noise)), step(flat(x_t), flat(noise)))
# The reference itself, written out without jdiff.diffusion: rng -> (t, noise) as documented
# by denoising_loss, x_t from the schedule's coefficients, the eps MSE per example.
def direct(x, r):
  t_rng, noise_rng = jax.random.split(r)
  t = jax.random.randint(t_rng, (x.shape[0],), 0, 100, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x.shape, x.dtype)
  ab = s.alphas_cumprod[t][:, None]
  a, sd = s.sqrt_alphas_cumprod[t][:, None], s.sqrt_one_minus_alphas_cumprod[t][:, None]
  x_t = a * x + sd * noise
  eps_hat = jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * 0.1) / (ab * 0.5**2 + 1 - ab)
  return jnp.mean((eps_hat - noise) ** 2, axis=1)
out["ref_loss_direct"] = diff(ref_loss, jnp.stack([direct(x0[i], rngs[i]) for i in range(4)]))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mapped():
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(4),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
  )
  proc = subprocess.run(
    [sys.executable, "-c", _MAPPED], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("mapping", ["pmap", "vmap", "shard_map"])
@pytest.mark.parametrize("fn", ["loss", "ddpm", "ddim"])
def test_mapped_equals_unmapped(mapped, mapping, fn):
  assert mapped[f"{mapping}_{fn}"] < 1e-5, mapped


def test_reference_loss_is_the_eps_mse_written_out(mapped):
  """The unmapped loss the mapped ones are compared with is itself right (not, say, all 0)."""
  assert mapped["ref_loss_direct"] < 1e-5, mapped


def test_no_retrace_when_t_or_schedule_values_change():
  traces = []

  @jax.jit
  def step(s, x, t, t_prev, noise, rng):
    traces.append(1)  # Python side effect: runs only while tracing.
    f = analytic.gaussian_eps_fn(s, 0.1, 0.5)
    a = samplers.ddpm_step(samplers.VPDenoiser(s, f), x, t, noise)[0]
    b = samplers.ddim_step(samplers.VPDenoiser(s, f), x, t, t_prev, noise, eta=0.3)[0]
    c = losses.denoising_loss(s, f, x, rng, t=jnp.full((x.shape[0],), t))
    return a, b, c

  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  rng = jax.random.PRNGKey(1)
  results = []
  for s in (
    schedules.linear(100),
    schedules.cosine(100),
    schedules.sigmoid(100),
    schedules.rescale_zero_terminal_snr(schedules.scaled_linear(100)),
  ):
    for t, tp in ((5, 2), (50, 10), (99, 80)):
      results.append(step(s, x, jnp.int32(t), jnp.int32(tp), x, rng))
  assert len(traces) == 1
  # The values did change (the calls were not constant-folded).
  assert float(jnp.abs(results[0][0] - results[4][0]).max()) > 0


def test_bfloat16_is_kept():
  s = schedules.linear(100)
  bf = jnp.bfloat16
  x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 3)).astype(bf)
  noise = jax.random.normal(jax.random.PRNGKey(1), (4, 3)).astype(bf)
  t = jnp.array([0, 10, 50, 99], jnp.int32)
  x_t = diffusion.q_sample(s, x0, t, noise)
  assert x_t.dtype == bf
  # Values agree with float32 to bfloat16 precision.
  ref = diffusion.q_sample(s, x0.astype(jnp.float32), t, noise.astype(jnp.float32))
  np.testing.assert_allclose(x_t.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)
  for fn in (
    diffusion.x0_from_eps,
    diffusion.eps_from_x0,
    diffusion.x0_from_v,
    diffusion.eps_from_v,
  ):
    assert fn(s, x_t, t, noise).dtype == bf
  assert diffusion.v_from_x0_eps(s, x0, t, noise).dtype == bf
  assert diffusion.score_from_eps(s, t, noise).dtype == bf
  assert diffusion.eps_from_score(s, t, noise).dtype == bf
  for kind in ("eps", "x0", "v"):
    assert all(a.dtype == bf for a in diffusion.to_x0_eps(s, x_t, t, noise, prediction=kind))
  for variance in ("fixed_small", "fixed_large"):
    p, x0_hat = diffusion.p_mean_variance(s, noise, x_t, t, variance=variance)
    assert p.mean.dtype == bf and p.log_variance.dtype == bf and x0_hat.dtype == bf
  p, _ = diffusion.p_mean_variance(
    s, jnp.concatenate([noise, noise], -1), x_t, t, variance="learned_range"
  )
  assert p.mean.dtype == bf and p.log_variance.dtype == bf
  f = analytic.gaussian_eps_fn(s, 0.1, 0.5)
  for variance in ("fixed_small", "fixed_large"):
    assert (
      samplers.ddpm_step(samplers.VPDenoiser(s, f), x_t, 20, noise, variance=variance)[0].dtype
      == bf
    )
  a, b = samplers.ddim_step(samplers.VPDenoiser(s, f), x_t, 50, 20, noise, eta=0.5)
  assert a.dtype == bf and b.dtype == bf
  assert (
    samplers.ddim_sample(
      samplers.VPDenoiser(s, f), x_t, samplers.timestep_grid(s.num_steps, 5), jax.random.PRNGKey(2)
    ).dtype
    == bf
  )
  for pred in ("eps", "x0", "v"):
    loss = losses.denoising_loss(
      s, f, x0, jax.random.PRNGKey(3), prediction=pred, weighting="min_snr"
    )
    assert loss.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(loss)))
