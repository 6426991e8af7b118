"""SFT: next-token cross-entropy on the response tokens (loss mask).

Commands:

  python -m jaxopd.main --config experiments/sft.py --workdir runs/sft          # reviews corpus
  python -m jaxopd.main --config experiments/sft.py:smoke --workdir runs/sft_smoke
  python -m jaxopd.main --config experiments/sft.py:sort --workdir runs/sft_sort  # tiny in-code task

The method: jaxopd/methods/sft.py. Default: a 4-layer Llama-style model
(d_model 128) on the reviews corpus of the controlled suite
(jaxopd/data/reviews.py), built into ``config.data.data_dir`` on first use.
Your own model and data: ``--config.models.policy.init=hf:DIR
--config.data.task=files --config.data.files.train=FILE.jsonl``. Eval:
held-out per-token loss (nats; the corpus' exact entropy rate is its floor,
printed by ``python -m jaxopd.data.build``) and, from samples on held-out
prompts, the gold reward, per-token entropy, distinct-n.
Measured numbers: experiments/sft.md.

Presets: ``smoke`` (tiny model, few steps, small data), ``sort`` (the in-code
sort task of jaxopd/data/toy.py instead of the reviews corpus), ``digits`` (the
digits task's easy levels, jaxopd/data/digits.py: GRPO's SFT base).
"""

from __future__ import annotations

import ml_collections

from jaxopd import config as config_lib
from jaxopd.data import digits, suite as suite_lib
from jaxopd.experiment import parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "sort", "digits"))
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
  c.method.name = "sft"          # jaxopd/methods/sft.py
  c.method.chunk = 128           # positions per chunk of the loss (0: all at once, no recompute)
  c.method.pack = False          # pack several examples per training row (segment ids, per-example positions);
                                 # evaluation stays one example per row
  c.model = suite_lib.default_model(smoke=bool(args.get("smoke")))
  c.data = suite_lib.data_config(smoke=bool(args.get("smoke")))
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
    c.model.d_model = 32 if args.get("smoke") else 64
    c.model.n_layers = 2
    c.model.max_len = 32
    c.eval.num_prompts = 0
  if args.get("digits"):          # the digits task's easy levels (the SFT base of experiments/grpo.py)
    c.data = digits.data_config(smoke=bool(args.get("smoke")))
    c.total_steps = 1500
    c.seq_len = 32
    c.optim.lr = 2e-3
    c.eval_every = 500
    c.eval_batches = 4
    c.model = digits.default_model(smoke=bool(args.get("smoke")))
    c.eval.num_prompts = 0       # pass@k per level is GRPO's evaluation
  if args.get("smoke"):
    c.total_steps = 20
    c.batch_size = 8
    c.optim.warmup_steps = 5
    c.eval_every = 10
    c.eval_batches = 2
    c.log_every = 5
    c.checkpoint.every = 10
    c.eval.num_prompts = 0 if c.data.task == "digits" else 16
    c.eval.max_new_tokens = 16
    if c.data.task == "sort":
      c.seq_len = 16
      c.model.max_len = 16
      c.data.sort.num_train = 512
      c.data.sort.num_eval = 64
      c.data.sort.max_symbols = 6
  return c
