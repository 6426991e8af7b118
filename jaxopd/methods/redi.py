"""REDI (Xu et al., 2025): reinforcement distillation from positive and negative traces,
reference-free. Config: experiments/redi.py; loss: :func:`jaxopd.losses.redi_loss`.

Per pair of a positive trace ``y+`` (the chosen side) and a negative one ``y-``
(the rejected side) for the same prompt:
``loss = -log pi(y+) / |y+| + alpha log pi(y-) / |y-|`` (``alpha = 0.8`` the
paper's asymmetric weighting, ``1`` the symmetric case, ``0`` SFT on the
positives), averaged over pairs.

Roles: ``policy`` (trained); ``reference`` (frozen: the starting model) only for
the metric ``logps/chosen_change`` and the sampled evaluation's KL; the loss
never uses it, and ``--config.models.reference.init=none`` drops it (no
forward, no memory).

Data: the preference pipeline's pairs (:func:`jaxopd.methods.tdpo.pair_data`: the
reviews pairs, best vs worst of the SFT model's samples by gold reward, or your
pair files). Not yet here: REDI's own stage-1 data, a stronger teacher's traces
labelled by a verifiable rule, and stage-1 SFT on their positives; the policy
starts from the SFT base.

Metrics: ``logps/chosen_norm``, ``logps/rejected_norm`` (length-normalised
log-likelihoods), ``logps/margin_norm`` (their difference), ``logps/chosen_change``
(the positives' length-normalised log-likelihood minus the reference's: REDI's
point is that it must not collapse), ``rewards/accuracies`` (pairs whose
normalised positive log-likelihood is the larger).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopd.errors import ConfigError
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import redi_loss, response_mask, token_logprobs
from jaxopd.methods import tdpo
from jaxopd.models import table


def make_loss_fn(alpha: float, with_reference: bool):
  """``loss_fn(models, batch, rng)`` on pair batches ``tokens[B, 2, T]`` (0 = positive, 1 = negative)."""
  def loss_fn(models, batch, rng):
    del rng
    tokens, mask = batch["tokens"], batch["loss_mask"]
    b, _, t = tokens.shape
    flat, m = tokens.reshape(b * 2, t), response_mask(mask.reshape(b * 2, t))
    n = jnp.sum(m, axis=-1).reshape(b, 2)
    lp = jnp.sum(m * token_logprobs(models["policy"](flat).logits, flat), axis=-1).reshape(b, 2)
    losses = redi_loss(lp[:, 0], n[:, 0], lp[:, 1], n[:, 1], alpha)
    norm = jax.lax.stop_gradient(lp / jnp.maximum(n, 1.0))
    metrics = {"logps/chosen_norm": jnp.sum(norm[:, 0]), "logps/rejected_norm": jnp.sum(norm[:, 1]),
               "logps/margin_norm": jnp.sum(norm[:, 0] - norm[:, 1]),
               "rewards/accuracies": jnp.sum((norm[:, 0] > norm[:, 1]).astype(jnp.float32))}
    if with_reference:
      pos, pos_m = tokens[:, 0], m.reshape(b, 2, t - 1)[:, 0]
      ref = jnp.sum(pos_m * token_logprobs(models["reference"](pos).logits, pos), axis=-1)
      metrics["logps/chosen_change"] = jnp.sum(norm[:, 0] - jax.lax.stop_gradient(ref) / jnp.maximum(n[:, 0], 1.0))
    return LossOutput(jnp.sum(losses), jnp.float32(b), metrics)
  return loss_fn


def _check(c):
  if c.method.alpha < 0:
    raise ConfigError(f"config.method.alpha={c.method.alpha}: must be >= 0")
  if c.data.task not in ("reviews", "files"):
    raise ConfigError(f"config.data.task={c.data.task!r}: must be reviews or files")


def prepare(config, workdir: str):
  """TDPO's cached stages: data, SFT base, pairs (none with ``task=files``)."""
  del workdir
  _check(config)
  return tdpo.prepare_pairs(config)


def build(config) -> Experiment:
  _check(config)
  train_recs, test_recs, evaluate = tdpo.pair_data(config)
  with_ref = table.built(config, "reference")
  train_data, eval_data = tdpo.pair_batches(train_recs, test_recs)
  return Experiment(roles={"policy": True, **({"reference": False} if with_ref else {})},
                    loss_fn=make_loss_fn(float(config.method.alpha), with_ref), train_data=train_data,
                    eval_data=eval_data, evaluate=evaluate)
