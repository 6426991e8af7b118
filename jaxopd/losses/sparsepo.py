"""SparsePO (Christopoulou et al., Findings EMNLP 2025): per-token weights on the
reward and KL terms of a TDPO1-style objective, pure functions on arrays.

Math: the SparsePO paper. Every ``[N, T-1]`` array is aligned with
:func:`~jaxopd.losses.common.token_logprobs`: entry t belongs to the target
``tokens[:, t+1]``, with mask ``response_mask(loss_mask)[:, t]``. The token
weights ``w_u``, ``w_d`` use the same layout, so ``w[:, t]`` multiplies the
log-ratio and the KL of token t+1. In the official code (huawei-noah/HEBO,
SparsePO) the weight of token t+1 is computed from the reference model's
states at position t (``reference_states[:, :-1]``), the states that score it;
:mod:`jaxopd.methods.sparsepo` does the same. Signs: :func:`sequence_terms`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_terms(lp_pi: jax.Array, lp_ref: jax.Array, token_kl: jax.Array, m: jax.Array,
                   w_u: jax.Array, w_d: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``U = sum_t m w_u (lp_pi - lp_ref)`` and ``D = -sum_t m w_d k_t``: ``[N, T-1]`` each -> ``[N]``, ``[N]``.

  ``lp_*`` are target log-probs (``token_logprobs``), ``token_kl`` the per-token
  forward ``KL(p_ref || p_pi)`` (``forward_kl_per_token``), ``m`` the response mask.
  Signs follow the official code: ``D(y) = sum_t m_t w_d,t sum_v p_ref (lp_pi - lp_ref)`` is minus
  the weighted forward KL, and the logit (:func:`sparsepo_loss`) is ``(U_w - U_l) - (D_w - D_l)``;
  with all-ones weights it is TDPO1's ``(R_w - R_l) - (K_l - K_w)``.
  """
  u = jnp.sum(m * w_u * (lp_pi - lp_ref), axis=-1)
  d = -jnp.sum(m * w_d * token_kl, axis=-1)
  return u, d


def sparsepo_loss(chosen_u: jax.Array, rejected_u: jax.Array, chosen_d: jax.Array, rejected_d: jax.Array,
                  beta: float) -> jax.Array:
  """``-log sigmoid(beta ((U_w - U_l) - (D_w - D_l)))`` per pair (without the L1 terms)."""
  return -jax.nn.log_sigmoid(beta * ((chosen_u - rejected_u) - (chosen_d - rejected_d)))


def mask_l1(w: jax.Array, m: jax.Array) -> jax.Array:
  """``|w m|_1`` per sequence: ``[N, T-1] -> [N]``."""
  return jnp.sum(jnp.abs(w * m), axis=-1)


def l1_penalty(w_u_pair: jax.Array, w_d_pair: jax.Array, m_pair: jax.Array, lambda_u: float, lambda_d: float,
               shared: bool) -> jax.Array:
  """``lambda_u (|w_u m|_1 chosen + rejected) + lambda_d (same for w_d)`` per pair; arrays ``[B, 2, T-1]``.

  With one shared mask both coefficients are halved (the official code does
  this so that the shared mask is not penalised twice).
  """
  scale = 0.5 if shared else 1.0
  pen_u = jnp.sum(mask_l1(w_u_pair, m_pair), axis=-1)
  pen_d = jnp.sum(mask_l1(w_d_pair, m_pair), axis=-1)
  return scale * (lambda_u * pen_u + lambda_d * pen_d)


def znorm_minmax(x: jax.Array, m: jax.Array) -> jax.Array:
  """Per-sequence z-normalisation over the valid tokens, then min-max to [0, 1]: ``[N, T-1] -> [N, T-1]``.

  As in the official ``zn_rescale`` mapping, the result is 0 off the response. Guard: a sequence whose valid values are all equal
  (``max == min``, e.g. constant activations or one valid token) gets weight 1
  on every valid token, the TDPO weight, instead of the official code's 0/0.
  The standard deviation is the population one (the official ``torch.std`` is
  unbiased); z-normalisation is affine, so after min-max it changes nothing
  but the numerical range.
  """
  x = x.astype(jnp.float32)
  m = m.astype(jnp.float32)
  valid = m > 0
  n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
  mean = jnp.sum(x * m, axis=-1, keepdims=True) / n
  var = jnp.sum(jnp.square(x - mean) * m, axis=-1, keepdims=True) / n
  z = (x - mean) / (jnp.sqrt(var) + 1e-12)
  lo = jnp.min(jnp.where(valid, z, jnp.inf), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1, keepdims=True)
  span = hi - lo
  flat = ~(span > 0)                                        # also true with no valid token (inf - inf)
  scaled = (z - jnp.where(flat, 0.0, lo)) / jnp.where(flat, 1.0, span)
  return jnp.where(valid, jnp.where(flat, 1.0, scaled), 0.0)


def activation_mask(activations: dict, m: jax.Array) -> jax.Array:
  """The MaPO mask: ``{type: [arrays [N, T-1, ...]]}`` -> weights ``[N, T-1]`` in [0, 1], detached.

  Each activation is averaged over its trailing (hidden) dimensions, mapped by
  :func:`znorm_minmax` over the valid tokens of its sequence, averaged over the
  layers of its type, then over types (as the official ``MAPOTrainer``).
  """
  per_type = []
  for name in sorted(activations):
    layers = activations[name]
    if not layers:
      raise ValueError(f"activation_mask: no activations of type {name!r}")
    maps = [znorm_minmax(jnp.mean(a.astype(jnp.float32).reshape(a.shape[:2] + (-1,)), axis=-1), m)
            for a in layers]
    per_type.append(jnp.mean(jnp.stack(maps), axis=0))
  if not per_type:
    raise ValueError("activation_mask: no activation types")
  return jax.lax.stop_gradient(jnp.mean(jnp.stack(per_type), axis=0))
