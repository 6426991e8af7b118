"""SFT: next-token cross-entropy on the response tokens (loss mask); the other pipelines'
SFT stages train this experiment (:mod:`jaxopd.stages`).

Data: the SFT records of task ``config.data.task`` (:mod:`jaxopd.tasks`: reviews, files, digits,
sort), with the task's evaluation beside the held-out per-token loss. Config: experiments/sft.py.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxopd import options, tasks
from jaxopd.data import batched_iterator
from jaxopd.data.pipeline import pack
from jaxopd.errors import ConfigError
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses.common import sft_mask
from jaxopd.models import table
from jaxopd.models.heads import chunked_terms, label_logprob
from jaxopd.options import at_least, option


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  chunk: int = option(at_least(0))  # positions per chunk of the vocabulary-wide terms (0: all at once)
  pack: bool = option()             # pack several examples into a row (segments kept apart)


def build(config) -> Experiment:
  m = Options.of(config.method)
  data = tasks.get(config, "sft")(config, table.arch(config, "policy"))
  train_records = data.train
  if m.pack:
    train_records, stats = pack(train_records, config.seq_len, data.pad_id)
    print(f"packing: {stats['examples']} examples into {stats['rows']} rows of {config.seq_len} tokens "
          f"({100 * stats['fill']:.1f}% filled)")
    if len(train_records) < config.batch_size:
      raise ConfigError(f"config.method.pack=True: {len(train_records)} packed rows are fewer than one batch "
                        f"(config.batch_size={config.batch_size})")
  return experiment(train_records, data.eval, data.evaluate, m.chunk)


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
