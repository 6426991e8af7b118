"""REDI (Xu et al., 2025): reinforcement distillation from positive and negative traces,
reference-free. Config: experiments/redi.py; loss: :func:`jaxopd.losses.redi_loss`.

Per pair of a positive trace ``y+`` (the chosen side) and a negative one ``y-``
(the rejected side) for the same prompt:
``loss = -log pi(y+) / |y+| + alpha log pi(y-) / |y-|`` (``alpha = 0.8`` the
paper's asymmetric weighting, ``1`` the symmetric case, ``0`` SFT on the
positives), averaged over pairs. ``config.method.loss`` also offers the paper's baselines on
the same pairs (the loss types of its official trainer): ``simpo``
(``-log sigmoid(beta (log pi(y+)/|y+| - log pi(y-)/|y-|) - gamma)``, reference-free) and
``dpo`` (``beta``, against the ``reference``).

Roles: ``policy`` (trained); ``reference`` (frozen: the starting model) only for
the metric ``logps/chosen_change`` and the sampled evaluation's KL; REDI's and
SimPO's losses never use it (DPO's does), and ``--config.models.reference.init=none`` drops it (no
forward, no memory).

Data (``config.data.task``):

* ``digits``: REDI's own setting (experiments/redi.py:digits). A teacher's traces on the
  digits task labelled by its exact checker (:mod:`jaxopd.data.traces`: ``config.traces``),
  stage 1 = SFT of the student (the digits SFT base, easy levels) on every positive trace
  (``config.positives``, a cached stage), stage 2 = this loss on (positive, negative)
  pairs of the same prompt, from the stage-1 model; evaluation pass@k per level and the
  held-out NLL of the easy levels (:func:`jaxopd.tasks.digits.evaluate`).
* ``reviews`` / ``files``: the preference pipeline's pairs
  (:func:`jaxopd.tasks.pairs.pair_data`: the reviews pairs, best vs worst of the SFT
  model's samples by gold reward, or your pair files), from the SFT base.

Metrics: ``logps/chosen_norm``, ``logps/rejected_norm`` (length-normalised
log-likelihoods), ``logps/margin_norm`` (their difference), ``logps/chosen_change``
(the positives' length-normalised log-likelihood minus the reference's: REDI's
point is that it must not collapse), ``rewards/accuracies`` (pairs whose
normalised positive log-likelihood is the larger).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxopd import paths, stages as stage_lib
from jaxopd.data import digits, traces
from jaxopd.data.tokenizer import check_tokenizer
from jaxopd.errors import ConfigError, one_of, positive
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import dpo_loss, redi_loss, simpo_loss
from jaxopd.losses.common import responses
from jaxopd.models import heads, table
from jaxopd.tasks import digits as digits_task, pairs as pair_task


LOSSES = ("redi", "simpo", "dpo")


def make_loss_fn(alpha: float, with_reference: bool, loss: str = "redi", beta: float = 2.0, gamma: float = 1.0,
                 chunk: int = 64):
  """``loss_fn(models, batch, rng)`` on pair batches (0 = positive, 1 = negative) in either layout
  (:func:`jaxopd.losses.common.responses`: a row per response, or shared-prefix rows).

  ``loss``: ``redi`` (``alpha``), or the paper's baselines on the same pairs (the loss types of
  REDI's official trainer): ``simpo`` (reference-free, ``beta``, ``gamma``) and ``dpo`` (``beta``,
  against the ``reference``)."""
  if loss not in LOSSES:
    raise ValueError(f"config.method.loss={loss!r}: must be one of {LOSSES}")

  def loss_fn(models, batch, rng):
    del rng
    rows = responses(batch)
    b = rows.mask.shape[0]
    n = rows.lengths()
    lp = rows.sums(heads.token_logprobs(models["policy"], rows.tokens, chunk, **rows.forward))
    ref = None
    if with_reference:   # DPO's loss needs both sides; the metric only the positives
      r = rows if loss == "dpo" else rows.response(0)
      ref = r.sums(heads.token_logprobs(models["reference"], r.tokens, chunk, frozen=True, **r.forward))
    if loss == "redi":
      losses = redi_loss(lp[:, 0], n[:, 0], lp[:, 1], n[:, 1], alpha)
    elif loss == "simpo":
      losses = simpo_loss(lp[:, 0], n[:, 0], lp[:, 1], n[:, 1], beta, gamma)
    else:
      losses = dpo_loss(lp[:, 0] - ref[:, 0], lp[:, 1] - ref[:, 1], beta)
    norm = jax.lax.stop_gradient(lp / jnp.maximum(n, 1.0))
    metrics = {"logps/chosen_norm": jnp.sum(norm[:, 0]), "logps/rejected_norm": jnp.sum(norm[:, 1]),
               "logps/margin_norm": jnp.sum(norm[:, 0] - norm[:, 1]),
               "rewards/accuracies": jnp.sum((norm[:, 0] > norm[:, 1]).astype(jnp.float32))}
    if with_reference:
      metrics["logps/chosen_change"] = jnp.sum(norm[:, 0] - ref[:, 0] / jnp.maximum(n[:, 0], 1.0))
    return LossOutput(jnp.sum(losses), jnp.float32(b), metrics)
  return loss_fn


def _check(c):
  positive(c.method, "config.method", "chunk")
  m = c.method
  one_of(m, "config.method", "loss", LOSSES)
  if m.alpha < 0:
    raise ConfigError(f"config.method.alpha={m.alpha}: must be >= 0")
  if m.loss != "redi" and m.alpha != 0.8:
    raise ConfigError(f"config.method.alpha={m.alpha}: only loss=redi uses alpha (loss={m.loss!r})")
  if m.loss == "redi" and (m.beta != 2.0 or m.gamma != 1.0):
    raise ConfigError(f"config.method.{'beta' if m.beta != 2.0 else 'gamma'}: loss=redi uses neither beta nor "
                      f"gamma (they are simpo's and dpo's)")
  if m.loss == "dpo" and m.gamma != 1.0:
    raise ConfigError(f"config.method.gamma={m.gamma}: only loss=simpo uses gamma")
  if m.loss != "redi" and m.beta <= 0:
    raise ConfigError(f"config.method.beta={m.beta}: must be positive")
  if m.loss == "dpo" and not table.built(c, "reference"):
    raise ConfigError("config.models.reference.init='none': loss=dpo needs the reference")
  if c.data.task not in ("reviews", "files", "digits"):
    raise ConfigError(f"config.data.task={c.data.task!r}: must be reviews, files or digits")
  if c.data.task == "digits":
    t = c.get("traces")
    if t is None:
      raise ConfigError("config.traces: task=digits trains on teacher traces; start from experiments/redi.py:digits")
    for f in ("num_prompts", "samples", "pairs_per_prompt"):
      if t[f] < 1:
        raise ConfigError(f"config.traces.{f}={t[f]}: must be >= 1")
    if t.samples < 2:
      raise ConfigError(f"config.traces.samples={t.samples}: a pair needs at least 2 samples per prompt")


def prepare(config, workdir: str):
  """The cached stages: on ``digits`` the SFT base, the teacher, its traces and stage 1 (SFT on
  the positives); otherwise TDPO's (data, SFT base, pairs; none with ``task=files``)."""
  del workdir
  _check(config)
  if config.data.task != "digits":
    return stage_lib.prepare_pairs(config)
  suite = digits.ensure(config.data)
  base = stage_lib.run_sft(config, "sft")
  t = config.traces
  teacher = stage_lib.run_sft(config, "teacher") if t.teacher == "stage:teacher" else t.teacher
  table.parse_init("teacher", teacher)
  prompts = digits.prompt_records(suite, "train", config.rollout.prompt_len, config.rollout.max_new_tokens - 1)
  scfg = digits_task.sampling_config(config, suite.tokenizer, t.temperature)
  where = stage_lib.run(t.workdir, "traces", _traces_inputs(config, suite), lambda where: traces.write(
      where, t, lambda: table.load_model(teacher, "teacher")[0], teacher, suite, prompts, scfg, int(t.seed)))
  lines = traces.load(where)
  st = traces.statistics(lines, t.pairs_per_prompt)
  rates = " ".join(f"L{k} {v:.2f}" for k, v in st["positive_rate_per_level"].items())
  print(f"traces: {st['traces']} ({st['positives']} positive, {st['negatives']} negative, "
        f"{st['negatives_truncated']} of them cut at the budget); {st['prompts_both']} of {st['prompts']} prompts "
        f"have both -> {st['pairs']} pairs ({st['prompts_only_positive']} prompts only positive, "
        f"{st['prompts_only_negative']} only negative: no pair); positive rate per level: {rates}")
  if table.uses_stage(config, "positives"):
    node = config.positives
    s = stage_lib.sft_config(config, "positives")
    s.models.policy.init = base
    train_recs = traces.positive_records(lines, suite.tokenizer, s.seq_len)
    eval_recs, _ = digits.sft_records(suite, "test", s.seq_len, verbose=False)   # the gold answers, every level
    table.fill_stage(config, "positives", stage_lib.run_sft_on(
        s, node, train_recs, eval_recs, f"stage 1: SFT on the {len(train_recs)} positive traces", where))
  return config


