"""f-DPG (Go et al., ICML 2023): approximate a target distribution with any f-divergence.

  python -m jaxopd.main --config experiments/fdpg.py --workdir runs/fdpg                 # pointwise, JS
  python -m jaxopd.main --config experiments/fdpg.py:rlhf,fkl --workdir runs/fdpg_rlhf_fkl

The method: jaxopd/methods/fdpg.py. Pipeline (each stage cached): data and
the SFT base of experiments/tdpo.py
(``config.sft.workdir``, shared with TDPO/SparsePO) -> target fit ->
on-policy f-DPG from the base -> before/after report (summary.json, .png).

The base model ``a`` is the SFT base (the frozen role ``base``); the policy
starts from it. Targets (``config.method.target``):

* ``pointwise``: ``P(x) = a(x) b(x)``, ``b`` = the response uses one of
  ``config.method.words`` (default "wonderful", ~2% of base samples);
* ``distributional``: ``P(x) = a(x) exp(lambda phi(x))``, ``phi`` = the review
  mentions ``config.method.topic`` (music: ~20% of base samples), ``lambda``
  fitted on ``config.method.fit_samples`` base samples so that
  ``E_p[phi] = config.method.topic_mean`` (0.5, the GDC "half of the
  biographies" setting);
* ``rlhf``: ``P(x) = a(x) exp(r(x) / beta)`` with the gold reward ``r``.

Unconditional by default (every sample starts from BOS, one log Z); with
``config.method.conditional`` each training prompt of the reviews suite is a
context with its own log Z. ``config.method.offline``: samples come from a
proposal that is replaced by the policy when the policy's estimated
KL(p||pi) is lower (checked every ``proposal_every`` steps), as in disco.

Evaluation (held-out samples from the policy): importance-sampled KL(p||pi),
KL(pi||p), TV and JS to the true target, using a log Z estimated once from
``fit_samples`` base samples per evaluation context (stored in
``config.eval.log_z``); alignment (b, E[phi] or the gold reward), KL(pi||a),
per-token entropy, distinct-1/2, self-BLEU.

Presets: ``pointwise``, ``distributional``, ``rlhf``; ``fkl``, ``rkl``, ``tv``,
``js``; ``offline``, ``conditional``; ``smoke``. Measured numbers:
experiments/fdpg.md.
"""

from __future__ import annotations

import ml_collections

from jaxopd import config as config_lib, stages
from jaxopd.data import suite as suite_lib
from jaxopd.experiment import parse_arg
from jaxopd.losses.fdpg import F_DIVERGENCES
from jaxopd.methods import fdpg
from jaxopd.models import table


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "offline", "conditional") + fdpg.TARGETS + F_DIVERGENCES)
  smoke = bool(args.get("smoke"))
  c = config_lib.base_config()
  c.total_steps = 300
  c.batch_size = 64              # samples per step
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 50
  c.eval_batches = 0             # no eval split: evaluation samples from the policy
  c.checkpoint.every = 100
  c.model = suite_lib.default_model(smoke)   # the SFT base's architecture
  c.data = suite_lib.data_config(smoke)      # the reviews suite
  # the SFT base run (shared with TDPO)
  c.pipeline = ("sft",)          # the stages, in order (jaxopd.stages.prepare)
  c.sft = stages.sft_stage("runs/sft_smoke" if smoke else "runs/sft_base", 20 if smoke else 1500, what="SFT base")
  c.models.policy = table.role(init="stage:sft")
  c.models.base = table.role(init="stage:sft", trainable=False)   # the base (proposal, target's a(x))
  c.models.reward = table.role(init="none", trainable=False)       # reward=model: a reward model (hf:DIR)

  c.method.name = "fdpg"         # jaxopd/methods/fdpg.py
  c.method.target = "pointwise"  # pointwise | distributional | rlhf
  c.method.divergence = "js"     # fkl (= DPG) | rkl | tv | js
  c.method.eps = -1.0            # pointwise: floor of b in the training target; -1 = auto (1e-3 for rkl, else 0)
  c.method.words = "wonderful"   # pointwise: "|"-separated words, any of which satisfies b
  c.method.topic = "music"       # distributional: phi = the review names one of this topic's nouns
  c.method.topic_mean = 0.5      # distributional: target E_p[phi]
  c.method.lambdas = ()          # distributional: filled by the fit in prepare() (or set by hand)
  c.method.reward_beta = 0.1     # rlhf: P = a exp(r / beta)
  c.method.reward = "gold"       # rlhf: gold (the reviews task's) | module:function | model (config.models.reward:
                                 # a sequence-classification directory run on device; jaxopd/rewards.py)
  c.method.conditional = False   # per-prompt targets (one log Z per training prompt)
  c.method.samples_per_context = 8  # conditional: samples per prompt in a step (batch_size / 8 prompts)
  c.method.chunk = 64            # positions per chunk of the log-probabilities (0: all at once, no recompute)
  c.method.offline = False       # sample from a proposal, replaced when the policy is closer
  c.method.proposal_every = 16   # offline: steps between proposal checks (disco's default)
  c.method.baseline_window = 1024  # pseudo-rewards in the moving-average baseline (disco's default)
  c.method.fit_samples = 4096    # base samples for lambda and the evaluation log Z (per eval context)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.max_new_tokens = 64  # response budget (base samples average ~30 tokens)
  c.rollout.prompt_len = 16      # conditional: padded prompt tokens (unconditional: 1, BOS)
  c.rollout.temperature = 1.0    # f-DPG needs ancestral sampling: other values are refused
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 256       # policy samples per evaluation (spread over the contexts)
  c.eval.contexts = 16           # conditional: held-out prompts evaluated
  c.eval.log_z = ()              # filled by prepare(): log Z of the true target per eval context
  c.eval.bleu_samples = 200      # samples in the self-BLEU estimate

  for name in fdpg.TARGETS:
    if args.get(name):
      c.method.target = name
  for name in F_DIVERGENCES:
    if args.get(name):
      c.method.divergence = name
  c.method.offline = bool(args.get("offline"))
  c.method.conditional = bool(args.get("conditional"))
  if smoke:
    c.total_steps = 6
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.eval_every = 3
    c.log_every = 1
    c.checkpoint.every = 3
    c.method.fit_samples = 64
    c.method.proposal_every = 2
    c.method.words = "the"     # frequent enough for a 64-sample fit of a smoke model
    c.rollout.max_new_tokens = 12
    c.rollout.prompt_len = 8
    c.eval.num_samples = 16
    c.eval.contexts = 2
    c.eval.bleu_samples = 16
    c.method.samples_per_context = 4
  c.seq_len = fdpg.prompt_len(c) + c.rollout.max_new_tokens
  return c
