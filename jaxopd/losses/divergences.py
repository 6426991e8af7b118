"""Token-level divergences between a teacher/target ``p`` and a student/draft ``q``.

Both come as logits ``[..., V]``; every divergence is computed per position in
float32 from log-softmaxes (never ``log(softmax)``), after dividing the logits
by ``temperature``. Conventions (GKD / TRL):

* ``forward_kl = KL(p || q)``, ``reverse_kl = KL(q || p)``;
* ``jsd(beta)``: ``M = beta p + (1 - beta) q`` (logsumexp in log space),
  ``beta KL(p || M) + (1 - beta) KL(q || M)``, with the endpoints defined as
  ``beta = 0 -> KL(p || q)`` and ``beta = 1 -> KL(q || p)`` exactly;
* ``tvd = 0.5 sum |p - q|``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def _logps(p_logits, q_logits, temperature):
  lp = jax.nn.log_softmax(p_logits.astype(jnp.float32) / temperature, axis=-1)
  lq = jax.nn.log_softmax(q_logits.astype(jnp.float32) / temperature, axis=-1)
  return lp, lq


def _kl(la, lb):
  """KL(a || b) from log-probabilities; terms with a == 0 contribute 0, and their gradient is 0
  too: the difference is masked before it is multiplied by ``a``, so a -inf logit of both (a
  padded vocabulary) gives no ``0 * inf = nan`` in the backward pass."""
  a = jnp.exp(la)
  return jnp.sum(a * jnp.where(a > 0, la - lb, 0.0), axis=-1)


def forward_kl(p_logits, q_logits, temperature: float = 1.0):
  lp, lq = _logps(p_logits, q_logits, temperature)
  return _kl(lp, lq)


def reverse_kl(p_logits, q_logits, temperature: float = 1.0):
  lp, lq = _logps(p_logits, q_logits, temperature)
  return _kl(lq, lp)


def jsd(p_logits, q_logits, beta: float = 0.5, temperature: float = 1.0):
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"jsd beta={beta}: must be in [0, 1]")
  lp, lq = _logps(p_logits, q_logits, temperature)
  if beta == 0.0:
    return _kl(lp, lq)
  if beta == 1.0:
    return _kl(lq, lp)
  dead = jnp.isneginf(lp) & jnp.isneginf(lq)     # an entry neither has (a padded vocabulary): M is 0 there
  lm = jnp.where(dead, -jnp.inf, jnp.logaddexp(jnp.where(dead, 0.0, lp + jnp.log(beta)),
                                               jnp.where(dead, 0.0, lq + jnp.log1p(-beta))))
  return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)


def tvd(p_logits, q_logits, temperature: float = 1.0):
  lp, lq = _logps(p_logits, q_logits, temperature)
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(lp) - jnp.exp(lq)), axis=-1)


def divergence(name: str, p_logits, q_logits, *, beta: float = 0.5, temperature: float = 1.0):
  """Per-position divergence by name: ``fkl``, ``rkl``, ``jsd`` (with ``beta``), ``tvd``."""
  if name == "fkl":
    return forward_kl(p_logits, q_logits, temperature)
  if name == "rkl":
    return reverse_kl(p_logits, q_logits, temperature)
  if name == "jsd":
    return jsd(p_logits, q_logits, beta, temperature)
  if name == "tvd":
    return tvd(p_logits, q_logits, temperature)
  raise ValueError(f"divergence={name!r}: must be one of {DIVERGENCES}")


def token_divergence_loss(name: str, p_logits, q_logits, tokens_mask, *, beta: float = 0.5,
                          temperature: float = 1.0):
  """``(sum_{b,t} m D_t, sum m)``: a sum and its token count, so the trainer's
  global division gives ``sum m D / sum m`` over the *global* batch.

  ``p_logits, q_logits: [B, T, V]`` at the positions that predict the masked
  tokens; ``tokens_mask: [B, T]``.
  """
  d = divergence(name, p_logits, q_logits, beta=beta, temperature=temperature)
  m = tokens_mask.astype(jnp.float32)
  return jnp.sum(d * m), jnp.sum(m)
