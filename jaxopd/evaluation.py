"""Evaluation helpers shared by the methods.

Speculative-decoding quantities follow METHODS.md: per-position acceptance
``beta = sum_v min(p, q) = 1 - TVD(p, q)`` under speculative sampling and
``1[argmax p == argmax q]`` under greedy decoding; ``alpha = E[beta]`` over
draft-generated prefixes; block efficiency ``tau = (1 - alpha^(gamma+1)) /
(1 - alpha)``; modelled speed-up ``tau / (gamma c + 1)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopd.models import Transformer
from jaxopd.sampling import SamplingConfig, process_logits, sample


def block_efficiency(alpha, gamma: int):
  """Expected tokens per target call with ``gamma`` draft tokens, i.i.d. acceptance ``alpha``."""
  alpha = jnp.asarray(alpha, jnp.float32)
  return jnp.where(alpha >= 1.0, gamma + 1.0, (1.0 - alpha ** (gamma + 1)) / (1.0 - jnp.minimum(alpha, 1 - 1e-12)))


def speedup(alpha, gamma: int, cost_ratio: float):
  """Modelled wall-clock speed-up over target-only decoding; ``cost_ratio`` = draft step / target step."""
  return block_efficiency(alpha, gamma) / (gamma * cost_ratio + 1.0)


class Acceptance(NamedTuple):
  sampling: jax.Array   # mean of sum_v min(p, q) over response positions (temperature of cfg)
  greedy: jax.Array     # mean of 1[argmax p == argmax q]
  positions: jax.Array  # response positions averaged over


def acceptance_on_draft_prefixes(target: Transformer, draft: Transformer, prompt, prompt_len, rng,
                                 cfg: SamplingConfig) -> Acceptance:
  """Samples responses from the draft, then scores every response position with
  both models: the states speculative decoding visits. Same ``cfg`` (temperature,
  truncation) for p and q, as the draft is trained and used."""
  out = sample(draft, prompt, prompt_len, rng, cfg)
  # Position t predicts token t+1: the response positions are those whose *next* token is in the response.
  m = out.loss_mask[:, 1:].astype(jnp.float32)
  lp = process_logits(target(out.tokens).logits[:, :-1], cfg)
  lq = process_logits(draft(out.tokens).logits[:, :-1], cfg)
  beta = jnp.sum(jnp.minimum(jnp.exp(lp), jnp.exp(lq)), axis=-1)
  agree = (jnp.argmax(lp, -1) == jnp.argmax(lq, -1)).astype(jnp.float32)
  n = jnp.sum(m)
  return Acceptance(jnp.sum(beta * m) / n, jnp.sum(agree * m) / n, n)


def sequence_kl(policy_logps: jax.Array, ref_logps: jax.Array, mask: jax.Array) -> jax.Array:
  """Monte-Carlo ``KL(pi || ref)`` per sequence from samples of ``pi``:
  ``sum_t m_t (log pi(y_t) - log ref(y_t))``; inputs ``[B, T]`` -> ``[B]``."""
  return jnp.sum(mask * (policy_logps - ref_logps), axis=-1)


def token_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the model's next-token distribution over the masked positions."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  h = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
  return jnp.sum(h * mask) / jnp.maximum(jnp.sum(mask), 1)


def distinct_n(sequences, n: int) -> float:
  """Distinct n-grams / total n-grams over a set of token sequences (lists of ids or words)."""
  total, seen = 0, set()
  for s in sequences:
    s = list(s)
    grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
    total += len(grams)
    seen.update(grams)
  return len(seen) / total if total else 0.0


def self_bleu(sequences, n: int = 4, max_refs: int = 200) -> float:
  """Mean BLEU-n of each sequence against the others (lower = more diverse).

  Uniform n-gram weights, brevity penalty, add-one smoothing of the higher
  orders so short samples do not all score 0; references capped at
  ``max_refs`` others for speed.
  """
  import collections
  import math

  seqs = [list(s) for s in sequences if len(s) > 0]
  if len(seqs) < 2:
    return 0.0

  def grams(s, k):
    return collections.Counter(tuple(s[i:i + k]) for i in range(len(s) - k + 1))

  scores = []
  for i, hyp in enumerate(seqs):
    refs = [s for j, s in enumerate(seqs) if j != i][:max_refs]
    logp = 0.0
    for k in range(1, n + 1):
      h = grams(hyp, k)
      best: dict = collections.Counter()
      for r in refs:
        for g, c in grams(r, k).items():
          if c > best[g]:
            best[g] = c
      match = sum(min(c, best[g]) for g, c in h.items())
      count = max(sum(h.values()), 0)
      if k == 1:
        if match == 0:
          logp = -math.inf
          break
        logp += math.log(match / count) / n
      else:
        logp += math.log((match + 1) / (count + 1)) / n
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > closest else math.exp(1 - closest / max(len(hyp), 1))
    scores.append(0.0 if logp == -math.inf else bp * math.exp(logp))
  return float(sum(scores) / len(scores))


def to_host(tree):
  """``jax.device_get`` that also fetches arrays spanning other processes' devices
  (a batch-sharded sample in a multi-host run): gathered to every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def evaluate_policy(policy: Transformer, reference: Transformer | None, prompt, prompt_len, rng,
                    cfg: SamplingConfig, reward_fn=None) -> dict:
  """Samples responses from ``policy`` and reports, over the batch:

  ``reward`` (mean of ``reward_fn(list of response id lists)``), ``kl_ref``
  (sequence ``KL(policy || reference)`` estimated from the samples under the
  untempered models), ``entropy`` (per-token, policy), ``distinct1/2``,
  ``length`` (response tokens). Jit-compiles once per (model structure, cfg).
  """
  from flax import nnx
  import numpy as np

  gd, state = nnx.split(policy)
  ref_parts = nnx.split(reference) if reference is not None else None
  key = (gd, None if ref_parts is None else ref_parts[0], cfg)
  fn = _EVAL_CACHE.get(key)
  if fn is None:
    def run(state, ref_state, prompt, prompt_len, rng):
      pol = nnx.merge(gd, state)
      out = sample(pol, prompt, prompt_len, rng, cfg)
      logits = pol(out.tokens).logits
      m = out.loss_mask[:, 1:].astype(jnp.float32)
      from jaxopd.losses import token_logprobs
      lp = token_logprobs(logits, out.tokens)
      res = {"entropy": token_entropy(logits[:, :-1], m)}
      if ref_state is not None:
        ref = nnx.merge(ref_parts[0], ref_state)
        lr = token_logprobs(ref(out.tokens).logits, out.tokens)
        res["kl_ref"] = jnp.mean(sequence_kl(lp, lr, m))
      return out, res
    fn = _EVAL_CACHE[key] = jax.jit(run)
  out, res = fn(state, None if ref_parts is None else ref_parts[1], jnp.asarray(prompt), jnp.asarray(prompt_len), rng)
  out, res = to_host((out, res))
  toks, mask = np.asarray(out.tokens), np.asarray(out.loss_mask)
  responses = [t[m == 1].tolist() for t, m in zip(toks, mask)]
  metrics = {k: float(v) for k, v in res.items()}
  metrics.update(distinct1=distinct_n(responses, 1), distinct2=distinct_n(responses, 2),
                 length=float(np.mean([len(r) for r in responses])))
  if reward_fn is not None:
    metrics["reward"] = float(np.mean(reward_fn(toks, mask)))
  return metrics


_EVAL_CACHE: dict = {}
