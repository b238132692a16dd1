"""The flax CLIP text tower equals transformers' `CLIPTextModel` (random weights, tiny
configs: OpenAI's quick-GELU last layer and OpenCLIP's GELU penultimate layer), and prompts
tokenise as the SD pipelines tokenise them (jdiff.models.clip, jdiff.pretrained.clip_convert).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_pretrained import _perturbed as perturbed

from jdiff.pretrained import clip_convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def write_tokenizer(directory, *, pad="<|endoftext|>") -> int:
  """A tiny CLIP BPE tokenizer (bytes, bytes + '</w>', a few merges) in `directory`; its size."""
  # GPT-2's byte -> printable-character table, which CLIP's BPE is written in.
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(256 - len(keep))]
  merges = [
    "t h",
    "th e</w>",
    "d i",
    "di g",
    "dig i",
    "digi t</w>",
    "s e",
    "se v",
    "sev e",
    "seve n</w>",
  ]
  vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  with open(directory / "vocab.json", "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(directory / "merges.txt", "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = transformers.CLIPTokenizer(
    vocab={t: i for i, t in enumerate(vocab)},
    merges=[tuple(m.split()) for m in merges],
    pad_token=pad,
  )
  tok.model_max_length = 77
  tok.save_pretrained(str(directory))
  return len(vocab)


def tiny_config(act: str, vocab: int = 600, layers: int = 3):
  return transformers.CLIPTextConfig(
    vocab_size=vocab,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=layers,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act=act,
    bos_token_id=vocab - 2,
    eos_token_id=vocab - 1,
    pad_token_id=vocab - 1,
  )


def perturbed_text_model(config):
  return perturbed(transformers.CLIPTextModel(config))


@pytest.mark.parametrize("act,skip", [("quick_gelu", 0), ("gelu", 1)], ids=["sd1", "sd2"])
def test_text_encoder_equals_transformers_and_round_trips(act, skip):
  model = perturbed_text_model(tiny_config(act))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  kwargs = clip_convert.clip_kwargs(model.config.to_dict(), skip_last_layers=skip)
  encoder = clip_convert.CLIPTextEncoder(**kwargs)
  params = clip_convert.to_params(sd, encoder)
  ids = np.random.RandomState(0).randint(0, 600, (2, 77)).astype(np.int32)
  with torch.no_grad():
    out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    # SD 1.x: the last hidden state; SD 2.x: the penultimate one through the final LayerNorm.
    ref = (
      out.last_hidden_state if skip == 0 else model.final_layer_norm(out.hidden_states[-1 - skip])
    )
  got = jax.jit(encoder.apply)({"params": params}, ids)
  np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=2e-5, rtol=1e-5)
  prefix = clip_convert.key_prefix(sd)
  back = clip_convert.to_state_dict(params, encoder, prefix=prefix)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  assert len(back) == len([k for k in sd if "position_ids" not in k]) - 16 * skip


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd1_pad", "sd2_pad"])
def test_token_ids_are_the_pipelines(tmp_path, pad):
  write_tokenizer(tmp_path, pad=pad)
  tok = clip_convert.load_tokenizer(str(tmp_path))
  pipe = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))  # as the SD pipeline loads it
  prompts = ["the digit seven", "", "The  DIGIT, seven!" * 20]
  ids = clip_convert.tokenize(tok, prompts)
  ref = pipe(prompts, padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(ids, np.asarray(ref))
  vocab = json.loads((tmp_path / "vocab.json").read_text())
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  first = [bos, vocab["the</w>"], vocab["digit</w>"], vocab["seven</w>"], eos]
  assert ids.shape == (3, 77) and list(ids[0, :5]) == first
  assert set(ids[0, 5:]) == {vocab[pad] if pad != "!" else vocab["!"]}
  assert ids[2, -1] == eos  # truncated to 77 with the end token kept
