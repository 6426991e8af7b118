"""GRPO with DAPO's and ProRL's controls, on-policy distillation and RL with a teacher term,
on the digits task (a verifiable task with difficulty levels: jaxopd/data/digits.py).

  python -m jaxopd.main --config experiments/grpo.py --workdir runs/grpo

runs the pipeline, each stage cached (a re-run skips what is done):
1. the digits dataset and tokenizer (built into ``config.data.data_dir`` once);
2. the SFT base on the easy levels (``config.sft``: experiments/sft.py:digits, levels <=
   ``config.data.sft_max_level``); for the distillation presets also the teacher
   (``config.teacher``: the same recipe on every level, longer);
3. the method: the policy starts from the SFT base; G responses per prompt are sampled in
   the step and scored by the task's exact checker;
4. report: pass@k per level of the SFT base (before) and the trained policy; summary.json.

The method: jaxopd/methods/grpo.py (loss: jaxopd/losses/grpo.py). Presets
(comma-separated):

* (default) DAPO's settings: decoupled clip 0.2 / 0.28, token-mean aggregation, no KL;
* ``grpo``: the original GRPO: symmetric clip 0.2, per-sequence token means, k3 KL 0.04;
* ``dapo``: the default plus dynamic sampling (groups of equal rewards dropped);
* ``prorl``: ProRL: clip 0.2 / 0.4, k3 KL 1e-3 with the reference reset every
  ``reset_every`` steps, dynamic sampling, rollout temperature 1.2;
* ``opd``: on-policy distillation (VLA-OPD): no RL term, reverse KL to the teacher on the
  policy's own samples;
* ``rpd``: GRPO plus ``lambda_d`` times the reverse KL to the teacher (RPD);
* ``reviews``: on the reviews task instead, the reward its gold reward (on the host), from the
  main job's SFT base (``runs/sft_base``), evaluated as TDPO (gold reward, KL, entropy);
* ``smoke``: tiny sizes, for tests.

Your own model, prompts and reward, by flags:
``--config.data.task=files --config.data.files.train=prompts.jsonl
--config.models.policy.init=hf:DIR --config.method.reward=my_module:my_reward``
(TRL's reward-function convention, :mod:`jaxopd.rewards`), or ``--config.method.reward=model
--config.models.reward.init=hf:RM_DIR`` for a reward model.
"""

from __future__ import annotations

import ml_collections

from jaxopd import config as config_lib, stages
from jaxopd.data import digits, suite as suite_lib
from jaxopd.experiment import parse_arg
from jaxopd.models import table

