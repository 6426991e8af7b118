"""REDI (Xu et al., 2025): reinforcement distillation from positive and negative traces,
reference-free, on the controlled reviews task's preference pairs.

  python -m jaxopd.main --config experiments/redi.py --workdir runs/redi

reuses TDPO's cached stages (data, SFT base, pairs: experiments/tdpo.py) and trains the
policy from the SFT base on ``-log pi(y+) / |y+| + alpha log pi(y-) / |y-|`` over the pairs
(chosen = positive, rejected = negative). The method: jaxopd/methods/redi.py.
Presets (comma-separated): ``digits`` (REDI's own setting, below), ``symmetric``
(alpha 1), ``sft`` (alpha 0: SFT on the positives, token-normalised per sequence),
``smoke`` (tiny sizes, for tests). Default alpha 0.8 (the paper's).

``digits``: teacher traces labelled by a verifiable rule, on the digits task
(jaxopd/data/digits.py, jaxopd/data/traces.py), each stage cached:

  python -m jaxopd.main --config experiments/redi.py:digits --workdir runs/redi_digits

1. the SFT base (easy levels) and the teacher (every level, longer): GRPO's stages
   (``config.sft``, ``config.teacher``; the same directories as experiments/grpo.py);
2. the traces (``config.traces``): ``samples`` responses of the teacher (or any
   ``traces.teacher`` init: ``hf:DIR``, ``run:WORKDIR``) to each of the first ``num_prompts``
   train prompts at ``temperature``, positive when the exact checker passes them;
3. stage 1 (``config.positives``): the SFT base fine-tuned on every positive trace
   (rejection-sampling SFT; experiments/sft.py:digits's recipe);
4. stage 2, this method: from the stage-1 model, on up to ``pairs_per_prompt``
   (positive, negative) pairs of each prompt that has both; evaluation pass@k per level
   (GRPO's); the report compares the SFT base, the teacher, stage 1 and stage 2.
"""

from __future__ import annotations

import ml_collections

from jaxopd import config as config_lib, stages
from jaxopd.data import digits
from jaxopd.experiment import parse_arg
from jaxopd.models import table


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "symmetric", "sft", "digits"))
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
  stages.preference_pipeline(c, smoke)        # model, data, the SFT stage, pairs, sampled evaluation; policy, reference
  # the reference (the starting model) only serves the metric logps/chosen_change and the eval KL;
  # --config.models.reference.init=none drops it

  c.method.name = "redi"         # jaxopd/methods/redi.py
  c.method.loss = "redi"         # redi | simpo | dpo (the paper's baselines on the same pairs)
  c.method.alpha = 0.8           # redi: weight of the negatives' normalised log-likelihood (1: symmetric, 0: SFT on y+)
  c.method.beta = 2.0            # simpo / dpo: the margin's scale (dpo: e.g. 0.1)
  c.method.chunk = 64            # positions per chunk of the log-probabilities (0: all at once, no recompute)
  c.method.gamma = 1.0           # simpo: the target margin
  c.method.share_prompt = False  # one row per pair, the prompt encoded once ([prompt | y+ | y-])
  if args.get("symmetric"):
    c.method.alpha = 1.0
  if args.get("sft"):
    c.method.alpha = 0.0
  if args.get("digits"):
    digits_pipeline(c, smoke)
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


def digits_pipeline(c, smoke: bool):
  """REDI's own setting on the digits task (module docstring): data, stages, traces, evaluation."""
  c.model = digits.default_model(smoke)
  c.data = digits.data_config(smoke)
  c.rollout = ml_collections.ConfigDict()   # the traces' and the evaluation's sampling budgets
  c.rollout.prompt_len = 16      # padded prompt tokens (sort, level 10: 12)
  c.rollout.max_new_tokens = 12  # response budget (sort, level 10: 10 digits + EOS)
  c.seq_len = c.rollout.prompt_len + c.rollout.max_new_tokens
  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 200       # held-out prompts for pass@k per level (0: no sampled evaluation)
  c.eval.samples = 16            # samples per prompt
  c.eval.temperature = 1.0
  c.eval_batches = 0             # no held-out pairs (the traces are of train prompts)
  c.optim.lr = 1e-4
  c.total_steps = 300
  c.eval_every = 100
  c.checkpoint.every = 100
  recipe = "sft.py:digits,smoke" if smoke else "sft.py:digits"
  c.sft = stages.sft_stage("runs/grpo_sft_base_smoke" if smoke else "runs/grpo_sft_base", 150 if smoke else 1500,
                    config=recipe, what="SFT base (easy levels)")   # GRPO's SFT base: the student
  c.teacher = stages.sft_stage("runs/grpo_teacher_smoke" if smoke else "runs/grpo_teacher", 150 if smoke else 3000,
                        config=recipe, what="teacher (SFT, longer)", all_levels=True)   # GRPO's teacher
  c.pipeline = ("sft", "teacher", "traces", "positives")   # the stages, in order (jaxopd.stages.prepare)
  c.traces = ml_collections.ConfigDict()
  c.traces.kind = "traces"       # a data stage: the teacher's answers, labelled by the checker
  c.traces.workdir = "runs/redi_traces_smoke" if smoke else "runs/redi_traces"   # root of the traces stages
  c.traces.teacher = "stage:teacher"   # the traces' model: stage:teacher, hf:DIR or run:WORKDIR[:MODEL][@STEP]
  c.traces.num_prompts = 64 if smoke else 4000   # train prompts sampled
  c.traces.samples = 4           # responses per prompt
  c.traces.temperature = 2.0     # of the traces: at 1 the teacher passes 99.5% (45 pairs from 4000 prompts)
  c.traces.pairs_per_prompt = 1  # (positive, negative) pairs per prompt that has both
  c.traces.seed = 0              # the traces' sampling (not config.seed: seeds of stage 2 share one set)
  c.positives = stages.sft_stage("runs/redi_positives_smoke" if smoke else "runs/redi_positives", 40 if smoke else 500,
                          config=recipe, what="stage 1")   # stage 1: the SFT base on every positive trace
  c.positives.kind = "positives"
  c.models.policy = table.role(init="stage:positives")
  c.models.reference = table.role(init="stage:positives", trainable=False)   # metrics only; none drops it
  if smoke:
    c.data.max_level = 5
    c.data.sft_max_level = 3
    c.rollout.prompt_len = 8
    c.rollout.max_new_tokens = 8
    c.seq_len = 16
    c.eval.num_prompts = 8
    c.eval.samples = 4
    c.traces.num_prompts = 256   # the smoke teacher is weak: every train prompt, sampled cooler
    c.traces.temperature = 0.5
