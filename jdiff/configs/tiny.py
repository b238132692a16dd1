"""A tiny, fast variant of the default for tests and smoke runs (seconds per phase on a CPU)."""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.model.ch = 8
  c.model.ch_mult = (1, 2)
  c.model.attn_resolutions = (8,)
  c.model.num_groups = 4
  # XLA's own convolutions: the tests on this config check the trainer, the CLI and the
  # samplers, not the convolution. `conv_impl="auto"` (jdiff.ops.winograd on CPU) is tested
  # in tests/test_winograd.py and runs in the README workflows' commands (digits configs).
  c.model.conv_impl = "xla"
  c.diffusion.num_steps = 50
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 2
  c.train.num_steps = 6
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.ckpt_every = 3
  c.sample.num_steps = 5
  c.sample.num_samples = 8
  c.sample.grid_size = 8
  c.sample.batch_size = 8
  c.eval.batch_size = 40
  c.eval.bound_examples = 4
  return c
