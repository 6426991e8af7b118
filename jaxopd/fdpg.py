"""f-DPG (Go et al., ICML 2023) as an on-policy method of the one trainer: targets,
the rollout (sample, score, update log Z and the baseline) and the loss.

A target is ``p(x) = P(x) / Z`` with ``log P(x) = log a(x) + log phi(x)``: ``a``
is the frozen base model (``frozen["base"]``), ``phi`` a scorer of the sampled
sequence (:class:`Target`). Each step the rollout samples from the proposal
(the policy itself, or in offline mode a frozen copy that is replaced by the
policy when the policy gets closer to the target, as disco's
``_update_proposal_if_better`` does), scores the samples, adds them to the
running estimate of ``Z`` (per context) *before* they are used (disco's
order), and hands the batch to the loss with the baseline taken before this
batch's pseudo-rewards are added. The method state (log Z, baseline, offline
proposal and its bookkeeping) lives in the trainer's ``state["aux"]``.

Importance weights are valid only under pure ancestral sampling: any other
sampling setting is refused (:func:`check_sampling`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopd.errors import ConfigError
from jaxopd.experiment import LossOutput
from jaxopd.losses import token_logprobs, response_mask
from jaxopd.losses.fdpg import (F_DIVERGENCES, Baseline, LogZ, divergence_estimates, pseudo_reward,
                                surrogate_loss)
from jaxopd.sampling import SamplingConfig, sample

TARGETS = ("pointwise", "distributional", "rlhf")


@dataclasses.dataclass(frozen=True)
class Target:
  """``log phi(x)`` of a sequence, jittable: ``phi`` is

  * pointwise: ``b(x) in {0, 1}``: the response contains one of ``token_ids``;
    ``log b = -inf`` where it does not (``eps > 0`` floors ``b`` at ``eps``,
    needed for reverse KL);
  * distributional: ``exp(lambda . features(x))`` with ``features[k] = 1`` if the
    response contains one of ``feature_ids[k]`` (e.g. a topic's nouns);
  * rlhf: ``exp(r(x) / beta)`` with a host-side reward (``jax.pure_callback``).
  """
  kind: str
  token_ids: tuple = ()                   # pointwise
  feature_ids: tuple = ()                 # distributional: tuple of tuples of ids
  lambdas: tuple = ()                     # distributional coefficients
  reward_fn: Callable | None = None       # rlhf: (tokens [B, T], mask [B, T]) -> [B] numpy
  beta: float = 1.0                       # rlhf temperature

  def features(self, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """``[B, K]`` float32: 1 where the response contains one of ``feature_ids[k]``."""
    ids = self.feature_ids if self.kind == "distributional" else (self.token_ids,)
    resp = loss_mask.astype(bool)
    cols = [jnp.any(jnp.isin(tokens, jnp.asarray(group, jnp.int32)) & resp, axis=1) for group in ids]
    return jnp.stack(cols, axis=1).astype(jnp.float32)

  def reward(self, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32)
    fn = lambda t, m: np.asarray(self.reward_fn(t, m), np.float32)
    return jax.pure_callback(fn, shape, tokens, loss_mask)

  def alignment(self, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """``[B]``: ``b(x)`` (pointwise), the first feature (distributional), ``r(x)`` (rlhf)."""
    if self.kind == "rlhf":
      return self.reward(tokens, loss_mask)
    return self.features(tokens, loss_mask)[:, 0]

  def log_phi(self, tokens: jax.Array, loss_mask: jax.Array, eps: float = 0.0) -> jax.Array:
    if self.kind == "pointwise":
      b = jnp.maximum(self.features(tokens, loss_mask)[:, 0], eps)
      return jnp.where(b > 0, jnp.log(jnp.where(b > 0, b, 1.0)), -jnp.inf)
    if self.kind == "distributional":
      return self.features(tokens, loss_mask) @ jnp.asarray(self.lambdas, jnp.float32)
    if self.kind == "rlhf":
      return self.reward(tokens, loss_mask) / self.beta
    raise ValueError(f"config.method.target={self.kind!r}: must be one of {TARGETS}")


def check_sampling(cfg: SamplingConfig, field: str = "config.rollout"):
  """f-DPG's importance weights and log Z need samples from the model itself."""
  if not cfg.is_ancestral:
    raise ConfigError(
        f"{field}: f-DPG needs pure ancestral sampling (temperature 1, top_k 0, top_p 1, not greedy); got "
        f"temperature={cfg.temperature}, top_k={cfg.top_k}, top_p={cfg.top_p}, greedy={cfg.greedy}")


def fit_lambdas(features: np.ndarray, targets: np.ndarray, iters: int = 100) -> np.ndarray:
  """GDC moment matching: ``lambda`` with ``E_p[features] = targets`` for
  ``p ~ a(x) exp(lambda . features)``, from samples of ``a`` (self-normalised
  importance sampling). Newton's method on the convex dual
  ``log E_a[exp(lambda . f)] - lambda . targets``; float64 numpy."""
  f = np.asarray(features, np.float64)
  mu = np.asarray(targets, np.float64)
  lo, hi = f.min(0), f.max(0)
  bad = (mu <= lo) | (mu >= hi)
  if np.any(bad):
    raise ValueError(f"moment targets {mu[bad].tolist()} are outside the range the base samples reach "
                     f"({lo[bad].tolist()}..{hi[bad].tolist()}): no finite lambda matches them")
  lam = np.zeros(f.shape[1])
  for _ in range(iters):
    s = f @ lam
    w = np.exp(s - s.max())
    w /= w.sum()
    m = w @ f
    cov = (f - m).T @ ((f - m) * w[:, None]) + 1e-12 * np.eye(f.shape[1])
    step = np.linalg.solve(cov, m - mu)
    lam -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  return lam


def init_aux(num_contexts: int, baseline_window: int, proposal_state=None) -> dict:
  """The method state: log Z per context, baseline, and (offline) the proposal."""
  aux = {"log_z": LogZ.init(num_contexts), "baseline": Baseline.init(baseline_window)}
  if proposal_state is not None:
    aux.update(proposal=proposal_state, proposal_set=jnp.bool_(False), swaps=jnp.int32(0),
               rollouts=jnp.int32(0), kl_policy=jnp.float32(0), kl_proposal=jnp.float32(0))
  return aux


def _sequence_logp(model, tokens, loss_mask):
  return jnp.sum(token_logprobs(model(tokens).logits, tokens) * response_mask(loss_mask), axis=1)


def make_rollout(target: Target, divergence: str, scfg: SamplingConfig, eps: float = 0.0,
                 offline: bool = False, proposal_every: int = 16, samples_per_context: int = 1):
  """``rollout(policy, frozen, batch, rng, aux) -> (batch, aux)`` for the trainer.

  ``batch``: ``prompt [B, P]``, ``prompt_len [B]``, ``context [B]`` (index of
  the context's log Z; all 0 when unconditional). ``eps`` floors a pointwise
  ``b`` in the *training* target; the metrics use the true target (``eps=0``).
  ``proposal_every``: rollouts between proposal checks (offline).
  ``samples_per_context`` = k > 1: rows ``0, 0, .., 1, 1, ..`` (each of the
  first ``B / k`` prompts k times) are sampled instead of one per prompt, as
  disco samples several continuations per context: a context's running log Z
  then has k samples at its first visit (with one, ``t = pi / q = 1`` on-policy
  and the pseudo-reward carries no signal).
  """
  check_sampling(scfg)
  if divergence not in F_DIVERGENCES:
    raise ConfigError(f"config.method.divergence={divergence!r}: must be one of {F_DIVERGENCES}")
  if not 0.0 <= eps < 1.0:
    raise ConfigError(f"config.method.eps={eps}: must be in [0, 1)")
  if target.kind == "pointwise" and divergence == "rkl" and eps <= 0:
    raise ConfigError("config.method.eps=0: reverse KL on a pointwise target needs the epsilon floor "
                      "b_eps = max(b, eps) > 0 (log P = -inf where the constraint fails); set e.g. eps=1e-3")

  def rollout(params, frozen, batch, rng, aux):
    policy = params["policy"]
    if samples_per_context > 1:
      b = batch["context"].shape[0]
      if b % samples_per_context:
        raise ConfigError(f"config.method.samples_per_context={samples_per_context}: must divide the "
                          f"(micro)batch of {b} samples")
      rows = jnp.arange(b) // samples_per_context
      batch = {k: v[rows] for k, v in batch.items()}
    ctx = batch["context"].astype(jnp.int32)
    if offline:
      gd, pol_state = nnx.split(policy)
      prop_state = jax.tree.map(lambda q, p: jnp.where(aux["proposal_set"], q, p), aux["proposal"], pol_state)
      proposal = nnx.merge(gd, prop_state)
    else:
      proposal = policy
    out = sample(proposal, batch["prompt"], batch["prompt_len"], rng, scfg)
    tokens, mask = out.tokens, out.loss_mask
    q_logp = jnp.sum(out.logprobs, axis=1)
    a_logp = _sequence_logp(frozen["base"], tokens, mask)
    pi_logp = _sequence_logp(policy, tokens, mask) if offline else q_logp
    log_score = a_logp + target.log_phi(tokens, mask, eps)
    true_score = a_logp + target.log_phi(tokens, mask, 0.0) if eps > 0 else log_score
    log_z = aux["log_z"].update(log_score, q_logp, ctx)
    lz = log_z.value[ctx]
    valid = jnp.isfinite(lz)
    r = pseudo_reward(pi_logp - (log_score - jnp.where(valid, lz, 0.0)), divergence)
    b = aux["baseline"].value
    # Rows whose context has no log Z yet enter the window with the current baseline value.
    new = dict(aux, log_z=log_z, baseline=aux["baseline"].update(jnp.where(valid, r, b)))
    if offline:
      # disco: accumulate KL(p||pi) and KL(p||q) estimates; every `proposal_every`
      # rollouts, replace q by pi if pi is closer, then reset the estimates.
      kl_pi = divergence_estimates(pi_logp, q_logp, log_score, jnp.where(valid, lz, 0.0))["kl_target_policy"]
      kl_q = divergence_estimates(q_logp, q_logp, log_score, jnp.where(valid, lz, 0.0))["kl_target_policy"]
      n = aux["rollouts"] + 1
      kp, kq = aux["kl_policy"] + kl_pi, aux["kl_proposal"] + kl_q
      check = n % proposal_every == 0
      swap = check & (kp < kq)
      new.update(proposal=jax.tree.map(lambda q, p: jnp.where(swap | ~aux["proposal_set"], p, q),
                                       prop_state, pol_state),
                 proposal_set=jnp.bool_(True), swaps=aux["swaps"] + swap.astype(jnp.int32), rollouts=n,
                 kl_policy=jnp.where(check, 0.0, kp), kl_proposal=jnp.where(check, 0.0, kq))
    train = {"tokens": tokens, "loss_mask": mask, "proposal_logp": q_logp, "log_score": log_score,
             "log_z": lz, "baseline": jnp.broadcast_to(b, q_logp.shape), "true_score": true_score,
             "base_logp": a_logp, "alignment": target.alignment(tokens, mask)}
    if offline:
      train["swaps"] = jnp.broadcast_to(new["swaps"].astype(jnp.float32), q_logp.shape)
    return train, new
  return rollout


def make_loss_fn(divergence: str):
  """The surrogate loss of :func:`jaxopd.losses.fdpg.surrogate_loss` plus metrics:
  importance-sampled divergences to the (true) target with the running log Z,
  alignment, ``KL(pi || a)`` and the pseudo-reward."""
  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    tokens, mask = batch["tokens"], batch["loss_mask"]
    pi_logp = _sequence_logp(params["policy"], tokens, mask)
    loss, n, r = surrogate_loss(pi_logp, batch["proposal_logp"], batch["log_score"], batch["log_z"],
                                batch["baseline"], divergence)
    sg = jax.lax.stop_gradient(pi_logp)
    w = jnp.exp(sg - batch["proposal_logp"])      # pi / q (1 on-policy)
    lz = jnp.where(jnp.isfinite(batch["log_z"]), batch["log_z"], 0.0)
    div = divergence_estimates(sg, batch["proposal_logp"], batch["true_score"], lz)
    metrics = {f"target/{k}": v * n for k, v in div.items()}
    metrics.update({
        "alignment": jnp.sum(w * batch["alignment"]),
        "kl_base": jnp.sum(w * (sg - batch["base_logp"])),
        "pseudo_reward": jnp.sum(r),
        "baseline": jnp.sum(batch["baseline"]),
        "log_z": jnp.sum(lz),
        "length": jnp.sum(mask.astype(jnp.float32)),
    })
    if "swaps" in batch:
      metrics["proposal_swaps"] = jnp.sum(batch["swaps"])
    return LossOutput(loss, n, metrics)
  return loss_fn