def _teacher(config) -> str:
  t = config.traces
  return stage_lib.sft_init(config, "teacher") if t.teacher == "stage:teacher" else t.teacher


def _traces_inputs(config, suite) -> dict:
  """The inputs of the traces stage (the teacher, its sampling, the prompts)."""
  t = config.traces
  scfg = digits_task.sampling_config(config, suite.tokenizer, t.temperature)
  return traces.settings(_teacher(config), t, scfg, int(t.seed), suite.builder_config.name)


def _traces_dir(config, suite) -> str:
  return stage_lib.directory(config.traces.workdir, "traces", _traces_inputs(config, suite))


def _digits_data(config):
  suite = digits.ensure(config.data, verbose=False)
  check_tokenizer(config, suite.tokenizer, "the digits task")
  where = _traces_dir(config, suite)
  lines = traces.load(where)
  train_recs = traces.pair_records(lines, suite.tokenizer, config.seq_len, int(config.traces.pairs_per_prompt))
  print(f"trace pairs: {len(train_recs)} (positive, negative) pairs from {where}")
  if len(train_recs) < config.batch_size:
    raise ConfigError(f"config.batch_size={config.batch_size}: the traces give only {len(train_recs)} pairs "
                      f"(raise config.traces.num_prompts or samples)")
  evaluate = None
  if config.eval.num_prompts and config.eval.samples:
    test = digits.prompt_records(suite, "test", config.rollout.prompt_len, config.rollout.max_new_tokens - 1,
                                 verbose=False)[:config.eval.num_prompts]
    evaluate = digits_task.evaluate(config, suite, test)
  return train_recs, None, evaluate


