"""AlignDistil (Zhang et al., ACL 2025): alignment as adaptive token-level distillation.

Pure per-token math on logits ``[..., V]`` (the AlignDistil paper; the
official OpenRLHF trainers ``aligndistil_trainer.py`` / ``aligndistil_offpolicy_trainer.py``).
The per-token loss (:func:`token_terms`) is ``c KL(q || softmax(z* / T))`` with
``q = softmax(z_pi / T)`` (reverse KL over the whole vocabulary, float32), toward a teacher
``z*`` with coefficient ``c`` built per variant from the DPO, reverse-DPO and reference
models' logits (:func:`teacher`); ``z*`` and ``c`` carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopd.losses.divergences import _kl

VARIANTS = ("adaptive", "contrast", "theorem1", "gkd")
NEEDS = {"adaptive": ("dpo", "rdpo"), "contrast": ("dpo", "rdpo"), "theorem1": ("dpo",), "gkd": ("dpo",)}
FLOOR = 1e-3          # the official code's floor of the adaptive weight


def teacher(variant: str, z_dpo, z_rdpo, z_ref, beta0: float, beta2: float):
  """``(z* [..., V], c [...])`` float32, both without gradient. ``z_rdpo`` is unused by
  ``theorem1`` / ``gkd`` and ``z_ref`` by all but ``theorem1`` (pass None).

  ``z_dpo``: a DPO model's logits, ``z_rdpo``: a reverse DPO model's (trained with chosen and
  rejected swapped), ``z_ref``: the SFT reference's; ``beta0`` the DPO reward scale, ``beta2`` the boost:

  * ``theorem1``: ``z* = w z_dpo + (1 - w) z_ref``, ``w = beta0 / beta2``, ``c = beta2``;
  * ``contrast``: ``z* = z_dpo + w (z_dpo - z_rdpo)``, ``w = beta0 / beta2``, ``c = beta2``;
  * ``adaptive`` (AlignDistil): ``d = sum_v |p_dpo(v) - p_rdpo(v)|`` (in [0, 2], no 1/2),
    ``w = beta2 d + 1e-3``, ``z* = z_dpo + w (z_dpo - z_rdpo)``, ``c = beta0 / w``; ``c`` is not
    clipped (the official code's choice): where the two DPO models agree it reaches ``beta0 / 1e-3``;
  * ``gkd``: ``z* = z_dpo``, ``c = 1`` (reverse-KL distillation into the DPO model).
  """
  if variant not in VARIANTS:
    raise ValueError(f"config.method.variant={variant!r}: must be one of {VARIANTS}")
  f32 = lambda z: jax.lax.stop_gradient(z.astype(jnp.float32))
  zd = f32(z_dpo)
  if variant == "gkd":
    return zd, jnp.ones(zd.shape[:-1], jnp.float32)
  if variant == "theorem1":
    w = beta0 / beta2
    return w * zd + (1.0 - w) * f32(z_ref), jnp.full(zd.shape[:-1], beta2, jnp.float32)
  zr = f32(z_rdpo)
  if variant == "contrast":
    return zd + (beta0 / beta2) * (zd - zr), jnp.full(zd.shape[:-1], beta2, jnp.float32)
  d = jnp.sum(jnp.abs(jax.nn.softmax(zd, axis=-1) - jax.nn.softmax(zr, axis=-1)), axis=-1)
  w = beta2 * d + FLOOR
  return zd + w[..., None] * (zd - zr), beta0 / w


def token_terms(variant: str, z_pi, z_ref, z_dpo, z_rdpo, targets, beta0: float, beta2: float,
                temperature: float = 1.0) -> dict:
  """Per-position terms ``[...]`` (float32) at positions whose next token is ``targets [...]``:

  * ``loss``: ``c KL(q || softmax(z* / T))`` (gradient into ``z_pi`` only);
  * ``kl_teacher``: ``KL(q || softmax(z* / T))``; ``kl_reference``: ``KL(q || p_ref)``;
  * ``coef``: ``c``;
  * ``reward_token``: the DPO token reward ``beta0 (lp_dpo - lp_ref)`` of the target token,
    and ``reward_expected`` its expectation under ``q`` (both detached).
  """
  zs, c = teacher(variant, z_dpo, z_rdpo, z_ref, beta0, beta2)
  lq = jax.nn.log_softmax(z_pi.astype(jnp.float32) / temperature, axis=-1)
  kl = _kl(lq, jax.nn.log_softmax(zs / temperature, axis=-1))
  lq_sg = jax.lax.stop_gradient(jax.nn.log_softmax(z_pi.astype(jnp.float32), axis=-1))
  l_ref = jax.nn.log_softmax(jax.lax.stop_gradient(z_ref.astype(jnp.float32)), axis=-1)
  l_dpo = jax.nn.log_softmax(jax.lax.stop_gradient(z_dpo.astype(jnp.float32)), axis=-1)
  r = beta0 * (l_dpo - l_ref)                                           # [..., V]
  return {"loss": c * kl, "kl_teacher": jax.lax.stop_gradient(kl), "kl_reference": _kl(lq_sg, l_ref),
          "coef": c, "reward_token": jnp.take_along_axis(r, targets[..., None], axis=-1)[..., 0],
          "reward_expected": jnp.sum(jnp.exp(lq_sg) * r, axis=-1)}


def sequence_loss(token_loss, mask, len_norm: bool = True):
  """``[B]``: ``sum_t m_t loss_t`` per sequence, divided by ``sum_t m_t`` when ``len_norm``
  (the official scripts' ``--reward_len_norm``); the batch loss is its mean over sequences."""
  m = mask.astype(jnp.float32)
  s = jnp.sum(m * token_loss, axis=-1)
  return s / jnp.maximum(jnp.sum(m, axis=-1), 1.0) if len_norm else s
