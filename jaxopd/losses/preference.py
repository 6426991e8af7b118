"""Preference losses: DPO and TDPO (token-level DPO), pure functions on arrays.

Math: the DPO, TDPO, SimPO and REDI papers. Sequences of a pair are scored with the same helpers as SFT
(``token_logprobs`` / ``response_mask``: position t scores token t+1).

TDPO follows the official code (Vance0124/Token-level-Direct-Preference-
Optimization, ``tdpo_loss``): the sequential KL is the sum over response
positions of ``KL(p_ref || p_pi)`` over the whole vocabulary, and TDPO2 puts
``alpha`` on the KL margin with the chosen side's KL detached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopd.losses.common import map_chunks, response_mask, token_logprobs


def sequence_logps(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Summed log-probability of the masked tokens: ``[B, T, V], [B, T], [B, T] -> [B]``."""
  return jnp.sum(token_logprobs(logits, tokens) * response_mask(loss_mask), axis=-1)


def forward_kl_per_token(ref_logits: jax.Array, pi_logits: jax.Array, chunk: int = 128) -> jax.Array:
  """``k_t = sum_v p_ref(v|s_t) (log p_ref(v|s_t) - log p_pi(v|s_t))`` for t < T-1: ``[B, T, V] x2 -> [B, T-1]``.

  Computed over chunks of ``chunk`` positions with rematerialisation, so at
  most one chunk of both models' float32 log-softmax is alive in the forward
  pass and in the backward pass (the logits themselves are the inputs).
  """
  def one(xs):                        # [B, chunk, V] x2 -> [B, chunk]
    lr = jax.nn.log_softmax(xs[0].astype(jnp.float32), axis=-1)
    lp = jax.nn.log_softmax(xs[1].astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lr) * (lr - lp), axis=-1)

  return map_chunks(one, (ref_logits[:, :-1], pi_logits[:, :-1]), chunk)


def dpo_loss(chosen_logratio: jax.Array, rejected_logratio: jax.Array, beta: float) -> jax.Array:
  """``-log sigmoid(beta (R_w - R_l))`` per pair; ``R = log pi(y) - log ref(y)`` summed over the response."""
  return -jax.nn.log_sigmoid(beta * (chosen_logratio - rejected_logratio))


def ipo_loss(chosen_logratio: jax.Array, rejected_logratio: jax.Array, beta: float) -> jax.Array:
  """IPO (Azar et al. 2023): ``(R_w - R_l - 1 / (2 beta))^2`` per pair, ``R`` summed over the
  response as in the paper (TRL's ``loss_type="ipo"`` averages the log-probs per token instead)."""
  return jnp.square(chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta))


def tdpo_loss(chosen_logratio: jax.Array, rejected_logratio: jax.Array, chosen_kl: jax.Array,
              rejected_kl: jax.Array, beta: float, alpha: float = 0.5, variant: int = 2) -> jax.Array:
  """Per-pair TDPO loss.

  TDPO1: ``z = (R_w - R_l) - (K_l - K_w)``;
  TDPO2: ``z = (R_w - R_l) - alpha (K_l - sg(K_w))``; loss ``-log sigmoid(beta z)``.
  ``K`` is the sequential forward KL ``sum_t m_t KL(p_ref || p_pi)``.
  """
  margin = chosen_logratio - rejected_logratio
  if variant == 1:
    z = margin - (rejected_kl - chosen_kl)
  elif variant == 2:
    z = margin - alpha * (rejected_kl - jax.lax.stop_gradient(chosen_kl))
  else:
    raise ValueError(f"TDPO variant={variant}: must be 1 or 2")
  return -jax.nn.log_sigmoid(beta * z)


def simpo_loss(logp_pos: jax.Array, len_pos: jax.Array, logp_neg: jax.Array, len_neg: jax.Array,
               beta: float = 2.0, gamma: float = 1.0) -> jax.Array:
  """Per-pair SimPO loss (Meng et al. 2024; reference-free), as REDI's baseline and TRL's CPO
  trainer: ``-log sigmoid(beta (log pi(y+) / |y+| - log pi(y-) / |y-|) - gamma)``."""
  margin = logp_pos / jnp.maximum(len_pos, 1.0) - logp_neg / jnp.maximum(len_neg, 1.0)
  return -jax.nn.log_sigmoid(beta * margin - gamma)


def redi_loss(logp_pos: jax.Array, len_pos: jax.Array, logp_neg: jax.Array, len_neg: jax.Array,
              alpha: float = 0.8) -> jax.Array:
  """Per-pair REDI loss (Xu et al. 2025; reference-free): ``-log pi(y+) / |y+| + alpha log pi(y-) / |y-|``,
  ``log pi(y)`` summed over the response, ``|y|`` its token count (at least 1)."""
  return -logp_pos / jnp.maximum(len_pos, 1.0) + alpha * logp_neg / jnp.maximum(len_neg, 1.0)
