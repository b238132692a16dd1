"""`train.prng_impl`: which pseudo-random generator draws the dropout masks and the noise.

  - "threefry" (default): jax's threefry2x32, counter-based and splittable; the same seed
    and step give the same numbers on any backend, device count or sharding (the
    reproducibility every test and checksum of jdiff relies on).
  - "rbg": XLA's RngBitGenerator keyed by threefry-derived keys: much cheaper bits on
    GPU/TPU; key splitting and folding stay threefry's, but the bits drawn may differ
    between backends and between shardings of the same array.
  - "unsafe_rbg": as rbg, and splits / folds keys by a cheap hash too: fastest, no
    guarantee of statistical independence between derived keys; reproducible only on the
    same backend, jax version and sharding.

Nothing measured yet: the default stays threefry until a GPU profile shows the gain.
"""

from __future__ import annotations

import jax

PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def base_key(seed: int, impl: str = "threefry") -> jax.Array:
  """A typed PRNG key of `seed` for config.train.prng_impl `impl` (see the module docstring)."""
  if impl not in PRNG_IMPLS:
    raise ValueError(f"config.train.prng_impl must be one of {tuple(PRNG_IMPLS)}, got {impl!r}")
  return jax.random.key(seed, impl=PRNG_IMPLS[impl])
