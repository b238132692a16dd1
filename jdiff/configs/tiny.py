"""A tiny, fast variant of the default for tests and smoke runs (seconds per phase on a CPU)."""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  # XLA's own convolutions: the tests on this config check the trainer, the CLI and the
  # samplers, not the convolution. `conv_impl="auto"` (jdiff.ops.winograd on CPU) is tested
  # in tests/test_winograd.py and runs in the README workflows' commands (digits configs).
  c.model.update(ch=8, ch_mult=(1, 2), attn_resolutions=(8,), num_groups=4, conv_impl="xla")
  c.diffusion.num_steps = 50
  c.optim.update(schedule="constant", warmup_steps=2)
  c.train.update(num_steps=6, batch_size=8, log_every=2, ckpt_every=3)
  c.sample.update(num_steps=5, num_samples=8, grid_size=8, batch_size=8)
  c.eval.update(batch_size=40, bound_examples=4)
  return c
