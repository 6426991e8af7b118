"""Preference construction from a policy: sample K continuations per prompt,
score them with the gold reward, keep a (chosen, rejected) pair per prompt
(:func:`generate`, which also describes the pairing modes).

Stored as a TFDS dataset (``reviews_preferences``, array_record) in the TRL
text format (prompt / chosen / rejected, plus both rewards), so it is read
through the same encoder as real JSONL/Parquet preference data
(:func:`jaxopd.data.formats.encode`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import tensorflow_datasets as tfds

from jaxopd.data import reviews, tfds_builders
from jaxopd.data.tfds_builders import _code_path_override

MODES = ("best_worst", "bradley_terry")


@dataclasses.dataclass(eq=False)
class PreferencesConfig(tfds.core.BuilderConfig):
  policy_workdir: str = ""        # run whose latest checkpoint is the sampling policy
  policy_step: int = 0            # its step (part of the cache key)
  world_seed: int = 0             # reviews world of the prompts and tokenizer
  prompts_num_train: int = 10000  # the reviews_prompts config the prompts come from ...
  prompts_num_test: int = 1000    # ...
  prompt_min_words: int = 2       # ...
  prompt_max_words: int = 8       # ...
  num_train: int = 2000           # prompts used for the train split
  num_test: int = 200             # prompts used for the test split
  k: int = 4                      # samples per prompt
  mode: str = "best_worst"        # best_worst | bradley_terry
  bt_temperature: float = 0.1     # Bradley-Terry label noise (reward units)
  temperature: float = 1.0        # sampling temperature
  max_new_tokens: int = 48        # response budget
  prompt_len: int = 16            # padded prompt tokens
  seed: int = 0                   # sampling and label coins
  batch_size: int = 256           # sampler batch (rows = prompts x k)


def make_config(policy_key: str = "", **kw) -> PreferencesConfig:
  """The dataset's config, named by a digest of its fields; ``policy_key`` (e.g. the SFT stage's
  ``sft-HASH``, itself a digest of what made the policy) stands for ``policy_workdir`` in the
  digest, so that the same policy trained in another checkout names the same dataset."""
  if kw.get("mode", "best_worst") not in MODES:
    raise ValueError(f"preferences mode={kw.get('mode')!r}: must be one of {MODES}")
  if kw.get("k", 4) < 2:
    raise ValueError(f"preferences k={kw.get('k')}: need at least 2 samples per prompt")
  key = json.dumps({**kw, "policy_workdir": policy_key} if policy_key else kw, sort_keys=True)
  name = f"{kw.get('mode', 'best_worst')}_k{kw.get('k', 4)}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
  return PreferencesConfig(name=name, description=key, **kw)


class ReviewsPreferences(tfds.core.GeneratorBasedBuilder):
  """Preference pairs sampled from a policy checkpoint, labelled by the gold reward."""

  code_path = _code_path_override
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(), "chosen": tfds.features.Text(),
            "rejected": tfds.features.Text(),
            "chosen_reward": tfds.features.Scalar(np.float32),
            "rejected_reward": tfds.features.Scalar(np.float32)}))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split, n):
    for i, ex in enumerate(generate(self.builder_config, split, n, self._data_dir_root)):
      yield i, ex


def generate(c: PreferencesConfig, split: str, n: int, data_dir: str):
  """Yields ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}`` texts
  for the first ``n`` prompts of ``split``.

  Pairing: ``best_worst`` takes the highest- and lowest-reward samples of a prompt (prompts whose
  K rewards are all equal are skipped); ``bradley_terry`` takes two distinct samples and labels the
  first as chosen with probability ``sigmoid((r1 - r2) / bt_temperature)`` (noisy labels), drawing
  the coin from ``c.seed``.
  """
  from jaxopd.data.build import tokenizer_dir
  from jaxopd.data.tokenizer import load_tokenizer
  from jaxopd.evaluation import sampler
  from jaxopd.sampling import SamplingConfig

  from jaxopd.models import table
  policy, _ = table.load_model(f"run:{c.policy_workdir}:policy@{c.policy_step}", "policy")
  prompts_cfg = tfds_builders.prompts_config(c.world_seed, c.prompts_num_train, c.prompts_num_test,
                                             c.prompt_min_words, c.prompt_max_words)
  src = tfds_builders.load("reviews_prompts", split, prompts_cfg, data_dir)
  tok = load_tokenizer(tokenizer_dir(data_dir, c.world_seed))
  texts = [src[i]["prompt"].decode() if isinstance(src[i]["prompt"], bytes) else src[i]["prompt"]
           for i in range(min(n, len(src)))]
  rows = []
  for t in texts:
    ids = [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
    rows.append(ids[:c.prompt_len])
  scfg = SamplingConfig(max_new_tokens=c.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                        temperature=c.temperature)
  fn = sampler(policy, scfg)
  vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
  special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
  flat = [r for r in rows for _ in range(c.k)]
  rng = jax.random.PRNGKey(c.seed + (0 if split == "train" else 1))
  words_out = []
  for start in range(0, len(flat), c.batch_size):
    chunk = flat[start:start + c.batch_size]
    b = len(chunk)
    prompt = np.full((c.batch_size, c.prompt_len), tok.pad_token_id, np.int32)
    plen = np.ones((c.batch_size,), np.int32)
    for j, r in enumerate(chunk):
      prompt[j, :len(r)] = r
      plen[j] = len(r)
    out = jax.device_get(fn(prompt, plen, jax.random.fold_in(rng, start)))
    for j in range(b):
      resp = out.tokens[j][out.loss_mask[j] == 1]
      words_out.append([vocab[i] for i in resp.tolist() if i not in special])
  coin = np.random.default_rng([c.seed, 7 if split == "train" else 8])
  for p_i, text in enumerate(texts):
    prompt_words = text.split()
    cands = words_out[p_i * c.k:(p_i + 1) * c.k]
    rewards = np.array([reviews.gold_reward(prompt_words + w) for w in cands])
    if c.mode == "best_worst":
      hi, lo = int(np.argmax(rewards)), int(np.argmin(rewards))
      if rewards[hi] == rewards[lo]:
        continue
    else:
      hi, lo = coin.choice(c.k, size=2, replace=False)
      if coin.random() >= 1.0 / (1.0 + np.exp(-(rewards[hi] - rewards[lo]) / c.bt_temperature)):
        hi, lo = lo, hi
    yield {"prompt": text, "chosen": " " .join(cands[hi]), "rejected": " ".join(cands[lo]),
           "chosen_reward": float(rewards[hi]), "rejected_reward": float(rewards[lo])}


def prepare(config: PreferencesConfig, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the pairs into ``data_dir`` unless cached (the prompts dataset must exist there)."""
  builder = ReviewsPreferences(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
  builder.download_and_prepare()
  return builder


def load(config: PreferencesConfig, split: str, data_dir: str):
  return tfds.data_source("reviews_preferences", split=split, data_dir=os.fspath(data_dir),
                          builder_kwargs={"config": config, "file_format": "array_record"})


def records(config: PreferencesConfig, split: str, data_dir: str, tokenizer, seq_len: int,
            over_length: str = "drop", max_prompt_len: int | None = None):
  """Trainer records ``tokens[2, T], loss_mask[2, T]`` through the real-data encoder, and its stats."""
  from jaxopd.data import formats
  src = load(config, split, data_dir)
  dec = lambda v: v.decode() if isinstance(v, bytes) else v
  recs = ((f"reviews_preferences/{config.name}/{split}[{i}]",
           {k: dec(src[i][k]) for k in ("prompt", "chosen", "rejected")}) for i in range(len(src)))
  return formats.encode(recs, "preference", tokenizer, seq_len, over_length, max_prompt_len)


def statistics(config: PreferencesConfig, split: str, data_dir: str) -> dict:
  src = load(config, split, data_dir)
  c = np.array([src[i]["chosen_reward"] for i in range(len(src))])
  r = np.array([src[i]["rejected_reward"] for i in range(len(src))])
  return {"pairs": len(src), "chosen_reward": float(c.mean()), "rejected_reward": float(r.mean()),
          "label_accuracy": float(np.mean(c > r))}
