"""SFT: next-token cross-entropy on the response tokens (loss mask).

Commands:

  python -m jaxopd.main --config experiments/sft.py --workdir runs/sft          # reviews corpus
  python -m jaxopd.main --config experiments/sft.py:smoke --workdir runs/sft_smoke
  python -m jaxopd.main --config experiments/sft.py:sort --workdir runs/sft_sort  # tiny in-code task

Default: a 4-layer Llama-style model (d_model 128) on the reviews corpus of the
controlled suite (jaxopd/data/reviews.py), built into ``config.data.data_dir``
on first use. Eval: held-out per-token loss (nats; the corpus' exact entropy
rate is its floor, printed by ``python -m jaxopd.data.build``) and, from
samples on held-out prompts, the gold reward, per-token entropy, distinct-n.
Measured numbers: experiments/README.md.

Presets: ``smoke`` (tiny model, few steps, small data), ``sort`` (the in-code
sort task of jaxopd/data/toy.py instead of the reviews corpus).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from jaxopd import config as config_lib
from jaxopd.data import batched_iterator, suite as suite_lib, toy
from jaxopd.errors import ConfigError
from jaxopd.evaluation import evaluate_policy
from jaxopd.experiment import Experiment, LossOutput, parse_arg
from jaxopd.losses import sft_loss
from jaxopd.models import table
from jaxopd.sampling import SamplingConfig


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "sort"))
  c = config_lib.base_config()
  c.total_steps = 2000
  c.batch_size = 32
  c.seq_len = 64
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.01
  c.eval_every = 500
  c.eval_batches = 16
  c.checkpoint.every = 500
  c.model.family = "llama"
  c.model.vocab_size = 385       # the reviews tokenizer (checked against it in build())
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.max_len = 128

  c.data = suite_lib.data_config()
  c.data.sort = ml_collections.ConfigDict()   # used when data.task == "sort"
  c.data.sort.num_train = 20000  # training records
  c.data.sort.num_eval = 512     # held-out records
  c.data.sort.min_symbols = 2    # shortest prompt
  c.data.sort.max_symbols = 8    # longest prompt; (seq_len - 3) // 2 at most

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 128       # held-out prompts sampled at each eval (reviews task); 0 = none
  c.eval.max_new_tokens = 48     # response budget of those samples
  c.eval.temperature = 1.0       # sampling temperature of those samples
  c.eval.prompt_len = 16         # padded prompt length (tokens)

  if args.get("sort"):
    c.data.task = "sort"
    c.total_steps = 1000
    c.seq_len = 32
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.eval_every = 200
    c.eval_batches = 4
    c.checkpoint.every = 200
    c.model.vocab_size = 32
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.max_len = 32
    c.eval.num_prompts = 0
  if args.get("smoke"):
    c.total_steps = 20
    c.batch_size = 8
    c.optim.warmup_steps = 5
    c.model.d_model = 32
    c.model.n_layers = 2
    c.eval_every = 10
    c.eval_batches = 2
    c.log_every = 5
    c.checkpoint.every = 10
    c.data.num_train, c.data.num_validation, c.data.num_test = 256, 64, 64
    c.data.num_prompts_train, c.data.num_prompts_test = 64, 32
    c.eval.num_prompts = 16
    c.eval.max_new_tokens = 16
    if c.data.task == "sort":
      c.seq_len = 16
      c.model.max_len = 16
      c.data.sort.num_train = 512
      c.data.sort.num_eval = 64
      c.data.sort.max_symbols = 6
  return c


def _sort_data(config, vocab_size):
  s = config.data.sort
  make = lambda num, seed: toy.sort_task(num, config.seq_len, vocab_size, seed, min_len=s.min_symbols,
                                         max_len=s.max_symbols)
  return make(s.num_train, config.seed), make(s.num_eval, config.seed + 10_000)


def build(config) -> Experiment:
  model_cfg = table.arch(config, "policy")
  evaluate = None
  if config.data.task == "sort":
    train_records, eval_records = _sort_data(config, model_cfg.vocab_size)
  elif config.data.task == "reviews":
    suite = suite_lib.ensure(config.data)
    if len(suite.tokenizer) != model_cfg.vocab_size:
      raise ConfigError(f"config.model.vocab_size={model_cfg.vocab_size}: the reviews tokenizer has "
                        f"{len(suite.tokenizer)} tokens")
    train_records, _ = suite_lib.sft_records(suite, "train", config.seq_len, config.data.over_length)
    eval_records, _ = suite_lib.sft_records(suite, "validation", config.seq_len, config.data.over_length)
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

      def evaluate(params, frozen, step):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)
        m = evaluate_policy(params["policy"], None, prompt, plen, rng, scfg, reward_fn)
        return {f"sample/{k}": v for k, v in m.items()}
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
  else:
    raise ConfigError(f"config.data.task={config.data.task!r}: must be reviews, files or sort")

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    logits = params["policy"](batch["tokens"], batch.get("positions"),
                              segment_ids=batch.get("segment_ids")).logits
    nll, n_tokens, correct = sft_loss(logits, batch["tokens"], batch["loss_mask"])
    return LossOutput(nll, n_tokens, {"accuracy": correct})

  return Experiment(
      roles={"policy": True},
      loss_fn=loss_fn,
      train_data=lambda shard: batched_iterator(train_records, shard),
      eval_data=(lambda shard: batched_iterator(eval_records, shard, shuffle=False, repeat=False))
      if eval_records else None,
      evaluate=evaluate,
  )
