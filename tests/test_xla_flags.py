"""The GPU flags recipe: set only on a GPU and only when the user has not set XLA_FLAGS."""

from jdiff.training import xla_flags


def test_gpu_flags_only_on_a_gpu_and_never_over_the_users():
  env = {}
  assert xla_flags.apply_gpu_flags(env, gpu=False) is None and "XLA_FLAGS" not in env
  flags = xla_flags.apply_gpu_flags(env, gpu=True)
  assert env["XLA_FLAGS"] == flags and "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  user = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_flags.apply_gpu_flags(user, gpu=True) is None
  assert user == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert not xla_flags.gpu_present({"JAX_PLATFORMS": "cpu"})
  env = {"JAX_PLATFORMS": "cpu"}
  assert xla_flags.apply_gpu_flags(env) is None and "XLA_FLAGS" not in env
