"""Digits: a verifiable task with difficulty levels, for GRPO / on-policy RL.

Ops (one per dataset, ``config.data.op``; :func:`draw`): ``sort`` (``"sort 3 1 4 1 ="`` -> ``"1 1 3 4"``)
and ``add`` (``"add 1 2 + 3 4 ="`` -> ``"4 6"``); the level ``L`` (digits per number) is uniform in
``[min_level, max_level]`` per example, and every digit is a word of its own. Longer inputs are
harder, so a small SFT base trained on the easy levels (``level <= sft_max_level``) passes the hard
ones rarely but not never: a reward signal GRPO can climb. The reward is exact match (:func:`check`).

Entry points: :func:`ensure` (the tokenizer, :func:`build_tokenizer`, and the TFDS dataset
``digits_tasks``, :class:`DigitsTasks`), then :func:`sft_records` and :func:`prompt_records`
(right-padded trainer records; rows longer than the given lengths are dropped, counted and printed).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxopd.data import tfds_builders
from jaxopd.data.tfds_builders import _check_sizes, _code_path_override, split_rng
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.errors import ConfigError

OPS = ("sort", "add")
EOT = "<|endoftext|>"                                      # EOS and pad, id 0
VOCABULARY = (EOT, *"0123456789", "sort", "add", "+", "=")  # ids in this order
LEVELS = (1, 64)                                           # allowed [min_level, max_level] bounds
DATASET = "digits_tasks"
TOKENIZER_DIR = "digits_tokenizer"

_VERSION = tfds.core.Version("1.0.0")
_RELEASE_NOTES = {"1.0.0": "Initial release: sort and add, levels drawn uniformly (jaxopd.data.digits)."}


def data_config(smoke: bool = False) -> ml_collections.ConfigDict:
  """``config.data`` for the digits task (``smoke``: small splits)."""
  d = ml_collections.ConfigDict()
  d.task = "digits"
  d.data_dir = "data"            # built dataset and tokenizer (cached across runs)
  d.op = "sort"                  # sort | add
  d.seed = 0                     # draws the examples
  d.num_train = 20000            # train examples (SFT and RL prompts)
  d.num_test = 1000              # held-out examples for evaluation
  d.min_level = 2                # level = number of digits (per number, for add), uniform in [min, max]
  d.max_level = 10
  d.sft_max_level = 5            # the SFT base trains on levels <= this (the easy ones)
  from jaxopd.data import suite
  files = suite.data_config()    # task=files (your prompt file, config.data.files.train): its fields
  d.files, d.over_length = files.files, files.over_length
  if smoke:
    d.num_train, d.num_test = 256, 64
  return d


def default_model(smoke: bool = False) -> ml_collections.ConfigDict:
  """The digits task's default architecture (``config.model``): a 4-layer Llama-style model,
  d_model 128, over the tokenizer's 15 tokens (padded to 16); ``smoke``: 2 layers, d_model 32."""
  from jaxopd.models import table
  m = table.arch_block()
  m.family = "llama"
  m.vocab_size = 16
  m.d_model = 32 if smoke else 128
  m.n_layers = 2 if smoke else 4
  m.n_heads = 4
  m.n_kv_heads = 2
  m.max_len = 64
  return m


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def build_tokenizer(out_dir: str | os.PathLike):
  """Writes the word-level digits tokenizer to ``out_dir``; returns it as loaded back from disk.

  Like Qwen2's: ``<|endoftext|>`` (id 0) is both EOS and pad, there is no BOS and encoding adds
  nothing; an ordinary HF tokenizer dir (:func:`jaxopd.data.tokenizer.load_tokenizer`).
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # No post-processor: like Qwen2's, encoding adds no BOS (and no EOS).
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT,
                                 clean_up_tokenization_spaces=False, padding_side="right")
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(os.fspath(out_dir))
  return load_tokenizer(out_dir)


def ensure_tokenizer(data_dir: str | os.PathLike) -> tuple[object, bool]:
  """``(tokenizer, built)``: the tokenizer in ``data_dir/digits_tokenizer``, built unless present;
  a directory holding another tokenizer is an error, not reused."""
  path = os.path.join(os.fspath(data_dir), TOKENIZER_DIR)
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    return build_tokenizer(path), True
  tok = load_tokenizer(path)
  expected = {w: i for i, w in enumerate(VOCABULARY)}
  if tok.get_vocab() != expected or tok.bos_token is not None or tok.eos_token != EOT or tok.pad_token != EOT:
    raise RuntimeError(f"{path}: not the digits tokenizer of this code (vocabulary or special tokens differ); "
                       f"delete the directory to rebuild it")
  return tok, False


# ----------------------------------------------------------------------------
# Examples and the TFDS builder
# ----------------------------------------------------------------------------


def draw(op: str, level: int, rng: np.random.Generator) -> tuple[str, str]:
  """One ``(prompt, answer)`` of ``op`` at ``level``: ``sort``: ``level`` digits, answered sorted
  ascending; ``add``: two ``level``-digit numbers (no leading zeros), answered by their sum
  (``level`` or ``level + 1`` digits)."""
  if op == "sort":
    digits = rng.integers(0, 10, size=level)
    return f"sort {_words(digits)} =", _words(np.sort(digits))
  if op == "add":
    a, b = (np.concatenate([rng.integers(1, 10, size=1), rng.integers(0, 10, size=level - 1)]) for _ in range(2))
    total = int("".join(map(str, a))) + int("".join(map(str, b)))
    return f"add {_words(a)} + {_words(b)} =", " ".join(str(total))
  raise ValueError(f"op={op!r}: must be one of {OPS}")


def _words(digits: np.ndarray) -> str:
  return " ".join(str(int(x)) for x in digits)


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  """Op, seed, split sizes and level range of ``digits_tasks``."""
  op: str = "sort"
  seed: int = 0
  num_train: int = 20000
  num_test: int = 1000
  min_level: int = 2
  max_level: int = 10


def _make_config(op: str, seed: int, num_train: int, num_test: int, min_level: int, max_level: int) -> DigitsConfig:
  return DigitsConfig(name=f"{op}_seed{seed}_n{num_train}-{num_test}_l{min_level}-{max_level}", op=op,
                      seed=int(seed), num_train=int(num_train), num_test=int(num_test), min_level=int(min_level),
                      max_level=int(max_level), description=f"{op}, levels {min_level}..{max_level}, seed {seed}")


def digits_config(op: str = "sort", seed: int = 0, num_train: int = 20000, num_test: int = 1000,
                  min_level: int = 2, max_level: int = 10) -> DigitsConfig:
  """The config for these parameters (the predefined instance when one matches). A bad value is a
  ``ValueError`` whose message starts with the parameter's name."""
  if op not in OPS:
    raise ValueError(f"op={op!r}: must be one of {OPS}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r}: must be a non-negative int")
  _check_sizes(num_train=num_train, num_test=num_test, min_level=min_level, max_level=max_level)
  for k, v in (("min_level", min_level), ("max_level", max_level)):
    if not LEVELS[0] <= v <= LEVELS[1]:
      raise ValueError(f"{k}={v}: must be in [{LEVELS[0]}, {LEVELS[1]}]")
  if min_level > max_level:
    raise ValueError(f"min_level={min_level}: greater than max_level={max_level}")
  config = _make_config(op, seed, num_train, num_test, min_level, max_level)
  for c in DigitsTasks.BUILDER_CONFIGS:
    if c.name == config.name:
      return c
  return config


