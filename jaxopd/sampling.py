"""Jitted KV-cache sampling and speculative decoding.

Layout. Prompts come right-padded (``prompt[B, P]`` with ``prompt_len[B]``),
as datasets store them. Inside, each row is shifted to be *left*-padded so
every row's next token is written at the same cache slot; the pads are masked
out of attention and the positions count real tokens only. The result is
shifted back: ``tokens[B, P + N]`` right-padded, prompt then response, with
``loss_mask`` on the response (up to and including EOS) - the record format
the train step consumes.

``sample`` runs a ``lax.while_loop`` over a fixed-size cache and stops early
when every row has emitted EOS. ``speculative_sample`` is written for one
sequence and ``jax.vmap``-ed over the batch, so each row keeps its own
acceptance count and cache index.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopd.models import KVCache, Transformer

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int            # response length budget N
  eos_id: int                    # generation of a row stops after this token
  pad_id: int = 0                # filler after EOS / after the prompt
  temperature: float = 1.0       # > 0; ignored when greedy
  top_k: int = 0                 # keep the k most likely tokens; 0 = all
  top_p: float = 1.0             # nucleus mass; 1 = all
  greedy: bool = False           # argmax decoding

  def validate(self, prefix: str = "sampling") -> "SamplingConfig":
    if self.max_new_tokens <= 0:
      raise ValueError(f"{prefix}.max_new_tokens={self.max_new_tokens}: must be positive")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"{prefix}.temperature={self.temperature}: must be > 0 (or set greedy)")
    if self.top_k < 0:
      raise ValueError(f"{prefix}.top_k={self.top_k}: must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"{prefix}.top_p={self.top_p}: must be in (0, 1]")
    return self

  @property
  def is_ancestral(self) -> bool:
    """Pure ancestral sampling (temperature 1, no truncation): needed for importance weights."""
    return not self.greedy and self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


class SampleOutput(NamedTuple):
  tokens: jax.Array           # [B, P+N] int32: prompt, response, pad
  loss_mask: jax.Array        # [B, P+N] int32: 1 on response tokens (incl. EOS)
  logprobs: jax.Array         # [B, P+N] f32: log-prob of each response token under the sampling distribution
  model_logprobs: jax.Array   # [B, P+N] f32: ... under the untempered, untruncated model
  lengths: jax.Array          # [B] int32: response lengths


def process_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Log-probabilities of the sampling distribution: temperature, top-k, top-p. ``[..., V]`` f32."""
  x = logits.astype(jnp.float32)
  if cfg.greedy:
    return jax.nn.log_softmax(x, axis=-1)
  x = x / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
    x = jnp.where(x < kth, NEG_INF, x)
  if cfg.top_p < 1.0:
    srt = jnp.sort(x, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    # Smallest set whose mass reaches top_p: keep tokens whose preceding mass is < top_p.
    keep_sorted = (cum - jax.nn.softmax(srt, axis=-1)) < cfg.top_p
    threshold = jnp.min(jnp.where(keep_sorted, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < threshold, NEG_INF, x)
  return jax.nn.log_softmax(x, axis=-1)


def _draw(rng, logp: jax.Array, cfg: SamplingConfig) -> jax.Array:
  if cfg.greedy:
    return jnp.argmax(logp, axis=-1).astype(jnp.int32)
  # = jax.random.categorical(rng, logp) (same Gumbel noise, same draws), with the argmax
  # written as max + first index of the max: two plain reductions, which XLA:CPU
  # vectorizes (its variadic (value, index) argmax reduction is not).
  z = logp + jax.random.gumbel(rng, logp.shape, logp.dtype)
  hit = z == jnp.max(z, axis=-1, keepdims=True)
  return jnp.min(jnp.where(hit, jnp.arange(z.shape[-1], dtype=jnp.int32), z.shape[-1]), axis=-1)


def _left_pad(prompt, prompt_len):
  """Right-padded ``[B, P]`` -> left-padded, with its mask and positions."""
  b, p = prompt.shape
  shift = p - prompt_len                                            # pads per row
  idx = (jnp.arange(p)[None, :] - shift[:, None]) % p
  left = jnp.take_along_axis(prompt, idx, axis=1)
  mask = jnp.arange(p)[None, :] >= shift[:, None]
  return left, mask, shift


def _right_align(x, shift):
  """Undo :func:`_left_pad` on a ``[B, L]`` array: row b rolled left by ``shift[b]``."""
  l = x.shape[1]
  idx = (jnp.arange(l)[None, :] + shift[:, None]) % l
  return jnp.take_along_axis(x, idx, axis=1)


def sample(model: Transformer, prompt: jax.Array, prompt_len: jax.Array, rng: jax.Array,
           cfg: SamplingConfig) -> SampleOutput:
  """Samples ``cfg.max_new_tokens`` tokens after each prompt. Pure; jit it (or call
  it inside a jitted step). Same ``rng`` -> same samples on any mesh."""
  cfg.validate()
  b, p = prompt.shape
  n = cfg.max_new_tokens
  total = p + n
  left, pmask, shift = _left_pad(prompt.astype(jnp.int32), prompt_len.astype(jnp.int32))
  positions = jnp.maximum(jnp.cumsum(pmask, axis=1) - 1, 0)
  cache = KVCache.zeros(model.cfg, b, total)
  out = model(left, positions, attention_mask=pmask, cache=cache)
  last_logits = out.logits[:, -1]
  tokens = jnp.concatenate([left, jnp.full((b, n), cfg.pad_id, jnp.int32)], axis=1)
  zeros = jnp.zeros((b, total), jnp.float32)

  def cond(carry):
    i, _, _, _, _, _, done, _ = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, tokens, lp_s, lp_m, cache, logits, done, rng = carry
    rng, key = jax.random.split(rng)
    logp = process_logits(logits, cfg)
    tok = _draw(key, logp, cfg)
    tok = jnp.where(done, cfg.pad_id, tok)
    slot = p + i
    got_s = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    got_m = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), tok[:, None], axis=-1)[:, 0]
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], slot, axis=1)
    lp_s = jax.lax.dynamic_update_slice_in_dim(lp_s, jnp.where(done, 0.0, got_s)[:, None], slot, axis=1)
    lp_m = jax.lax.dynamic_update_slice_in_dim(lp_m, jnp.where(done, 0.0, got_m)[:, None], slot, axis=1)
    new_done = done | (tok == cfg.eos_id)
    pos = (prompt_len + i)[:, None]
    o = model(tok[:, None], pos, attention_mask=~done[:, None], cache=cache)
    return i + 1, tokens, lp_s, lp_m, o.cache, o.logits[:, 0], new_done, rng

  carry = (jnp.int32(0), tokens, zeros, zeros, out.cache, last_logits, jnp.zeros((b,), bool), rng)
  _, tokens, lp_s, lp_m, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
  gen = jnp.arange(total)[None, :] >= p
  is_eos = (tokens == cfg.eos_id) & gen
  # Response = generated slots up to and including the first EOS.
  after_eos = jnp.cumsum(is_eos, axis=1) - is_eos
  resp = gen & (after_eos == 0)
  lengths = jnp.sum(resp, axis=1).astype(jnp.int32)
  tokens = jnp.where(gen & ~resp, cfg.pad_id, tokens)
  return SampleOutput(
      tokens=_right_align(tokens, shift),
      loss_mask=_right_align(resp.astype(jnp.int32), shift),
      logprobs=_right_align(lp_s * resp, shift),
      model_logprobs=_right_align(lp_m * resp, shift),
      lengths=lengths)


