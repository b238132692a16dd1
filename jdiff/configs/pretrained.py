"""Sample, evaluate or fine-tune an imported pretrained U-Net (diffusers or ADM weights).

  python -m experiments.main --config=jdiff/configs/pretrained.py \
      --config.pretrained.path=google/ddpm-cifar10-32 --workdir=runs/ddpm_cifar10 --mode=sample

`pretrained.path` is a local diffusers directory (config.json + diffusion_pytorch_model
.safetensors, optionally scheduler_config.json), a hub name (needs huggingface_hub and
the network), or for `format=adm` an ADM .pt file with its flags
(`--config.pretrained.flags="--image_size 64 --num_channels 192 ..."`, or flags.json next
to it). The architecture, schedule and parameterisation come from the weights' own
configuration (jdiff/runs/pretrained.py); config.data must give the model's image shape.
`--mode=sample` / `--mode=eval` need no checkpoint; `--mode=train` fine-tunes from the
imported weights (and resumes from the workdir once it has a checkpoint).
"""

import ml_collections

from jdiff.configs import default


def get_config():
  c = default.get_config()
  # The data the imported model was trained on (train / eval).
  c.data.update(name="cifar10", image_size=32, random_flip=True)
  p = ml_collections.ConfigDict()
  p.path = ""  # directory, hub name (owner/name) or ADM .pt file
  p.format = "diffusers"  # diffusers | adm
  p.flags = ""  # ADM: "--image_size 64 --num_channels 192 ..." (over flags.json)
  p.adm_variant = "guided"  # ADM defaults for omitted flags: guided | improved
  # Take x0 clipping / thresholding (and a DDIM spacing) from the scheduler config / ADM,
  # and ADM's timestep_respacing as sample.sampler / num_steps / eta / spacing (logged).
  p.scheduler_sampling = True
  with c.unlocked():
    c.pretrained = p
  # Fine-tuning: a small learning rate, EMA from the imported weights.
  c.optim.update(lr=2e-5, warmup_steps=0, schedule="constant")
  c.update(ema_decay=0.9999, ema_warmup=False)
  c.train.update(num_steps=1000, batch_size=64)
  c.sample.update(sampler="ddim", num_steps=50)
  c.eval.bound_examples = 0
  return c
