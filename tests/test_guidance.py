"""Tests of classifier-free guidance (`jdiff.models.guidance`) and its intervals and scale
schedules (`jdiff.models.guidance_schedules`), on discrete schedules and on processes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import processes, schedules
from jdiff.configs import dit_latent_digits
from jdiff.models.edm import EDMPrecond
from jdiff.models.guidance import cfg_model_fn, rescale_guidance
from jdiff.models.guidance_schedules import interval_scale, schedule_scale, scheduled_cfg_model_fn
from jdiff.runs import objectives
from jdiff.runs.sample_options import sample_options, validate_sample_config
from jdiff.samplers.registry import make_sample_fn

NULL = 10  # the U-Net's null_label for num_classes = 10


def make_model(calls):
  """A toy conditional model: output depends on x, t and the label (null differs)."""
  table = jax.random.normal(jax.random.PRNGKey(0), (NULL + 1, 3))

  def model_fn(x, t, y):
    calls.append(x.shape[0])
    return jnp.tanh(x) * table[y][:, None, :] + 0.01 * t[:, None, None]

  return model_fn


X = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
T = jnp.array([1, 50, 300, 999])
Y = jnp.array([0, 3, 7, 9])


@pytest.mark.parametrize("w", [0.0, 1.0, 3.5])
def test_combination_and_one_batched_call(w):
  calls = []
  model = make_model(calls)
  cond = model(X, T, Y)
  uncond = model(X, T, jnp.full_like(Y, NULL))
  calls.clear()
  out = cfg_model_fn(model, guidance_scale=w, null_cond=NULL)(X, T, Y)
  assert calls == [8]  # one call on the doubled batch
  np.testing.assert_allclose(out, uncond + w * (cond - uncond), rtol=1e-6, atol=1e-6)
  if w == 1.0:
    np.testing.assert_allclose(out, cond, rtol=1e-6, atol=1e-6)
  if w == 0.0:
    np.testing.assert_allclose(out, uncond, rtol=1e-6, atol=1e-6)


def test_rescale_formula():
  calls = []
  model = make_model(calls)
  w, phi = 4.0, 0.7
  cond = np.asarray(model(X, T, Y), np.float64)
  uncond = np.asarray(model(X, T, jnp.full_like(Y, NULL)), np.float64)
  guided = uncond + w * (cond - uncond)
  std = lambda a: a.reshape(a.shape[0], -1).std(axis=1).reshape(-1, 1, 1)
  want = phi * guided * std(cond) / std(guided) + (1 - phi) * guided
  out = cfg_model_fn(model, guidance_scale=w, null_cond=NULL, guidance_rescale=phi)(X, T, Y)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  full = rescale_guidance(jnp.asarray(guided, jnp.float32), jnp.asarray(cond, jnp.float32), 1.0)
  np.testing.assert_allclose(std(np.asarray(full, np.float64)), std(cond), rtol=1e-5)


def test_jit_traced_scale_and_null_embedding():
  """guidance_scale may be traced; null_cond may be a per-example embedding."""

  def model_fn(x, t, c):
    return x * jnp.sum(c, axis=-1, keepdims=True)[:, None] + t[:, None, None]

  c = jax.random.normal(jax.random.PRNGKey(2), (4, 6))
  null = jnp.zeros((6,))

  @jax.jit
  def run(w):
    return cfg_model_fn(model_fn, guidance_scale=w, null_cond=null)(X, T.astype(jnp.float32), c)

  want = model_fn(X, T, c)
  np.testing.assert_allclose(run(1.0), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(0.0), model_fn(X, T, jnp.zeros_like(c)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_learn_sigma_guides_only_eps_half(phi):
  """[B, ..., 2C] outputs: eps half guided (and rescaled), variance half = conditional."""
  calls = []
  table = jax.random.normal(jax.random.PRNGKey(3), (NULL + 1, 6))

  def model_fn(x, t, y):  # eps in channels 0..2, variance interpolation in 3..5
    calls.append(x.shape[0])
    h = jnp.tanh(jnp.concatenate([x, 2 * x], -1))
    return h * table[y][:, None, :] + 0.01 * t[:, None, None]

  w = 3.0
  cond = np.asarray(model_fn(X, T, Y), np.float64)
  uncond = np.asarray(model_fn(X, T, jnp.full_like(Y, NULL)), np.float64)
  calls.clear()
  fn = cfg_model_fn(
    model_fn, guidance_scale=w, null_cond=NULL, guidance_rescale=phi, learn_sigma=True
  )
  out = np.asarray(fn(X, T, Y))
  assert calls == [8] and out.shape == (4, 5, 6)
  np.testing.assert_array_equal(out[..., 3:], np.asarray(model_fn(X, T, Y))[..., 3:])
  guided = uncond[..., :3] + w * (cond[..., :3] - uncond[..., :3])
  if phi:
    std = lambda a: a.reshape(a.shape[0], -1).std(axis=1).reshape(-1, 1, 1)
    guided = phi * guided * std(cond[..., :3]) / std(guided) + (1 - phi) * guided
  np.testing.assert_allclose(out[..., :3], guided, rtol=1e-5, atol=1e-5)
  # Without learn_sigma the variance channels are extrapolated too (what it must avoid).
  plain = np.asarray(cfg_model_fn(model_fn, guidance_scale=w, null_cond=NULL)(X, T, Y))
  want = uncond[..., 3:] + w * (cond[..., 3:] - uncond[..., 3:])
  np.testing.assert_allclose(plain[..., 3:], want, rtol=1e-5, atol=1e-5)
  assert np.abs(plain[..., 3:] - out[..., 3:]).max() > 0.1


def test_errors():
  model = make_model([])
  with pytest.raises(ValueError, match="guidance_rescale"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=NULL, guidance_rescale=1.5)
  with pytest.raises(ValueError, match="null_cond"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=None)
  with pytest.raises(ValueError, match="cond"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=NULL)(X, T, None)
  with pytest.raises(ValueError, match=r"more output channels than the input.s 3.*\(5, 3\)"):
    cfg_model_fn(model, guidance_scale=2.0, null_cond=NULL, learn_sigma=True)(X, T, Y)


# ----------------------------------------------------------------------------- extra channels


def make_uncertainty_model(ch):
  """An analytic EDM2-style model: C denoised channels, then one log-variance channel."""
  table = jax.random.normal(jax.random.PRNGKey(2), (NULL + 1, ch))

  def model_fn(x, t, y):
    d = jnp.tanh(x) * table[y][:, None, :] + 0.01 * t[:, None, None]
    u = jnp.broadcast_to((0.1 * y + 0.001 * t)[:, None, None], x.shape[:-1] + (1,))
    return jnp.concatenate([d, u], axis=-1)

  return model_fn


@pytest.mark.parametrize("ch", [3, 4])  # RGB, and 4-channel latents (C + 1 = 5, odd)
def test_uncertainty_channel_is_not_guided(ch):
  """EDM2's uncertainty model outputs C + 1 channels: all C image channels are guided, the
  log-variance is the conditional branch's (it used to be split in half)."""
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 5, ch))
  model_fn, w = make_uncertainty_model(ch), 3.0
  cond, uncond = model_fn(x, T, Y), model_fn(x, T, jnp.full_like(Y, NULL))
  out = cfg_model_fn(model_fn, guidance_scale=w, null_cond=NULL, learn_sigma=True)(x, T, Y)
  assert out.shape == (4, 5, ch + 1)
  want = uncond[..., :ch] + w * (cond[..., :ch] - uncond[..., :ch])
  np.testing.assert_allclose(out[..., :ch], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[..., ch:], cond[..., ch:])


