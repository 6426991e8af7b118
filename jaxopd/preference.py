"""The preference step shared by DPO, TDPO (and SparsePO): run policy and frozen
reference on chosen and rejected sequences, then the pure losses.

Batch: ``tokens[B, 2, T]``, ``loss_mask[B, 2, T]`` (pair axis: 0 = chosen,
1 = rejected). The pair axis is folded into the batch for one forward per
model; the reference's logits are detached where they are produced.

Metrics use TRL's names: ``rewards/chosen`` (``beta R(y_w)`` for DPO, ``beta (R
+ K)`` for TDPO as in the official code), ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``; plus the sequential KL ``kl/chosen``, ``kl/rejected``,
``kl/margin`` (= K_l - K_w).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopd.experiment import LossOutput
from jaxopd.losses import dpo_loss, forward_kl_per_token, response_mask, tdpo_loss, token_logprobs

LOSSES = ("dpo", "tdpo1", "tdpo2")


def pair_terms(policy_logits, ref_logits, tokens, loss_mask, with_kl: bool, kl_chunk: int):
  """Per-sequence sums over the response: logratio R, policy log-prob, sequential KL K. ``[N] each``."""
  m = response_mask(loss_mask)
  lp_pi = token_logprobs(policy_logits, tokens)
  lp_ref = token_logprobs(ref_logits, tokens)
  logratio = jnp.sum(m * (lp_pi - lp_ref), axis=-1)
  logps = jnp.sum(m * lp_pi, axis=-1)
  kl = jnp.sum(m * forward_kl_per_token(ref_logits, policy_logits, kl_chunk), axis=-1) if with_kl else None
  return logratio, logps, kl


def make_loss_fn(loss: str, beta: float, alpha: float = 0.5, log_kl: bool = True, kl_chunk: int = 128):
  """``loss_fn(params, frozen, batch, rng)`` for ``loss`` in ``dpo | tdpo1 | tdpo2``.

  ``log_kl``: DPO also computes the sequential KL, detached, for the metrics
  (TDPO needs it for the loss anyway).
  """
  if loss not in LOSSES:
    raise ValueError(f"config.method.loss={loss!r}: must be one of {LOSSES}")

  def loss_fn(params, frozen, batch, rng):
    del rng
    tokens, mask = batch["tokens"], batch["loss_mask"]
    b, _, t = tokens.shape
    flat, flat_mask = tokens.reshape(b * 2, t), mask.reshape(b * 2, t)
    pi_logits = params["policy"](flat).logits
    ref_logits = jax.lax.stop_gradient(frozen["reference"](flat).logits)
    tdpo = loss != "dpo"
    logratio, logps, kl = pair_terms(pi_logits, ref_logits, flat, flat_mask, tdpo or log_kl, kl_chunk)
    if kl is not None and not tdpo:
      kl = jax.lax.stop_gradient(kl)
    r = logratio.reshape(b, 2)
    lps = logps.reshape(b, 2)
    if tdpo:
      k = kl.reshape(b, 2)
      losses = tdpo_loss(r[:, 0], r[:, 1], k[:, 0], k[:, 1], beta, alpha, variant=int(loss[-1]))
      reward = beta * jax.lax.stop_gradient(r + k)
    else:
      losses = dpo_loss(r[:, 0], r[:, 1], beta)
      reward = beta * jax.lax.stop_gradient(r)
    metrics = {
        "rewards/chosen": jnp.sum(reward[:, 0]),
        "rewards/rejected": jnp.sum(reward[:, 1]),
        "rewards/margins": jnp.sum(reward[:, 0] - reward[:, 1]),
        "rewards/accuracies": jnp.sum((reward[:, 0] > reward[:, 1]).astype(jnp.float32)),
        "logps/chosen": jnp.sum(jax.lax.stop_gradient(lps[:, 0])),
        "logps/rejected": jnp.sum(jax.lax.stop_gradient(lps[:, 1])),
    }
    if kl is not None:
      k = jax.lax.stop_gradient(kl.reshape(b, 2))
      metrics.update({"kl/chosen": jnp.sum(k[:, 0]), "kl/rejected": jnp.sum(k[:, 1]),
                      "kl/margin": jnp.sum(k[:, 1] - k[:, 0])})
    return LossOutput(jnp.sum(losses), jnp.float32(b), metrics)

  return loss_fn
