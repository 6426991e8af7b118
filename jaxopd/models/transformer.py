"""A decoder-only language model in Flax NNX: GPT-2 and Llama (Qwen2) families.

One module, two families chosen by ``ModelConfig.family``:

* ``gpt2``: learned positions, LayerNorm with bias, GELU (tanh), biases on
  every projection, tied input/output embeddings.
* ``llama``: RMSNorm, rotary positions (HF "rotate_half" layout), SwiGLU MLP,
  grouped-query attention, no biases except the optional q/k/v bias of Qwen2.

Every parameter is an ``nnx.Param`` with ``logical_axes`` metadata; the mesh
rules in :mod:`jaxopd.mesh` turn those into shardings.

The same attention code serves training and decoding: without a cache it is
plain causal attention over ``T`` tokens; with a :class:`KVCache` the ``T`` new
tokens are written at ``cache.index`` and attend to every valid slot at or
before their own, so prefill and one-token decode are the same call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopd.errors import ConfigError
from jaxopd.losses.common import map_chunks
from jaxopd.mesh import constrain
from jaxopd.models import splash

FAMILIES = ("gpt2", "llama")
ATTENTION = ("einsum", "dot_product", "chunked", "splash")
REMAT = ("none", "full", "dots")
HEADS = ("lm", "score")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str = "llama"            # "gpt2" or "llama" (Llama/Qwen2 layout)
  vocab_size: int = 256            # vocabulary size
  d_model: int = 64                # residual width
  n_layers: int = 2                # transformer blocks
  n_heads: int = 4                 # query heads
  n_kv_heads: int = 0              # key/value heads (GQA); 0 = n_heads
  d_ff: int = 0                    # MLP width; 0 = 4*d_model (gpt2) or 8/3*d_model rounded to 32 (llama)
  max_len: int = 256               # longest sequence (positions table / cache size)
  qkv_bias: bool = False           # llama only: bias on q/k/v (Qwen2)
  rope_theta: float = 10000.0      # llama only: rotary base
  norm_eps: float = 1e-5           # LayerNorm / RMSNorm epsilon
  tie_embeddings: bool = True      # share input embedding and output projection
  dtype: str = "float32"           # compute dtype: float32 or bfloat16
  param_dtype: str = "float32"     # parameter storage dtype: float32 or bfloat16 (norm and softmax math stay float32)
  attention: str = "einsum"        # einsum (scores materialised, float32 softmax) | dot_product
                                   # (jax.nn.dot_product_attention: cuDNN flash attention on GPU where it applies)
                                   # | chunked (einsum over query chunks, rematerialised: scores of one chunk
                                   # of queries at a time, memory linear in length; training forwards)
                                   # | splash (the TPU splash-attention Pallas kernel, jaxopd/models/splash.py;
                                   # training forwards; interpret mode off TPU; the KV-cache path uses einsum)
  attention_chunk: int = 512       # chunked: queries per chunk
  remat: str = "none"              # rematerialisation of each block in a training forward: none | full
                                   # (keep only block inputs, recompute the rest in the backward) | dots
                                   # (keep the projections' matmul outputs, recompute attention and the rest)
  scan_layers: bool = False        # training forwards run the blocks as one lax.scan over their stacked
                                   # parameters (compile time independent of depth; see _trunk)
  init_std: float = 0.02           # normal init scale of every weight matrix
  head: str = "lm"                 # lm (next-token logits [B, T, V]) | score (one scalar per position [B, T, 1]:
                                   # a reward model, HF's *ForSequenceClassification with num_labels=1)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.family == "gpt2":
      return 4 * self.d_model
    return int(math.ceil(8 * self.d_model / 3 / 32) * 32)

  def validate(self, prefix: str = "config.model") -> "ModelConfig":
    def bad(field, why):
      raise ConfigError(f"{prefix}.{field}={getattr(self, field)!r}: {why}")
    if self.family not in FAMILIES:
      bad("family", f"must be one of {FAMILIES}")
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
      if getattr(self, f) <= 0:
        bad(f, "must be positive")
    if self.d_model % self.n_heads:
      bad("n_heads", f"must divide d_model={self.d_model}")
    if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
      bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
    if self.family == "gpt2" and self.n_kv_heads not in (0, self.n_heads):
      bad("n_kv_heads", "gpt2 has no grouped-query attention (use 0)")
    if self.family == "gpt2" and self.qkv_bias:
      bad("qkv_bias", "gpt2 always has biases; this option is for llama")
    if self.family == "llama" and self.head_dim % 2:
      bad("n_heads", "rotary embeddings need an even head_dim")
    if self.d_ff < 0:
      bad("d_ff", "must be >= 0")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in ("float32", "bfloat16"):
        bad(f, "must be float32 or bfloat16")
    if self.attention not in ATTENTION:
      bad("attention", f"must be one of {ATTENTION}")
    if self.attention_chunk <= 0:
      bad("attention_chunk", "must be positive")
    if self.attention_chunk != 512 and self.attention != "chunked":
      bad("attention_chunk", "only attention=chunked uses it")
    if self.remat not in REMAT:
      bad("remat", f"must be one of {REMAT}")
    if not isinstance(self.scan_layers, bool):
      bad("scan_layers", "must be True or False")
    if self.head not in HEADS:
      bad("head", f"must be one of {HEADS}")
    if self.norm_eps <= 0 or self.init_std <= 0:
      bad("norm_eps" if self.norm_eps <= 0 else "init_std", "must be positive")
    return self

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    d = dict(cfg)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"config.model: unknown fields {sorted(unknown)}")
    return cls(**d).validate()


class KVCache(NamedTuple):
  """Fixed-size key/value cache, one buffer per layer so that decoding updates
  each in place: ``k``: L arrays ``[B, Hkv, S, Dh]``, ``v``: L arrays ``[B, Hkv, S, Dh]``
  (head-major: the attention matmuls read them without a transpose);
  ``valid: [B, S]`` marks written, non-padding slots; ``index`` is the next slot to write."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int | None = None) -> "KVCache":
    length = length or cfg.max_len
    k_shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    v_shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return cls(tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.n_layers)),
               tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.n_layers)),
               jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


