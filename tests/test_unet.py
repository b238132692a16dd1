"""Tests for jdiff.models.{layers,unet,bridge}: shapes, parameter count, conditioning,
dropout, compile-once and remat equivalence. Tiny configs except the (abstract)
DDPM parameter count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models.bridge import make_model_fn
from jdiff.models.layers import timestep_embedding
from jdiff.models.unet import PRESETS, UNet, make_unet

# A tiny U-Net: 8x8 input, levels at 8 and 4, attention at 4.
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)


def _init(net, x, t, y=None, seed=0):
  """Random parameters of the right shapes, filled from numpy (no XLA compile).

  Real initialisers are exercised in test_zero_init_output_is_zero; here we
  only need generic non-degenerate weights (fan-in scaled normals).
  """
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, y, train=False))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
    if name == "bias" or len(s.shape) < 2:
      return jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32)
    fan_in = math.prod(s.shape[:-1]) if name == "kernel" else 1
    return jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _inputs(b=2, hw=8, c=3, seed=0):
  x = jax.random.normal(jax.random.key(seed), (b, hw, hw, c), jnp.float32)
  t = jnp.arange(b, dtype=jnp.int32) * 100 + 7
  return x, t


@pytest.mark.parametrize(
  "overrides, out_c",
  [
    (dict(), 3),
    (dict(learn_sigma=True), 6),
    (dict(out_channels=2, learn_sigma=True), 4),
    (dict(resblock_updown=True, num_classes=5), 3),
    (dict(use_scale_shift_norm=True, head_channels=8), 3),
    (dict(num_heads=2, conv_resample=False, dropout=0.1), 3),
  ],
)
def test_output_shape_and_dtype(overrides, out_c):
  net = UNet(**TINY, **overrides)
  x, t = _inputs()
  y = jnp.array([0, 5]) if net.num_classes else None  # 5 = null label
  params = _init(net, x, t, y)
  out = net.apply({"params": params}, x, t, y, train=False)
  assert out.shape == (2, 8, 8, out_c)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))


def test_bfloat16_compute_float32_params():
  net = UNet(**TINY, dtype=jnp.bfloat16, use_scale_shift_norm=True, num_classes=3)
  x, t = _inputs()
  y = jnp.array([1, 2])
  params = _init(net, x, t, y)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out = net.apply({"params": params}, x, t, y, train=False)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 8, 3)
  # Same params in float32 compute give nearly the same output.
  ref = UNet(**TINY, use_scale_shift_norm=True, num_classes=3).apply(
    {"params": params}, x, t, y, train=False
  )
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1, rtol=0.1)


def _analytic_ddpm_params(ch, ch_mult, nres, attn_levels, c_img):
  """Closed-form parameter count of the DDPM U-Net (Ho et al. 2020, App. B)."""
  conv = lambda k, i, o: k * k * i * o + o
  dense = lambda i, o: i * o + o
  gn = lambda c: 2 * c
  e = 4 * ch
  res = lambda i, o: (
    gn(i) + conv(3, i, o) + dense(e, o) + gn(o) + conv(3, o, o) + (conv(1, i, o) if i != o else 0)
  )
  attn = lambda c: gn(c) + 4 * dense(c, c)
  n = dense(ch, e) + dense(e, e) + conv(3, c_img, ch)
  skips, c = [ch], ch
  for lvl, m in enumerate(ch_mult):
    for _ in range(nres):
      n += res(c, ch * m) + (attn(ch * m) if lvl in attn_levels else 0)
      c = ch * m
      skips.append(c)
    if lvl != len(ch_mult) - 1:
      n += conv(3, c, c)
      skips.append(c)
  n += 2 * res(c, c) + attn(c)
  for lvl in reversed(range(len(ch_mult))):
    for _ in range(nres + 1):
      n += res(c + skips.pop(), ch * ch_mult[lvl])
      c = ch * ch_mult[lvl]
      n += attn(c) if lvl in attn_levels else 0
    if lvl != 0:
      n += conv(3, c, c)
  return n + gn(c) + conv(3, c, c_img)


def test_ddpm_cifar10_param_count():
  net = make_unet("ddpm_cifar10")
  shapes = jax.eval_shape(
    lambda: net.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), train=False
    )
  )
  n = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))
  assert abs(n - 35.7e6) / 35.7e6 < 0.01
  # Closed form of the paper's architecture; diffusers' UNet2DModel of the same
  # architecture also has 35,746,307 parameters.
  assert n == _analytic_ddpm_params(128, (1, 2, 2, 2), 2, {1}, 3) == 35_746_307


def test_digits_small_preset_and_class_variant():
  net = make_unet("digits_small", num_classes=10)
  assert net.null_label == 10
  x = jnp.zeros((1, 16, 16, 1))
  shapes = jax.eval_shape(
    lambda: net.init(jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False)
  )
  assert shapes["params"]["class_emb"]["embedding"].shape == (11, 4 * 32)
  n = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))
  assert 0.3e6 < n < 1.0e6
  with pytest.raises(ValueError, match="unknown UNet preset"):
    make_unet("nope")
  with pytest.raises(TypeError, match="chanels"):
    make_unet("digits_small", chanels=3)
  assert dict(PRESETS["ddpm_cifar10"])["ch"] == 128


def test_timestep_embedding_closed_form():
  t = jnp.array([0.0, 1.5, 999.0])
  emb = np.asarray(timestep_embedding(t, 8))
  freqs = 10000.0 ** (-np.arange(4) / 4)
  args = np.array([0.0, 1.5, 999.0])[:, None] * freqs
  np.testing.assert_allclose(
    emb, np.concatenate([np.cos(args), np.sin(args)], -1), rtol=1e-5, atol=1e-5
  )
  assert timestep_embedding(jnp.array([3, 4]), 7).shape == (2, 7)
  with pytest.raises(ValueError, match="shape"):
    timestep_embedding(jnp.zeros((2, 1)), 8)


def test_conditioning_changes_output():
  net = UNet(**TINY, num_classes=4, zero_init=False)
  x, t = _inputs()
  y = jnp.array([0, 1])
  params = _init(net, x, t, y)
  f = make_model_fn(net, params)
  base = np.asarray(f(x, t, y))
  np.testing.assert_array_equal(base, np.asarray(f(x, t, y)))
  diff = lambda a: float(np.max(np.abs(np.asarray(a) - base)))
  assert diff(f(x, t + 50, y)) > 1e-4  # time
  assert diff(f(x, t.astype(jnp.float32) + 0.5, y)) > 1e-6  # fractional time
  assert diff(f(x, t, jnp.array([2, 3]))) > 1e-4  # class
  assert diff(f(x, t, jnp.full((2,), net.null_label))) > 1e-4  # null label
  # Per-example: changing example 1's label leaves example 0 unchanged.
  out = np.asarray(f(x, t, jnp.array([0, 3])))
  np.testing.assert_allclose(out[0], base[0], rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(out[1] - base[1])) > 1e-4


def test_zero_init_output_is_zero():
  net = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
  x, t = _inputs()
  # The real initialisers ('rbg' keys compile much faster than threefry on CPU).
  params = jax.jit(lambda: net.init(jax.random.key(0, impl="rbg"), x, t, train=False))()
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert np.std(np.asarray(params["params"]["conv_in"]["kernel"])) > 0.01
  np.testing.assert_array_equal(np.asarray(make_model_fn(net, params)(x, t, None)), 0.0)


def test_dropout_only_in_train_mode():
  net = UNet(**TINY, dropout=0.5, zero_init=False)
  x, t = _inputs()
  params = _init(net, x, t)
  ev = make_model_fn(net, params)
  np.testing.assert_array_equal(np.asarray(ev(x, t, None)), np.asarray(ev(x, t, None)))
  # Eval ignores any rng: with or without one the output is identical.
  ev_rng = make_model_fn(net, params, rng=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(ev(x, t, None)), np.asarray(ev_rng(x, t, None)))
  tr = lambda seed: np.asarray(
    make_model_fn(net, {"params": params}, train=True, rng=jax.random.key(seed))(x, t, None)
  )
  np.testing.assert_array_equal(tr(1), tr(1))
  assert np.max(np.abs(tr(1) - tr(2))) > 1e-4
  assert np.max(np.abs(tr(1) - np.asarray(ev(x, t, None)))) > 1e-4
  with pytest.raises(ValueError, match="rng"):
    make_model_fn(net, params, train=True)


def test_jitted_step_compiles_once():
  net = UNet(**TINY, num_classes=3, zero_init=False)
  x, t = _inputs()
  params = _init(net, x, t, jnp.array([0, 1]))
  traces = []

  @jax.jit
  def step(params, x, t, y):
    traces.append(1)  # Python side effect: runs only when tracing.
    model_fn = make_model_fn(net, params)
    return jnp.mean(model_fn(x, t, y) ** 2)

  for i in range(4):
    step(params, x + i, t + 17 * i, jnp.array([i % 4, (i + 1) % 4])).block_until_ready()
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_remat_matches_no_remat():
  cfg = dict(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    num_groups=4,
    dropout=0.3,
    use_scale_shift_norm=True,
    zero_init=False,
  )
  net, net_r = UNet(**cfg), UNet(**cfg, remat=True)
  x, t = _inputs()
  params = _init(net, x, t)
  assert jax.tree.structure(params) == jax.tree.structure(_init(net_r, x, t))

  def loss(net, p):
    fn = make_model_fn(net, p, train=True, rng=jax.random.key(5))  # dropout on
    return jnp.mean(fn(x, t, None) ** 2)

  both = jax.jit(
    lambda p: (
      jax.value_and_grad(lambda p: loss(net, p))(p),
      jax.value_and_grad(lambda p: loss(net_r, p))(p),
    )
  )
  (l0, g0), (l1, g1) = both(params)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_input_validation():
  net = UNet(**TINY)
  x, t = _inputs()
  params = _init(net, x, t)
  fn = make_model_fn(net, params)
  with pytest.raises(ValueError, match="divisible"):
    fn(jnp.zeros((2, 7, 8, 3)), t, None)
  with pytest.raises(ValueError, match="NHWC"):
    fn(jnp.zeros((8, 8, 3)), t, None)
  with pytest.raises(ValueError, match="t must have shape"):
    fn(x, jnp.zeros((3,)), None)
  with pytest.raises(ValueError, match="unconditional"):
    fn(x, t, jnp.array([0, 1]))
  cnet = UNet(**TINY, num_classes=2)
  cparams = _init(cnet, x, t, jnp.array([0, 1]))
  cfn = make_model_fn(cnet, cparams)
  with pytest.raises(ValueError, match="y .* required"):
    cfn(x, t, None)
  with pytest.raises(TypeError, match="integer"):
    cfn(x, t, jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="num_groups"):
    UNet(**{**TINY, "ch": 10}).init(jax.random.key(0), x, t, train=False)
  with pytest.raises(TypeError, match="Module"):
    make_model_fn(lambda x: x, params)
  # A scalar t broadcasts over the batch.
  np.testing.assert_array_equal(np.asarray(fn(x, jnp.int32(7), None)).shape, (2, 8, 8, 3))
