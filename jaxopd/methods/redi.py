"""REDI (Xu et al., 2025): reinforcement distillation from positive and negative traces,
reference-free: ``loss = -log pi(y+) / |y+| + alpha log pi(y-) / |y-|`` per pair
(:func:`jaxopd.losses.redi_loss`), with the paper's baselines SimPO and DPO on the same pairs
(:data:`LOSS_TABLE`). Config and commands: experiments/redi.py.

The ``reference`` (frozen) serves only the metric ``logps/chosen_change`` and the sampled
evaluation's KL, unless ``loss=dpo``; ``models.reference.init=none`` drops it. On ``digits``
(REDI's setting) the pairs are a teacher's traces labelled by the task's checker (the traces
stage), trained after stage 1, SFT on every positive trace (``config.positives``); on
``reviews`` / ``files`` they are the preference pipeline's pairs (:mod:`jaxopd.tasks.pairs`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from jaxopd import options, paths, stages as stage_lib, tasks
from jaxopd.data import traces
from jaxopd.errors import ConfigError
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import dpo_loss, redi_loss, simpo_loss
from jaxopd.losses.common import responses
from jaxopd.models import heads, table
from jaxopd.options import at_least, one_of, option
from jaxopd.tasks import digits as digits_task, pairs as pair_task

TASKS = ("reviews", "files", "digits")   # the tasks it trains on (jaxopd.tasks)


# The losses by name, each ``fn(lp, n, ref, beta, gamma, alpha) -> [B]`` from the pairs' summed
# log-probs ``lp``, lengths ``n`` and reference log-probs ``ref`` (``[B, 2]``; 0 = positive), and
# whether it needs the reference on both sides: REDI and the baselines of its official trainer.
LOSS_TABLE = {
    "redi": (lambda lp, n, ref, beta, gamma, alpha: redi_loss(lp[:, 0], n[:, 0], lp[:, 1], n[:, 1], alpha), False),
    "simpo": (lambda lp, n, ref, beta, gamma, alpha: simpo_loss(lp[:, 0], n[:, 0], lp[:, 1], n[:, 1], beta, gamma),
              False),
    "dpo": (lambda lp, n, ref, beta, gamma, alpha: dpo_loss(lp[:, 0] - ref[:, 0], lp[:, 1] - ref[:, 1], beta), True),
}
LOSSES = tuple(LOSS_TABLE)


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  chunk: int = option(at_least(0))
  loss: str = option(one_of(*LOSSES))
  alpha: float = option(at_least(0))
  beta: float = option()
  gamma: float = option()
  share_prompt: bool = option()

  def __post_init__(self):
    if self.loss != "redi" and self.alpha != 0.8:
      self.refuse("alpha", f"only loss=redi uses alpha (loss={self.loss!r})")
    if self.loss == "redi" and (self.beta != 2.0 or self.gamma != 1.0):
      raise ConfigError(f"config.method.{'beta' if self.beta != 2.0 else 'gamma'}: loss=redi uses neither beta nor "
                        f"gamma (they are simpo's and dpo's)")
    if self.loss == "dpo" and self.gamma != 1.0:
      self.refuse("gamma", "only loss=simpo uses gamma")
    if self.loss != "redi" and self.beta <= 0:
      self.refuse("beta", "must be positive")


def make_loss_fn(alpha: float, with_reference: bool, loss: str = "redi", beta: float = 2.0, gamma: float = 1.0,
                 chunk: int = 64):
  """``loss_fn(models, batch, rng)`` on pair batches (0 = positive, 1 = negative) in either layout
  (:func:`jaxopd.losses.common.responses`: a row per response, or shared-prefix rows). Metrics:
  ``logps/chosen_norm``, ``logps/rejected_norm``, ``logps/margin_norm`` (length-normalised),
  ``logps/chosen_change`` (the positives' against the reference's: REDI's point is that it must not
  collapse) and ``rewards/accuracies``.

  ``loss``: ``redi`` (``alpha``), or the paper's baselines on the same pairs (the loss types of
  REDI's official trainer): ``simpo`` (reference-free, ``beta``, ``gamma``) and ``dpo`` (``beta``,
  against the ``reference``)."""
  if loss not in LOSSES:
    raise ValueError(f"config.method.loss={loss!r}: must be one of {LOSSES}")
  fn, both_sides = LOSS_TABLE[loss]

  def loss_fn(models, batch, rng):
    del rng
    rows = responses(batch)
    b = rows.mask.shape[0]
    n = rows.lengths()
    lp = rows.sums(heads.token_logprobs(models["policy"], rows.tokens, chunk, **rows.forward))
    ref = None
    if with_reference:   # DPO's loss needs both sides; the metric only the positives
      r = rows if both_sides else rows.response(0)
      ref = r.sums(heads.token_logprobs(models["reference"], r.tokens, chunk, frozen=True, **r.forward))
    losses = fn(lp, n, ref, beta, gamma, alpha)
    norm = jax.lax.stop_gradient(lp / jnp.maximum(n, 1.0))
    metrics = {"logps/chosen_norm": jnp.sum(norm[:, 0]), "logps/rejected_norm": jnp.sum(norm[:, 1]),
               "logps/margin_norm": jnp.sum(norm[:, 0] - norm[:, 1]),
               "rewards/accuracies": jnp.sum((norm[:, 0] > norm[:, 1]).astype(jnp.float32))}
    if with_reference:
      metrics["logps/chosen_change"] = jnp.sum(norm[:, 0] - ref[:, 0] / jnp.maximum(n[:, 0], 1.0))
    return LossOutput(jnp.sum(losses), jnp.float32(b), metrics)
  return loss_fn


def _check(c) -> Options:
  m = Options.of(c.method)
  if LOSS_TABLE[m.loss][1] and not table.built(c, "reference"):
    raise ConfigError("config.models.reference.init='none': loss=dpo needs the reference")
  tasks.require(c, TASKS)
  return m


def prepare(config, workdir: str):
  """The stages ``config.pipeline`` declares: on ``digits`` the SFT base, the teacher, its traces
  and stage 1 (SFT on the positives); otherwise the preference pipeline's (data, SFT base, pairs;
  none with ``task=files``). Each is cached."""
  del workdir
  _check(config)
  return stage_lib.prepare(config)


def build(config) -> Experiment:
  m = _check(config)
  train_recs, test_recs, evaluate = pair_task.pair_data(config)   # digits: the traces' pairs
  with_ref = table.built(config, "reference")
  train_data, eval_data = pair_task.pair_batches(train_recs, test_recs, m.share_prompt)
  return Experiment(roles={"policy": True, **({"reference": False} if with_ref else {})},
                    loss_fn=make_loss_fn(float(m.alpha), with_ref, m.loss, float(m.beta), float(m.gamma), int(m.chunk)),
                    train_data=train_data,
                    eval_data=eval_data, evaluate=evaluate)


def report(config, workdir: str, summary: dict):
  """On the digits task: pass@k per level of the SFT base, the teacher, the stage-1 model (``before``:
  the start) and the trained policy; summary.json (other tasks: no report)."""
  if "traces" not in config.get("pipeline", ()):    # the table compares the traces pipeline's models
    return
  where = stage_lib.traces_dir(config)
  out = {"method": {"alpha": float(config.method.alpha)},
         "traces": traces.statistics(traces.load(where), int(config.traces.pairs_per_prompt)), "after": summary.eval}
  digits_task.report(config, out, {"sft base": stage_lib.sft_init(config, "sft"), "teacher": stage_lib.source(config, config.traces.teacher),
                                   "before": config.models.policy})
  paths.write_json(os.path.join(workdir, "summary.json"), out, indent=2)
  print(f"wrote {os.path.join(workdir, 'summary.json')}")
