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