class DigitsTasks(tfds.core.GeneratorBasedBuilder):
  """Sort / add examples with uniformly drawn levels; answers computed exactly.

  One BuilderConfig per (op, seed, sizes, levels), its name spelling them all out; array_record,
  numpy-only features (no TensorFlow). Example ``i`` of a split is draw ``i`` of
  ``split_rng(seed, "digits_tasks/" + op, split)`` (stored order = drawing order, so growing a
  split keeps its first examples).
  """

  code_path = _code_path_override
  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  BUILDER_CONFIGS = [_make_config(op, 0, 20000, 1000, 2, 10) for op in OPS]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "level": tfds.features.Scalar(np.int32),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split: str, n: int):
    c = self.builder_config
    rng = split_rng(c.seed, f"{self.name}/{c.op}", split)
    for i in range(n):
      level = int(rng.integers(c.min_level, c.max_level + 1))
      prompt, answer = draw(c.op, level, rng)
      yield i, {"prompt": prompt, "answer": answer, "level": level}


tfds_builders.register(DATASET, DigitsTasks, DigitsConfig)   # its prepare / is_prepared / load serve this one


class DigitsSuite(NamedTuple):
  tokenizer: object
  builder_config: DigitsConfig
  data_dir: str


def ensure(d: ml_collections.ConfigDict, verbose: bool = True) -> DigitsSuite:
  """Builds (or finds) the tokenizer and dataset of ``config.data`` ``d``; a bad field is a ``ConfigError``."""
  try:
    config = digits_config(d.op, d.seed, d.num_train, d.num_test, d.min_level, d.max_level)
  except ValueError as e:
    raise ConfigError(f"config.data.{e}") from None
  if not config.min_level <= d.sft_max_level <= config.max_level:
    raise ConfigError(f"config.data.sft_max_level={d.sft_max_level!r}: must be in [min_level, max_level] = "
                      f"[{config.min_level}, {config.max_level}]")
  data_dir = os.path.abspath(d.data_dir)
  os.makedirs(data_dir, exist_ok=True)
  tfds.disable_progress_bar()     # our own one-line message says what is built
  prepared = tfds_builders.is_prepared(DATASET, config, data_dir)
  if verbose and not prepared:
    print(f"building {DATASET}/{config.name} into {data_dir} (once; cached afterwards)", flush=True)
  tok, _ = ensure_tokenizer(data_dir)
  if not prepared:
    tfds_builders.prepare(DATASET, config, data_dir)
  return DigitsSuite(tok, config, data_dir)


