"""GRPO with DAPO's and ProRL's controls, and the on-policy distillation term (GRPO, DAPO,
ProRL and VLA-OPD's papers).

Pure math on plain arrays. Per prompt, G responses are scored ``r [N, G]``;
:func:`group_advantages` turns them into one advantage per response, broadcast
to its tokens. :func:`policy_loss` takes per-token log-probs of the sampled
tokens ``[B, T]`` (current policy ``lp``, rollout-time policy ``lp_old``,
reference ``lp_ref``), the mask of response tokens and ``adv [B]``, and returns a *sum*
and its count, as every loss in jaxopd (the trainer divides the global sums).
:func:`distill_per_token` is the teacher term of on-policy distillation on the student's
own samples; RPD adds it to GRPO weighted by :func:`distill_weight`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxopd.losses.divergences import _kl

ADVANTAGES = ("grpo", "dr_grpo")
RATIO_LEVELS = ("token", "sequence")
CORRECTIONS = ("none", "tis", "mis")     # of a sampler whose log-probs differ from the trainer's
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")
DISTILL = ("reverse_kl", "forward_kl", "hard_ce")
SCHEDULES = ("constant", "cosine")


def group_advantages(rewards: jax.Array, kind: str = "grpo", eps: float = 1e-6) -> jax.Array:
  """``rewards [N, G] -> [N, G]``: ``(r - mean) / (std + eps)`` (``grpo``, unbiased std) or
  ``r - mean`` (``dr_grpo``); 0 for a group whose rewards are all equal."""
  if kind not in ADVANTAGES:
    raise ValueError(f"config.method.advantage={kind!r}: must be one of {ADVANTAGES}")
  r = rewards.astype(jnp.float32)
  # Exactly 0 for a group of equal rewards: float32's mean of eight 0.7s misses 0.7 by ~6e-8,
  # which over (std ~6e-8) + eps would be an advantage of ~0.06 (TRL and verl have it).
  centred = jnp.where(kept_groups(r)[..., None], r - jnp.mean(r, axis=-1, keepdims=True), 0.0)
  if kind == "dr_grpo":
    return centred
  return centred / (group_std(r)[..., None] + eps)


def group_std(rewards: jax.Array) -> jax.Array:
  """``[N, G] -> [N]``: each group's unbiased std (torch's ``std``, ``ddof = 1``, as in TRL and verl;
  0 for equal rewards)."""
  r = rewards.astype(jnp.float32)
  centred = jnp.where(kept_groups(r)[..., None], r - jnp.mean(r, axis=-1, keepdims=True), 0.0)
  return jnp.sqrt(jnp.sum(centred ** 2, axis=-1) / max(r.shape[-1] - 1, 1))


def kept_groups(rewards: jax.Array) -> jax.Array:
  """``[N, G] -> bool [N]``: the groups whose rewards are not all equal (they carry a signal)."""
  return jnp.max(rewards, axis=-1) > jnp.min(rewards, axis=-1)


def kl_estimate(lp: jax.Array, lp_ref: jax.Array, kind: str = "k3") -> jax.Array:
  """Per-token estimators of ``KL(pi || ref)`` on tokens sampled from pi, ``u = lp_ref - lp``:
  ``k1 = -u``, ``k2 = u^2 / 2``, ``k3 = exp(u) - u - 1`` (non-negative, unbiased)."""
  u = lp_ref - lp
  if kind == "k1":
    return -u
  if kind == "k2":
    return 0.5 * u * u
  if kind == "k3":
    return jnp.expm1(u) - u
  raise ValueError(f"config.method.kl={kind!r}: must be one of {KL_ESTIMATORS}")


def aggregate(values: jax.Array, m: jax.Array, mode: str, max_len: int, rows: jax.Array):
  """``(sum, count)`` of per-token ``values [B, T]`` under mask ``m`` (row weights applied) in
  aggregation ``mode``; ``rows [B]``: the row weights (for ``dr_grpo``'s sequence count):

  * ``token_mean`` (DAPO, the default): ``sum m l / sum m``;
  * ``seq_mean_token_mean`` (the original GRPO): the mean over sequences of each sequence's token mean;
  * ``dr_grpo`` (Dr. GRPO): ``sum m l / (sequences x max_len)``, a constant normaliser, so long and
    short responses weigh by their tokens.
  """
  if mode == "token_mean":
    return jnp.sum(values * m), jnp.sum(m)
  if mode == "seq_mean_token_mean":
    n = jnp.sum(m, axis=-1)
    has = n > 0
    return jnp.sum(jnp.where(has, jnp.sum(values * m, axis=-1) / jnp.maximum(n, 1.0), 0.0)), \
        jnp.sum(has.astype(jnp.float32))
  if mode == "dr_grpo":
    return jnp.sum(values * m), jnp.sum((rows > 0).astype(jnp.float32)) * float(max_len)
  raise ValueError(f"config.method.aggregation={mode!r}: must be one of {AGGREGATIONS}")


def rollout_correction(lp_old, lp_rollout, mask, kind: str, cap: float):
  """The correction of a sampler whose log-probs ``lp_rollout`` differ from the trainer's ``lp_old``
  (a bf16 sampler, an inference engine), and the mismatch metrics, over the response tokens
  ``mask``. ``kind``: ``none``; ``tis`` (token-level truncated importance sampling: each token's
  policy-gradient term weighted by ``min(exp(lp_old - lp_rollout), cap)``); ``mis`` (sequence-level
  masking: a response whose geometric-mean ratio ``exp(mean_t (lp_old - lp_rollout))`` lies outside
  ``[1/cap, cap]`` leaves the loss, numerator and count). Returns ``(token weight [R, N], row keep
  [R], metrics)``; metrics (``(sum, count)``): ``rollout/logp_diff`` (mean ``|lp_old - lp_rollout|``
  per token), ``rollout/logp_diff_seqmax`` (its max within a response, averaged over responses),
  ``rollout/kl`` (``KL(sampler || trainer)`` per response, from the sampler's own samples:
  ``sum_t (lp_rollout - lp_old)``), and ``rollout/tis_truncated`` or ``rollout/mis_masked``."""
  if kind not in CORRECTIONS:
    raise ValueError(f"config.method.rollout_correction={kind!r}: must be one of {CORRECTIONS}")
  m = mask.astype(jnp.float32)
  d = jax.lax.stop_gradient(lp_old.astype(jnp.float32) - lp_rollout.astype(jnp.float32))
  n = jnp.sum(m)
  rows = jnp.float32(m.shape[0])
  lengths = jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  metrics = {"rollout/logp_diff": (jnp.sum(jnp.abs(d) * m), n),
             "rollout/logp_diff_seqmax": (jnp.sum(jnp.max(jnp.abs(d) * m, axis=-1)), rows),
             "rollout/kl": (jnp.sum(-d * m), rows)}
  weight, keep = jnp.ones_like(m), jnp.ones(m.shape[:1], jnp.float32)
  if kind == "tis":
    weight = jnp.minimum(jnp.exp(d), cap)
    metrics["rollout/tis_truncated"] = (jnp.sum((jnp.exp(d) > cap) * m), n)
  elif kind == "mis":
    keep = (jnp.abs(jnp.sum(d * m, axis=-1) / lengths) <= jnp.log(cap)).astype(jnp.float32)
    metrics["rollout/mis_masked"] = (jnp.sum(1.0 - keep), rows)
  return weight, keep, metrics


def policy_loss(lp, lp_old, adv, mask, eps_low: float, eps_high: float, beta_kl: float = 0.0, lp_ref=None,
                kl: str = "k3", aggregation: str = "token_mean", max_len: int | None = None, row_weight=None,
                ratio_level: str = "token", token_weight=None):
  """``(loss_sum, count, metrics)`` of the clipped surrogate plus ``beta_kl`` times the KL
  estimator, per token ``l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta_kl k_t``
  with ``rho_t = exp(lp_t - lp_old_t)`` and ``k_t`` from :func:`kl_estimate`, reduced by :func:`aggregate`;
  ``metrics``: name -> ``(sum, count)`` token means over the kept tokens. The clip fractions follow
  TRL: ``clip_ratio/low`` counts tokens with ``A < 0`` and ``rho < 1 - eps_low`` (the clipped branch
  is the min there), ``high`` those with ``A > 0`` and ``rho > 1 + eps_high``.
  ``ratio_level="sequence"`` (GSPO; TRL's ``importance_sampling_level="sequence"``): every token
  of a response takes its sequence's ratio ``exp(mean_t (lp_t - lp_old_t))``, clipped as one.
  ``token_weight [R, N]`` (no gradient): multiplies each token's surrogate term (TIS,
  :func:`rollout_correction`); a zero ``row_weight`` drops a row from the loss and its count (DAPO's
  dynamic sampling drops the groups whose rewards are all equal: :func:`kept_groups`)."""
  lp = lp.astype(jnp.float32)
  lp_old = jax.lax.stop_gradient(lp_old.astype(jnp.float32))
  rows = jnp.ones(lp.shape[:1], jnp.float32) if row_weight is None else row_weight.astype(jnp.float32)
  m = mask.astype(jnp.float32) * rows[:, None]
  a = adv.astype(jnp.float32)[:, None]
  if ratio_level == "token":
    rho = jnp.exp(lp - lp_old)
  elif ratio_level == "sequence":
    raw = mask.astype(jnp.float32)
    log_rho = jnp.sum((lp - lp_old) * raw, axis=-1) / jnp.maximum(jnp.sum(raw, axis=-1), 1.0)
    rho = jnp.broadcast_to(jnp.exp(log_rho)[:, None], lp.shape)
  else:
    raise ValueError(f"config.method.ratio_level={ratio_level!r}: must be one of {RATIO_LEVELS}")
  clipped = jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high)
  l = -jnp.minimum(rho * a, clipped * a)
  if token_weight is not None:
    l = l * jax.lax.stop_gradient(token_weight.astype(jnp.float32))
  low = ((a < 0) & (rho < 1.0 - eps_low)).astype(jnp.float32)
  high = ((a > 0) & (rho > 1.0 + eps_high)).astype(jnp.float32)
  n = jnp.sum(m)
  tok = lambda x: (jnp.sum(x * m), n)
  metrics = {"clip_ratio/low": tok(low), "clip_ratio/high": tok(high),
             "clip_ratio/region": tok(jnp.maximum(low, high)), "ratio/mean": tok(rho),
             "pg_loss": tok(l)}
  if lp_ref is not None:
    k = kl_estimate(lp, jax.lax.stop_gradient(lp_ref.astype(jnp.float32)), kl)
    metrics["kl"] = tok(k)
    if beta_kl > 0:
      l = l + beta_kl * k
  total, count = aggregate(l, m, aggregation, lp.shape[1] if max_len is None else max_len, rows)
  return total, count, metrics


def distill_per_token(student_logits, teacher_logits, kind: str = "reverse_kl", temperature: float = 1.0):
  """Per position ``[...]``: ``KL(q || p)`` (``reverse_kl``), ``KL(p || q)`` (``forward_kl``) or
  ``-log q(argmax p)`` (``hard_ce``), ``q = softmax(student / T)``, ``p = softmax(teacher / T)``;
  float32, no gradient into the teacher. Reverse KL is VLA-OPD's choice."""
  lq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  z_t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  if kind == "hard_ce":
    return -jnp.take_along_axis(lq, jnp.argmax(z_t, axis=-1)[..., None], axis=-1)[..., 0]
  lp = jax.nn.log_softmax(z_t / temperature, axis=-1)
  if kind == "reverse_kl":
    return _kl(lq, lp)
  if kind == "forward_kl":
    return _kl(lp, lq)
  raise ValueError(f"config.method.distill={kind!r}: must be one of {DISTILL}")


def distill_weight(step, total_steps: int, lambda0: float, schedule: str = "constant"):
  """RPD's ``lambda_d(s)``: ``lambda0`` (``constant``) or ``lambda0 (0.5 cos(pi s / S) + 0.5)``
  (``cosine``)."""
  if schedule == "constant":
    return jnp.float32(lambda0)
  if schedule == "cosine":
    s = jnp.asarray(step, jnp.float32) / float(total_steps)
    return lambda0 * (0.5 * jnp.cos(math.pi * s) + 0.5)
  raise ValueError(f"config.method.distill_schedule={schedule!r}: must be one of {SCHEDULES}")