class Output(NamedTuple):
  logits: jax.Array                      # [B, T, V] in the compute dtype ([B, T, 1] with head=score)
  hidden: tuple[jax.Array, ...] | None   # n_layers + 1 arrays [B, T, D] (HF layout), or None
  cache: KVCache | None                  # the updated cache when one was given


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x[B, T, D] @ w[D, ...]`` as one 2-D matmul on ``[B*T, D]``: XLA:CPU otherwise
  materialises transposed copies for the weight gradients of 3-D activations
  (bench/train_step.py: the backward was ~4.5x the forward; 446 -> 324 ms/step)."""
  b, t, d = x.shape
  out = x.reshape(b * t, d) @ w.reshape(d, -1)
  return out.reshape((b, t) + w.shape[1:])


def _param(rngs: nnx.Rngs, shape, axes, std, dtype) -> nnx.Param:
  return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype), logical_axes=axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


def _ones(shape, axes, dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


class Norm(nnx.Module):
  """LayerNorm (gpt2) or RMSNorm (llama), statistics in float32."""

  def __init__(self, cfg: ModelConfig):
    pd = jnp.dtype(cfg.param_dtype)
    self.rms = cfg.family == "llama"
    self.eps = cfg.norm_eps
    self.scale = _ones((cfg.d_model,), ("embed",), pd)
    self.bias = None if self.rms else _zeros((cfg.d_model,), ("embed",), pd)

  def __call__(self, x):
    dt = x.dtype
    x = x.astype(jnp.float32)
    if self.rms:
      x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
      return (x * self.scale[...]).astype(dt)
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    x = (x - mu) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...] + self.bias[...]).astype(dt)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF layout (halves rotated). ``x: [B, T, H, Dh]``, ``positions: [B, T]``."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, Dh/2]
  cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (xf * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    d, h, kv, dh, std = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.init_std
    self.wq = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pd)
    self.wk = _param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wv = _param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wo = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), std / math.sqrt(2 * cfg.n_layers), pd)
    has_qkv_bias = cfg.family == "gpt2" or cfg.qkv_bias
    self.bq = _zeros((h, dh), ("heads", "head_dim"), pd) if has_qkv_bias else None
    self.bk = _zeros((kv, dh), ("kv_heads", "head_dim"), pd) if has_qkv_bias else None
    self.bv = _zeros((kv, dh), ("kv_heads", "head_dim"), pd) if has_qkv_bias else None
    self.bo = _zeros((d,), ("embed",), pd) if cfg.family == "gpt2" else None

  def __call__(self, x, positions, key_mask, cache_kv=None, index=None, segment_ids=None, branch_ids=None):
    """``x: [B, T, D]``; ``key_mask: [B, S]`` valid keys (S = T without cache);
    ``segment_ids: [B, T]`` (packed rows, no cache): attend only within a segment;
    ``branch_ids: [B, T]`` (shared-prefix rows, no cache): 0 marks the shared prefix, ``j > 0``
    the tokens of branch j (a response); a token attends to the prefix and its own branch;
    ``cache_kv``: this layer's ``(k, v)`` (layouts in :class:`KVCache`); returns (y, new (k, v))."""
    cfg = self.cfg
    dt = x.dtype
    q, k, v = (_dense(x, w[...].astype(dt)) for w in (self.wq, self.wk, self.wv))
    if self.bq is not None:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.family == "llama":
      q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    t = x.shape[1]
    if cache_kv is None:
      keys, values = k, v
      k_spec, v_spec = "bsnk", "bsnk"
      q_slot = jnp.arange(t)
    else:
      ck, cv = cache_kv
      keys = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), (0, 0, index, 0))
      values = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), (0, 0, index, 0))
      k_spec, v_spec = "bnsk", "bnsk"
      q_slot = index + jnp.arange(t)
    s = values.shape[v_spec.index("s")]
    b, _, h, dh = q.shape
    allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]   # [B, T, S]
    if segment_ids is not None:
      allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if branch_ids is not None:
      allowed = allowed & ((branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :]))
    if cfg.attention == "splash" and cache_kv is None:
      out = splash.attention(q, keys, values, key_mask, segment_ids, branch_ids)
    elif cfg.attention == "dot_product":
      if cache_kv is not None:   # the cache holds [B, n, S, Dh]
        keys_bsnk, values_bsnk = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
      else:
        keys_bsnk, values_bsnk = keys, values
      out = jax.nn.dot_product_attention(q, keys_bsnk.astype(dt), values_bsnk.astype(dt), mask=allowed[:, None])
    elif cfg.attention == "chunked" and cache_kv is None:
      # One chunk of queries at a time: its [B, n, g, C, S] scores exist for one chunk in the forward
      # pass and are recomputed per chunk in the backward pass (map_chunks' checkpointed scan).
      out = map_chunks(lambda xs: self._einsum_attention(xs[0], keys, values, xs[1], k_spec, True),
                       (q, allowed), cfg.attention_chunk)
    else:
      out = self._einsum_attention(q, keys, values, allowed, k_spec, cache_kv is None)
    y = _dense(out.reshape(b, t, h * dh), self.wo[...].reshape(h * dh, -1).astype(dt))
    if self.bo is not None:
      y = y + self.bo[...].astype(dt)
    return y, (None if cache_kv is None else (keys, values))

  def _einsum_attention(self, q, keys, values, allowed, k_spec, no_cache):
    """Scores materialised ``[B, n, g, T, S]``, accumulated and kept in float32 (bf16 inputs
    too), masked, softmax; ``[B, T, h, Dh]``."""
    cfg = self.cfg
    dt = q.dtype
    b, t, h, dh = q.shape
    s = allowed.shape[-1]
    g = h // cfg.kv_heads
    qg = q.reshape(b, t, cfg.kv_heads, g, dh)
    scores = jnp.einsum(f"btngk,{k_spec}->bngts", qg, keys.astype(dt),
                        preferred_element_type=jnp.float32) / math.sqrt(dh)   # accumulated in float32
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    if no_cache:
      return jnp.einsum("bngts,bsnk->btngk", probs, values.astype(dt)).reshape(b, t, h, dh)
    else:
      # [B, n, g*T, S] @ [B, n, S, Dh] written as a plain batched matmul: XLA:CPU then hands
      # it to its fast (YNNPACK) kernel; the einsum form lowers to a transposed dot that
      # runs on the slow generic emitter.
      out = jax.lax.dot_general(probs.reshape(b, cfg.kv_heads, g * t, s), values.astype(dt),
                                (((3,), (2,)), ((0, 1), (0, 1))))
      return out.reshape(b, cfg.kv_heads, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.gpt2 = cfg.family == "gpt2"
    d, f, std = cfg.d_model, cfg.ff_dim, cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    if self.gpt2:
      self.w_in = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
      self.b_in = _zeros((f,), ("mlp",), pd)
      self.w_out = _param(rngs, (f, d), ("mlp", "embed"), out_std, pd)
      self.b_out = _zeros((d,), ("embed",), pd)
    else:
      self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
      self.w_up = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
      self.w_down = _param(rngs, (f, d), ("mlp", "embed"), out_std, pd)

  def __call__(self, x):
    dt = x.dtype
    if self.gpt2:
      h = jax.nn.gelu(_dense(x, self.w_in[...].astype(dt)) + self.b_in[...].astype(dt), approximate=True)
      h = constrain(h, ("batch", "length", "mlp"))
      return _dense(h, self.w_out[...].astype(dt)) + self.b_out[...].astype(dt)
    h = jax.nn.silu(_dense(x, self.w_gate[...].astype(dt))) * _dense(x, self.w_up[...].astype(dt))
    h = constrain(h, ("batch", "length", "mlp"))
    return _dense(h, self.w_down[...].astype(dt))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln1 = Norm(cfg)
    self.attn = Attention(cfg, rngs)
    self.ln2 = Norm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, key_mask, cache_kv=None, index=None, segment_ids=None, branch_ids=None):
    a, new_kv = self.attn(self.ln1(x), positions, key_mask, cache_kv, index, segment_ids, branch_ids)
    x = x + a
    x = x + self.mlp(self.ln2(x))
    return constrain(x, ("batch", "length", "embed")), new_kv


