"""f-DPG pieces (Go et al., ICML 2023; official code naver/disco), pure functions.

Target ``p(x) = P(x) / Z`` with ``log P`` given per sample. Samples come from a
proposal ``q`` (the policy itself when on-policy). With ``log t = log pi(x) -
(log P(x) - log Z)`` the pseudo-reward is ``R = -f'(t)`` (:func:`pseudo_reward`).
As in disco's ``FDivergenceLoss``: the baseline is a windowed moving average of
past pseudo-rewards, taken *before* this batch is added (:class:`Baseline`,
:func:`group_baselines`); the loss is ``mean(w * -(R - b) * log pi(x))`` with
``w = sg(pi / q)`` and R, b detached (:func:`surrogate_loss`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

F_DIVERGENCES = ("fkl", "rkl", "tv", "js")


def pointwise_log_score(base_logp: jax.Array, satisfied: jax.Array, eps: float = 0.0) -> jax.Array:
  """``log P = log a(x) + log max(b(x), eps)`` for a binary constraint ``b``.
  ``eps = 0`` gives ``-inf`` where ``b = 0`` (fine for fkl, tv, js)."""
  b = jnp.maximum(satisfied.astype(jnp.float32), eps)
  return base_logp + jnp.where(b > 0, jnp.log(jnp.where(b > 0, b, 1.0)), -jnp.inf)


def pseudo_reward(log_t: jax.Array, f: str) -> jax.Array:
  """``R = -f'(t)`` from ``u = log t``:

  =========  ======================  ======================================
  f          R(t)                    stable form in ``u = log t``
  =========  ======================  ======================================
  fkl        1 / t     (this is DPG) ``exp(-u)``
  rkl        -(log t + 1)            ``-(u + 1)``
  tv         -0.5 sign(t - 1)        ``-0.5 sign(u)``
  js         -log(2t / (1 + t))      ``softplus(-u) - log 2``
  =========  ======================  ======================================

  Pointwise targets have ``log P = -inf`` where the constraint fails (``u = +inf``): fkl gives 0,
  tv -0.5, js -log 2, all finite; rkl gives ``-inf``, so reverse KL needs the epsilon floor
  ``b_eps = max(b, eps)`` of :func:`pointwise_log_score`.
  """
  if f == "fkl":
    return jnp.exp(-log_t)
  if f == "rkl":
    return -(log_t + 1.0)
  if f == "tv":
    return -0.5 * jnp.sign(log_t)
  if f == "js":
    return jax.nn.softplus(-log_t) - jnp.log(2.0)
  raise ValueError(f"config.method.divergence={f!r}: must be one of {F_DIVERGENCES}")


class LogZ(NamedTuple):
  """Running mean of ``P(x) / q(x)`` over every sample seen, in log space,
  one entry per context (``[C]``; C = 1 for unconditional targets)."""
  log_sum: jax.Array     # [C] log of the sum of P/q
  count: jax.Array       # [C] samples seen

  @classmethod
  def init(cls, num_contexts: int = 1) -> "LogZ":
    return cls(jnp.full((num_contexts,), -jnp.inf, jnp.float32), jnp.zeros((num_contexts,), jnp.float32))

  def update(self, log_score: jax.Array, proposal_logp: jax.Array, context: jax.Array | None = None) -> "LogZ":
    """Adds samples ``[N]`` (``context[N]`` ids when conditional)."""
    ctx = jnp.zeros(log_score.shape, jnp.int32) if context is None else context
    lw = (log_score - proposal_logp).astype(jnp.float32)
    c = self.log_sum.shape[0]
    # log-sum-exp per context, stable when a context has only -inf terms.
    m = jax.ops.segment_max(lw, ctx, num_segments=c)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jax.ops.segment_sum(jnp.exp(lw - m_safe[ctx]), ctx, num_segments=c)
    batch_log = jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1.0)) + m_safe, -jnp.inf)
    n = jax.ops.segment_sum(jnp.ones_like(lw), ctx, num_segments=c)
    return LogZ(jnp.logaddexp(self.log_sum, batch_log), self.count + n)

  @property
  def value(self) -> jax.Array:
    """``log Z`` per context (``-inf`` before any sample with P > 0)."""
    return self.log_sum - jnp.log(jnp.maximum(self.count, 1.0))


class Baseline(NamedTuple):
  """Windowed moving average of pseudo-rewards (a ring buffer of ``window`` values)."""
  values: jax.Array      # [W]
  filled: jax.Array      # scalar int: entries written so far (capped at W in the mean)
  cursor: jax.Array      # next slot

  @classmethod
  def init(cls, window: int = 1024) -> "Baseline":
    return cls(jnp.zeros((window,), jnp.float32), jnp.int32(0), jnp.int32(0))

  @property
  def value(self) -> jax.Array:
    n = jnp.minimum(self.filled, self.values.shape[0])
    return jnp.where(n > 0, jnp.sum(self.values) / jnp.maximum(n, 1), 0.0)

  def update(self, rewards: jax.Array) -> "Baseline":
    w = self.values.shape[0]
    r = rewards.reshape(-1)[-w:]
    idx = (self.cursor + jnp.arange(r.shape[0])) % w
    return Baseline(self.values.at[idx].set(r.astype(jnp.float32)), self.filled + r.shape[0],
                    (self.cursor + r.shape[0]) % w)


def group_baselines(baseline: Baseline, rewards: jax.Array, valid: jax.Array, group: int):
  """disco's baseline over a batch of contexts: rows come in consecutive groups of ``group``
  samples of one context (``group`` = the batch: one context); each group's advantage uses the
  window as the groups before it left it (disco updates its windowed baseline once per context),
  and a group whose context has no valid log Z adds nothing (disco skips that context).

  Returns ``(per-row baseline [B], new Baseline)``."""
  b = rewards.shape[0]
  m = b // group

  def body(base, x):
    r, ok = x
    return jax.lax.cond(ok, lambda: base.update(r), lambda: base), base.value
  new, values = jax.lax.scan(body, baseline, (rewards.reshape(m, group), valid.reshape(m, group)[:, 0]))
  return jnp.repeat(values, group), new


def context_weights(valid: jax.Array, group: int) -> jax.Array:
  """Per-row loss weights ``valid / group``: the loss is the mean over the contexts with a valid
  log Z of each context's mean over its samples, as disco's (its sum over rows divided by the
  weights' sum, the number of valid contexts)."""
  return valid.astype(jnp.float32) / group


def importance_weights(policy_logp: jax.Array, proposal_logp: jax.Array) -> jax.Array:
  """``sg(pi(x) / q(x))``; exactly 1 on-policy (``q = pi``)."""
  return jax.lax.stop_gradient(jnp.exp(policy_logp - proposal_logp))


def surrogate_loss(policy_logp: jax.Array, proposal_logp: jax.Array, log_score: jax.Array, log_z: jax.Array,
                   baseline: jax.Array, f: str, weight: jax.Array | None = None):
  """Returns ``(loss_sum, n, pseudo_rewards)`` for samples ``[N]``:
  ``sum_x c_x w (-(R - b)) log pi(x)`` and ``n = sum_x c_x``, so the trainer's
  ``loss_sum / n`` is the paper's mean; ``weight`` ``c`` (default 1 per row)
  is :func:`context_weights` for several contexts. ``policy_logp`` is the summed
  response log-probability (with gradient); everything else is detached here.

  As in disco, a sample contributes nothing while its context's ``log Z`` is
  still ``-inf`` (no sample with ``P > 0`` seen yet): ``t`` is undefined there.
  """
  valid = jnp.isfinite(log_z)
  log_t = jax.lax.stop_gradient(policy_logp) - (log_score - jnp.where(valid, log_z, 0.0))
  r = jax.lax.stop_gradient(pseudo_reward(log_t, f))
  adv = jax.lax.stop_gradient(jnp.where(valid, r - baseline, 0.0))
  w = importance_weights(policy_logp, proposal_logp)
  if weight is None:
    return jnp.sum(w * -adv * policy_logp), jnp.float32(policy_logp.shape[0]), r
  # 1e-9: a batch of no valid context has a zero loss and gradient, which must not become 0 / 0
  # (it is below float32's resolution of any count >= 1, so it changes no other step).
  return jnp.sum(weight * w * -adv * policy_logp), jnp.sum(weight) + 1e-9, r


def divergence_estimates(policy_logp, proposal_logp, log_score, log_z) -> dict:
  """Importance-sampled divergences between target ``p`` and policy ``pi`` from
  samples of ``q``; ``[N]`` inputs, scalars out:
  ``KL(p||pi) = E_q[p/q (log p - log pi)]``, ``KL(pi||p) = E_q[pi/q (log pi - log p)]``,
  ``TV = 0.5 E_q[|p - pi| / q]``, ``JS = 0.5 E_q[p/q log(2p/(p+pi))] + 0.5 E_q[pi/q log(2pi/(p+pi))]``."""
  log_p = log_score - log_z
  lw_p = log_p - proposal_logp
  lw_pi = policy_logp - proposal_logp
  w_p, w_pi = jnp.exp(lw_p), jnp.exp(lw_pi)
  finite_p = jnp.isfinite(log_p)
  safe = lambda x: jnp.where(finite_p, x, 0.0)      # p(x) = 0 terms contribute 0 to p-weighted sums
  log_mix = jnp.logaddexp(log_p, policy_logp)        # log(p + pi)
  kl_p_pi = jnp.mean(safe(w_p * (log_p - policy_logp)))
  kl_pi_p = jnp.mean(jnp.where(finite_p, w_pi * (policy_logp - log_p), jnp.inf))
  tv = 0.5 * jnp.mean(jnp.abs(w_p - w_pi))
  js = 0.5 * jnp.mean(safe(w_p * (jnp.log(2.0) + log_p - log_mix))) + \
       0.5 * jnp.mean(w_pi * (jnp.log(2.0) + policy_logp - log_mix))
  return {"kl_target_policy": kl_p_pi, "kl_policy_target": kl_pi_p, "tv": tv, "js": js}
