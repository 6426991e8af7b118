"""TDPO (Zeng et al., ICML 2024) and its DPO baseline on the controlled reviews task.

The main job (README command 1 runs it with no flags):

  python -m jaxopd.main --config experiments/tdpo.py --workdir runs/default

runs the whole pipeline, each stage cached so a re-run skips what is done:
1. data: the reviews suite (tokenizer, corpus, prompts) into ``config.data.data_dir``;
2. SFT base: ``experiments/sft.py``'s recipe with this config's model in ``config.sft.workdir``;
3. preferences: ``config.prefs.k`` samples per prompt from the SFT policy,
   labelled by the gold reward (``jaxopd.data.preferences``), in the data dir;
4. TDPO: policy and frozen reference both start from the SFT base;
5. report: held-out prompts sampled from the SFT policy ("before") and the
   trained policy ("after"): gold reward, sequence KL to the reference,
   per-token entropy, distinct-n; the same for a DPO run in
   ``config.compare_with`` if one is there; ``summary.json`` and ``summary.png``.

The method: jaxopd/methods/tdpo.py. Presets (comma-separated): ``dpo``,
``tdpo1``, ``tdpo2`` (the loss; default tdpo2; ``dpo`` is the DPO baseline,
``--workdir runs/dpo``), ``smoke`` (tiny sizes, for tests). Defaults of the official code:
beta 0.1, alpha 0.5. Measured numbers: experiments/tdpo.md.
"""

from __future__ import annotations

from jaxopd import config as config_lib, stages
from jaxopd.experiment import parse_arg
from jaxopd.methods import tdpo

LOSSES = tdpo.LOSSES


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke",) + LOSSES)
  smoke = bool(args.get("smoke"))
  c = config_lib.base_config()
  c.total_steps = 400
  c.batch_size = 16              # preference pairs per step
  c.seq_len = 64
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint.every = 200
  stages.preference_pipeline(c, smoke)        # model, data, the SFT stage, pairs, sampled evaluation; roles

  c.method.name = "tdpo"         # jaxopd/methods/tdpo.py
  c.method.loss = "tdpo2"        # dpo | ipo | tdpo1 | tdpo2 (jaxopd.methods.tdpo.PAIR_LOSSES)
  c.method.beta = 0.1            # inverse temperature of the implicit reward
  c.method.alpha = 0.5           # tdpo2: weight of the KL margin
  c.method.log_kl = True         # dpo: also compute the sequential KL (detached) for the metrics
  c.method.chunk = 64            # positions per chunk of the vocabulary-wide terms (0: all at once, no recompute)
  c.method.swap = False          # train on rejected over chosen (AlignDistil's reverse DPO model)
  c.method.share_prompt = False  # one row per pair, the prompt encoded once ([prompt | chosen | rejected])

  # a finished DPO run to put in the report, if present ("" = none)
  c.compare_with = "runs/dpo"
  for loss in LOSSES:
    if args.get(loss):
      c.method.loss = loss
  if c.method.loss == "dpo":
    c.compare_with = ""          # DPO is the comparison
  if smoke:
    c.total_steps = 8
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.eval_every = 4
    c.eval_batches = 1
    c.log_every = 2
    c.checkpoint.every = 4
    c.compare_with = ""
  return c