class _Net(nn.Module):
  """A network F for `EDMPrecond`: analytic, class-dependent, 4 channels."""

  num_classes: int = NULL

  @nn.compact
  def __call__(self, x, t, y, *, train):
    del train
    return jnp.tanh(x) * (0.5 + 0.1 * y[:, None, None, None]) + 0.01 * t[:, None, None, None]


def test_edm_uncertainty_model_samples_with_cfg_on_latents():
  """`EDMPrecond(uncertainty=True)` on 4-channel latents samples with CFG (it raised), and the
  sample is the one of the image channels guided alone."""
  module = EDMPrecond(_Net(), uncertainty=True)
  x_T = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 4))
  labels = jnp.array([1, 7])
  params = module.init(jax.random.PRNGKey(5), x_T, jnp.ones(2), labels, train=False)["params"]
  opts = dict(sampler="euler", num_steps=3, prediction="x0", clip_x0=None, null_label=NULL)
  got = make_sample_fn(module, processes.ve(), guidance_scale=2.5, **opts)(
    params, x_T, jax.random.key(0), labels
  )

  class ImageOnly(nn.Module):  # the same model without its uncertainty channel, guided by hand
    num_classes: int = NULL

    @nn.compact
    def __call__(self, x, t, y, *, train):
      f = lambda yy: module.apply({"params": params}, x, t, yy, train=False)[..., :4]
      return f(jnp.full_like(y, NULL)) + 2.5 * (f(y) - f(jnp.full_like(y, NULL)))

  want = make_sample_fn(ImageOnly(), processes.ve(), **opts)({}, x_T, jax.random.key(0), labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- intervals, schedules


def _lin_model(x, t, y):
  """Conditional and unconditional outputs that differ by a known, nonzero amount."""
  c = jnp.asarray(y, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  tt = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return x * (1.0 + 0.3 * c) + 0.01 * tt * c


def _applied_weight(noise, scale_fn, t_model):
  """The guidance weight `scheduled_cfg_model_fn` applies at each model time, read back from
  out = u + w (c - u)."""
  x, y = jnp.ones((len(t_model), 2, 1)), jnp.full((len(t_model),), 2)
  guided = scheduled_cfg_model_fn(_lin_model, noise, scale_fn=scale_fn, null_cond=0)
  out = guided(x, t_model, y)
  c, u = _lin_model(x, t_model, y), _lin_model(x, t_model, jnp.zeros_like(y))
  return np.asarray(jnp.mean((out - u) / (c - u), axis=(1, 2)), np.float64)


def _paper_weight(kind, w, f, sigma=None, lo=None, hi=None):
  """[Wang24]'s increasing schedules with omega = w - 1 (f = 1 at the first step, 0 at the
  end), and [Kyn24]'s interval, in float64."""
  if kind == "interval":
    return np.where((sigma >= lo) & (sigma <= hi), w, 1.0)
  ramp = 2.0 * (1.0 - f) if kind == "linear" else 1.0 + np.cos(np.pi * f)
  return 1.0 + (w - 1.0) * ramp


W = 3.0
# Process times (for VE t is sigma; flow: sigma = t / (1 - t)), the range ends included.
TIMES = {
  "ve": (processes.ve(), np.array([0.002, 0.1, 0.5, 2.0, 4.0, 4.5, 40.0, 80.0])),
  "flow": (processes.flow(), np.array([0.0, 0.05, 0.3, 0.5, 0.75, 0.85, 0.95, 1.0])),
}


@pytest.mark.parametrize("kind", ["interval", "linear", "cosine"])
@pytest.mark.parametrize("name", list(TIMES))
def test_interval_and_schedules_on_processes(name, kind):
  """Guidance intervals and schedules run on the EDM and flow processes (they raised) and
  apply the formula's weight at known times."""
  p, t = TIMES[name]
  t_min, t_max = float(p.t_min), float(p.t_max)
  f = np.clip((t - t_min) / (t_max - t_min), 0.0, 1.0)
  with np.errstate(divide="ignore"):
    sigma = t if name == "ve" else t / (1.0 - t)
  lo, hi = 0.5, 4.0
  if kind == "interval":
    scale_fn = interval_scale(W, lo, hi)
  else:
    scale_fn = schedule_scale(W, kind)
  got = _applied_weight(p, scale_fn, jnp.asarray(t * p.t_scale, jnp.float32))
  want = _paper_weight(kind, W, f, sigma, lo, hi)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  if kind == "interval":  # both ends of the range are inside, the rest of the times outside
    assert (got > 1.5).sum() == (3 if name == "ve" else 2)


def test_schedules_rise_as_sampling_proceeds():
  """[Wang24]'s linear and cosine schedules start at the conditional model (w = 1) at the
  first step (t = T - 1), reach w half-way and 2w - 1 at t = 0, rise monotonically in
  between, and average w over t, on a discrete schedule."""
  sch = schedules.cosine(101)
  t = jnp.arange(100, -1, -1)  # the sampling order: t from T - 1 down to 0
  f = np.asarray(t, np.float64) / 100.0
  for kind in ("linear", "cosine"):
    got = _applied_weight(sch, schedule_scale(W, kind), t)
    np.testing.assert_allclose(got, _paper_weight(kind, W, f), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[[0, 50, 100]], [1.0, W, 2 * W - 1], rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(got) > 0)
    np.testing.assert_allclose(np.trapezoid(got, dx=0.01), W, rtol=1e-3)


@pytest.mark.parametrize(
  "override",
  [{"guidance_sigma_hi": 3.0, "guidance_sigma_lo": 0.3}, {"guidance_schedule": "linear"}],
)
def test_dit_latent_digits_config_samples_with_an_interval_or_a_schedule(override):
  """The `dit_latent_digits` config (a flow model sampled by flow_euler) with
  `sample.guidance_sigma_hi` or `sample.guidance_schedule`: the options the runs build give
  the sample of a model that applies the formula's weight by hand (it raised)."""
  c = dit_latent_digits.get_config()
  c.sample.guidance_scale = W
  c.sample.num_steps = 4
  for key, value in override.items():
    c.sample[key] = value
  validate_sample_config(c.sample, latent=True)
  proc = objectives.make_process(c)
  opts = {**sample_options(c.sample), **objectives.sample_overrides(c)}
  opts |= dict(prediction=objectives.prediction_of(c), null_label=NULL)
  x_T = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 8, 4))
  labels, rng = jnp.array([2, 5]), jax.random.key(0)
  got = make_sample_fn(_Net(), proc, **opts)({}, x_T, rng, labels)

  class GuidedByHand(nn.Module):
    num_classes: int = NULL

    @nn.compact
    def __call__(self, x, tm, y, *, train):
      t = tm / 1000.0  # flow: the model sees t * 1000
      if "guidance_schedule" in override:
        f = jnp.clip((t - proc.t_min) / (proc.t_max - proc.t_min), 0.0, 1.0)
        w = 1.0 + (W - 1.0) * 2.0 * (1.0 - f)
      else:
        sigma = t / (1.0 - t)
        w = jnp.where((sigma >= 0.3) & (sigma <= 3.0), W, 1.0)
      cond, uncond = (
        _Net()(x, tm, y, train=train),
        _Net()(x, tm, jnp.full_like(y, NULL), train=train),
      )
      return uncond + w[:, None, None, None] * (cond - uncond)

  plain = opts | dict(guidance_scale=1.0, guidance_interval=None, guidance_schedule="constant")
  want = make_sample_fn(GuidedByHand(), proc, **plain)({}, x_T, rng, labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  const = make_sample_fn(_Net(), proc, **plain | {"guidance_scale": W})({}, x_T, rng, labels)
  assert np.abs(np.asarray(got) - np.asarray(const)).max() > 1e-3  # not plain CFG
