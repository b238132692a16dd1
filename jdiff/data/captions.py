"""Generated captions for a labelled dataset, and their word-level tokenizer.

The embedded text-to-image default needs image-caption pairs without a download: each digit
gets captions drawn from `TEMPLATES`, which name it as a numeral or a word in several
phrasings ("7", "seven", "a handwritten seven", "the digit 7", "an image of the number
seven", ...). A text encoder trained on them must learn that "7" and "seven" mean the same
digit and that the rest of the phrase carries nothing. The captions are drawn in the train
step, per example and step, from a table of token ids: `caption_ids(labels, rng)`.

The tokenizer is CLIP's layout on a word vocabulary: [BOS, words..., EOS, PAD...] of a fixed
length. The empty prompt [BOS, EOS, PAD...] is the null condition of classifier-free
guidance (as Stable Diffusion's empty prompt), so the attention mask (id != PAD) is never
empty.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PAD, BOS, EOS = 0, 1, 2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
  "{word}",
  "{digit}",
  "a handwritten {word}",
  "the digit {digit}",
  "the digit {word}",
  "{article} {word} written by hand",
  "number {word}",
  "an image of the number {digit}",
  "a small blurry {word}",
  "a picture of a handwritten {digit}",
)
PROMPT_TEMPLATE = 2  # "a handwritten seven": the prompt of a label when none is given
MAX_LENGTH = 10  # BOS + up to 8 words + EOS (the longest caption has 6 words)

_FILLER = sorted(
  {w for t in TEMPLATES for w in re.findall(r"[a-z]+", t.format(word="", digit="", article=""))}
  | {"a", "an"}
)
VOCAB = ("<pad>", "<bos>", "<eos>", *[str(d) for d in range(10)], *NUMBER_WORDS, *_FILLER)
_IDS = {w: i for i, w in enumerate(VOCAB)}


def caption(label: int, template: int) -> str:
  """The caption of digit `label` in phrasing `template` (an index into TEMPLATES)."""
  word = NUMBER_WORDS[label]
  article = "an" if word[0] in "aeiou" else "a"
  return TEMPLATES[template].format(word=word, digit=str(label), article=article)


def words_of(text: str) -> list[str]:
  """Lower-cased words and numerals of `text` ("The digit 7!" -> ['the', 'digit', '7'])."""
  return re.findall(r"[a-z]+|[0-9]", text.lower())


def tokenize(text: str, *, max_length: int = MAX_LENGTH) -> np.ndarray:
  """int32 [max_length]: [BOS, ids of the words, EOS, PAD, ...].

  Raises:
    ValueError: a word outside VOCAB (named, with the vocabulary), or a prompt longer than
      max_length - 2 words.
  """
  words = words_of(text)
  unknown = [w for w in words if w not in _IDS]
  if unknown:
    raise ValueError(
      f"prompt {text!r}: word(s) {unknown} are not in the caption vocabulary {sorted(VOCAB[3:])}"
    )
  if len(words) > max_length - 2:
    raise ValueError(
      f"prompt {text!r} has {len(words)} words; at most {max_length - 2} fit in {max_length} tokens"
    )
  ids = [BOS, *(_IDS[w] for w in words), EOS]
  return np.asarray(ids + [PAD] * (max_length - len(ids)), np.int32)


def tokenize_all(texts, *, max_length: int = MAX_LENGTH) -> np.ndarray:
  """int32 [N, max_length]: `tokenize` of each text."""
  return np.stack([tokenize(t, max_length=max_length) for t in texts])


def null_ids(max_length: int = MAX_LENGTH) -> np.ndarray:
  """int32 [max_length]: the empty prompt, the unconditional input of guidance."""
  return tokenize("", max_length=max_length)


def longest_caption(num_classes: int = 10) -> int:
  """Tokens of the longest caption, BOS and EOS included (the least `max_length`)."""
  return 2 + max(
    len(words_of(caption(k, t))) for k in range(num_classes) for t in range(len(TEMPLATES))
  )


def caption_table(num_classes: int = 10, *, max_length: int = MAX_LENGTH) -> np.ndarray:
  """int32 [len(TEMPLATES), num_classes, max_length]: every caption of every label."""
  if not 1 <= num_classes <= len(NUMBER_WORDS):
    raise ValueError(f"digit captions cover 1 to 10 classes, got num_classes={num_classes}")
  return np.stack(
    [
      tokenize_all([caption(k, t) for k in range(num_classes)], max_length=max_length)
      for t in range(len(TEMPLATES))
    ]
  )


def caption_ids(table: Array, labels: Array, rng: Array) -> Array:
  """int32 [B, L]: for each label [B], one of its captions, the phrasing drawn uniformly.

  Args:
    table: `caption_table(...)` [T, K, L].
    labels: int [B] in [0, K).
    rng: the draw's key.
  """
  table = jnp.asarray(table)
  template = jax.random.randint(rng, labels.shape, 0, table.shape[0])
  return table[template, labels]
