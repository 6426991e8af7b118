"""DPO (Rafailov et al., 2023) and TDPO (Zeng et al., ICML 2024): the preference
step (its loss table :data:`PAIR_LOSSES`). The pipeline it runs on (data, SFT base,
sampled pairs labelled by the gold reward) is the ``pairs`` stage of :mod:`jaxopd.stages`, its
data and report :mod:`jaxopd.tasks.pairs`. Config: experiments/tdpo.py (``:dpo`` for DPO).

The step runs policy and frozen reference (its outputs detached where they are produced) on
chosen and rejected sequences, then the pure losses of :mod:`jaxopd.losses.preference`.
Batch: ``tokens[B, 2, T]``, ``loss_mask[B, 2, T]`` (pair axis: 0 = chosen, 1 = rejected),
the pair axis folded into the batch for one forward per model; or, with
``config.method.share_prompt``, one row per pair ``[prompt | chosen | rejected]``
(:func:`jaxopd.data.pipeline.share_prompt`; equal losses and gradients: tests/test_prefix_sharing.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxopd import options, stages, tasks
from jaxopd.errors import ConfigError
from jaxopd.options import at_least, one_of, option, positive
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import dpo_loss, forward_kl, ipo_loss, tdpo_loss
from jaxopd.losses.common import responses
from jaxopd.models.heads import chunked_terms, label_logprob
from jaxopd.tasks import pairs

TASKS = ("reviews", "files")   # the tasks it trains on (jaxopd.tasks)


@dataclasses.dataclass(frozen=True)
class PairLoss:
  """A preference loss: ``fn(r, kl, beta, alpha) -> [B]`` per pair from the log-ratios ``r`` and
  sequential KLs ``kl`` (``[B, 2]``: chosen, rejected); ``kl``: whether it needs the KL (then it
  also enters the implicit reward ``beta (r + kl)``)."""
  fn: Callable
  kl: bool = False


# The preference losses by name: a new variant is one function and one entry.
PAIR_LOSSES = {
    "dpo": PairLoss(lambda r, kl, beta, alpha: dpo_loss(r[:, 0], r[:, 1], beta)),
    "ipo": PairLoss(lambda r, kl, beta, alpha: ipo_loss(r[:, 0], r[:, 1], beta)),
    "tdpo1": PairLoss(lambda r, kl, beta, alpha: tdpo_loss(r[:, 0], r[:, 1], kl[:, 0], kl[:, 1], beta, alpha, 1),
                      kl=True),
    "tdpo2": PairLoss(lambda r, kl, beta, alpha: tdpo_loss(r[:, 0], r[:, 1], kl[:, 0], kl[:, 1], beta, alpha, 2),
                      kl=True),
}
LOSSES = tuple(PAIR_LOSSES)


def pair_terms(models, rows, with_kl: bool, chunk: int):
  """Per-response sums over the responses of :class:`~jaxopd.losses.common.Responses` ``rows``:
  logratio R, policy log-prob, sequential KL K (``[B, 2]`` each), from the policy's and the
  frozen reference's hidden states in chunks of ``chunk`` positions (the LM heads inside the
  loop: no ``[N, T, V]`` logits; :mod:`jaxopd.models.heads`)."""
  def terms(z, targets):
    out = {"lp_pi": label_logprob(z["policy"], targets), "lp_ref": label_logprob(z["reference"], targets)}
    if with_kl:
      out["kl"] = forward_kl(z["reference"], z["policy"])      # KL(p_ref || p_pi) over the vocabulary
    return out
  t = chunked_terms({"policy": models["policy"], "reference": models["reference"]}, rows.tokens, terms, chunk,
                    frozen=("reference",), **rows.forward)
  logratio = rows.sums(t["lp_pi"] - t["lp_ref"])
  logps = rows.sums(t["lp_pi"])
  kl = rows.sums(t["kl"]) if with_kl else None
  return logratio, logps, kl


def make_loss_fn(loss: str, beta: float, alpha: float = 0.5, log_kl: bool = True, chunk: int = 128):
  """``loss_fn(models, batch, rng)`` for ``loss`` of :data:`PAIR_LOSSES`, on pair batches in
  either layout (:func:`jaxopd.losses.common.responses`: a row per response, or shared-prefix rows).

  ``log_kl``: a loss without the KL also computes it, detached, for the metrics.

  Metrics use TRL's names: ``rewards/chosen`` (``beta R(y_w)`` for DPO, ``beta (R + K)`` for TDPO
  as in the official code), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
  ``logps/chosen``, ``logps/rejected``; plus the sequential KL ``kl/chosen``, ``kl/rejected``,
  ``kl/margin`` (= K_l - K_w).
  """
  if loss not in PAIR_LOSSES:
    raise ValueError(f"config.method.loss={loss!r}: must be one of {LOSSES}")
  variant = PAIR_LOSSES[loss]

  def loss_fn(models, batch, rng):
    del rng
    rows = responses(batch)
    b = rows.mask.shape[0]
    r, lps, kl = pair_terms(models, rows, variant.kl or log_kl, chunk)
    if kl is not None and not variant.kl:
      kl = jax.lax.stop_gradient(kl)
    losses = variant.fn(r, kl, beta, alpha)
    reward = beta * jax.lax.stop_gradient(r + kl if variant.kl else r)
    metrics = {
        "rewards/chosen": jnp.sum(reward[:, 0]),
        "rewards/rejected": jnp.sum(reward[:, 1]),
        "rewards/margins": jnp.sum(reward[:, 0] - reward[:, 1]),
        "rewards/accuracies": jnp.sum((reward[:, 0] > reward[:, 1]).astype(jnp.float32)),
        "logps/chosen": jnp.sum(jax.lax.stop_gradient(lps[:, 0])),
        "logps/rejected": jnp.sum(jax.lax.stop_gradient(lps[:, 1])),
    }
    if kl is not None:
      k = jax.lax.stop_gradient(kl)
      metrics.update({"kl/chosen": jnp.sum(k[:, 0]), "kl/rejected": jnp.sum(k[:, 1]),
                      "kl/margin": jnp.sum(k[:, 1] - k[:, 0])})
    return LossOutput(jnp.sum(losses), jnp.float32(b), metrics)

  return loss_fn


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  loss: str = option(one_of(*LOSSES))
  beta: float = option(positive)
  alpha: float = option(at_least(0))   # tdpo2's weight of the KL margin
  chunk: int = option(at_least(0))
  log_kl: bool = option()              # a loss without the KL also logs it (detached)
  share_prompt: bool = option()        # one row per pair, the prompt encoded once
  swap: bool = option()                # train on rejected over chosen (the reverse-DPO stage)

  def __post_init__(self):
    if self.loss != "tdpo2" and self.alpha != 0.5:
      self.refuse("alpha", "only tdpo2 uses alpha")
    if PAIR_LOSSES[self.loss].kl and not self.log_kl:
      raise ConfigError(f"config.method.log_kl=False: {self.loss}'s loss is made of the sequential KL, so it is "
                        f"always computed and logged; the option is for the losses without it")


def _check(c) -> Options:
  m = Options.of(c.method)
  tasks.require(c, TASKS)
  e = c.eval      # the sampled evaluation of a built-in task's stages' architecture (files: checked on the roles)
  if tasks.has_stages(c) and e.prompt_len + e.max_new_tokens > c.model.max_len:
    raise ConfigError(f"config.eval.max_new_tokens={e.max_new_tokens}: prompt_len + max_new_tokens "
                      f"exceeds config.model.max_len={c.model.max_len}")
  return m


def prepare(config, workdir: str):
  """The stages ``config.pipeline`` declares (data, SFT base, pairs; each cached), none with
  ``task=files`` (every role then needs an ``hf:DIR`` or ``run:WORKDIR`` init)."""
  del workdir
  _check(config)
  return stages.prepare(config)


def build(config) -> Experiment:
  m = _check(config)
  train_recs, test_recs, evaluate = pairs.pair_data(config)
  if m.swap:
    train_recs, test_recs = pairs.swapped(train_recs), (pairs.swapped(test_recs) if test_recs else test_recs)
  loss_fn = make_loss_fn(m.loss, m.beta, m.alpha, m.log_kl, m.chunk)
  train_data, eval_data = pairs.pair_batches(train_recs, test_recs, m.share_prompt)
  return Experiment(roles={"policy": True, "reference": False}, loss_fn=loss_fn, train_data=train_data,
                    eval_data=eval_data, evaluate=evaluate)


def report(config, workdir: str, summary: dict):
  """The before/after table of the sampled evaluation; summary.json (:func:`jaxopd.tasks.pairs.report`)."""
  pairs.report(config, workdir, summary, config.method.loss)
