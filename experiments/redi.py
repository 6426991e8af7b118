"""REDI (Xu et al., 2025): reinforcement distillation from positive and negative traces,
reference-free, on the controlled reviews task's preference pairs.

  python -m jaxopd.main --config experiments/redi.py --workdir runs/redi

reuses TDPO's cached stages (data, SFT base, pairs: experiments/tdpo.py) and trains the
policy from the SFT base on ``-log pi(y+) / |y+| + alpha log pi(y-) / |y-|`` over the pairs
(chosen = positive, rejected = negative). The method: jaxopd/methods/redi.py.
Presets (comma-separated): ``symmetric`` (alpha 1), ``sft`` (alpha 0: SFT on the
positives, token-normalised per sequence), ``smoke`` (tiny sizes, for tests).
Default alpha 0.8 (the paper's).

Not yet: REDI's teacher-traces data (a stronger model's samples labelled by a verifiable
rule) and its stage-1 SFT on the positives; here the pairs are the SFT model's own samples,
best vs worst by gold reward.
"""

from __future__ import annotations

from jaxopd import config as config_lib
from jaxopd.experiment import parse_arg
from jaxopd.methods import tdpo


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "symmetric", "sft"))
  smoke = bool(args.get("smoke"))
  c = config_lib.base_config()
  c.total_steps = 400
  c.batch_size = 16              # pairs per step
  c.seq_len = 64
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint.every = 200
  tdpo.pipeline(c, smoke)        # model, data, the SFT stage, pairs, sampled evaluation; policy, reference
  # the reference (the starting model) only serves the metric logps/chosen_change and the eval KL;
  # --config.models.reference.init=none drops it

  c.method.name = "redi"         # jaxopd/methods/redi.py
  c.method.alpha = 0.8           # weight of the negatives' normalised log-likelihood (1: symmetric, 0: SFT on y+)
  if args.get("symmetric"):
    c.method.alpha = 1.0
  if args.get("sft"):
    c.method.alpha = 0.0
  if smoke:
    c.total_steps = 8
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-3
    c.eval_every = 4
    c.eval_batches = 1
    c.log_every = 2
    c.checkpoint.every = 4
  return c
