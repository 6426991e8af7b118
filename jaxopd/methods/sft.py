"""SFT: next-token cross-entropy on the response tokens (loss mask); the other pipelines'
SFT stages train this experiment (:mod:`jaxopd.stages`).

Data (``config.data.task``): the reviews corpus of the controlled suite
(jaxopd/data/reviews.py, built into ``config.data.data_dir`` on first use),
your own files (``files``: TRL ``text`` / prompt-completion / messages
records), the digits task's easy levels (``digits``: jaxopd/data/digits.py, the SFT
base of GRPO), or the in-code sort task (``sort``, jaxopd/data/toy.py). Eval:
held-out per-token loss and, on the reviews task, the gold reward, per-token
entropy and distinct-n of samples on held-out prompts (``config.eval``).
Config: experiments/sft.py.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.data import batched_iterator, digits, suite as suite_lib, toy
from jaxopd.data.tokenizer import check_tokenizer
from jaxopd.data.pipeline import pack
from jaxopd.errors import ConfigError, positive
from jaxopd.evaluation import evaluate_policy
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses.common import sft_mask
from jaxopd.models import table
from jaxopd.models.heads import chunked_terms, label_logprob
from jaxopd.sampling import SamplingConfig


def _sort_data(config, vocab_size):
  s = config.data.sort
  make = lambda num, seed: toy.sort_task(num, config.seq_len, vocab_size, seed, min_len=s.min_symbols,
                                         max_len=s.max_symbols)
  return make(s.num_train, config.seed), make(s.num_eval, config.seed + 10_000)


def build(config) -> Experiment:
  model_cfg = table.arch(config, "policy")
  evaluate = None
  if config.data.task == "sort":
    check_tokenizer(config, None, "the sort task")
    train_records, eval_records = _sort_data(config, model_cfg.vocab_size)
    pad_id = toy.PAD
  elif config.data.task == "reviews":
    suite = suite_lib.ensure(config.data)
    check_tokenizer(config, suite.tokenizer, "the reviews task")
    if len(suite.tokenizer) != model_cfg.vocab_size:
      raise ConfigError(f"config.model.vocab_size={model_cfg.vocab_size}: the reviews tokenizer has "
                        f"{len(suite.tokenizer)} tokens")
    train_records, _ = suite_lib.sft_records(suite, "train", config.seq_len, config.data.over_length)
    eval_records, _ = suite_lib.sft_records(suite, "validation", config.seq_len, config.data.over_length)
    pad_id = suite.tokenizer.pad_token_id
    e = config.eval
    if e.num_prompts:
      prompts = suite_lib.prompt_records(suite, "test", e.prompt_len)[:e.num_prompts]
      prompt = np.stack([p["prompt"] for p in prompts])
      plen = np.stack([p["prompt_len"] for p in prompts])
      if e.prompt_len + e.max_new_tokens > model_cfg.max_len:
        raise ConfigError(f"config.eval.max_new_tokens={e.max_new_tokens}: prompt_len + max_new_tokens exceeds "
                          f"config.model.max_len={model_cfg.max_len}")
      scfg = SamplingConfig(max_new_tokens=e.max_new_tokens, eos_id=suite.tokenizer.eos_token_id,
                            pad_id=suite.tokenizer.pad_token_id, temperature=e.temperature)
      reward_fn = suite_lib.gold_reward_fn(suite)

      def sampled(models, step):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)
        m = evaluate_policy(models["policy"], None, prompt, plen, rng, scfg, reward_fn)
        return {f"sample/{k}": v for k, v in m.items()}
      evaluate = sampled
  elif config.data.task == "digits":
    suite = digits.ensure(config.data)
    check_tokenizer(config, suite.tokenizer, "the digits task")
    if len(suite.tokenizer) > model_cfg.vocab_size:
      raise ConfigError(f"config.model.vocab_size={model_cfg.vocab_size}: the digits tokenizer has "
                        f"{len(suite.tokenizer)} tokens")
    if config.eval.num_prompts:
      raise ConfigError("config.eval.num_prompts: sampled evaluation needs the reviews task's gold reward; "
                        "set it to 0 with task=digits (experiments/sft.py:digits; pass@k is GRPO's evaluation)")
    lv = config.data.sft_max_level
    train_records, _ = digits.sft_records(suite, "train", config.seq_len, max_level=lv)
    eval_records, _ = digits.sft_records(suite, "test", config.seq_len, max_level=lv)
    pad_id = suite.tokenizer.pad_token_id
  elif config.data.task == "files":
    tok, train_records, eval_records = suite_lib.file_records(config.data, "lm", config.seq_len,
                                                              default_tokenizer=table.tokenizer_dir(config))
    if len(tok) > model_cfg.vocab_size:
      raise ConfigError(f"config.models.policy: its vocab_size={model_cfg.vocab_size} is smaller than the "
                        f"tokenizer's {len(tok)} tokens")
    if config.eval.num_prompts:
      raise ConfigError("config.eval.num_prompts: sampled evaluation needs the reviews task's gold reward; "
                        "set it to 0 with task=files")
    eval_records = eval_records or []
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0   # as jaxopd.data.formats pads
  else:
    raise ConfigError(f"config.data.task={config.data.task!r}: must be reviews, files, digits or sort")
  if config.method.pack:
    train_records, stats = pack(train_records, config.seq_len, pad_id)
    print(f"packing: {stats['examples']} examples into {stats['rows']} rows of {config.seq_len} tokens "
          f"({100 * stats['fill']:.1f}% filled)")
    if len(train_records) < config.batch_size:
      raise ConfigError(f"config.method.pack=True: {len(train_records)} packed rows are fewer than one batch "
                        f"(config.batch_size={config.batch_size})")

  positive(config.method, "config.method", "chunk")
  return experiment(train_records, eval_records, evaluate, config.method.chunk)


def make_loss_fn(chunk: int = 128):
  """Next-token cross-entropy of the policy on ``batch["tokens"]`` under its loss mask (segments
  respected), and its accuracy, from hidden states in chunks of ``chunk`` positions (the LM head
  inside the loop: no ``[B, T, V]`` logits; :mod:`jaxopd.models.heads`)."""
  def terms(z, targets):
    zp = z["policy"]
    return {"lp": label_logprob(zp, targets), "correct": (jnp.argmax(zp, -1) == targets).astype(jnp.float32)}

  def loss_fn(models, batch, rng):
    del rng
    seg = batch.get("segment_ids")
    t = chunked_terms({"policy": models["policy"]}, batch["tokens"], terms, chunk,
                      positions=batch.get("positions"), segment_ids=seg)
    m = sft_mask(batch["loss_mask"], seg)
    return LossOutput(-jnp.sum(m * t["lp"]), jnp.sum(m), {"accuracy": jnp.sum(m * t["correct"])})
  return loss_fn


def experiment(train_records, eval_records=None, evaluate=None, chunk: int = 128) -> Experiment:
  """SFT on ``{"tokens", "loss_mask"}`` records (also REDI's stage 1 on teacher traces)."""
  return Experiment(
      roles={"policy": True},
      loss_fn=make_loss_fn(chunk),
      train_data=lambda shard: batched_iterator(train_records, shard),
      eval_data=(lambda shard: batched_iterator(eval_records, shard, shuffle=False, repeat=False))
      if eval_records else None,
      evaluate=evaluate,
  )