def source(suite: DigitsSuite, split: str):
  """Random-access source of a split (``len``, ``[i]`` -> ``prompt``/``answer`` bytes, ``level``)."""
  return tfds_builders.load(DATASET, split, suite.builder_config, suite.data_dir)


def _examples(suite: DigitsSuite, split: str) -> tuple[list[list[int]], list[list[int]], list[int]]:
  """Prompt ids, answer ids and levels of a split, in stored order."""
  src = source(suite, split)
  rows = [src[i] for i in range(len(src))]
  tok = suite.tokenizer
  prompts = tok([r["prompt"].decode() for r in rows], add_special_tokens=False)["input_ids"]
  answers = tok([r["answer"].decode() for r in rows], add_special_tokens=False)["input_ids"]
  return prompts, answers, [int(r["level"]) for r in rows]


# ----------------------------------------------------------------------------
# Trainer records
# ----------------------------------------------------------------------------


class SftStats(NamedTuple):
  """What ``sft_records`` did with a split (nothing happens silently)."""
  examples: int       # examples in the split
  over_level: int     # level > max_level, left out as asked
  dropped: int        # longer than seq_len tokens (prompt, answer, EOS), dropped
  records: int        # records returned


def sft_records(suite: DigitsSuite, split: str, seq_len: int, max_level: int | None = None,
                verbose: bool = True) -> tuple[list[dict], SftStats]:
  """``{"tokens", "loss_mask"}`` int32 ``[seq_len]`` records of the examples with ``level <= max_level``
  (all when None): prompt, answer, EOS, right-padded; the mask is 1 on the answer and the EOS."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"sft_records: seq_len must be a positive int, got {seq_len!r}")
  tok = suite.tokenizer
  prompts, answers, lvls = _examples(suite, split)
  records, over_level, dropped = [], 0, 0
  for p, a, level in zip(prompts, answers, lvls):
    if max_level is not None and level > max_level:
      over_level += 1
      continue
    seq = [*p, *a, tok.eos_token_id]
    if len(seq) > seq_len:
      dropped += 1
      continue
    tokens = np.full(seq_len, tok.pad_token_id, np.int32)
    tokens[:len(seq)] = seq
    mask = np.zeros(seq_len, np.int32)
    mask[len(p):len(seq)] = 1
    records.append({"tokens": tokens, "loss_mask": mask})
  stats = SftStats(len(lvls), over_level, dropped, len(records))
  if verbose and dropped:
    print(f"{DATASET}/{suite.builder_config.name}/{split}: {dropped} of {len(lvls) - over_level} examples "
          f"longer than seq_len={seq_len} tokens dropped")
  return records, stats


def prompt_records(suite: DigitsSuite, split: str, prompt_len: int, answer_len: int,
                   verbose: bool = True) -> list[dict]:
  """Right-padded prompts and answers for the sampler and :func:`check`: ``{"prompt": [prompt_len],
  "prompt_len": (), "answer": [answer_len], "answer_len": (), "level": ()}``, all int32 (the answer's
  ids without EOS)."""
  pad = suite.tokenizer.pad_token_id
  prompts, answers, lvls = _examples(suite, split)
  out, long_prompt, long_answer = [], 0, 0
  for p, a, level in zip(prompts, answers, lvls):
    if len(p) > prompt_len:
      long_prompt += 1
      continue
    if len(a) > answer_len:
      long_answer += 1
      continue
    prompt = np.full(prompt_len, pad, np.int32)
    prompt[:len(p)] = p
    answer = np.full(answer_len, pad, np.int32)
    answer[:len(a)] = a
    out.append({"prompt": prompt, "prompt_len": np.int32(len(p)), "answer": answer,
                "answer_len": np.int32(len(a)), "level": np.int32(level)})
  if verbose and (long_prompt or long_answer):
    print(f"{DATASET}/{suite.builder_config.name}/{split}: of {len(lvls)} examples, {long_prompt} with a prompt "
          f"longer than {prompt_len} tokens and {long_answer} more with an answer longer than {answer_len} dropped")
  return out


def levels(records: Sequence[dict]) -> np.ndarray:
  """The records' levels, int32 ``[N]`` (for pass rates per level: ``scores[levels(r) == L].mean()``)."""
  return np.asarray([r["level"] for r in records], np.int32)


