"""The controlled reviews suite as experiments use it: one config block, built
on first use into ``data_dir`` (cached afterwards), read as trainer records.

Experiments call :func:`data_config` in ``get_config`` and :func:`ensure` /
:func:`sft_records` / :func:`prompt_records` in ``build``. The same data dir
and world seed always give the same tokenizer and datasets.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxopd.data import reviews, tfds_builders
from jaxopd.data.build import ensure_tokenizer
from jaxopd.errors import ConfigError


def default_model(smoke: bool = False) -> ml_collections.ConfigDict:
  """The controlled task's default architecture (``config.model``): a 4-layer Llama-style model,
  d_model 128, over the reviews tokenizer's 385 tokens; ``smoke``: 2 layers, d_model 32."""
  from jaxopd.models import table
  m = table.arch_block()
  m.family = "llama"
  m.vocab_size = 385             # the reviews tokenizer (checked against it when a method builds)
  m.d_model = 32 if smoke else 128
  m.n_layers = 2 if smoke else 4
  m.n_heads = 4
  m.n_kv_heads = 2
  m.max_len = 128
  return m


def data_config(smoke: bool = False) -> ml_collections.ConfigDict:
  """``config.data``: the reviews suite by default (``smoke``: small splits), or your files."""
  d = ml_collections.ConfigDict()
  d.task = "reviews"             # reviews (the controlled suite) | files (your data, below) | sort (SFT only)
  d.data_dir = "data"            # built datasets and tokenizer (cached across runs)
  d.world_seed = 0               # the reviews world (grammar, lexicon)
  d.num_train = 20000            # corpus reviews for SFT
  d.num_validation = 2000        # held-out corpus reviews
  d.num_test = 2000              # test corpus reviews
  d.num_prompts_train = 10000    # prompts for preference construction / on-policy training
  d.num_prompts_test = 1000      # held-out prompts for evaluation
  d.prompt_min_words = 2         # shortest prompt
  d.prompt_max_words = 8         # longest prompt
  d.over_length = "drop"         # examples longer than seq_len: drop | truncate (counts are printed)
  d.files = ml_collections.ConfigDict()
  d.files.train = ""             # task=files: .jsonl / .parquet path, or tfds:NAME[/CONFIG][:VERSION]
  d.files.eval = ""              # held-out file, same forms ("" = none)
  d.files.tokenizer = ""         # HF tokenizer directory (AutoTokenizer.from_pretrained)
  d.files.tfds_data_dir = ""     # data_dir of tfds:NAME datasets (default: data_dir)
  d.files.max_prompt_len = 0     # prompt tokens kept (a longer prompt keeps its end, or is dropped with
                                 # over_length=drop); 0 = up to seq_len - 1
  d.files.ignore_keys = ()       # record keys that are not the format's and are skipped ("id", "score_chosen", ...);
                                 # any other unknown key is an error naming file, line and key
  d.files.allow_no_prompt = False  # preference pairs of strings, or lm completions, without a prompt
  if smoke:
    d.num_train, d.num_validation, d.num_test = 256, 64, 64
    d.num_prompts_train, d.num_prompts_test = 64, 32
  return d


def file_records(d: ml_collections.ConfigDict, fmt: str, seq_len: int, max_prompt_len: int | None = None,
                 default_tokenizer: str = ""):
  """``(tokenizer, train_records, eval_records)`` from ``config.data.files`` in TRL format ``fmt``
  (see jaxopd.data.formats); prints what was dropped or truncated. ``default_tokenizer``
  (the policy's Hugging Face directory) serves when ``files.tokenizer`` is empty."""
  from jaxopd.data import formats
  from jaxopd.data.tokenizer import load_tokenizer
  f = d.files
  if not f.train:
    raise ConfigError("config.data.files.train is empty (config.data.task='files')")
  if max_prompt_len is None and f.get("max_prompt_len", 0):
    max_prompt_len = int(f.max_prompt_len)
  tok_dir = f.tokenizer or default_tokenizer
  if not tok_dir:
    raise ConfigError("config.data.files.tokenizer is empty (config.data.task='files'): an HF tokenizer directory "
                      "(default: the policy's hf: directory when it holds a tokenizer)")
  if not os.path.isdir(tok_dir):
    raise ConfigError(f"config.data.files.tokenizer={tok_dir!r}: not a directory")
  tok = load_tokenizer(tok_dir)
  if f.tokenizer and default_tokenizer and os.path.realpath(f.tokenizer) != os.path.realpath(default_tokenizer):
    model_tok = load_tokenizer(default_tokenizer)
    if model_tok.get_vocab() != tok.get_vocab():
      raise ConfigError(f"config.data.files.tokenizer={f.tokenizer!r}: its vocabulary differs from the tokenizer of "
                        f"the model's hf: directory {default_tokenizer}: the model would read another vocabulary's "
                        f"ids (leave it empty to use the model's)")
  print(f"tokenizer: {tok_dir} (bos {tok.bos_token!r}, eos {tok.eos_token!r}, pad {tok.pad_token!r}, "
        f"{len(tok)} tokens)")
  schema = dict(ignore_keys=tuple(f.ignore_keys), allow_no_prompt=bool(f.allow_no_prompt))
  out = []
  for field in ("train", "eval"):
    path = f[field]
    if not path:
      out.append(None)
      continue
    if path.startswith("tfds:"):
      name, split = path[5:], ("train" if field == "train" else "test")
      if "@" in name:
        name, split = name.split("@", 1)
      recs, stats = formats.load_tfds(name, split, f.tfds_data_dir or d.data_dir, fmt, tok, seq_len,
                                      d.over_length, max_prompt_len, **schema)
    else:
      recs, stats = formats.load(path, fmt, tok, seq_len, d.over_length, max_prompt_len, **schema)
    print(f"config.data.files.{field} {path}: {stats}")
    if not recs:
      raise ConfigError(f"config.data.files.{field}={path!r}: no usable records ({stats})")
    out.append(recs)
  return tok, out[0], out[1]


