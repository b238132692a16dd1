"""Text to image on the embedded digits: the generated captions and their tokenizer, caption
drops for guidance, and the text-conditioned U-Net (`TextUNet`)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.data import captions
from jdiff.models.clip import CLIPTextEncoder
from jdiff.models.text_unet import TextUNet
from jdiff.models.unet import UNet
from jdiff.training.step import drop_labels


def test_tokenize_is_clip_layout_and_round_trips():
  ids = captions.tokenize("The digit 7, written by hand!")
  words = [captions.VOCAB[i] for i in ids]
  assert words == ["<bos>", "the", "digit", "7", "written", "by", "hand", "<eos>", "<pad>", "<pad>"]
  assert ids.dtype == np.int32 and ids.shape == (captions.MAX_LENGTH,)
  assert list(captions.null_ids()) == [captions.BOS, captions.EOS] + [captions.PAD] * 8


def test_bad_prompts_name_the_word_or_the_length():
  with pytest.raises(ValueError, match=re.escape("word(s) ['purple'] are not in the caption")):
    captions.tokenize("a purple seven")
  with pytest.raises(ValueError, match="has 9 words; at most 8 fit in 10 tokens"):
    captions.tokenize("one two three four five six seven eight nine")


def test_every_caption_names_its_digit_once():
  table = captions.caption_table()
  assert table.shape == (len(captions.TEMPLATES), 10, captions.MAX_LENGTH)
  names = {captions.tokenize(w)[1] for w in captions.NUMBER_WORDS}
  names |= {captions.tokenize(str(d))[1] for d in range(10)}
  for t in range(len(captions.TEMPLATES)):
    for k in range(10):
      named = [i for i in table[t, k] if i in names]
      assert len(named) == 1 and captions.VOCAB[named[0]] in (str(k), captions.NUMBER_WORDS[k])
  # The article agrees with the number word: "an eight", "a seven".
  assert captions.caption(8, 5) == "an eight written by hand"
  assert captions.caption(7, 5) == "a seven written by hand"


def test_caption_ids_draw_every_phrasing_of_the_label():
  table = captions.caption_table()
  labels = jnp.asarray(np.arange(4000) % 10, jnp.int32)
  ids = np.asarray(captions.caption_ids(table, labels, jax.random.key(0)))
  t = len(captions.TEMPLATES)
  matches = (ids[:, None, :] == table[:, np.asarray(labels)].transpose(1, 0, 2)).all(-1)
  assert matches.any(1).all()  # each row is a caption of its own label
  counts = np.bincount(matches.argmax(1), minlength=t)
  # Uniform over T phrasings: each count is Binomial(4000, 1/T), std ~ 19 for T = 10.
  assert np.all(np.abs(counts - 4000 / t) < 5 * np.sqrt(4000 / t))


def test_drop_labels_on_rows_and_on_class_labels():
  rng = jax.random.key(3)
  ids = jnp.asarray(captions.caption_table()[2, np.arange(8) % 10])
  null = captions.null_ids()
  assert np.array_equal(drop_labels(rng, ids, rate=0.0, null_label=null), ids)
  out = np.asarray(drop_labels(rng, ids, rate=0.5, null_label=null))
  dropped = (out == null).all(1)
  assert np.array_equal(out[~dropped], np.asarray(ids)[~dropped])  # whole rows or nothing
  assert 0 < dropped.sum() < 8
  # Class labels: one Bernoulli draw per example, as before rows were allowed.
  labels = jnp.arange(64, dtype=jnp.int32) % 10
  want = jnp.where(jax.random.bernoulli(rng, 0.3, (64,)), 10, labels)
  assert np.array_equal(drop_labels(rng, labels, rate=0.3, null_label=10), want)


def _model():
  unet = UNet(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4,
    context_dim=16, attention_head_dim=8, zero_init=False, conv_impl="xla",
  )  # fmt: skip
  encoder = CLIPTextEncoder(
    vocab_size=len(captions.VOCAB), width=16, num_layers=2, heads=2, mlp_dim=32, max_length=16,
    act="gelu",
  )  # fmt: skip
  return TextUNet(unet, encoder)


def test_text_unet_follows_the_prompt_and_ignores_padding():
  model = _model()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.asarray([10, 500])
  ids = jnp.asarray(captions.tokenize_all(["the digit 3", "seven"]))
  params = model.init(jax.random.key(1), x, t, ids, train=False)["params"]
  assert set(params) == {"unet", "encoder"}
  out = model.apply({"params": params}, x, t, ids, train=False)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  # Another prompt, another output.
  other = jnp.asarray(captions.tokenize_all(["the digit 8", "seven"]))
  out2 = model.apply({"params": params}, x, t, other, train=False)
  assert np.abs(np.asarray(out2 - out)[0]).max() > 1e-4
  np.testing.assert_array_equal(out2[1], out[1])  # the second prompt did not change
  # Longer padding (16 tokens instead of 10) is masked out: the same output.
  long = jnp.asarray(captions.tokenize_all(["the digit 3", "seven"], max_length=16))
  out3 = model.apply({"params": params}, x, t, long, train=False)
  np.testing.assert_allclose(out3, out, atol=1e-5, rtol=1e-5)


def test_text_unet_rejects_labels_and_float_context():
  model = _model()
  x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r"cond must be token ids \[B, L\] with B = 2, got \(2,\)"):
    model.init(jax.random.key(0), x, t, jnp.zeros((2,), jnp.int32), train=False)
  with pytest.raises(ValueError, match="token ids must be integers, got dtype float32"):
    model.init(jax.random.key(0), x, t, jnp.zeros((2, 10), jnp.float32), train=False)


def test_caption_folder_layouts_and_errors(tmp_path):
  from PIL import Image

  from jdiff.data import caption_folder

  d = tmp_path / "pairs"
  d.mkdir()
  Image.fromarray(np.full((12, 20, 3), 200, np.uint8)).save(d / "b.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "a.jpg")  # grey: becomes RGB
  with pytest.raises(ValueError, match=r"image '.*a.jpg' has no caption file '.*a.txt'"):
    caption_folder.list_pairs(str(d))
  (d / "a.txt").write_text("a black square\n")
  (d / "b.txt").write_text("a grey bar")
  images, texts = caption_folder.read_caption_folder(str(d), image_size=4)
  assert images.shape == (2, 4, 4, 3) and images.dtype == np.uint8
  assert (
    texts == ["a black square", "a grey bar"] and images[0].max() == 0 and images[1].min() == 200
  )
  # diffusers' ImageFolder layout wins when present.
  (d / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "bar"}\n')
  assert caption_folder.list_pairs(str(d)) == [(str(d / "b.png"), "bar")]
  (d / "metadata.jsonl").write_text('{"file_name": "c.png", "text": "none"}\n')
  with pytest.raises(FileNotFoundError, match=r"line 1: no image '.*c.png'"):
    caption_folder.list_pairs(str(d))
  (d / "metadata.jsonl").write_text('{"name": "b.png"}\n')
  with pytest.raises(
    ValueError, match="line 1: expected a JSON object with 'file_name' and 'text'"
  ):
    caption_folder.list_pairs(str(d))
  with pytest.raises(FileNotFoundError, match="caption folder '/nope' does not exist"):
    caption_folder.list_pairs("/nope")


def test_a_briefly_trained_text_unet_follows_its_prompts_in_any_phrasing():
  """Two classes of 4x4 images (mean +0.8 or -0.8, noise 0.1) captioned by the digit
  captions of 0 and 1: trained through `make_train_step` with captions drawn per example and
  10 % dropped to the empty prompt, the guided samples of "0", "zero", "the digit 0", ...
  land on their class's mean (classified by the sign of their mean pixel)."""
  from jdiff.samplers.registry import make_sample_fn
  from jdiff.schedules import get_schedule
  from jdiff.training.optim import make_optimizer
  from jdiff.training.state import init_train_state
  from jdiff.training.step import make_train_step

  unet = UNet(
    ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), num_groups=4,
    context_dim=32, attention_head_dim=16, conv_impl="xla",
  )  # fmt: skip
  encoder = CLIPTextEncoder(
    vocab_size=len(captions.VOCAB), width=32, num_layers=1, heads=2, mlp_dim=64, max_length=10,
    act="gelu",
  )  # fmt: skip
  model = TextUNet(unet, encoder)
  schedule = get_schedule("cosine", 100)
  opt = make_optimizer(lr=3e-3, warmup_steps=10, schedule="constant")
  state = init_train_state(
    model,
    opt,
    jax.random.key(0),
    jnp.zeros((1, 4, 4, 1)),
    sample_cond=jnp.zeros((1, 10), jnp.int32),
  )
  table = captions.caption_table(2)
  null = captions.null_ids()
  step = jax.jit(
    make_train_step(
      model, opt, ema_decay=0.9, label_dropout=0.1, null_label=null,
      label_fn=lambda labels, rng: captions.caption_ids(table, labels, rng),
    )
  )  # fmt: skip
  rng = np.random.RandomState(0)
  for _ in range(300):
    labels = rng.randint(0, 2, 64).astype(np.int32)
    x = (0.8 - 1.6 * labels)[:, None, None, None] + 0.1 * rng.randn(64, 4, 4, 1)
    batch = {"image": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels)}
    state, metrics = step(state, batch, schedule, jax.random.key(1))
  assert float(metrics["loss"]) < 0.5
  prompts = [captions.caption(k, t) for t in range(len(captions.TEMPLATES)) for k in (0, 1)]
  want = np.tile([0, 1], len(captions.TEMPLATES))
  sample = make_sample_fn(
    model, schedule, sampler="ddim", num_steps=20, guidance_scale=3.0, null_label=null
  )
  x_T = jax.random.normal(jax.random.key(2), (len(prompts), 4, 4, 1))
  x0 = jax.jit(sample)(state.ema_params, x_T, jax.random.key(3), captions.tokenize_all(prompts))
  got = (np.asarray(x0).mean((1, 2, 3)) < 0).astype(int)
  assert np.mean(got == want) >= 0.95, list(zip(prompts, got))