PRESETS = ("smoke", "grpo", "dapo", "prorl", "opd", "rpd", "reviews")


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=PRESETS)
  smoke = bool(args.get("smoke"))
  c = config_lib.base_config()
  c.total_steps = 200
  c.batch_size = 16              # prompts per step (each sampled group_size times)
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10
  c.optim.clip_norm = 1.0
  c.optim.weight_decay = 0.0
  c.eval_every = 50
  c.eval_batches = 0
  c.checkpoint.every = 50
  c.log_every = 5

  c.model = digits.default_model(smoke)
  c.data = digits.data_config(smoke)     # with the fields of task=files (your prompt file)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompt_len = 16      # padded prompt tokens (sort, level 10: 12)
  c.rollout.max_new_tokens = 12  # response budget (sort, level 10: 10 digits + EOS)
  c.rollout.temperature = 1.0    # ProRL: 1.2; the loss's log-probs are the untempered policy's
  c.seq_len = c.rollout.prompt_len + c.rollout.max_new_tokens

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 200       # held-out prompts for pass@k per level (0: no sampled evaluation)
  c.eval.samples = 16            # samples per prompt (pass@k for k = 1, 2, 4, ... <= samples)
  c.eval.temperature = 1.0

  c.method.name = "grpo"         # jaxopd/methods/grpo.py
  c.method.group_size = 8        # G responses per prompt
  c.method.reward = "check"      # check (the digits task's checker) | module:function | model (the reward role)
  c.method.advantage = "grpo"    # grpo ((r - mean) / std) | dr_grpo (r - mean)
  c.method.eps_low = 0.2         # the ratio's clip below: 1 - eps_low
  c.method.eps_high = 0.28       # ... above: 1 + eps_high (DAPO's clip-higher; = eps_low for PPO's)
  c.method.ratio_level = "token" # token | sequence (GSPO: one ratio per response, the mean log-ratio's exp)
  c.method.sampler_dtype = ""    # the sampler's compute dtype: "" = the policy's | float32 | bfloat16 |
                                 # bfloat16_matmul (bf16 operands of the matmuls only: the faster on CPU)
  c.method.rollout_correction = "none"  # none | tis (token IS weights, truncated) | mis (mask responses)
  c.method.rollout_cap = 2.0     # TIS's truncation C; MIS keeps responses with ratio in [1/C, C]
  c.method.beta_kl = 0.0         # KL-to-reference weight; 0 builds no reference model
  c.method.kl = "k3"             # k1 | k2 | k3 estimator on the sampled tokens
  c.method.aggregation = "token_mean"   # token_mean | seq_mean_token_mean | dr_grpo
  c.method.dynamic_sampling = False     # drop groups whose rewards are all equal
  c.method.train_groups = 0      # > 0: train on this many of the step's groups, kept ones first (over-sampling)
  c.method.updates_per_rollout = 1      # optimizer updates per rollout (its minibatches; pi_old = rollout time)
  c.method.reset_every = 0       # ProRL: reference <- policy and optimizer re-initialised every N steps (0: never)
  c.method.reset_kl = 0.0        # ... or when the step's kl exceeds this (0: never)
  c.method.pg = True             # the RL term (False: on-policy distillation only)
  c.method.distill = ""          # "" | reverse_kl | forward_kl | hard_ce: the teacher term on the policy's samples
  c.method.lambda_d = 0.0        # its weight (RPD); 1 for pure on-policy distillation
  c.method.distill_schedule = "constant"   # constant | cosine (lambda_d (0.5 cos(pi s / S) + 0.5))
  c.method.distill_temperature = 1.0
  c.method.chunk = 32            # positions per chunk of the vocabulary-wide terms (0: all at once, no recompute)
  c.method.share_prompt = True   # each prompt encoded once for its G samples in the loss's forwards (equal
                                 # results; False: a full row per sample, e.g. for attention=splash)

  c.pipeline = ("sft", "teacher")   # the stages, in order (jaxopd.stages.prepare); each runs if a role uses it
  c.sft = stages.sft_stage("runs/grpo_sft_base_smoke" if smoke else "runs/grpo_sft_base", 150 if smoke else 1500,
                    config="sft.py:digits,smoke" if smoke else "sft.py:digits", what="SFT base (easy levels)")
  c.teacher = stages.sft_stage("runs/grpo_teacher_smoke" if smoke else "runs/grpo_teacher", 150 if smoke else 3000,
                        config="sft.py:digits,smoke" if smoke else "sft.py:digits", what="teacher (SFT, longer)",
                        all_levels=True)
  c.models.policy = table.role(init="stage:sft")
  c.models.teacher = table.role(init="none", trainable=False)   # distill: stage:teacher (or hf:DIR / run:...)
  c.models.reward = table.role(init="none", trainable=False)    # reward=model: hf:DIR

  m = c.method
  if args.get("grpo"):
    m.eps_high = 0.2
    m.aggregation = "seq_mean_token_mean"
    m.beta_kl = 0.04
  if args.get("dapo"):
    m.dynamic_sampling = True
  if args.get("prorl"):
    m.eps_high = 0.4
    m.beta_kl = 1e-3
    m.reset_every = 100
    m.dynamic_sampling = True
    c.rollout.temperature = 1.2
  if args.get("opd") or args.get("rpd"):
    m.distill = "reverse_kl"
    m.lambda_d = 1.0
    c.models.teacher.init = "stage:teacher"
  if args.get("opd"):
    m.pg = False
  if args.get("reviews"):
    c.data = suite_lib.data_config(smoke)
    c.model = suite_lib.default_model(smoke)
    m.reward = "gold"
    c.sft = stages.sft_stage("runs/sft_smoke" if smoke else "runs/sft_base", 20 if smoke else 1500,
                             what="SFT base")   # TDPO's SFT stage
    c.teacher = stages.sft_stage("runs/sft_teacher_smoke" if smoke else "runs/sft_teacher", 40 if smoke else 3000,
                                 what="teacher (SFT, longer)")
    c.rollout.prompt_len, c.rollout.max_new_tokens = 16, 48
    c.seq_len = 64
    c.eval.num_prompts = 256     # held-out prompts (TDPO's evaluation); eval.samples is the digits task's
    c.eval.prompt_len, c.eval.max_new_tokens = 16, 48
  if smoke:
    c.total_steps = 6
    c.batch_size = 8
    m.group_size = 4
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1
    c.eval_every = 3
    c.log_every = 1
    c.checkpoint.every = 3
    c.eval.num_prompts = 8
    c.eval.samples = 4
    if args.get("reviews"):
      c.rollout.prompt_len, c.rollout.max_new_tokens, c.seq_len = 16, 8, 24
      c.eval.max_new_tokens = 8
    else:
      c.data.max_level = 5
      c.data.sft_max_level = 3
      c.rollout.prompt_len = 8
      c.rollout.max_new_tokens = 8
      c.seq_len = 16
  return c
