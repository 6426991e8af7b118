"""DistillSpec (Zhou et al., ICLR 2024): distil a small draft toward a frozen
target for speculative decoding; with ``eval.mode = "quality"`` (preset
``gkd``) the same module is the GKD baseline (Agarwal et al., ICLR 2024).

  python -m jaxopd.main --config experiments/distillspec.py --workdir runs/distillspec
  python -m jaxopd.main --config experiments/distillspec.py:fkl,teacher --workdir runs/ds_fkl_teacher
  python -m jaxopd.main --config experiments/distillspec.py:gkd --workdir runs/gkd

The method, its pipeline (data, target SFT, draft SFT, distillation) and the
report's measurements: jaxopd/methods/distillspec.py.

Presets: ``smoke``; ``gkd`` (JSD(0.5), mixed data, quality evaluation); a
divergence (``fkl``, ``rkl``, ``jsd``, ``tvd``; default tvd) and a data source
(``fixed``, ``teacher``, ``student``, ``mixed``; default student). Measured
numbers: experiments/distillspec.md.
"""

from __future__ import annotations

import ml_collections

from jaxopd import config as config_lib, stages
from jaxopd.data import suite as suite_lib
from jaxopd.experiment import parse_arg
from jaxopd.losses import DIVERGENCES
from jaxopd.methods.distillspec import DATA_SOURCES
from jaxopd.models import table


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "gkd") + DIVERGENCES + DATA_SOURCES)
  smoke = bool(args.get("smoke"))
  target_model = suite_lib.default_model(smoke)   # experiments/sft.py's default
  c = config_lib.base_config()
  c.total_steps = 300
  c.batch_size = 16              # sequences per step
  c.seq_len = 64                 # = method.prompt_len + method.max_new_tokens
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint.every = 200
  c.data = suite_lib.data_config(smoke)   # the reviews suite
  c.model = suite_lib.default_model(smoke)   # the draft (trained): the target's family and vocabulary
  c.model.d_model = 32
  c.model.n_layers = 1
  c.model.n_heads = 2
  c.model.n_kv_heads = 1

  # The frozen target: the main job's SFT base (an SFT stage, trained here if missing).
  c.pipeline = ("draft_sft", "target")   # the stages, in order (jaxopd.stages.prepare); each runs if a role uses it
  c.target = stages.sft_stage("runs/sft_base", 1500, what="target SFT")
  c.target.source = "policy"     # the model of target.workdir's checkpoint: "policy" (an SFT run, trained here if
                                 # missing) or "draft" (a distilled model of a run of this module, which must exist:
                                 # the "distil the target first, then the draft" setting)
  c.target.model = target_model  # its architecture (experiments/sft.py's default)

  # The draft starts from the draft SFT stage, the target is the target stage's run; give
  # either an hf:DIR or run:WORKDIR init to use your own model (that stage is then not run).
  c.models.draft = table.role(init="stage:draft_sft")
  c.models.target = table.role(init="stage:target", trainable=False)
  del c.models["policy"]

  # The undistilled draft: an SFT stage of config.model, short (a weak draft leaves room for distillation).
  c.draft_sft = stages.sft_stage("runs/draft_sft_base", 300, what="draft SFT")

  c.method.name = "distillspec"  # jaxopd/methods/distillspec.py
  c.method.divergence = "tvd"    # fkl | rkl | jsd | tvd: D(p_target || q_draft) per token
  c.method.beta = 0.5            # jsd only: M = beta p + (1 - beta) q (0 -> FKL, 1 -> RKL)
  c.method.temperature = 1.0     # of the divergence (both models' logits / T; TRL's GKD: 1 always) and of
                                 # generated training responses
  c.method.chunk = 64            # positions per chunk of the vocabulary-wide terms (0: all at once, no recompute)
  c.method.t2_scale = False      # multiply the divergence by temperature^2 (classic distillation's scaling)
  c.method.data = "student"      # fixed | teacher | student | mixed
  c.method.mix_lambda = 0.5      # mixed: probability that a microbatch is student-generated
  c.method.mix_with = "fixed"    # mixed: the other source (fixed | teacher)
  c.method.prompt_len = 16       # padded prompt tokens of generated batches
  c.method.max_new_tokens = 48   # response budget of generated batches

  c.eval = ml_collections.ConfigDict()
  c.eval.mode = "spec"           # spec (acceptance, SD runs, timings + quality) | quality (GKD: draft quality only)
  c.eval.num_prompts = 128       # held-out prompts for acceptance, SD runs and gold reward
  c.eval.max_new_tokens = 48     # response budget
  c.eval.temperature = 1.0       # sampling temperature of the non-greedy evaluation
  c.eval.prompt_len = 16         # padded prompt tokens
  c.eval.max_gamma = 7           # block efficiency formula for gamma = 1..max_gamma
  c.eval.sd_gammas = (1, 3, 5)   # gammas of the measured SD runs and timings (report)
  c.eval.timing_prompts = 32     # prompts decoded one by one (batch 1) by the SD runs and timings
  c.eval.timing_repeats = 3      # timing rounds (every call timed once per round); the median is reported
  c.eval.nll_examples = 512      # held-out corpus reviews for the report's log-likelihood

  for d in DIVERGENCES:
    if args.get(d):
      c.method.divergence = d
  for d in DATA_SOURCES:
    if args.get(d):
      c.method.data = d
  if args.get("gkd"):
    c.method.divergence = "jsd"
    c.method.data = "mixed"
    c.eval.mode = "quality"
  if args.get("smoke"):
    c.total_steps = 8
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.eval_every = 4
    c.eval_batches = 1
    c.log_every = 2
    c.checkpoint.every = 4
    c.model.d_model = 16
    c.target.total_steps = 20
    c.draft_sft.total_steps = 20
    c.target.config = c.draft_sft.config = "sft.py:smoke"
    c.eval.num_prompts = 8
    c.eval.max_new_tokens = 12
    c.eval.max_gamma = 3
    c.eval.sd_gammas = (2,)
    c.eval.timing_prompts = 2
    c.eval.timing_repeats = 1
    c.eval.nll_examples = 16
  return c
