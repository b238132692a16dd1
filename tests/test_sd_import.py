"""Cross-attention U-Nets imported from diffusers' `UNet2DConditionModel` are the same
functions (random weights, tiny SD 1.x- and 2.x-shaped configs), round trip exactly, and a
whole tiny `StableDiffusionPipeline` gives the same image (jdiff.pretrained.stable_diffusion).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pretrained import _perturbed as perturbed

from jdiff.pretrained import PretrainedError, build, diffusers_unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# SD 1.x: conv projections, one head count for every level (diffusers' attention_head_dim).
SD1 = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  block_out_channels=(16, 32),
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=12,
  attention_head_dim=2,
  norm_num_groups=8,
)
# SD 2.x: linear projections, heads per level, two transformer blocks, attention everywhere.
SD2 = dict(
  SD1,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  attention_head_dim=(2, 4),
  use_linear_projection=True,
  transformer_layers_per_block=2,
)


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_condition_unet_same_function_and_exact_round_trip():
  """SD 2.x's layout; SD 1.x's (conv projections, a level without attention) is the U-Net
  of the whole pipeline below."""
  cfg = SD2
  model = perturbed(diffusers.UNet2DConditionModel(**cfg))
  config = dict(model.config)
  config["_class_name"] = "UNet2DConditionModel"
  pt = build("diffusers", _state_dict(model), config=config, conv_impl="xla")
  heads = cfg["attention_head_dim"]
  heads = (heads,) * 2 if isinstance(heads, int) else heads
  assert pt.module.attention_head_dim == tuple(c // h for c, h in zip((16, 32), heads))
  rs = np.random.RandomState(1)
  x = rs.randn(2, 4, 8, 8).astype(np.float32)
  ctx = rs.randn(2, 5, 12).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  t = np.array([3, 999])
  # Row 0 masks two context tokens; row 1 attends to all (the same as no mask).
  with torch.no_grad():
    ref = model(
      torch.from_numpy(x),
      torch.from_numpy(t),
      torch.from_numpy(ctx),
      encoder_attention_mask=torch.from_numpy(mask),
    ).sample.numpy()
  cond = {"context": ctx, "mask": mask}
  out = jax.jit(lambda p, x, c: pt.module.apply({"params": p}, x, t, c, train=False))(
    pt.params, x.transpose(0, 2, 3, 1), cond
  )
  out = np.asarray(out).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
  sd, ref_sd = pt.state_dict(), _state_dict(model)
  assert sorted(sd) == sorted(ref_sd)
  for k, v in ref_sd.items():
    np.testing.assert_array_equal(sd[k], v, err_msg=k)


def test_condition_unet_unsupported_options_are_clear_errors():
  with pytest.raises(PretrainedError, match="addition_embed_type"):
    diffusers_unet.unet_kwargs(
      {"_class_name": "UNet2DConditionModel", **SD1, "addition_embed_type": "text_time"}
    )
  with pytest.raises(PretrainedError, match="transformer_layers_per_block"):
    diffusers_unet.unet_kwargs(
      {"_class_name": "UNet2DConditionModel", **SD1, "transformer_layers_per_block": [1, 2]}
    )


def test_context_shape_is_checked():
  from jdiff.models.unet import UNet

  net = UNet(
    ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), num_groups=8, context_dim=6
  )
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match=r"context must have shape \[B, L, context_dim\]"):
    net.init(jax.random.key(0), x, jnp.zeros(2), jnp.zeros((2, 3, 5)), train=False)


# ----------------------------------------------------------------------------- whole pipeline

PIPE_UNET = dict(SD1, cross_attention_dim=32, sample_size=8)
PIPE_VAE = dict(
  block_out_channels=(16, 16),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  sample_size=16,
  scaling_factor=0.5,
)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  """A whole tiny StableDiffusionPipeline, random weights, saved with save_pretrained."""
  from test_clip import perturbed_text_model, tiny_config, write_tokenizer

  d = tmp_path_factory.mktemp("tiny_sd")
  (d / "tok").mkdir()
  vocab = write_tokenizer(d / "tok")
  transformers = pytest.importorskip("transformers")
  pipe = diffusers.StableDiffusionPipeline(
    vae=perturbed(diffusers.AutoencoderKL(**PIPE_VAE)),
    text_encoder=perturbed_text_model(tiny_config("quick_gelu", vocab=vocab)),
    tokenizer=transformers.CLIPTokenizer.from_pretrained(str(d / "tok")),
    unet=perturbed(diffusers.UNet2DConditionModel(**PIPE_UNET)),
    scheduler=diffusers.DDIMScheduler(
      beta_schedule="scaled_linear",
      beta_start=0.00085,
      beta_end=0.012,
      clip_sample=False,
      set_alpha_to_one=True,
      timestep_spacing="trailing",
    ),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(str(d / "sd"), safe_serialization=True)
  return d / "sd"


def test_pipeline_same_image_as_diffusers(sd_dir):
  """SD 1.x's U-Net layout: the same image, and the U-Net's state dict round trips exactly."""
  from jdiff.pretrained.stable_diffusion import load_stable_diffusion, make_text_to_image

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  placed = []

  def shardings(path, shape):  # restored onto a mesh, array by array, as the U-Nets are
    placed.append(path)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  sd = load_stable_diffusion(str(sd_dir), conv_impl="xla", shardings=shardings)
  leaves = [sd.unet.params, sd.text_params, sd.vae_params]
  assert len(placed) == sum(len(jax.tree.leaves(p)) for p in leaves)
  assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(leaves))
  assert sd.scaling_factor == 0.5 and sd.unet.module.context_dim == 32
  ref_sd = _state_dict(pipe.unet)
  assert sorted(sd.unet.state_dict()) == sorted(ref_sd)
  for k, v in sd.unet.state_dict().items():
    np.testing.assert_array_equal(v, ref_sd[k], err_msg=k)
  prompts = ["the digit seven", "seven"]
  z = np.random.RandomState(0).randn(2, 4, 8, 8).astype(np.float32)
  kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
  with torch.no_grad():
    ref = pipe(prompts, latents=torch.from_numpy(z), negative_prompt=["the"] * 2, **kw).images
  generate = make_text_to_image(sd, negative_prompt="the", guidance=5.0, num_steps=4)
  images, _ = generate(prompts, latents_T=z.transpose(0, 2, 3, 1))
  assert images.shape == ref.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(images, ref, atol=1e-3)
  # One seed per prompt: a prompt's image depends on its prompt and seed only, not on its
  # place in the batch (up to the last bits: XLA's CPU kernels may round the rows of a batch
  # differently, 2.4e-7 on AVX2; another prompt or seed moves the image by more than 1e-3).
  a, _ = generate(prompts, seeds=[4, 5])
  b, _ = generate(prompts[::-1], seeds=[5, 6])
  np.testing.assert_allclose(a[1], b[0], rtol=0, atol=1e-5)
  assert np.abs(a[0] - b[1]).max() > 1e-3


def test_hub_name_fetches_the_pipeline_files_and_offline_is_one_line(monkeypatch):
  hub = pytest.importorskip("huggingface_hub")
  from jdiff.pretrained.stable_diffusion import HUB_FILES, load_stable_diffusion

  asked = {}

  def offline(repo_id, *, revision=None, allow_patterns=None, **kw):
    asked.update(repo=repo_id, patterns=allow_patterns)
    raise hub.errors.LocalEntryNotFoundError("offline\nand not cached")

  monkeypatch.setattr(hub, "snapshot_download", offline)
  with pytest.raises(OSError, match="could not fetch 'owner/sd-x'") as e:
    load_stable_diffusion("owner/sd-x")
  assert "\n" not in str(e.value)
  assert asked == dict(repo="owner/sd-x", patterns=list(HUB_FILES))
  assert {"model_index.json", "text_encoder/model.safetensors", "vae/config.json"} <= set(HUB_FILES)
  assert not any("safety_checker" in f or f.endswith(".bin") for f in HUB_FILES)


# ----------------------------------------------------------------------------- fine-tuning


def _caption_folder(root, n=6):
  """n random 20x16 RGB PNGs with captions beside them (centre-cropped to 16x16 on reading)."""
  from PIL import Image

  folder = root / "pairs"
  folder.mkdir()
  rng = np.random.RandomState(0)
  captions = [f"the digit {w}" for w in ("seven", "one", "two", "seven", "nine", "six")][:n]
  for i, text in enumerate(captions):
    Image.fromarray(rng.randint(0, 256, (16, 20, 3), np.uint8)).save(folder / f"img{i}.png")
    (folder / f"img{i}.txt").write_text(text + "\n")
  return folder, captions


@pytest.mark.e2e
def test_finetune_on_a_caption_folder_encodes_like_diffusers_and_trains_the_unet(sd_dir, tmp_path):
  """The folder's latents and contexts are diffusers' (VAE mode x scaling, CLIP last hidden
  state); only the U-Net trains; the fine-tuned workdir samples prompts."""
  from conftest import run_python

  from jdiff.configs import sd_finetune
  from jdiff.data import caption_folder
  from jdiff.runs.setup import Setup

  folder, captions = _caption_folder(tmp_path)
  overrides = {
    "pretrained.path": str(sd_dir), "text.folder": str(folder), "model.conv_impl": "xla",
    "train.num_steps": 2, "train.batch_size": 2, "train.log_every": 1,
    "sample.num_steps": 2, "sample.num_samples": 4, "sample.batch_size": 4,
  }  # fmt: skip
  c = sd_finetune.get_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
  with Setup(c, str(tmp_path / "probe"), kind="diffusion") as setup:
    src = setup.prepared_source
    assert setup.image_shape == (8, 8, 4) and setup.pixel_shape == (16, 16, 3)
    null = setup.null_label
  images, _ = caption_folder.read_caption_folder(str(folder), image_size=16)
  x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
  ids = pipe.tokenizer(
    [*captions, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
  ).input_ids
  with torch.no_grad():
    z = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    ctx = pipe.text_encoder(ids)[0].numpy()
  np.testing.assert_allclose(src.latents, z.permute(0, 2, 3, 1).numpy(), atol=1e-4)
  np.testing.assert_allclose(src.labels, ctx[:-1], atol=1e-4)
  np.testing.assert_allclose(null, ctx[-1], atol=1e-4)

  wd = str(tmp_path / "ft")
  args = ["--config=jdiff/configs/sd_finetune.py", f"--workdir={wd}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  run_python(["-m", "experiments.main", *args])
  import orbax.checkpoint as ocp

  state = ocp.PyTreeCheckpointer().restore(f"{wd}/checkpoints/2/state")
  from jdiff.pretrained.stable_diffusion import load_stable_diffusion

  sd = load_stable_diffusion(str(sd_dir), conv_impl="xla")
  want = jax.tree.structure(sd.unet.params)
  assert jax.tree.structure(jax.tree.map(np.asarray, state["params"])) == want  # the U-Net only
  moved = [
    np.abs(np.asarray(a) - np.asarray(b)).max()
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(sd.unet.params))
  ]
  assert max(moved) > 0
  prompts = "('the digit seven', 'six')"
  run_python(
    ["-m", "experiments.main", *args, "--mode=sample", f"--config.sample.prompts={prompts}"]
  )
  (npz,) = [f for f in os.listdir(f"{wd}/samples") if f.endswith(".npz")]
  f = np.load(f"{wd}/samples/{npz}")
  assert f["images"].shape == (4, 16, 16, 3) and np.all(np.isfinite(f["images"]))
  assert list(f["prompts"]) == ["the digit seven", "six"] * 2
