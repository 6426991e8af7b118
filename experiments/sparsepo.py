"""SparsePO (Christopoulou et al., Findings EMNLP 2025) on the controlled reviews task.

  python -m jaxopd.main --config experiments/sparsepo.py --workdir runs/sparsepo             # learned, shared
  python -m jaxopd.main --config experiments/sparsepo.py:independent --workdir runs/sparsepo_indep
  python -m jaxopd.main --config experiments/sparsepo.py:mapo --workdir runs/mapo

The method: jaxopd/methods/sparsepo.py. The same pipeline as
experiments/tdpo.py (its stages, evaluation and report are reused, so the
data, the SFT base in ``config.sft.workdir`` and the preference pairs are
shared and cached), with the SparsePO loss: token weights ``w_u`` on the reward and ``w_d`` on the
KL term of TDPO1, from a learned mask head on the reference's hidden states
(trainable model "mask", optimizer group ``config.optim.groups.mask``, weight
decay 0.01 as the official setup) or from the reference's activations (MaPO).

Extra metrics: ``mask/*`` on the training and held-out pairs (mean weight,
fraction of exact zeros, mean weight on the gold reward-bearing tokens and on
the others) and ``mask/auroc_u`` (``auroc_d``): the mask as a detector of the
reward-bearing response tokens of the held-out pairs (``reviews.reward_positions``).
The report adds ``mask_examples.json`` and ``heatmap.png`` (held-out responses
coloured by their token weights).

Presets: ``mapo``, ``independent``, ``smoke``. Official IMDb setting: beta 0.8,
no L1 (lambda 0), mask weight decay 0.01; here beta defaults to TDPO's 0.1 so
that the two are compared at equal beta. Measured numbers: experiments/sparsepo.md.
"""

from __future__ import annotations

import ml_collections

from jaxopd import config as config_lib, stages
from jaxopd.experiment import parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "mapo", "independent"))
  smoke = bool(args.get("smoke"))
  c = config_lib.base_config()
  c.total_steps = 400            # as experiments/tdpo.py
  c.batch_size = 16              # preference pairs per step
  c.seq_len = 64
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint.every = 200
  stages.preference_pipeline(c, smoke)        # TDPO's model, data, SFT stage, pairs, sampled evaluation; roles

  c.method.name = "sparsepo"     # jaxopd/methods/sparsepo.py
  c.method.mask = "learned"      # learned (mask head on the reference's hidden states) | mapo (activations)
  c.method.shared = True         # learned: one mask for w_u and w_d (False: two independent heads); mapo: True
  c.method.beta = 0.1            # inverse temperature (TDPO's default; the paper's IMDb runs use 0.8)
  c.method.lambda_u = 0.0        # L1 penalty on w_u per response token (halved when shared); learned only
  c.method.lambda_d = 0.0        # L1 penalty on w_d (halved when shared); learned only
  # learned: positive (official W; b = 1 + U(+-1/sqrt(D)) and a ~ U(0, 2/L) where the official draws U(+-1/sqrt(D))
  # and U(+-1/sqrt(L)): starts dense with mean ~1, rarely all zero) | uniform (the official PyTorch nn.Linear default:
  # all zero when every a_l < 0, e.g. the smoke model) | ones (exactly 1 = TDPO1). A mask zero on every response
  # token stops the run at the next eval (jaxopd/methods/sparsepo.py: check_masks).
  c.method.mask_init = "positive"
  c.method.chunk = 64            # positions per chunk of the vocabulary-wide terms (0: all at once, no recompute)
  c.optim.groups.mask = ml_collections.ConfigDict({"weight_decay": 0.01})  # the mask head's group (learned)
  c.heatmap_examples = 6         # held-out responses drawn in heatmap.png
  c.compare_with = ""            # a finished TDPO/DPO run to put in the report ("" = none)
  if args.get("mapo"):
    c.method.mask = "mapo"
    del c.optim.groups["mask"]
  if args.get("independent"):
    c.method.shared = False
  if smoke:
    c.total_steps = 8
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.eval_every = 4
    c.eval_batches = 1
    c.log_every = 2
    c.checkpoint.every = 4
  return c
