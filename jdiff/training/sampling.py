"""Moved to `jdiff.samplers.registry`; this alias keeps branches in flight importing.

Delete once nothing imports `jdiff.training.sampling`.
"""

from jdiff.samplers.registry import (  # noqa: F401
  AUTO,
  FLOW_SAMPLERS,
  SAMPLERS,
  Sampler,
  make_sample_fn,
  resolve_options,
)