class Suite(NamedTuple):
  tokenizer: object
  world: reviews.World
  corpus: tfds_builders.CorpusConfig
  prompts: tfds_builders.PromptsConfig
  data_dir: str


def ensure(d: ml_collections.ConfigDict, verbose: bool = True) -> Suite:
  """Builds (or finds) the tokenizer, corpus and prompt datasets of ``d``."""
  try:
    corpus = tfds_builders.corpus_config(d.world_seed, d.num_train, d.num_validation, d.num_test)
    prompts = tfds_builders.prompts_config(d.world_seed, d.num_prompts_train, d.num_prompts_test,
                                           d.prompt_min_words, d.prompt_max_words)
  except ValueError as e:
    raise ConfigError(f"config.data: {e}") from None
  data_dir = os.path.abspath(d.data_dir)
  os.makedirs(data_dir, exist_ok=True)
  tfds.disable_progress_bar()     # our own one-line messages say what is built
  world = reviews.World(d.world_seed)
  tok, _ = ensure_tokenizer(data_dir, world)
  for name, cfg in (("reviews_corpus", corpus), ("reviews_prompts", prompts)):
    if not tfds_builders.is_prepared(name, cfg, data_dir):
      if verbose:
        print(f"building {name}/{cfg.name} into {data_dir} (once; cached afterwards)", flush=True)
      tfds_builders.prepare(name, cfg, data_dir)
  return Suite(tok, world, corpus, prompts, data_dir)


def corpus_source(suite: Suite, split: str):
  return tfds_builders.load("reviews_corpus", split, suite.corpus, suite.data_dir)


def sft_records(suite: Suite, split: str, seq_len: int, over_length: str, verbose: bool = True):
  """``[bos] review [eos]`` records of a corpus split; prints what was dropped or truncated."""
  source = corpus_source(suite, split)
  records, stats = tfds_builders.records_for_sft((source[i] for i in range(len(source))), suite.tokenizer,
                                                 seq_len, over_length=over_length)
  if verbose and (stats.dropped or stats.truncated or stats.unknown_tokens):
    print(f"reviews_corpus/{split}: {stats.examples} reviews, {stats.dropped} dropped and {stats.truncated} "
          f"truncated as longer than seq_len={seq_len} tokens, {stats.unknown_tokens} unknown tokens")
  return records, stats


def prompt_records(suite: Suite, split: str, prompt_len: int, verbose: bool = True) -> list[dict]:
  """Right-padded prompts ``[bos] words`` for the sampler: ``{"prompt": [P], "prompt_len": ()}``."""
  source = tfds_builders.load("reviews_prompts", split, suite.prompts, suite.data_dir)
  tok = suite.tokenizer
  out, dropped = [], 0
  for i in range(len(source)):
    text = source[i]["prompt"]
    text = text.decode() if isinstance(text, bytes) else text
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) > prompt_len:
      dropped += 1
      continue
    row = np.full(prompt_len, tok.pad_token_id, np.int32)
    row[:len(ids)] = ids
    out.append({"prompt": row, "prompt_len": np.int32(len(ids))})
  if verbose and dropped:
    print(f"reviews_prompts/{split}: {dropped} of {len(source)} prompts longer than {prompt_len} tokens dropped")
  return out


def decode_words(suite: Suite, ids) -> list[str]:
  """Token ids -> words, dropping special tokens (for the gold reward)."""
  tok = suite.tokenizer
  special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
  return [w for i, w in zip(ids, tok.convert_ids_to_tokens([int(i) for i in ids])) if int(i) not in special]


def gold_reward_fn(suite: Suite):
  """``(tokens [B, T], loss_mask [B, T]) -> gold rewards [B]`` of the full text (prompt + response)."""
  tok = suite.tokenizer
  special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
  vocab = tok.convert_ids_to_tokens(list(range(len(tok))))

  def fn(tokens, loss_mask):
    out = []
    for row in np.asarray(tokens):
      words = [vocab[i] for i in row.tolist() if i not in special]
      out.append(reviews.gold_reward(words))
    return np.asarray(out)
  return fn
