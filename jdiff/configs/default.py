"""The default config: the embedded 8x8-digits dataset (resized to 16x16) on a CPU.

Every other config overrides a few fields of this one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.conditional = False  # class-conditional U-Net (needs a labelled dataset)

  c.data = ml_collections.ConfigDict()
  c.data.name = "jdiff_digits"  # embedded: scikit-learn's digits, built offline as a tfds dataset
  c.data.data_dir = ""  # tfds data_dir; "" = TFDS' default (~/tensorflow_datasets)
  c.data.image_size = 16  # square resize; 0 keeps the stored size
  c.data.random_flip = False
  c.data.train_split = "train"
  c.data.eval_split = "test"

  # Constructor arguments of jdiff.models.UNet (num_classes and out_channels come from data).
  c.model = ml_collections.ConfigDict()
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_heads = 1
  c.model.head_channels = ml_collections.FieldReference(None, field_type=int)
  c.model.dropout = 0.0
  c.model.num_groups = 8
  c.model.use_scale_shift_norm = False
  c.model.resblock_updown = False
  c.model.learn_sigma = False
  c.model.dtype = "float32"
  c.model.remat = False
  # auto (Winograd for float32 on CPU, native elsewhere) | xla | winograd
  c.model.conv_impl = "auto"
  # the attention kernel: xla | chunked (query blocks) | cudnn | auto (cudnn on a GPU in bf16)
  c.model.attention_impl = "xla"
  c.model.norm_impl = "flax"  # flax | colsum (the same GroupNorm by column sums; GPU: unmeasured)
  c.model.residual_dtype = "float32"  # DiT's residual stream: float32 | bfloat16
  c.model.arch = "unet"  # unet | dit (the DiT's shape is config.dit)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"
  c.diffusion.num_steps = 1000
  c.diffusion.zero_terminal_snr = False
  c.diffusion.prediction = "eps"  # eps | x0 | v
  c.diffusion.weighting = "simple"  # simple | snr | min_snr
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.variance = "fixed_small"  # fixed_small | fixed_large | learned_range
  c.diffusion.vlb_weight = 0.001  # hybrid loss weight when learn_sigma

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adam"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.grad_clip = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.mu_dtype = "float32"  # Adam's first moment: float32 | bfloat16 (mixed precision)

  c.ema_decay = 0.999
  c.ema_warmup = True

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1500
  c.train.batch_size = 64  # global, over all devices and processes
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.train.sample_every = 0  # 0: only at the end
  c.train.keep_checkpoints = 3
  # Restore a checkpoint whose checksum record is missing or unreadable, unverified.
  c.train.allow_unverified_checkpoints = False
  c.train.label_dropout = 0.0  # classifier-free guidance training (conditional only)
  c.train.grad_accum_steps = 1  # k microbatches of batch_size / k per update (lax.scan)
  # The generator of the training stream (dropout masks, timesteps, noise): threefry (the same
  # numbers on every backend, device count and sharding) | rbg | unsafe_rbg (cheaper bits on
  # GPU/TPU, reproducible only on the same backend; jdiff/training/prng.py).
  c.train.prng_impl = "threefry"
  # Multi-process runs agree on a SIGTERM every N steps (one small collective), unless JAX's
  # preemption service is running (jax.distributed), which needs no collective at all.
  c.train.preemption_check_every = 10
  # (a, b): a jax.profiler trace of steps a+1..b into workdir/tensorboard (TensorBoard's
  # profile plugin); (0, 0): off.
  c.train.profile_steps = (0, 0)

  c.sample = ml_collections.ConfigDict()
  # "auto": the objective's own sampler (ddim for ddpm, heun for edm, flow_euler for flow), or
  # any name of jdiff.samplers.registry.SAMPLERS: ddpm | ddim | pc | euler | heun | euler_a |
  # edm | dpmpp_2m | dpmpp_2m_sde | dpmpp_3m | unipc | flow_euler | flow_heun.
  c.sample.sampler = "auto"
  c.sample.num_steps = 50  # ignored by ddpm (all T steps)
  # None: the sampler's own (ddim 0, pc / euler_a / dpmpp_2m_sde 1, dpmpp_3m 0); the other
  # samplers are deterministic and reject an eta.
  c.sample.eta = ml_collections.FieldReference(None, field_type=float)
  # "auto": the sampler's own grid: trailing (ddim, pc, euler_a, dpmpp_2m_sde), log_snr
  # (euler, heun, edm, dpmpp_2m, dpmpp_3m, unipc); ddpm takes every timestep. Others:
  # linspace for ddim / pc; log_snr | karras | uniform | trailing for the sigma-grid samplers
  # (heun, edm: log_snr | karras). A name the sampler does not accept is an error (see
  # jdiff/samplers/registry.py for why leading / quadratic are not offered).
  c.sample.spacing = "auto"
  c.sample.clip_x0 = 1.0  # clip x0_hat to [-c, c] in every sampler; <= 0 disables
  # Imagen's dynamic thresholding: percentile p in (0, 1] of |x0_hat|, floored at clip_x0
  # (or 1); 0 disables. Pixel diffusion only (both must be 0 for latent diffusion).
  c.sample.dynamic_threshold = 0.0
  c.sample.guidance_scale = 1.0
  # A sigma grid fitted to the model (experiments/optimize_grid.py writes
  # <workdir>/grids/<sampler>_nfe<N>.json); it must match sampler and num_steps. "" = off.
  c.sample.grid_file = ""
  c.sample.guidance_rescale = 0.0
  c.sample.num_samples = 64
  c.sample.grid_size = 64
  c.sample.batch_size = 64
  c.sample.use_ema = True
  # Guidance variants (class-conditional models): guidance only where guidance_sigma_lo <=
  # sigma(t) <= guidance_sigma_hi (Kynkaanniemi et al. 2024; hi = 0: everywhere), or a scale
  # schedule in t: constant | linear | cosine (jdiff/models/guidance_schedules.py).
  c.sample.guidance_sigma_lo = 0.0
  c.sample.guidance_sigma_hi = 0.0
  c.sample.guidance_schedule = "constant"

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 100
  c.eval.bound_examples = 16  # full T-step bound on this many eval examples (0: skip)
  c.eval.use_ema = True
  # Sample quality (--mode=fid, --mode=fid_ref, and the end of training; jdiff/runs/fid.py).
  c.eval.feature_net = "auto"  # auto (digits for jdiff_digits, else inception) | digits | inception
  c.eval.inception_weights = ""  # .pth of pytorch-fid, or the .npz/.safetensors converted from it
  c.eval.inception_conv_impl = "auto"  # auto (winograd on CPU, else xla) | xla | winograd
  c.eval.ref_stats = ""  # reference .npz (jdiff, pytorch-fid or guided-diffusion); "" = cached
  c.eval.ref_split = "train"  # the tfds split the reference statistics are computed on
  c.eval.num_samples = 5000  # samples scored by --mode=fid
  c.eval.quality_samples = 0  # samples scored at the end of train_and_evaluate (0: skip)
  c.eval.samples_npz = ""  # --mode=fid scores this .npz of samples instead of sampling
  c.eval.is_splits = 10  # Inception Score splits
  c.eval.pr_samples = 5000  # features kept for precision/recall and KID (0: skip them)
  c.eval.pr_k = 3  # neighbourhood of improved precision/recall
  c.eval.classifier_steps = 800  # training steps of the digits classifier (cache key)

  # Latent diffusion: the data are the latents of a frozen stage-1 autoencoder (see
  # jdiff/configs/ae_digits.py); empty = pixel-space diffusion.
  c.latent = ml_collections.ConfigDict()
  c.latent.autoencoder_workdir = ""
  c.latent.scale_factor = 0.0  # 0: use the 1/std computed from the data by stage 1

  # The device mesh ('data', 'fsdp'): -1 = the rest of the devices. Parameters, EMA and
  # optimiser state are split over 'fsdp' (jdiff.training.sharding.fsdp_spec: the largest
  # dimension divisible by fsdp; arrays under fsdp_min_size elements stay replicated); the
  # batch is split over both axes.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**14
  # What the model is trained on (jdiff.processes): ddpm (the discrete config.diffusion
  # schedule), edm (VE, EDM preconditioning and loss, config.edm) or flow (rectified flow,
  # velocity target, config.flow). edm and flow sample with the sigma-grid samplers (euler,
  # heun, edm, euler_a, dpmpp_*, unipc) and flow also with flow_euler / flow_heun.
  c.objective = "ddpm"

  c.dit = ml_collections.ConfigDict()  # jdiff.models.dit.DiT, when model.arch = "dit"
  c.dit.preset = ""  # "S/2", "B/2", "L/2", "XL/2" ([DiT] Table 1); "" = the fields below
  c.dit.patch_size = 2
  c.dit.hidden = 96
  c.dit.depth = 4
  c.dit.num_heads = 4
  c.dit.mlp_ratio = 4.0

  c.edm = ml_collections.ConfigDict()  # [EDM] Table 1 defaults
  c.edm.sigma_data = 0.5
  c.edm.p_mean = -1.2
  c.edm.p_std = 1.2
  c.edm.sigma_min = 0.002
  c.edm.sigma_max = 80.0
  c.edm.c_noise_scale = 250.0  # the net sees ln(sigma) / 4 * 250 (see models/edm.py)
  c.edm.uncertainty = False  # EDM2's learned uncertainty weighting

  c.flow = ml_collections.ConfigDict()
  c.flow.t_sampler = "logit_normal"  # logit_normal (SD3) | uniform
  c.flow.p_mean = 0.0
  c.flow.p_std = 1.0
  c.flow.shift = 1.0  # SD3 time shift of the flow_euler / flow_heun grids
  # Reflow: an .npz of [x0 | x1] pairs (python -m experiments.main --mode=reflow_pairs
  # --workdir=<teacher>); when set, training reads its pairs instead of the dataset.
  c.flow.reflow_pairs = ""
  c.flow.reflow_num_pairs = 2048
  c.flow.reflow_steps = 50  # flow_heun steps of the teacher's ODE per pair
  # Super-resolution (SR3 / cascades; jdiff/conditioning.py): factor > 0 trains the U-Net on
  # images conditioned on their factor-x average-pooled copy, upsampled and noise-augmented
  # with a level drawn in [0, aug_max]; sampling uses the level aug_level.
  c.superres = ml_collections.ConfigDict()
  c.superres.factor = 0
  c.superres.aug_max = 0.2
  c.superres.aug_level = 0.05

  # --mode=edit (jdiff/runs/edit.py): img2img (SDEdit) | inpaint | superres, from an .npz
  # (key 'images', uint8 or [-1, 1]) or a folder of PNGs; results go beside the input.
  c.edit = ml_collections.ConfigDict()
  c.edit.task = "img2img"
  c.edit.input = ""
  c.edit.mask = ""  # inpaint: .png / .npz / .npy; 1 (white) = generate, 0 (black) = keep
  c.edit.strength = 0.6  # img2img: run the last ceil(strength * num_steps) steps
  c.edit.jump_length = 1  # inpaint: RePaint's jump length and count (1, 1: replacement)
  c.edit.jump_n = 1
  c.edit.base_config = ""  # superres without input: sample a base model first (cascade)
  c.edit.base_workdir = ""
  c.edit.num = 16  # cascade: how many base samples

  c.lock()
  return c
