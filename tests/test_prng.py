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
