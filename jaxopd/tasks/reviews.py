"""The reviews task (the controlled suite of :mod:`jaxopd.data.reviews`): its SFT corpus, the
preference pipeline's sampled pairs, and the sampled evaluation with the gold reward shared by
every method that trains on it."""

from __future__ import annotations

import jax
import numpy as np

from jaxopd import stages, tasks
from jaxopd.data import preferences, reviews, suite as suite_lib
from jaxopd.data.tokenizer import check_tokenizer
from jaxopd.errors import ConfigError
from jaxopd.evaluation import evaluate_policy
from jaxopd.sampling import SamplingConfig
from jaxopd.tasks import Prompts, SftData


def sft_data(config, arch) -> SftData:
  """The reviews corpus (train; validation for the held-out loss), and the sampled evaluation when
  ``config.eval.num_prompts``."""
  suite = suite_lib.ensure(config.data)
  check_tokenizer(config, suite.tokenizer, "the reviews task")
  if len(suite.tokenizer) != arch.vocab_size:
    raise ConfigError(f"config.model.vocab_size={arch.vocab_size}: the reviews tokenizer has "
                      f"{len(suite.tokenizer)} tokens")
  train, _ = suite_lib.sft_records(suite, "train", config.seq_len, config.data.over_length)
  evals, _ = suite_lib.sft_records(suite, "validation", config.seq_len, config.data.over_length)
  e = config.eval
  if e.num_prompts and e.prompt_len + e.max_new_tokens > arch.max_len:
    raise ConfigError(f"config.eval.max_new_tokens={e.max_new_tokens}: prompt_len + max_new_tokens exceeds "
                      f"config.model.max_len={arch.max_len}")
  return SftData(train, evals, suite.tokenizer.pad_token_id, evaluate(config, suite) if e.num_prompts else None)


def pair_data(config):
  """``(train_records, test_records, evaluate)``: the pairs sampled from the SFT stage and labelled
  by the gold reward (the ``pairs`` stage of :mod:`jaxopd.stages`), with the sampled evaluation."""
  suite = suite_lib.ensure(config.data, verbose=False)
  check_tokenizer(config, suite.tokenizer, "the reviews task")
  pc = stages.prefs_config(config)
  train, st = preferences.records(pc, "train", config.data.data_dir, suite.tokenizer, config.seq_len,
                                  config.data.over_length, config.prefs.prompt_len)
  test, _ = preferences.records(pc, "test", config.data.data_dir, suite.tokenizer, config.seq_len,
                                config.data.over_length, config.prefs.prompt_len)
  print(f"preference pairs: {st}")
  return train, test, evaluate(config, suite)


def prompts(config) -> Prompts:
  """The suite's train and held-out prompts, with the gold reward and (``config.eval.num_prompts``)
  the sampled evaluation."""
  suite = suite_lib.ensure(config.data, verbose=False)
  check_tokenizer(config, suite.tokenizer, "the reviews task")
  train = suite_lib.prompt_records(suite, "train", config.rollout.prompt_len)
  test = suite_lib.prompt_records(suite, "test", config.rollout.prompt_len, verbose=False)
  return Prompts(suite.tokenizer, train, test, evaluate(config, suite) if config.eval.get("num_prompts") else None,
                 suite_lib.gold_reward_fn(suite))


def evaluate(config, suite):
  """``evaluate(models, step)``: samples of the policy on held-out prompts (``config.eval``), their
  gold reward, KL to the reference (when there is one), entropy and distinct-n (``sample/...``)."""
  e = config.eval
  prompts = suite_lib.prompt_records(suite, "test", e.prompt_len, verbose=False)[:e.num_prompts]
  prompt = np.stack([p["prompt"] for p in prompts])
  plen = np.stack([p["prompt_len"] for p in prompts])
  scfg = SamplingConfig(max_new_tokens=e.max_new_tokens, eos_id=suite.tokenizer.eos_token_id,
                        pad_id=suite.tokenizer.pad_token_id, temperature=e.temperature)
  reward_fn = suite_lib.gold_reward_fn(suite)
  rng = jax.random.PRNGKey(config.seed + 1)   # the same samples' randomness at every eval

  def run(models, step):
    res = evaluate_policy(models["policy"], models.get("reference"), prompt, plen, rng, scfg, reward_fn)
    return {f"sample/{k}": v for k, v in res.items()}
  return run


def report(config, out: dict, sources: dict, base: dict | None = None) -> dict:
  """Adds to ``out`` (which holds ``"after"``) the sampled evaluation, with the gold reward, of each
  ``sources`` entry (name -> a role block or an init string; ``none`` / ``random`` skipped; ``base``:
  the other roles, e.g. the reference of the KL) and prints the table; nothing without
  ``config.eval.num_prompts``."""
  if not config.eval.get("num_prompts"):
    return out
  run = evaluate(config, suite_lib.ensure(config.data, verbose=False))
  keys = ["sample/reward", "sample/kl_ref", "sample/entropy", "sample/distinct2"]
  return tasks.evaluate_sources(config, run, sources, out, keys, base)


def gold_tokens(config):
  """``fn(tokens[..., T]) -> [..., T]``: 1.0 where the token is a word that carries the gold reward
  of its full text (:func:`jaxopd.data.reviews.reward_positions`)."""
  tok = suite_lib.ensure(config.data, verbose=False).tokenizer
  special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
  vocab = tok.convert_ids_to_tokens(list(range(len(tok))))

  def fn(tokens: np.ndarray) -> np.ndarray:
    flat = tokens.reshape(-1, tokens.shape[-1])
    out = np.zeros(flat.shape, np.float32)
    for r, row in enumerate(flat.tolist()):
      idx = [i for i, t in enumerate(row) if t not in special]
      for p in reviews.reward_positions([vocab[row[i]] for i in idx]):
        out[r, idx[p]] = 1.0
    return out.reshape(tokens.shape)
  return fn
