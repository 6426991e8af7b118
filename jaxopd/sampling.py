"""Jitted KV-cache sampling (:func:`sample`) and speculative decoding (:func:`speculative_sample`).

Layout. Prompts come right-padded (``prompt[B, P]`` with ``prompt_len[B]``),
as datasets store them. Inside, each row is shifted to be *left*-padded so
every row's next token is written at the same cache slot; the pads are masked
out of attention and the positions count real tokens only. The result is
shifted back: ``tokens[B, P + N]`` right-padded, prompt then response, with
``loss_mask`` on the response (up to and including EOS) - the record format
the train step consumes.
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


def rollout_config(c, tok, temperature=None) -> SamplingConfig:
  """The rollout's sampling settings (``c.rollout``: budget, temperature, and ``top_k`` / ``top_p``
  where it has them) with ``tok``'s EOS and pad (EOS where it has none)."""
  eos, r = tok.eos_token_id, c.rollout
  return SamplingConfig(max_new_tokens=r.max_new_tokens, eos_id=eos,
                        pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                        temperature=r.temperature if temperature is None else temperature,
                        top_k=r.get("top_k", 0), top_p=r.get("top_p", 1.0))


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
  return _first_argmax(logp + jax.random.gumbel(rng, logp.shape, logp.dtype))


