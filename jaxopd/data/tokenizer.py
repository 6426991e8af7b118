"""A real Hugging Face tokenizer for the reviews world (one token per word; :func:`build_tokenizer`).

Why word level: the gold reward and its reward-bearing positions are defined
on words, so a tokenizer that maps each word to exactly one token makes token
position = word index + 1 (the +1 is the BOS the tokenizer prepends), and
SparsePO-style token masks can be scored against the truth without alignment
guesswork. It is still an ordinary HF tokenizer dir (``tokenizer.json`` +
``tokenizer_config.json``) loaded with ``AutoTokenizer``, so a real model's
tokenizer goes through the same code path (:func:`load_tokenizer`), and
:func:`word_token_positions` handles tokenizers that split words.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)      # ids 0, 1, 2, 3


def build_tokenizer(vocab, out_dir: str | os.PathLike):
  """Writes a word-level tokenizer to ``out_dir`` and returns it (loaded back).

  vocab: a ``reviews.World`` (its ``vocabulary``) or a sequence of words;
    words must be unique, non-empty and free of whitespace.
  The returned object is what ``load_tokenizer(out_dir)`` gives, so callers
  never hold a tokenizer that differs from the one on disk.
  Ids: ``<pad>`` 0 (the trainer right-pads with 0), ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then
  the words in sorted order.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  words = list(getattr(vocab, "vocabulary", vocab))
  seen = set()
  for i, w in enumerate(words):
    if not isinstance(w, str) or not w or w.split() != [w]:
      raise ValueError(f"build_tokenizer: vocabulary entry {i} ({w!r}) must be a non-empty word "
                       f"without whitespace")
    if w in SPECIAL_TOKENS:
      raise ValueError(f"build_tokenizer: vocabulary entry {i} ({w!r}) is a reserved special token")
    if w in seen:
      raise ValueError(f"build_tokenizer: vocabulary entry {i} ({w!r}) is a duplicate")
    seen.add(w)
  ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for w in sorted(words):
    ids[w] = len(ids)

  tok = Tokenizer(models.WordLevel(ids, unk_token=UNK))
  # Split on whitespace only: "," and "." are words of their own in the
  # reviews text, and nothing else may split a word into two tokens.
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # Like Llama's tokenizers: encoding prepends BOS (add_special_tokens=True).
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ids[BOS])])
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
      clean_up_tokenization_spaces=False, padding_side="right")
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(str(out_dir))
  return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
  """Any HF tokenizer dir (ours or a real model's) via ``AutoTokenizer``.

  Needs an EOS token (it ends every trained response). BOS is optional: Qwen2
  tokenizers have none, and records then start with the prompt's first token.
  A tokenizer without a pad token (GPT-2, Llama) gets EOS as pad, with a
  warning: the trainer masks padding through ``loss_mask``, so pad == eos is
  safe and the EOS that ends a response is still trained. A path that is not
  a tokenizer is a one-line ``ConfigError``.
  """
  from transformers import AutoTokenizer

  from jaxopd.errors import ConfigError
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ConfigError(f"tokenizer {path}: not a directory (expected an HF tokenizer dir with tokenizer.json "
                      f"or vocab files)")
  try:
    tok = AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(f"tokenizer {path}: transformers cannot load it: {str(e).splitlines()[0]}") from None
  if tok.eos_token_id is None:
    raise ConfigError(f"tokenizer {path}: has no eos token (set eos_token in tokenizer_config.json); every "
                      f"trained response ends with it")
  if tok.pad_token_id is None:
    logging.warning("load_tokenizer: %s has no pad token; using eos (%r) as pad", path, tok.eos_token)
    tok.pad_token = tok.eos_token
  return tok


def hf_tokenizer(hf_dir: str):
  """The tokenizer saved in model directory ``hf_dir`` (:func:`load_tokenizer`), or None when it
  holds no tokenizer files."""
  from jaxopd.models.hf import has_tokenizer
  return load_tokenizer(hf_dir) if has_tokenizer(hf_dir) else None


def check_tokenizer(config, tok, data_name: str) -> None:
  """Every language-model role started from an ``hf:`` directory that holds a tokenizer must hold
  the data's (``tok``; None: a task whose ids are its own): a model fed another vocabulary's ids
  trains without an error, on nonsense. (A reward role is checked by jaxopd.rewards.check_model.)"""
  from jaxopd.errors import ConfigError
  from jaxopd.models import table
  for name in config.models:
    init = config.models[name].init
    if name == "reward" or not isinstance(init, str) or not init.startswith("hf:"):
      continue
    path = table.source_dir(config, name)
    theirs = hf_tokenizer(path) if path else None
    if theirs is not None and (tok is None or theirs.get_vocab() != tok.get_vocab()):
      raise ConfigError(f"config.models.{name}.init={init!r}: {data_name} tokenizes with "
                        f"{'ids of its own' if tok is None else 'another vocabulary'} than {path}'s tokenizer: "
                        f"the model would read another vocabulary's ids (your data: config.data.task=files, whose "
                        f"tokenizer defaults to the model's)")


def encode_words(tokenizer, words: Sequence[str]) -> tuple[list[int], list[int]]:
  """Token ids of ``words`` (no special tokens) and, per token, its word index.

  Shapes: both lists have one entry per token; with the reviews tokenizer that
  is one per word and ``word_ids == list(range(len(words)))``.
  """
  if isinstance(words, (str, bytes)):
    raise TypeError("encode_words: expected a list of words, got a string; split it first")
  words = list(words)
  if not words:
    return [], []
  enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
  word_ids = enc.word_ids()
  if any(w is None for w in word_ids):
    raise ValueError("encode_words: tokenizer produced tokens that belong to no word")
  return list(enc["input_ids"]), list(word_ids)


def word_token_positions(tokenizer, words: Sequence[str], word_positions: Sequence[int],
                         offset: int = 1) -> list[int]:
  """Token positions of the given word indices, shifted by ``offset`` (1 = after BOS).

  A word split into several tokens contributes all of them; with the reviews
  tokenizer this is ``[p + offset for p in word_positions]``.
  """
  _, word_ids = encode_words(tokenizer, words)
  wanted = set()
  for p in word_positions:
    if not 0 <= p < len(words):
      raise IndexError(f"word_token_positions: word index {p} outside 0..{len(words) - 1}")
    wanted.add(int(p))
  return [t + offset for t, w in enumerate(word_ids) if w in wanted]
