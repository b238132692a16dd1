"""Tests for jdiff.ops.winograd: Winograd F(2x2,3x3) / F(4x4,3x3) convolutions equal
XLA's direct convolution (values and both gradients), through the chunked custom VJP,
the conv dispatcher, the U-Net's conv_impl switch and the mapping transforms."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python
from jax import lax

from jdiff.models.unet import UNet
from jdiff.ops import winograd
from jdiff.ops.winograd import resolve_conv_impl, winograd_conv3x3, winograd_conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")


def _direct(x, w):
  return lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, precision=lax.Precision.HIGHEST
  )


def _data(n, h, w, c, o, seed=0):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, h, w, c))
  k = jax.random.normal(kw, (3, 3, c, o)) / np.sqrt(9 * c)
  g = jax.random.normal(kg, (n, h, w, o))
  return x, k, g


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize(
  "tile,tol,shape",
  [
    (2, 3e-6, (2, 8, 8, 16, 32)),
    (2, 3e-6, (3, 7, 9, 5, 4)),
    (2, 3e-6, (1, 4, 4, 1, 3)),
    (2, 3e-6, (2, 12, 6, 8, 8)),
    (4, 3e-5, (2, 8, 8, 16, 32)),
    (4, 3e-5, (3, 7, 9, 5, 4)),
  ],
)
def test_matches_direct_conv_and_its_gradients(tile, tol, shape):
  x, k, g = _data(*shape)
  y_ref, vjp_ref = jax.vjp(_direct, x, k)
  y, vjp = jax.vjp(lambda x, k: winograd_conv3x3(x, k, tile), x, k)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  assert _rel(y, y_ref) < tol
  for got, ref in zip(vjp(g), vjp_ref(g)):
    assert got.shape == ref.shape
    assert _rel(got, ref) < tol


def test_images_per_chunk_is_the_largest_fitting_divisor():
  t = winograd.TILES[2]
  per_image = 16 * 4 * 4 * (3 + 5) * 4  # 8x8 image, C=3, O=5, float32
  assert winograd._images_per_chunk((8, 8, 8, 3), 5, 4, t, 3 * per_image) == 2
  assert winograd._images_per_chunk((8, 8, 8, 3), 5, 4, t, per_image // 2) == 1
  assert winograd._images_per_chunk((8, 8, 8, 3), 5, 4, t, 100 * per_image) == 8
  assert winograd._images_per_chunk((7, 8, 8, 3), 5, 4, t, 6 * per_image) == 1


def test_chunked_scan_equals_one_chunk(monkeypatch):
  x, k, g = _data(6, 8, 8, 4, 8, seed=1)

  def run():
    y, vjp = jax.vjp(winograd_conv3x3, x, k)
    return (y, *vjp(g))

  whole = run()
  monkeypatch.setattr(winograd, "_CHUNK_BYTES", 1)  # one image per chunk
  assert winograd._images_per_chunk(x.shape, 8, 4, winograd.TILES[2], 1) == 1
  chunked = run()
  for a, b in zip(chunked, whole):
    # the same sums in another order: float32 rounding (eps 1.2e-7) of ~36 terms, relative
    # to the array's scale (an entry near 0 is a cancellation of terms of that size)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=36 * 1.2e-7 * float(np.abs(b).max()))
  # Inference (no autodiff) has its own budget: whole batch here, then chunked.
  infer_whole = jax.jit(lambda x, k: winograd_conv3x3(x, k))(x, k)
  monkeypatch.setattr(winograd, "_INFER_CHUNK_BYTES", 1)
  infer_chunked = jax.jit(lambda x, k: winograd_conv3x3(x, k))(x, k)
  for y in (infer_whole, infer_chunked):
    np.testing.assert_allclose(y, whole[0], rtol=1e-5, atol=1e-5)
    assert _rel(y, _direct(x, k)) < 3e-6


def test_jit_vmap_and_second_order_grad():
  x, k, _ = _data(2, 6, 6, 3, 4, seed=2)
  xs = jnp.stack([x, 2 * x, -x])
  got = jax.jit(jax.vmap(winograd_conv3x3, in_axes=(0, None)))(xs, k)
  want = jnp.stack([_direct(xi, k) for xi in xs])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # grad of a grad-dependent loss goes through the custom VJP's own ops.
  gg = jax.grad(lambda k: jnp.sum(jax.grad(lambda x: jnp.sum(winograd_conv3x3(x, k) ** 2))(x)))
  gg_ref = jax.grad(lambda k: jnp.sum(jax.grad(lambda x: jnp.sum(_direct(x, k) ** 2))(x)))
  assert _rel(gg(k), gg_ref(k)) < 1e-4


def test_bfloat16_in_bfloat16_out():
  x, k, _ = _data(2, 8, 8, 8, 8, seed=3)
  y = winograd_conv3x3(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert _rel(y.astype(jnp.float32), _direct(x, k)) < 3e-2


def test_bad_inputs_name_the_bad_value():
  x, k, _ = _data(1, 4, 4, 3, 2)
  with pytest.raises(ValueError, match=r"w.shape=\(3, 3, 5, 2\)"):
    winograd_conv3x3(x, jnp.zeros((3, 3, 5, 2)))
  with pytest.raises(ValueError, match=r"x.shape=\(4, 4, 3\)"):
    winograd_conv3x3(x[0], k)
  with pytest.raises(TypeError, match="int32"):
    winograd_conv3x3(x.astype(jnp.int32), k.astype(jnp.int32))
  with pytest.raises(ValueError, match="tile=3"):
    winograd_conv3x3(x, k, tile=3)


def _uses_lax_conv(fn, *args) -> bool:
  return "conv_general_dilated" in str(jax.make_jaxpr(fn)(*args))


def test_dispatcher_routes_only_stride1_3x3_same_and_1x1():
  x, k, _ = _data(2, 8, 8, 32, 40, seed=4)
  k1 = k[1:2, 1:2]
  dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
  cases = [  # (kernel, strides, padding, routed away from lax.conv)
    (k, (1, 1), ((1, 1), (1, 1)), True),
    (k, (1, 1), "SAME", True),
    (k1, (1, 1), ((0, 0), (0, 0)), True),
    (k1, (1, 1), "VALID", True),
    (k, (2, 2), ((1, 1), (1, 1)), False),
    (k, (1, 1), ((0, 0), (0, 0)), False),
    (k[..., :8], (1, 1), "SAME", False),  # narrower than MIN_WINOGRAD_CHANNELS
  ]
  for kern, strides, padding, routed in cases:

    def ours(x, kern=kern, strides=strides, padding=padding):
      return winograd_conv_general_dilated(x, kern, strides, padding, dimension_numbers=dn)

    def ref(x, kern=kern, strides=strides, padding=padding):
      return lax.conv_general_dilated(
        x, kern, strides, padding, dimension_numbers=dn, precision=lax.Precision.HIGHEST
      )

    assert _uses_lax_conv(ours, x) != routed, (kern.shape, strides, padding)
    assert _rel(ours(x), ref(x)) < 1e-5
  # Grouped convolutions are left to XLA.
  kg = k[:, :, :16, :]
  grouped = lambda x: winograd_conv_general_dilated(
    x, kg, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2
  )
  assert _uses_lax_conv(grouped, x)


def test_resolve_conv_impl():
  assert jax.default_backend() == "cpu"
  assert resolve_conv_impl("auto", jnp.float32) == "winograd"
  assert resolve_conv_impl("auto", jnp.bfloat16) == "xla"
  assert resolve_conv_impl("xla", jnp.float32) == "xla"
  assert resolve_conv_impl("winograd", jnp.bfloat16) == "winograd"
  with pytest.raises(ValueError, match="'bogus'"):
    resolve_conv_impl("bogus", jnp.float32)


def test_unet_conv_impls_share_parameters_and_agree():
  kw = dict(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_groups=8,
    num_classes=3,
    dropout=0.0,
    zero_init=False,
  )
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t, y = jnp.array([3, 700]), jnp.array([0, 3])
  nets = {impl: UNet(conv_impl=impl, **kw) for impl in ("xla", "winograd")}
  params = nets["xla"].init(jax.random.key(1), x, t, y, train=False)["params"]
  shapes = jax.eval_shape(lambda: nets["winograd"].init(jax.random.key(1), x, t, y, train=False))[
    "params"
  ]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, shapes, params)))
  jaxpr = str(
    jax.make_jaxpr(lambda p: nets["winograd"].apply({"params": p}, x, t, y, train=False))(params)
  )
  assert jaxpr.count("conv_general_dilated") == 3  # conv_in, conv_out, strided downsample
  assert "custom_vjp_call" in jaxpr

  def loss(p, impl):
    return jnp.mean(nets[impl].apply({"params": p}, x, t, y, train=False) ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # eager: ~2 min of dispatch
  (l_x, g_x), (l_w, g_w) = (grad_fn(params, i) for i in ("xla", "winograd"))
  assert abs(float(l_x - l_w)) < 1e-5 * abs(float(l_x))
  for a, b in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)
  with pytest.raises(ValueError, match="'fast'"):
    UNet(conv_impl="fast", **kw).init(jax.random.key(1), x, t, y, train=False)


def test_bad_conv_impl_in_config_is_named():
  from jdiff.configs import default  # pylint: disable=g-import-not-at-top
  from jdiff.runs.validate import validate  # pylint: disable=g-import-not-at-top

  c = default.get_config()
  c.model.conv_impl = "cudnn"
  with pytest.raises(ValueError, match="config.model.conv_impl.*'cudnn'"):
    validate(c)


def test_pmap_and_shard_map_equal_unmapped():
  script = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from jdiff.ops.winograd import winograd_conv3x3
    assert jax.device_count() == 4
    x = jax.random.normal(jax.random.key(0), (4, 2, 6, 6, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
    def loss(x, k):
      return jnp.sum(jnp.sin(winograd_conv3x3(x, k)))
    ref = [jax.value_and_grad(loss, argnums=(0, 1))(xi, k) for xi in x]
    ref_v = np.stack([r[0] for r in ref]); ref_dx = np.stack([r[1][0] for r in ref])
    ref_dk = np.stack([r[1][1] for r in ref])
    pm = jax.pmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(0, None))(x, k)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    def local(x, k):
      v, (dx, dk) = jax.value_and_grad(loss, argnums=(0, 1))(x[0], k)
      return v[None], dx[None], dk[None]
    sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P()),
                               out_specs=(P("d"), P("d"), P("d"))))(x, k)
    # pmap differentiates each device's loss; under shard_map the replicated k
    # gets the gradient of the summed loss (autodiff psums it) on every shard.
    sum_dk = np.broadcast_to(ref_dk.sum(0), ref_dk.shape)
    for got, want_dk in ((pm, ref_dk), ((sm[0], (sm[1], sm[2])), sum_dk)):
      np.testing.assert_allclose(got[0], ref_v, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(got[1][0], ref_dx, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(got[1][1], want_dk, rtol=1e-5, atol=1e-4)
    print("OK")
  """)
  proc = run_python(["-c", script], devices=4)
  assert proc.stdout.strip().endswith("OK")