class SpecOutput(NamedTuple):
  tokens: jax.Array           # [B, P+N] as in SampleOutput
  loss_mask: jax.Array        # [B, P+N]
  lengths: jax.Array          # [B] response lengths
  accepted: jax.Array         # [B] draft tokens accepted
  blocks: jax.Array           # [B] draft-then-verify rounds = target calls after the prefill
  proposed: jax.Array         # [B] draft tokens proposed (gamma * blocks)

  @property
  def acceptance_rate(self) -> jax.Array:
    """Empirical fraction of proposed draft tokens accepted, over the batch."""
    return jnp.sum(self.accepted) / jnp.maximum(jnp.sum(self.proposed), 1)

  @property
  def block_efficiency(self) -> jax.Array:
    """Tokens produced per target call (<= gamma + 1), over the batch."""
    return jnp.sum(self.accepted + self.blocks) / jnp.maximum(jnp.sum(self.blocks), 1)


def speculative_sample(target: Transformer, draft: Transformer, prompt: jax.Array, prompt_len: jax.Array,
                       rng: jax.Array, cfg: SamplingConfig, gamma: int, lenience: float = 1.0) -> SpecOutput:
  """Speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

  The draft proposes ``gamma`` tokens from its sampling distribution ``q``
  (``cfg``'s temperature / top-k / top-p applied to both models); the target
  scores all ``gamma + 1`` positions in one call, giving ``p``. Token ``x_i``
  is accepted with probability ``min(1, p(x_i) / (lenience * q(x_i)))``; at the
  first rejection a token is drawn from ``normalize(max(0, p - q))``; if all
  are accepted one more is drawn from ``p``. ``lenience = 1`` is lossless (the
  output is distributed as the target's); ``lenience < 1`` is the lossy
  variant, using lenience function ``f(p, eps) = p / eps`` in DistillSpec's
  notation (accept with ``min(1, f(p(x), eps) / q(x))``), residual unchanged.
  With ``cfg.greedy`` the draft proposes argmaxes and a token is accepted
  while it equals the target's argmax: the output equals the target's greedy
  decoding.
  """
  cfg.validate()
  if gamma < 1:
    raise ValueError(f"gamma={gamma}: must be >= 1")
  if not 0.0 < lenience <= 1.0:
    raise ValueError(f"lenience={lenience}: must be in (0, 1]")
  if cfg.greedy and lenience != 1.0:
    raise ValueError("lenience applies to speculative sampling, not greedy verification")
  _, p = prompt.shape
  n = cfg.max_new_tokens
  size = 1 + p + n + gamma + 1          # one extra leading pad: every row has >= 2 tokens
  keys = jax.random.split(rng, prompt.shape[0])
  one = lambda pr, pl, key: _speculative_one(target, draft, pr, pl, key, cfg, gamma, lenience, size)
  buf, resp_len, accepted, blocks = jax.vmap(one)(prompt.astype(jnp.int32), prompt_len.astype(jnp.int32), keys)
  # buf: [B, size] left-padded (1 + P slots of prompt), then the response.
  tokens = buf[:, 1:1 + p + n]
  gen = jnp.arange(p + n)[None, :] >= p
  resp = gen & (jnp.arange(p + n)[None, :] < p + resp_len[:, None])
  tokens = jnp.where(gen & ~resp, cfg.pad_id, tokens)
  shift = p - prompt_len.astype(jnp.int32)
  return SpecOutput(_right_align(tokens, shift), _right_align(resp.astype(jnp.int32), shift), resp_len,
                    accepted, blocks, gamma * blocks)


