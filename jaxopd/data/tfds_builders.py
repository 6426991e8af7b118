"""TFDS builders for the reviews world, stored as array_record (no TensorFlow).

Why TFDS: a versioned, cached, self-describing dataset on disk that the same
reading code (``tfds.data_source`` -> random-access source -> grain) uses for
real TFDS datasets. ``file_format="array_record"`` plus numpy-only features
(Text, Scalar, Tensor) build and read without TensorFlow installed.

Datasets: ``reviews_corpus`` (:class:`ReviewsCorpus`) and ``reviews_prompts`` (:class:`ReviewsPrompts`),
built and read by :func:`prepare` / :func:`load`; one BuilderConfig per world seed and split sizes (the
config name spells them out, so different sizes never share a cache directory). Example ``i`` of a split
is draw ``i`` of ``World(seed)`` with :func:`split_rng`; shuffling is disabled so the stored order is the
drawing order (grain shuffles at read time).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Iterable, Mapping, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from jaxopd.data import reviews
from jaxopd.data.formats import OVER_LENGTH_POLICIES

# Bump when reviews.py's grammar or these features change: the version is part
# of the cache path, so stale data is never read as new.
_VERSION = tfds.core.Version("1.0.0")
_RELEASE_NOTES = {"1.0.0": "Initial release: reviews world grammar v1 (jaxopd.data.reviews)."}


def split_rng(seed: int, dataset: str, split: str) -> np.random.Generator:
  """The generator that draws ``dataset``'s ``split`` for world ``seed``.

  Independent streams per (dataset, split), so growing one split leaves the
  others unchanged.
  """
  return np.random.default_rng([int(seed), zlib.crc32(dataset.encode()), zlib.crc32(split.encode())])


def _check_sizes(**sizes):
  for k, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{k} must be a positive int, got {v!r}")


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
  """World seed and split sizes of ``reviews_corpus``."""
  seed: int = 0
  num_train: int = 20000
  num_validation: int = 2000
  num_test: int = 2000


@dataclasses.dataclass(eq=False)
class PromptsConfig(tfds.core.BuilderConfig):
  """World seed, split sizes and prefix lengths of ``reviews_prompts``."""
  seed: int = 0
  num_train: int = 10000
  num_test: int = 1000
  min_words: int = 2
  max_words: int = 8


def corpus_config(seed: int = 0, num_train: int = 20000, num_validation: int = 2000,
                  num_test: int = 2000) -> CorpusConfig:
  """The config for these parameters (the predefined instance when one matches)."""
  _check_sizes(num_train=num_train, num_validation=num_validation, num_test=num_test)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  name = f"seed{seed}_n{num_train}-{num_validation}-{num_test}"
  for c in ReviewsCorpus.BUILDER_CONFIGS:
    if c.name == name:
      return c
  return CorpusConfig(name=name, seed=int(seed), num_train=int(num_train),
                      num_validation=int(num_validation), num_test=int(num_test),
                      description=f"World(seed={seed}); {num_train}/{num_validation}/{num_test} reviews")


def prompts_config(seed: int = 0, num_train: int = 10000, num_test: int = 1000, min_words: int = 2,
                   max_words: int = 8) -> PromptsConfig:
  """The config for these parameters (the predefined instance when one matches)."""
  _check_sizes(num_train=num_train, num_test=num_test, min_words=min_words, max_words=max_words)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if min_words > max_words:
    raise ValueError(f"min_words={min_words} > max_words={max_words}")
  name = f"seed{seed}_n{num_train}-{num_test}_w{min_words}-{max_words}"
  for c in ReviewsPrompts.BUILDER_CONFIGS:
    if c.name == name:
      return c
  return PromptsConfig(name=name, seed=int(seed), num_train=int(num_train), num_test=int(num_test),
                       min_words=int(min_words), max_words=int(max_words),
                       description=f"World(seed={seed}) prefixes of {min_words}..{max_words} words")


def _no_code_path(cls):
  """Replaces ``DatasetBuilder.code_path``, used only to find download checksums.

  tfds 4.9.10 computes it for builders living in a package by touching
  ``importlib_resources``, a backport it requires only on Python < 3.9, so
  without it preparing fails with "No module named 'importlib_resources'".
  These builders download nothing, so "no code path" (no checksums) is exact.
  """
  del cls
  return None


_code_path_override = tfds.core.utils.classproperty(classmethod(_no_code_path))


class ReviewsCorpus(tfds.core.GeneratorBasedBuilder):
  """Reviews sampled from ``reviews.World(seed)``, with gold reward and exact log-prob.

  The LM corpus for SFT, splits train/validation/test. Each example: ``text`` (words joined by
  spaces), ``num_words``, ``gold_reward``, ``reward_positions`` (word indices, see
  ``reviews.reward_positions``), ``polarity`` (the latent review sentiment z) and ``log_prob`` (exact
  log p(text) under the world, end of review included, in nats; float32 on disk, as TFDS stores floats).
  """

  code_path = _code_path_override
  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  BUILDER_CONFIGS = [CorpusConfig(name="seed0_n20000-2000-2000", seed=0,
                                  description="World(seed=0); 20000/2000/2000 reviews")]

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly (not dataset_info_from_configs): the latter reads
    # metadata files from this module's directory, which we do not ship.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "num_words": tfds.features.Scalar(np.int32),
            "gold_reward": tfds.features.Scalar(np.float32),
            "reward_positions": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "polarity": tfds.features.Scalar(np.int32),
            "log_prob": tfds.features.Scalar(np.float32),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split: str, n: int):
    world = reviews.World(self.builder_config.seed)
    samples = world.sample_detailed(split_rng(self.builder_config.seed, self.name, split), n)
    for i, s in enumerate(samples):
      # log p(x) = logaddexp(log p(x, z), log p(x, -z)): the sampler already
      # knows the first term, so only the other polarity is parsed.
      other = world.log_prob(s.words, -s.polarity)
      yield i, {
          "text": reviews.join(s.words),
          "num_words": len(s.words),
          "gold_reward": reviews.gold_reward(s.words),
          "reward_positions": np.asarray(reviews.reward_positions(s.words), np.int32),
          "polarity": s.polarity,
          "log_prob": float(np.logaddexp(s.joint_log_prob, other)),
      }


class ReviewsPrompts(tfds.core.GeneratorBasedBuilder):
  """Review prefixes from ``World(seed).prompts`` for on-policy and preference tasks (splits
  train/test; ``prompt``, ``num_words``)."""

  code_path = _code_path_override
  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  BUILDER_CONFIGS = [PromptsConfig(name="seed0_n10000-1000_w2-8", seed=0,
                                   description="World(seed=0) prefixes of 2..8 words")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "num_words": tfds.features.Scalar(np.int32),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split: str, n: int):
    c = self.builder_config
    world = reviews.World(c.seed)
    for i, words in enumerate(world.prompts(split_rng(c.seed, self.name, split), n,
                                            c.min_words, c.max_words)):
      yield i, {"prompt": reviews.join(words), "num_words": len(words)}


_BUILDERS = {"reviews_corpus": (ReviewsCorpus, CorpusConfig), "reviews_prompts": (ReviewsPrompts, PromptsConfig)}


def register(dataset: str, cls, config_cls) -> None:
  """Makes :func:`prepare` / :func:`is_prepared` / :func:`load` serve another builder of this kind
  (array_record, numpy features, built in code: e.g. ``jaxopd.data.digits``)."""
  _BUILDERS[dataset] = (cls, config_cls)


def prepare(dataset: str, config, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """Builds ``dataset`` with ``config`` into ``data_dir`` unless already cached."""
  if dataset not in _BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(_BUILDERS)}")
  cls, config_cls = _BUILDERS[dataset]
  if not isinstance(config, config_cls):
    raise TypeError(f"{dataset} needs a {config_cls.__name__} (see {config_cls.__name__.lower()[:-6]}"
                    f"_config()), got {type(config).__name__}")
  builder = cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
  builder.download_and_prepare()
  return builder


def is_prepared(dataset: str, config, data_dir: str | os.PathLike) -> bool:
  """Whether ``prepare`` would find the dataset already built."""
  cls, _ = _BUILDERS[dataset]
  builder = cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
  return builder.is_prepared()


def load(dataset: str, split: str, config, data_dir: str | os.PathLike):
  """Random-access source (``len``, ``[i]`` -> dict of numpy values) via ``tfds.data_source``.

  Text features come back as ``bytes``. Builds the dataset first if needed.
  """
  if dataset not in _BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(_BUILDERS)}")
  return tfds.data_source(dataset, split=split, data_dir=os.fspath(data_dir),
                          builder_kwargs={"config": config, "file_format": "array_record"})


# ----------------------------------------------------------------------------
# Trainer records
# ----------------------------------------------------------------------------


class RecordStats(NamedTuple):
  """What ``records_for_sft`` did with the examples (nothing happens silently)."""
  examples: int          # examples read
  records: int           # records returned
  truncated: int         # longer than seq_len and cut (over_length="truncate")
  dropped: int           # longer than seq_len and skipped (over_length="drop")
  unknown_tokens: int    # tokens that the tokenizer mapped to its unk id




def _text(example: Mapping, key: str, i: int) -> str:
  if key not in example:
    raise KeyError(f"records_for_sft: example {i} has no {key!r} field (fields: {sorted(example)})")
  text = example[key]
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  if not isinstance(text, str):
    raise TypeError(f"records_for_sft: example {i} field {key!r} is {type(text).__name__}, not text")
  return text


def records_for_sft(examples: Iterable[Mapping], tokenizer, seq_len: int, *,
                    over_length: str = "drop", text_key: str = "text") -> tuple[list[dict], RecordStats]:
  """Turns text examples into the trainer's SFT records.

  Each record: ``tokens[seq_len]`` int32 = ``[bos] text [eos]`` right-padded
  with the pad id; ``loss_mask[seq_len]`` int32 = 1 on every non-pad token
  after BOS (the text and EOS are all "response" for plain LM training).
  Over-length examples (more than ``seq_len`` tokens with BOS and EOS) are
  cut to their first ``seq_len`` tokens (``"truncate"``: no EOS then) or
  skipped (``"drop"``); the returned stats count both.
  """
  if over_length not in OVER_LENGTH_POLICIES:
    raise ValueError(f"records_for_sft: over_length={over_length!r}; choose one of {OVER_LENGTH_POLICIES}")
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f"records_for_sft: seq_len must be an int >= 2 (BOS plus one token), got {seq_len!r}")
  bos, eos, pad, unk = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        tokenizer.unk_token_id)
  if bos is None or eos is None or pad is None:
    raise ValueError("records_for_sft: the tokenizer needs bos, eos and pad tokens (see load_tokenizer)")
  records, n, truncated, dropped, unknown = [], 0, 0, 0, 0
  for i, example in enumerate(examples):
    n += 1
    ids = tokenizer(_text(example, text_key, i), add_special_tokens=False)["input_ids"]
    if unk is not None:
      unknown += sum(t == unk for t in ids)
    seq = [bos, *ids, eos]
    if len(seq) > seq_len:
      if over_length == "drop":
        dropped += 1
        continue
      truncated += 1
      seq = seq[:seq_len]
    tokens = np.full(seq_len, pad, np.int32)
    tokens[:len(seq)] = seq
    mask = np.zeros(seq_len, np.int32)
    mask[1:len(seq)] = 1
    records.append({"tokens": tokens, "loss_mask": mask})
  return records, RecordStats(n, len(records), truncated, dropped, unknown)