# ----------------------------------------------------------------------------
# Verifier
# ----------------------------------------------------------------------------


def check(tokens: jax.Array, loss_mask: jax.Array, answer: jax.Array, answer_len: jax.Array,
          eos_id: int | jax.Array) -> jax.Array:
  """1.0 where a sampled row's response is exactly ``answer[:answer_len]`` then EOS, else 0.0; float32 ``[B]``.

  tokens, loss_mask: ``[B, T]``, prompt then response then padding; ``loss_mask`` is 1 exactly on the
    response (its EOS included when one was emitted). The response is found through the mask only
    (pad == eos), so a response cut at the length budget (no EOS), a missing or extra token, a wrong
    digit or a short answer all score 0.
  answer, answer_len: ``[B, A]`` right-padded answer ids (no EOS) and ``[B]`` lengths.
  Pure jax.numpy: jit it, or call it inside a jitted step.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.asarray(loss_mask) != 0
  answer = jnp.asarray(answer, jnp.int32)
  answer_len = jnp.asarray(answer_len, jnp.int32)
  t, a = tokens.shape[1], answer.shape[1]
  start = jnp.argmax(mask, axis=1)                            # first response slot (rows without one fail below)
  j = jnp.arange(a + 1)[None, :]
  at = jnp.minimum(start[:, None] + j, t - 1)                 # clipped: a row that reaches past T has too few
  got = jnp.take_along_axis(tokens, at, axis=1)               # response slots and fails the count below
  want = jnp.where(j < answer_len[:, None], jnp.pad(answer, ((0, 0), (0, 1))), jnp.asarray(eos_id, jnp.int32))
  ok = (j > answer_len[:, None]) | (jnp.take_along_axis(mask, at, axis=1) & (got == want))
  # The answer_len + 1 slots from the first are response slots holding the answer and EOS; with
  # exactly answer_len + 1 response slots in all, nothing else is in the response.
  return (jnp.all(ok, axis=1) & (jnp.sum(mask, axis=1) == answer_len + 1)).astype(jnp.float32)