def _first_argmax(z: jax.Array) -> jax.Array:
  """``argmax`` over the last axis as max + first index of the max (see :func:`_draw`)."""
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
           cfg: SamplingConfig, repeats: int = 1) -> SampleOutput:
  """Samples ``cfg.max_new_tokens`` tokens after each prompt. Pure; jit it (or call
  it inside a jitted step). Same ``rng`` -> same samples on any mesh. One ``lax.while_loop``
  over a fixed-size cache, stopping early once every row has emitted EOS.

  ``repeats = G``: G samples per prompt, rows ``[B * G]`` prompt-major (row ``b * G + g``
  is prompt b's sample g); each prompt is prefilled once and its KV cache kept once, as the
  shared prefix of its G rows (:meth:`KVCache.with_prefix`), whose own caches hold only their
  responses (group sampling without G prefills or G copies of the prompt's keys and values)."""
  cfg.validate()
  b, p = prompt.shape
  n = cfg.max_new_tokens
  total = p + n
  left, pmask, shift = _left_pad(prompt.astype(jnp.int32), prompt_len.astype(jnp.int32))
  positions = jnp.maximum(jnp.cumsum(pmask, axis=1) - 1, 0)
  cache = KVCache.zeros(model.cfg, b, p if repeats > 1 else total)
  out = model(left, positions, attention_mask=pmask, cache=cache)
  last_logits = out.logits[:, -1]
  cache = out.cache
  if repeats > 1:
    rep = lambda x: jnp.repeat(x, repeats, axis=0)
    cache = KVCache.zeros(model.cfg, b * repeats, n).with_prefix(cache)
    left, shift, prompt_len, last_logits = rep(left), rep(shift), rep(prompt_len), rep(last_logits)
    b = b * repeats
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

  carry = (jnp.int32(0), tokens, zeros, zeros, cache, last_logits, jnp.zeros((b,), bool), rng)
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

  Batched: one ``lax.while_loop`` over rounds for the whole batch, until every
  row is done (finished rows run on, masked). Rows advance by different
  amounts (each keeps its own token and acceptance counts), so row b's token at buffer slot s sits at cache slot s of a
  per-row *main* region, committed with a per-row window write; each model
  call of a round writes its new keys/values to a shared *scratch* region
  after the main one (an in-place update at a common index) and attends to
  the valid main slots plus the scratch slots so far. One PRNG draw per round.
  """
  cfg.validate()
  if gamma < 1:
    raise ValueError(f"gamma={gamma}: must be >= 1")
  if not 0.0 < lenience <= 1.0:
    raise ValueError(f"lenience={lenience}: must be in (0, 1]")
  if cfg.greedy and lenience != 1.0:
    raise ValueError("lenience applies to speculative sampling, not greedy verification")
  b, p = prompt.shape
  n, g1, vocab = cfg.max_new_tokens, gamma + 1, target.cfg.vocab_size
  start = 1 + p                   # first response slot; one extra leading pad: every row has >= 2 tokens
  size = start + n + gamma        # main slots; a live row's writes stay below
  plen = prompt_len.astype(jnp.int32)
  shift = start - plen            # left pads per row (incl. the extra one)
  slots = jnp.arange(size)[None, :]
  src = jnp.clip(slots - shift[:, None], 0, p - 1)
  prompt_slot = (slots >= shift[:, None]) & (slots < start)
  buf = jnp.where(prompt_slot, jnp.take_along_axis(prompt.astype(jnp.int32), src, axis=1), cfg.pad_id)
  pos = lambda s: jnp.maximum(s - shift[:, None], 0)
  main_valid = lambda fed: (slots >= shift[:, None]) & (slots < fed[:, None])   # [B, size]
  j = jnp.arange(g1)[None, :]

  def call(model, cache, toks, s, index, mask=None):
    """Feeds ``toks[B, T]`` (buffer slots ``s``) at cache slot ``index``; returns f32 logits, cache."""
    o = model(toks, pos(s), attention_mask=mask, cache=cache._replace(index=jnp.int32(index)))
    return o.logits.astype(jnp.float32), o.cache

  def commit(cache, first):
    """Copies the scratch slots to main slots ``first[b] + j`` of each row (clamped to the scratch itself)."""
    put = jax.vmap(lambda x, u, i: jax.lax.dynamic_update_slice_in_dim(x, u, i, axis=1))
    ks, vs = ([put(x, x[:, :, size:], first) for x in kv] for kv in (cache.k, cache.v))
    pos = jax.vmap(lambda x, i: jax.lax.dynamic_update_slice_in_dim(x, x[size:], i, axis=0))(cache.pos, first)
    return cache._replace(k=tuple(ks), v=tuple(vs), pos=pos)

  def with_valid(cache, fed):
    return cache._replace(valid=jnp.concatenate([main_valid(fed), jnp.zeros((b, g1), bool)], axis=1))

  def pick(logp, noise):
    return jnp.argmax(logp, axis=-1).astype(jnp.int32) if noise is None else _first_argmax(logp + noise)

  # Prefill both models' main regions with all prompt slots but the last.
  pre = (buf[:, :start - 1], jnp.broadcast_to(slots[:, :start - 1], (b, start - 1)), 0, prompt_slot[:, :start - 1])
  _, t_cache = call(target, KVCache.zeros(target.cfg, b, size + g1), *pre)
  _, d_cache = call(draft, KVCache.zeros(draft.cfg, b, size + g1), *pre)

  def body(c):
    cur, live = c["cur"], ~c["done"]   # cur: tokens in the buffer; slot cur-1 not yet fed to the target
    rng = c["rng"]
    if cfg.greedy:
      noise, acc_u = [None] * g1, None
    else:
      rng, key = jax.random.split(rng)
      # One draw per round: Gumbel noise for gamma draft tokens and the correction, acceptance uniforms.
      u = jax.random.uniform(key, (g1, b, vocab + 1), minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
      noise, acc_u = -jnp.log(-jnp.log(u[..., :vocab])), u[:gamma, :, vocab].T

    # Last round's scratch slot j held buffer slot first+j; the accepted ones become valid main slots.
    tc, dc = commit(c["t_cache"], c["t_first"]), commit(c["d_cache"], c["d_first"])
    # Draft: refeed slots cur-2, cur-1 (cur-2 is missing after a fully accepted round), then gamma-1 own tokens.
    s2 = cur[:, None] - 2 + jnp.arange(2)[None, :]
    logits, dc = call(draft, with_valid(dc, cur - 2), jnp.take_along_axis(c["buf"], s2, axis=1), s2, size,
                      s2 >= shift[:, None])
    logits = logits[:, -1]
    xs, logqs = [], []
    for i in range(gamma):
      logq = process_logits(logits, cfg)
      x = pick(logq, noise[i])
      xs.append(x)
      logqs.append(logq)
      if i < gamma - 1:
        logits, dc = call(draft, dc, x[:, None], cur[:, None] + i, size + 2 + i)
        logits = logits[:, 0]
    xs, logq = jnp.stack(xs, axis=1), jnp.stack(logqs, axis=1)          # [B, gamma], [B, gamma, V]

    # Target: scores slots cur-1 .. cur-1+gamma in one call.
    block = jnp.concatenate([jnp.take_along_axis(c["buf"], cur[:, None] - 1, axis=1), xs], axis=1)
    logits, tc = call(target, with_valid(tc, cur - 1), block, cur[:, None] - 1 + j, size)
    logp = process_logits(logits, cfg)                                  # [B, gamma + 1, V]
    if cfg.greedy:
      ok = jnp.argmax(logp[:, :gamma], axis=-1) == xs
    else:
      lp_x = jnp.take_along_axis(logp[:, :gamma], xs[..., None], axis=-1)[..., 0]
      lq_x = jnp.take_along_axis(logq, xs[..., None], axis=-1)[..., 0]
      ok = acc_u < jnp.minimum(1.0, jnp.exp(lp_x - lq_x) / lenience)
    n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B]
    p_next = jnp.take_along_axis(logp, n_acc[:, None, None], axis=1)[:, 0]
    if cfg.greedy:
      fix = pick(p_next, None)
    else:
      q_all = jnp.concatenate([logq, jnp.full((b, 1, vocab), NEG_INF)], axis=1)
      q_next = jnp.take_along_axis(q_all, n_acc[:, None, None], axis=1)[:, 0]
      resid = jnp.maximum(jnp.exp(p_next) - jnp.exp(q_next), 0.0)
      mass = jnp.sum(resid, axis=-1, keepdims=True)
      resid_logp = jnp.where(mass > 0, jnp.log(resid / jnp.where(mass > 0, mass, 1.0)), p_next)
      fix = pick(jnp.where(jnp.isfinite(resid_logp), resid_logp, NEG_INF), noise[gamma])
    written = n_acc + 1
    keep = j < written[:, None]
    new = jnp.where(j < n_acc[:, None], jnp.concatenate([xs, xs[:, -1:]], axis=1), fix[:, None])
    new = jnp.where(keep, new, cfg.pad_id)
    at = jnp.where(live[:, None], cur[:, None] + j, size)                 # finished rows: dropped
    buf = c["buf"].at[jnp.arange(b)[:, None], at].set(new, mode="drop")
    new_cur = jnp.where(live, cur + written, cur)
    hit_eos = jnp.any((new == cfg.eos_id) & keep, axis=1)
    return dict(buf=buf, cur=new_cur, t_cache=tc, d_cache=dc, t_first=cur - 1, d_first=cur - 2, rng=rng,
                done=c["done"] | hit_eos | (new_cur - start >= n),
                accepted=c["accepted"] + jnp.where(live, n_acc, 0), blocks=c["blocks"] + live)

  zeros = jnp.zeros((b,), jnp.int32)
  nowhere = jnp.full((b,), size, jnp.int32)       # the scratch onto itself
  c = dict(buf=buf, cur=jnp.full((b,), start, jnp.int32), t_cache=t_cache, d_cache=d_cache, t_first=nowhere,
           d_first=nowhere, rng=rng, done=jnp.zeros((b,), bool), accepted=zeros, blocks=zeros)
  c = jax.lax.while_loop(lambda c: ~jnp.all(c["done"]), body, c)
  resp = c["buf"][:, start:start + n]
  is_eos = resp == cfg.eos_id
  first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
  resp_len = jnp.minimum(jnp.minimum(first_eos, c["cur"] - start), n).astype(jnp.int32)
  tokens = c["buf"][:, 1:1 + p + n]
  gen = jnp.arange(p + n)[None, :] >= p
  resp = gen & (jnp.arange(p + n)[None, :] < p + resp_len[:, None])
  tokens = jnp.where(gen & ~resp, cfg.pad_id, tokens)
  shift = p - plen
  return SpecOutput(_right_align(tokens, shift), _right_align(resp.astype(jnp.int32), shift), resp_len,
                    c["accepted"], c["blocks"], gamma * c["blocks"])