def _remat_block(policy: str):
  """A block's cache-free forward under ``jax.checkpoint`` (``nnx.remat``): ``full`` saves
  nothing inside the block (its input is saved by the caller's graph), ``dots`` saves the
  outputs of un-batched matmuls, i.e. the q/k/v/o and MLP projections (written as 2-D
  matmuls by :func:`_dense`), and recomputes the attention and elementwise work."""
  saveable = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable

  def run(block, x, positions, key_mask, segment_ids, branch_ids):
    return block(x, positions, key_mask, None, 0, segment_ids, branch_ids)[0]
  return nnx.remat(run, policy=saveable, prevent_cse=True)


class Transformer(nnx.Module):
  """Decoder-only LM. ``model(tokens) -> Output(logits [B, T, V], hidden, cache)``; with
  ``head="score"`` a reward model: ``logits [B, T, 1]``, a score per position from a
  bias-free projection of the final hidden state (HF's ``score`` layer)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    cfg.validate()
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
    self.pos_embed = (_param(rngs, (cfg.max_len, cfg.d_model), ("positions", "embed"), cfg.init_std / 2, pd)
                      if cfg.family == "gpt2" else None)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.ln_f = Norm(cfg)
    self.lm_head = (None if cfg.tie_embeddings or cfg.head == "score" else
                    _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd))
    self.score = (_param(rngs, (cfg.d_model, 1), ("embed", None), cfg.init_std, pd) if cfg.head == "score"
                  else None)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
               attention_mask: jax.Array | None = None, cache: KVCache | None = None,
               segment_ids: jax.Array | None = None, branch_ids: jax.Array | None = None,
               return_hidden: bool = False) -> Output:
    """``tokens: [B, T]`` int; ``positions: [B, T]`` (default: cache.index + arange(T));
    ``attention_mask: [B, T]`` 1 for real tokens (keys at 0 are never attended to;
    default all ones); ``segment_ids: [B, T]`` for packed rows (tokens attend
    within their segment only; pass the per-segment ``positions`` too); ``branch_ids: [B, T]``
    for shared-prefix rows (``[prompt | response 1 | response 2 ...]``, see
    :func:`jaxopd.data.pipeline.share_prompt`: 0 = the shared prefix, j = response j; a token
    attends to the prefix and its own response; pass each response's ``positions``)."""
    x, hidden, new_cache = self._trunk(tokens, positions, attention_mask, cache, segment_ids, branch_ids,
                                       return_hidden)
    return Output(self.unembed(x), hidden, new_cache)

  def final_hidden(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                   attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                   branch_ids: jax.Array | None = None) -> jax.Array:
    """The final (normed) hidden states ``[B, T, D]`` of :meth:`__call__`, without the head:
    a loss that needs the logits of only some positions at a time applies :meth:`unembed`
    to chunks of them (no ``[B, T, V]`` array)."""
    return self._trunk(tokens, positions, attention_mask, None, segment_ids, branch_ids, False)[0]

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                    attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    branch_ids: jax.Array | None = None):
    """The ``n_layers + 1`` hidden states ``[B, T, D]`` of ``return_hidden=True`` (embeddings, each
    block's output, the last one after the final norm), without the head."""
    return self._trunk(tokens, positions, attention_mask, None, segment_ids, branch_ids, True)[1]

  def output_weight(self) -> jax.Array:
    """The head's weight ``[D, V]`` (``[D, 1]`` with ``head="score"``) in its storage dtype."""
    if self.score is not None:
      return self.score[...]
    return self.embed[...].T if self.lm_head is None else self.lm_head[...]

  def unembed(self, x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Logits of final hidden states ``x [B, T, D]`` in the compute dtype; ``weight``: the
    :meth:`output_weight` array when the caller already holds it (inside a chunk loop)."""
    w = self.output_weight() if weight is None else weight
    logits = _dense(x, w.astype(jnp.dtype(self.cfg.dtype)))
    return logits if self.score is not None else constrain(logits, ("batch", "length", "vocab"))

  def _scan_blocks(self, x, positions, key_mask, segment_ids, branch_ids, run, return_hidden):
    """The blocks as one ``lax.scan`` (``scan_layers``): the per-layer parameters are stacked
    along a new leading axis for the forward (one extra copy of the blocks' parameters, sharded
    like them; the state, checkpoints and HF import/export keep one module per layer), so XLA
    compiles one block whatever the depth. Returns ``(x, list of each block's output)``."""
    graphdef, first = nnx.split(self.blocks[0])
    states = [first] + [nnx.split(b)[1] for b in self.blocks[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def body(h, state):
      block = nnx.merge(graphdef, state)
      if run is not None:
        h = run(block, h, positions, key_mask, segment_ids, branch_ids)
      else:
        h = block(h, positions, key_mask, None, 0, segment_ids, branch_ids)[0]
      return h, (h if return_hidden else None)
    x, ys = jax.lax.scan(body, x, stacked)
    return x, ([ys[i] for i in range(len(self.blocks))] if return_hidden else [])

  def _trunk(self, tokens, positions, attention_mask, cache, segment_ids, branch_ids, return_hidden):
    if (segment_ids is not None or branch_ids is not None) and cache is not None:
      raise ValueError("segment_ids / branch_ids (packed or shared-prefix rows) are for training forwards, "
                       "not with a KV cache")
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    start = 0 if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    new_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
      key_mask = new_mask
    else:
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_mask, cache.index, axis=1)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    x = constrain(x, ("batch", "length", "embed"))
    hidden = [x] if return_hidden else None
    ks, vs = [], []
    run = _remat_block(cfg.remat) if cache is None and cfg.remat != "none" else None
    if cache is None and cfg.scan_layers:
      x, states = self._scan_blocks(x, positions, key_mask, segment_ids, branch_ids, run, return_hidden)
      if return_hidden:
        hidden.extend(states)
    for i, block in enumerate(() if cache is None and cfg.scan_layers else self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      if run is not None:
        x, new_kv = run(block, x, positions, key_mask, segment_ids, branch_ids), None
      else:
        x, new_kv = block(x, positions, key_mask, kv, start, segment_ids, branch_ids)
      if cache is not None:
        ks.append(new_kv[0])
        vs.append(new_kv[1])
      if return_hidden:
        hidden.append(x)
    x = self.ln_f(x)
    if return_hidden:
      hidden[-1] = x   # HF convention: the last hidden state is after the final norm
    new_cache = None
    if cache is not None:
      new_cache = KVCache(tuple(ks), tuple(vs), key_mask, cache.index + t)
    return x, tuple(hidden) if return_hidden else None, new_cache
