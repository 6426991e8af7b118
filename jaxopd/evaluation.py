"""Evaluation helpers shared by the methods.

Speculative-decoding quantities follow the DistillSpec paper: per-position acceptance
``beta = sum_v min(p, q) = 1 - TVD(p, q)`` under speculative sampling and
``1[argmax p == argmax q]`` under greedy decoding; ``alpha = E[beta]`` over
draft-generated prefixes; block efficiency ``tau = (1 - alpha^(gamma+1)) /
(1 - alpha)``; modelled speed-up ``tau / (gamma c + 1)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopd.models import Transformer
from jaxopd.sampling import SamplingConfig, process_logits, sample


# --- host-side compiled calls on models ------------------------------------------------------
class _Key:
  """The static part of a :func:`compiled` call: the function, its hashable settings and the
  models' graph definitions, hashed once (a graphdef hashes in ~0.1 ms; a timed decoding loop
  should not pay that per call)."""

  def __init__(self, fn, static, graphdefs):
    self.fn, self.static, self.graphdefs = fn, static, graphdefs
    self._hash = hash((fn, static, graphdefs))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, _Key) and self._hash == other._hash and
                             (self.fn, self.static, self.graphdefs) == (other.fn, other.static, other.graphdefs))


@functools.partial(jax.jit, static_argnums=0)
def _call(key: _Key, states, args):
  models = tuple(None if g is None else nnx.merge(g, s) for g, s in zip(key.graphdefs, states))
  return key.fn(*key.static, *models, *args)


def compiled(fn: Callable, static: tuple, *models) -> Callable[..., Any]:
  """``f(*args) = fn(*static, *models, *args)``, jit-compiled by jax once per (``fn``,
  ``static``, the models' structures, argument shapes) and reused from jax's own cache by
  every later call with equal ones, whichever evaluation or report makes it.

  The one way host-side evaluation compiles (methods never call ``jax.jit``): ``fn`` is a
  module-level function (its identity is part of the key), ``static`` hashable settings
  (sampling configs, targets, ints); the models (``None`` passes through) are split once
  here into graph (static) and state (traced)."""
  parts = [(None, None) if m is None else nnx.split(m) for m in models]
  key = _Key(fn, tuple(static), tuple(g for g, _ in parts))
  states = tuple(st for _, st in parts)
  return lambda *args: _call(key, states, args)


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


def nll_sums(model, tokens, loss_mask):
  """``(NLL sum, token count)`` of ``model`` on the masked tokens (for :func:`compiled`)."""
  from jaxopd.losses import sft_loss
  return sft_loss(model(tokens).logits, tokens, loss_mask)[:2]


def heldout_nll(model, records, batch: int = 64) -> float:
  """Per-token NLL (nats) of ``model`` on SFT records (``tokens`` / ``loss_mask``), in whole batches."""
  fn = compiled(nll_sums, (), model)
  nll = n = 0.0
  for i in range(0, len(records) - batch + 1, batch):    # whole batches: one compiled shape
    rows = records[i:i + batch]
    a, b = fn(jnp.asarray(np.stack([r["tokens"] for r in rows])), jnp.asarray(np.stack([r["loss_mask"] for r in rows])))
    nll, n = nll + float(a), n + float(b)
  return nll / max(n, 1.0)


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k from ``n`` samples of which ``c`` pass (Chen et al. 2021):
  ``1 - C(n - c, k) / C(n, k)``, the chance that k of the n samples drawn without replacement
  include a passing one (1 when ``n - c < k``)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): needs 0 <= c <= n and 1 <= k <= n")
  if n - c < k:
    return 1.0
  out = 1.0
  for i in range(n - c + 1, n + 1):      # C(n-c, k) / C(n, k) as a product, no big integers
    out *= 1.0 - k / i
  return 1.0 - out


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


def _sample(cfg, model, prompt, prompt_len, rng):
  return sample(model, prompt, prompt_len, rng, cfg)


def sampler(model, cfg: SamplingConfig):
  """``f(prompt, prompt_len, rng) -> SampleOutput``: the compiled plain sampler of ``model``."""
  fn = compiled(_sample, (cfg,), model)
  return lambda p, l, r: fn(jnp.asarray(p), jnp.asarray(l), r)


def evaluate_policy(policy: Transformer, reference: Transformer | None, prompt, prompt_len, rng,
                    cfg: SamplingConfig, reward_fn=None) -> dict:
  """Samples responses from ``policy`` and reports, over the batch:

  ``reward`` (mean of ``reward_fn(list of response id lists)``), ``kl_ref``
  (sequence ``KL(policy || reference)`` estimated from the samples under the
  untempered models), ``entropy`` (per-token, policy), ``distinct1/2``,
  ``length`` (response tokens). Jit-compiles once per (model structure, cfg).
  """
  fn = compiled(_sample_and_score, (cfg,), policy, reference)
  out, res = fn(jnp.asarray(prompt), jnp.asarray(prompt_len), rng)
  out, res = to_host((out, res))
  toks, mask = np.asarray(out.tokens), np.asarray(out.loss_mask)
  responses = [t[m == 1].tolist() for t, m in zip(toks, mask)]
  metrics = {k: float(v) for k, v in res.items()}
  metrics.update(distinct1=distinct_n(responses, 1), distinct2=distinct_n(responses, 2),
                 length=float(np.mean([len(r) for r in responses])))
  if reward_fn is not None:
    metrics["reward"] = float(np.mean(reward_fn(toks, mask)))
  return metrics


def _sample_and_score(cfg, policy, reference, prompt, prompt_len, rng):
  from jaxopd.losses import token_logprobs
  out = sample(policy, prompt, prompt_len, rng, cfg)
  logits = policy(out.tokens).logits
  m = out.loss_mask[:, 1:].astype(jnp.float32)
  lp = token_logprobs(logits, out.tokens)
  res = {"entropy": token_entropy(logits[:, :-1], m)}
  if reference is not None:
    lr = token_logprobs(reference(out.tokens).logits, out.tokens)
    res["kl_ref"] = jnp.mean(sequence_kl(lp, lr, m))
  return out, res
