"""Class-conditional CIFAR-10 (DDPM recipe) with label dropout for classifier-free guidance."""

from jdiff.configs import cifar10_ddpm


def get_config():
  c = cifar10_ddpm.get_config()
  c.conditional = True
  c.train.label_dropout = 0.1
  c.sample.sampler = "ddim"
  c.sample.num_steps = 50
  c.sample.guidance_scale = 3.0
  return c
