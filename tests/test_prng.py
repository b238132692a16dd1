"""train.prng_impl: threefry is jax's default key bit for bit; rbg / unsafe_rbg draw other
(valid) numbers; a bad name is one clear error."""

import jax
import numpy as np
import pytest

from jdiff.training import prng


def test_prng_impls():
  ref = jax.random.normal(jax.random.fold_in(jax.random.key(3), 7), (64,))
  same = jax.random.normal(jax.random.fold_in(prng.base_key(3), 7), (64,))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(ref))
  for impl in ("rbg", "unsafe_rbg"):
    x = np.asarray(jax.random.normal(jax.random.fold_in(prng.base_key(3, impl), 7), (4096,)))
    assert not np.array_equal(x[:64], np.asarray(ref))
    assert abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1
    y = jax.random.normal(jax.random.fold_in(prng.base_key(3, impl), 7), (4096,))
    np.testing.assert_array_equal(x, np.asarray(y))  # same seed, same numbers
  with pytest.raises(ValueError, match=r"config.train.prng_impl must be one of"):
    prng.base_key(0, "philox")


def test_run_keys_draw_only_the_training_stream_with_prng_impl():
  from jdiff.training import rng  # noqa: PLC0415

  ref, keys = rng.run_keys(3), rng.run_keys(3, "rbg")
  assert jax.random.key_impl(ref.train) == jax.random.key_impl(jax.random.key(0))
  assert "rbg" in str(jax.random.key_impl(keys.train))
  np.testing.assert_array_equal(
    jax.random.key_data(keys.train),
    jax.random.key_data(jax.random.split(jax.random.key(3, impl="rbg"), 3)[0]),
  )
  for name in ("sample", "eval", "grid"):  # sampling and evaluation draw the same numbers
    np.testing.assert_array_equal(
      jax.random.key_data(keys.stream(name)), jax.random.key_data(ref.stream(name))
    )


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_train_step_with_other_generators(impl):
  """The train step (dropout, timesteps, noise) runs on an rbg / unsafe_rbg key: finite,
  the same for the same key, other numbers than threefry's."""
  import flax.linen as nn  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from jdiff import schedules  # noqa: PLC0415
  from jdiff.training.state import init_train_state  # noqa: PLC0415
  from jdiff.training.step import make_train_step  # noqa: PLC0415

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
      h = nn.Dropout(0.5, deterministic=not train)(nn.gelu(nn.Dense(32)(x)))
      return nn.Dense(x.shape[-1])(h)

  module, opt = Net(), optax.sgd(0.1)
  state = init_train_state(module, opt, jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
  batch = {"image": jax.random.normal(jax.random.key(5), (8, 4, 4, 2))}
  step = jax.jit(make_train_step(module, opt))
  losses = {
    name: float(step(state, batch, schedules.linear(50), key)[1]["loss"])
    for name, key in (
      ("threefry", prng.base_key(1)),
      ("a", prng.base_key(1, impl)),
      ("b", prng.base_key(1, impl)),
    )
  }
  assert all(np.isfinite(v) for v in losses.values()), losses
  assert losses["a"] == losses["b"] != losses["threefry"], losses