def _speculative_one(target, draft, prompt, plen, rng, cfg, gamma, lenience, size):
  """One sequence (vmapped over the batch). Returns (buffer, response length, accepted, blocks)."""
  p = prompt.shape[0]
  n = cfg.max_new_tokens
  start = 1 + p                                   # first response slot
  shift = start - plen                            # left pads (incl. the extra one)
  slots = jnp.arange(size)
  idx = jnp.clip(slots - shift, 0, p - 1)
  buf = jnp.where((slots >= shift) & (slots < start), prompt[idx], cfg.pad_id).astype(jnp.int32)
  valid = slots >= shift
  pos_of = lambda s: jnp.maximum(s - shift, 0)

  def feed(model, cache, buf, first_slot, length):
    toks = jax.lax.dynamic_slice_in_dim(buf, first_slot, length)[None]
    s = first_slot + jnp.arange(length)
    cache = cache._replace(index=first_slot)
    o = model(toks, pos_of(s)[None], attention_mask=valid[s][None], cache=cache)
    return o.logits[0].astype(jnp.float32), o.cache

  # Prefill both models with all prompt slots but the last.
  t_cache = KVCache.zeros(target.cfg, 1, size)
  d_cache = KVCache.zeros(draft.cfg, 1, size)
  _, t_cache = feed(target, t_cache, buf, 0, start - 1)
  _, d_cache = feed(draft, d_cache, buf, 0, start - 1)

  def logp_of(logits):
    return process_logits(logits, cfg)

  def cond(c):
    return ~c["done"]

  def body(c):
    cur = c["cur"]                                # tokens in the buffer; slot cur-1 not yet fed to the target
    rng, k_draft, k_acc, k_fix = jax.random.split(c["rng"], 4)
    # Draft: refeed slots cur-2, cur-1 (idempotent for an already-cached one), then gamma-1 of its own tokens.
    d_logits, d_cache = feed(draft, c["d_cache"], c["buf"], cur - 2, 2)

    def draft_step(carry, key):
      d_cache, logits, slot = carry
      logq = logp_of(logits)
      x = _draw(key, logq, cfg)
      o = draft(x[None, None], pos_of(slot)[None, None], cache=d_cache._replace(index=slot))
      return (o.cache, o.logits[0, 0].astype(jnp.float32), slot + 1), (x, logq)

    (d_cache, _, _), (xs, logqs) = jax.lax.scan(draft_step, (d_cache, d_logits[-1], cur),
                                                jax.random.split(k_draft, gamma))
    block = jnp.concatenate([c["buf"][cur - 1][None], xs])               # [gamma + 1]
    bslots = cur - 1 + jnp.arange(gamma + 1)
    o = target(block[None], pos_of(bslots)[None], cache=c["t_cache"]._replace(index=cur - 1))
    logps = logp_of(o.logits[0].astype(jnp.float32))                     # [gamma + 1, V]
    t_cache = o.cache
    if cfg.greedy:
      ok = jnp.argmax(logps[:gamma], -1) == xs
    else:
      lp_x = jnp.take_along_axis(logps[:gamma], xs[:, None], -1)[:, 0]
      lq_x = jnp.take_along_axis(logqs, xs[:, None], -1)[:, 0]
      ratio = jnp.exp(lp_x - lq_x) / lenience
      ok = jax.random.uniform(k_acc, (gamma,)) < jnp.minimum(1.0, ratio)
    n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    p_next = logps[n_acc]
    if cfg.greedy:
      fix = jnp.argmax(p_next).astype(jnp.int32)
    else:
      q_next = jnp.concatenate([logqs, jnp.full((1, logqs.shape[1]), NEG_INF)])[n_acc]
      resid = jnp.maximum(jnp.exp(p_next) - jnp.exp(q_next), 0.0)
      mass = jnp.sum(resid)
      resid_logp = jnp.where(mass > 0, jnp.log(resid / jnp.where(mass > 0, mass, 1.0)), p_next)
      resid_logp = jnp.where(jnp.isfinite(resid_logp), resid_logp, NEG_INF)
      fix = jax.random.categorical(k_fix, resid_logp).astype(jnp.int32)
    j = jnp.arange(gamma + 1)
    new = jnp.where(j < n_acc, jnp.concatenate([xs, xs[-1:]]), fix)
    buf = jax.lax.dynamic_update_slice_in_dim(c["buf"], new, cur, axis=0)
    written = n_acc + 1
    new_cur = cur + written
    hit_eos = jnp.any((new == cfg.eos_id) & (j < written))
    done = hit_eos | (new_cur - start >= n)
    return dict(buf=buf, cur=new_cur, t_cache=t_cache, d_cache=d_cache, rng=rng, done=done,
                accepted=c["accepted"] + n_acc, blocks=c["blocks"] + 1)

  c = dict(buf=buf, cur=jnp.int32(start), t_cache=t_cache, d_cache=d_cache, rng=rng, done=jnp.bool_(False),
           accepted=jnp.int32(0), blocks=jnp.int32(0))
  c = jax.lax.while_loop(cond, body, c)
  buf = c["buf"]
  resp = jax.lax.dynamic_slice_in_dim(buf, start, n + gamma + 1)[:n]
  is_eos = resp == cfg.eos_id
  first_eos = jnp.where(jnp.any(is_eos), jnp.argmax(is_eos) + 1, n)
  resp_len = jnp.minimum(jnp.minimum(first_eos, c["cur"] - start), n).astype(jnp.int32)
  return buf, resp_len, c["accepted"], c["blocks"]
