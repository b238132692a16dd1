"""Named random streams: every stream of a run is `fold_in(base, <the name's CRC-32>)`.

A name says what a key is for (`stream(base, "sample")`), and two different names give
independent streams without anyone choosing magic offsets (`10**9 + step`) that could
collide. Within a stream the step (or batch index) is folded in again, so the step
count stays the only clock (see jdiff/training/state.py).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import jax

from jdiff.training import prng

Array = jax.Array


def stream(base: Array, name: str) -> Array:
  """The key of the stream `name` of `base`: `fold_in(base, crc32(name))`.

  CRC-32 is stable across Python processes and versions (unlike `hash(str)`) and fits
  fold_in's 32-bit data.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"a stream name must be a non-empty str, got {name!r}")
  return jax.random.fold_in(base, zlib.crc32(name.encode("utf-8")))


class RunKeys(NamedTuple):
  """The keys a run derives from its integer seed.

  Attributes:
    base: `key(seed)`; every other stream is `stream(base, name)`.
    train: the training stream (dropout, timesteps, noise, label drops; the step is
      folded in by the train step). It is `split(key(seed), 3)[0]`, not a named stream,
      because it has always been derived that way: changing it would change every
      trained model and every recorded result (the main job's checksum included). With
      `prng_impl` 'rbg' or 'unsafe_rbg' it is the same split of that generator's key.
    init: parameter init key. It uses the 'rbg' PRNG, whose init of every kernel
      compiles far faster on a CPU than threefry's.
  """

  base: Array
  train: Array
  init: Array

  def stream(self, name: str) -> Array:
    """`stream(self.base, name)`."""
    return stream(self.base, name)


def run_keys(seed: int, prng_impl: str = "threefry") -> RunKeys:
  """The `RunKeys` of `seed` (an int); `prng_impl` (`jdiff.training.prng`) draws the
  training stream only: sampling, evaluation and init streams stay the same."""
  base = jax.random.key(seed)
  return RunKeys(
    base=base,
    train=jax.random.split(prng.base_key(seed, prng_impl), 3)[0],
    init=jax.random.key(seed, impl="rbg"),
  )