def build(config) -> Experiment:
  _check(config)
  train_recs, test_recs, evaluate = (_digits_data if config.data.task == "digits" else pair_task.pair_data)(config)
  with_ref = table.built(config, "reference")
  train_data, eval_data = pair_task.pair_batches(train_recs, test_recs, config.method.share_prompt)
  return Experiment(roles={"policy": True, **({"reference": False} if with_ref else {})},
                    loss_fn=make_loss_fn(float(config.method.alpha), with_ref, config.method.loss,
                                         float(config.method.beta), float(config.method.gamma), int(config.method.chunk)),
                    train_data=train_data,
                    eval_data=eval_data, evaluate=evaluate)


def report(config, workdir: str, summary: dict):
  """On the digits task: pass@k per level of the SFT base, the teacher, the stage-1 model (``before``:
  the start) and the trained policy; summary.json (other tasks: no report)."""
  if config.data.task != "digits":
    return
  where = _traces_dir(config, digits.ensure(config.data, verbose=False))
  out = {"method": {"alpha": float(config.method.alpha)},
         "traces": traces.statistics(traces.load(where), int(config.traces.pairs_per_prompt)), "after": summary["eval"]}
  digits_task.report(config, out, {"sft base": stage_lib.sft_init(config, "sft"), "teacher": _teacher(config),
                                   "before": config.models.policy})
  paths.write_json(os.path.join(workdir, "summary.json"), out, indent=2)
  print(f"wrote {os.path.join(workdir, 'summary.json')}")
