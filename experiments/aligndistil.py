"""AlignDistil (Zhang et al., ACL 2025) on the controlled reviews task.

  python -m jaxopd.main --config experiments/aligndistil.py --workdir runs/aligndistil

runs the pipeline, each stage cached (a re-run skips what is done):
1. data, SFT base and preference pairs: TDPO's stages (experiments/tdpo.py), shared with it;
2. DPO on the pairs (``config.dpo``: experiments/tdpo.py:dpo's recipe) and, for the
   ``adaptive`` / ``contrast`` teachers, reverse DPO on the same pairs with chosen and
   rejected swapped (``config.rdpo``);
3. AlignDistil: the policy starts from the SFT base and is distilled token by token
   toward the teacher built from the DPO, reverse DPO and SFT models;
4. report: gold reward, sequence KL to the SFT reference, entropy and distinct-n of
   held-out samples of the SFT model (before), the DPO model (the teacher's base) and the
   trained policy; ``summary.json``.

The method: jaxopd/methods/aligndistil.py (loss: jaxopd/losses/aligndistil.py).
Presets (comma-separated): the teacher ``adaptive`` (default: AlignDistil),
``contrast``, ``theorem1``, ``gkd`` (reverse-KL distillation into the DPO model);
the data ``on_policy`` (default: responses sampled from the policy in the step)
or ``off_policy`` (the chosen responses); ``smoke`` (tiny sizes, for tests).
Defaults of the official scripts: beta 0.1, beta2 15 on-policy and 10 off-policy,
length normalisation on, no clipping of the adaptive coefficient.

Your own models and data: give every role a source and the files (no stage is run):
``--config.data.task=files --config.data.files.train=pairs.jsonl`` (off_policy) or a
prompt file (on_policy), ``--config.models.{policy,reference,dpo,rdpo}.init=hf:DIR``.
"""

from __future__ import annotations

from jaxopd import config as config_lib, stages
from jaxopd.experiment import parse_arg
from jaxopd.losses.aligndistil import NEEDS, VARIANTS
from jaxopd.methods import aligndistil

DATA = aligndistil.DATA


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke",) + VARIANTS + DATA)
  smoke = bool(args.get("smoke"))
  c = config_lib.base_config()
  c.total_steps = 400
  c.batch_size = 16              # sequences per step (prompts on-policy, chosen responses off-policy)
  c.seq_len = 64
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 100
  c.eval_batches = 8             # held-out pairs (their chosen side): loss and KL metrics
  c.checkpoint.every = 200
  stages.preference_pipeline(c, smoke)        # model, data, the SFT stage, pairs, sampled evaluation; policy, reference
  aligndistil.stages(c, smoke)   # the DPO and reverse-DPO stages; roles dpo, rdpo; config.rollout

  c.method.name = "aligndistil"  # jaxopd/methods/aligndistil.py
  c.method.variant = "adaptive"  # adaptive | contrast | theorem1 | gkd (the teacher; jaxopd/losses/aligndistil.py)
  c.method.data = "on_policy"    # on_policy (sampled from the policy in the step) | off_policy (chosen responses)
  c.method.beta = 0.1            # beta0: the DPO models' reward scale
  c.method.beta2 = 15.0          # the boost (official scripts: 15 on-policy, 10 off-policy)
  c.method.temperature = 1.0     # T of q and of the teacher in the KL
  c.method.len_norm = True       # per-sequence length normalisation (--reward_len_norm)
  c.method.chunk = 32            # positions per chunk of the vocabulary-wide terms (0: all at once, no recompute)
  for v in VARIANTS:
    if args.get(v):
      c.method.variant = v
  if args.get("off_policy"):
    c.method.data = "off_policy"
    c.method.beta2 = 10.0
  if "rdpo" not in NEEDS[c.method.variant]:
    c.models.rdpo.init = "none"  # theorem1 / gkd: no reverse DPO model (and no such stage)
  if smoke:
    c.total_steps = 8
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-3
    c.eval_every = 4
    c.eval_batches = 1
    c.log_every = 2
    c.checkpoint.every = 4
    c.seq_len = c.eval.prompt_len + c.eval.max_new_tokens
    c.rollout.max_new_tokens = c.seq_len - c.rollout.prompt_len
  return c
