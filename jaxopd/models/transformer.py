"""A decoder-only language model in Flax NNX: GPT-2 and the rotary (Llama-like) families.

One module (:class:`Transformer`); ``ModelConfig.family`` picks the layout, per-family options
(commented on :class:`ModelConfig`) the rest. ``gpt2``: learned positions, LayerNorm with bias,
GELU (tanh), biases on every projection, tied input/output embeddings. ``llama``: RMSNorm, rotary
positions (HF "rotate_half" layout), gated MLP, grouped-query attention; its options cover
Qwen2/3, Llama 3.x, Mistral, Gemma 2/3 and OLMo 2 (sliding-window layers by position distance,
so every attention path and the KV cache agree). Every parameter is an ``nnx.Param`` with
``logical_axes`` metadata, which the mesh rules of :mod:`jaxopd.mesh` turn into shardings.
The same attention code serves training and decoding: with a :class:`KVCache` the ``T`` new
tokens are written at ``cache.index`` and attend to every valid slot at or before their own, so
prefill and one-token decode are the same call.
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
from jaxopd.models import lora, splash

FAMILIES = ("gpt2", "llama")
QK_NORMS = ("none", "head", "full")
NORM_LAYOUTS = ("pre", "sandwich", "post")
MLP_ACTS = ("silu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full", "sliding")
HF_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "olmo2")
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
  matmul_dtype: str = ""           # the projections' and LM head's operands: "" = dtype; bfloat16 with float32
                                   # compute: bf16 inputs and weights, accumulated in float32 (the rest float32)
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
  # Per-family options of the llama layout (defaults: Llama 2 / Qwen2).
  d_head: int = 0                  # per-head width; 0 = d_model / n_heads (Qwen3 and Gemma set it)
  qk_norm: str = "none"            # RMSNorm of queries and keys before the rotary embedding: none | head (per
                                   # head: Qwen3, Gemma 3) | full (over all heads' projection: OLMo 2)
  norm_layout: str = "pre"         # pre (norm before attention and MLP) | sandwich (before and after: Gemma 2/3)
                                   # | post (after only: OLMo 2)
  norm_plus_one: bool = False      # RMSNorm scales by (1 + w) (Gemma)
  mlp_act: str = "silu"            # the gated MLP's activation: silu (SwiGLU) | gelu_tanh (GeGLU: Gemma)
  embed_scale: bool = False        # embeddings times sqrt(d_model) (Gemma)
  query_scalar: float = 0.0        # scores scaled by query_scalar^-1/2; 0 = head_dim (Gemma: query_pre_attn_scalar)
  attn_softcap: float = 0.0        # scores -> c * tanh(scores / c) before masking; 0 = off (Gemma 2)
  logit_softcap: float = 0.0       # final logits likewise; 0 = off (Gemma 2)
  rope_type: str = "default"       # rotary scaling: default | linear (frequencies / rope_factor) | llama3
  rope_factor: float = 1.0         # linear and llama3: the scaling factor
  rope_low_freq: float = 1.0       # llama3: low_freq_factor
  rope_high_freq: float = 4.0      # llama3: high_freq_factor
  rope_original_len: int = 8192    # llama3: original_max_position_embeddings
  sliding_window: int = 0          # a sliding layer's query sees keys less than this many positions back; 0 = none
  layer_types: tuple = ()          # "full" or "sliding" per layer; () = all sliding if sliding_window, else full
  rope_local_theta: float = 0.0    # sliding layers' rotary base, unscaled (Gemma 3); 0 = as the full layers
  hf_type: str = ""                # the HF model_type export writes; "" = gpt2, or llama / qwen2 (by qkv_bias)
  # LoRA adapters (jaxopd/models/lora.py; set per role by config.models.<role>.lora).
  lora_rank: int = 0               # adapter rank; 0 = none
  lora_alpha: float = 16.0         # the adapters' output is scaled by lora_alpha / lora_rank
  lora_targets: tuple = ()         # projections with adapters, of q k v o gate up down; () = all seven
  lora_init: str = "kaiming"       # A's init: kaiming (PEFT's default) | gaussian; B starts at zero

  def __post_init__(self):
    for f in ("layer_types", "lora_targets"):    # hashable (a static model attribute)
      object.__setattr__(self, f, tuple(getattr(self, f)))

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def without_lora(self) -> "ModelConfig":
    """The same model without adapters (its base)."""
    return dataclasses.replace(self, lora_rank=0, lora_alpha=16.0, lora_targets=(), lora_init="kaiming")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends within ``sliding_window``."""
    if not self.sliding_window:
      return (False,) * self.n_layers
    return tuple(t == "sliding" for t in self.layer_types) if self.layer_types else (True,) * self.n_layers

  @property
  def export_type(self) -> str:
    return self.hf_type or ("gpt2" if self.family == "gpt2" else "qwen2" if self.qkv_bias else "llama")

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
    if self.d_head < 0:
      bad("d_head", "must be >= 0")
    if not self.d_head and self.d_model % self.n_heads:
      bad("n_heads", f"must divide d_model={self.d_model} (or set d_head)")
    if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
      bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
    if self.family == "gpt2" and self.n_kv_heads not in (0, self.n_heads):
      bad("n_kv_heads", "gpt2 has no grouped-query attention (use 0)")
    if self.family == "gpt2" and self.qkv_bias:
      bad("qkv_bias", "gpt2 always has biases; this option is for llama")
    if self.family == "llama" and self.head_dim % 2:
      bad("d_head" if self.d_head else "n_heads", "rotary embeddings need an even head_dim")
    for f, choices in (("qk_norm", QK_NORMS), ("norm_layout", NORM_LAYOUTS), ("mlp_act", MLP_ACTS),
                       ("rope_type", ROPE_TYPES)):
      if getattr(self, f) not in choices:
        bad(f, f"must be one of {choices}")
    if self.hf_type and self.hf_type not in HF_TYPES:
      bad("hf_type", f"must be one of {HF_TYPES} (or empty)")
    if self.family == "gpt2":
      defaults = ModelConfig()
      for f in ("d_head", "qk_norm", "norm_layout", "norm_plus_one", "mlp_act", "embed_scale", "query_scalar",
                "attn_softcap", "logit_softcap", "rope_type", "sliding_window", "layer_types", "rope_local_theta"):
        if getattr(self, f) != getattr(defaults, f):
          bad(f, "is an option of the llama layout, not gpt2")
      if self.hf_type not in ("", "gpt2"):
        bad("hf_type", "must be gpt2 (or empty) for family gpt2")
    for f in ("query_scalar", "attn_softcap", "logit_softcap", "rope_local_theta", "sliding_window"):
      if getattr(self, f) < 0:
        bad(f, "must be >= 0 (0 = off)")
    if self.rope_type != "default" and (self.rope_factor <= 0 or self.rope_original_len <= 0
                                        or self.rope_high_freq <= self.rope_low_freq):
      bad("rope_type", "needs rope_factor > 0, rope_original_len > 0 and rope_high_freq > rope_low_freq")
    if self.layer_types:
      if len(self.layer_types) != self.n_layers or any(t not in LAYER_TYPES for t in self.layer_types):
        bad("layer_types", f"must be {self.n_layers} entries (one per layer), each one of {LAYER_TYPES}")
      if "sliding" in self.layer_types and not self.sliding_window:
        bad("layer_types", "has sliding layers but sliding_window=0")
    if self.d_ff < 0:
      bad("d_ff", "must be >= 0")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in ("float32", "bfloat16"):
        bad(f, "must be float32 or bfloat16")
    if self.matmul_dtype not in ("", "float32", "bfloat16"):
      bad("matmul_dtype", "must be empty (the compute dtype), float32 or bfloat16")
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
    if self.lora_rank < 0:
      bad("lora_rank", "must be >= 0 (0 = no adapters)")
    if self.lora_rank:
      if self.family != "llama":
        bad("lora_rank", "adapters are for the llama layout (gpt2's fused c_attn has no per-projection adapters)")
      if self.lora_alpha <= 0:
        bad("lora_alpha", "must be positive")
      if any(t not in lora.TARGETS for t in self.lora_targets) or len(set(self.lora_targets)) != len(self.lora_targets):
        bad("lora_targets", f"must be distinct names of {tuple(lora.TARGETS)}")
      if self.lora_init not in lora.INITS:
        bad("lora_init", f"must be one of {lora.INITS}")
    return self

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    d = dict(cfg)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"config.model: unknown fields {sorted(unknown)}")
    return cls(**d).validate()


# Architecture fields compared between a block and a source (derived sizes: d_ff=0 means the default width).
ARCH_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "ff_dim", "qkv_bias",
               "rope_theta", "norm_eps", "tie_embeddings", "max_len", "head", "head_dim", "qk_norm", "norm_layout",
               "norm_plus_one", "mlp_act", "embed_scale", "query_scalar", "attn_softcap", "logit_softcap",
               "rope_type", "rope_factor", "rope_low_freq", "rope_high_freq", "rope_original_len",
               "sliding_window", "layer_types", "rope_local_theta")


def compare_arch(ours: ModelConfig, theirs: ModelConfig, ours_name: str, where: str, note: str = ""):
  """ConfigError ``"{ours_name}.{field}=... but {where} has ..."`` at the first architecture
  field that differs (``max_len`` only for gpt2, whose positions table depends on it)."""
  for f in ARCH_FIELDS:
    if f == "max_len" and ours.family != "gpt2" or f == "rope_theta" and ours.family == "gpt2":
      continue
    a, b = getattr(ours, f), getattr(theirs, f)
    if a != b:
      field = {"kv_heads": "n_kv_heads", "ff_dim": "d_ff", "head_dim": "d_head"}.get(f, f)
      raise ConfigError(f"{ours_name}.{field}={a!r}{note} but {where} has {b!r}")


class KVCache(NamedTuple):
  """Fixed-size key/value cache, one buffer per layer so that decoding updates
  each in place: ``k``: L arrays ``[B, Hkv, S, Dh]``, ``v``: L arrays ``[B, Hkv, S, Dh]``
  (head-major: the attention matmuls read them without a transpose);
  ``valid: [B, S]`` marks written, non-padding slots; ``pos: [B, S]`` each slot's position (sliding
  windows are measured in positions, not slots); ``index`` is the next slot to write.

  A *prefix* cache (:meth:`with_prefix`: ``prefix_k`` / ``prefix_v`` L arrays ``[Bp, Hkv, P, Dh]``,
  ``prefix_valid [Bp, P]``) holds a prompt shared by ``B / Bp`` consecutive rows once (GRPO's G
  samples of a prompt): every row attends to its group's prefix, then to its own slots."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array
  pos: jax.Array | None = None
  prefix_k: tuple[jax.Array, ...] = ()
  prefix_v: tuple[jax.Array, ...] = ()
  prefix_valid: jax.Array | None = None
  prefix_pos: jax.Array | None = None

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int | None = None) -> "KVCache":
    length = length or cfg.max_len
    k_shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    v_shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return cls(tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.n_layers)),
               tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.n_layers)),
               jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32), jnp.zeros((batch, length), jnp.int32))

  def with_prefix(self, prefix: "KVCache") -> "KVCache":
    """This cache (rows ``B``) continuing ``prefix``'s written slots (rows ``Bp``, ``B / Bp`` rows per
    prefix row, prompt-major) as a shared prefix."""
    return self._replace(prefix_k=prefix.k, prefix_v=prefix.v, prefix_valid=prefix.valid, prefix_pos=prefix.pos)

  def layer_prefix(self, i: int):
    """Layer ``i``'s ``(keys, values, valid, positions)`` of the shared prefix, or None."""
    return (self.prefix_k[i], self.prefix_v[i], self.prefix_valid, self.prefix_pos) if self.prefix_k else None


class Output(NamedTuple):
  logits: jax.Array                      # [B, T, V] in the compute dtype ([B, T, 1] with head=score)
  hidden: tuple[jax.Array, ...] | None   # n_layers + 1 arrays [B, T, D] (HF layout), or None
  cache: KVCache | None                  # the updated cache when one was given


def _dense(x: jax.Array, w: jax.Array, mm: str = "") -> jax.Array:
  """``x[B, T, D] @ w[D, ...]`` as one 2-D matmul on ``[B*T, D]``: XLA:CPU otherwise
  materialises transposed copies for the weight gradients of 3-D activations
  (bench/train_step.py: the backward was ~4.5x the forward; 446 -> 324 ms/step). ``mm``
  (``ModelConfig.matmul_dtype``): both operands in that dtype, accumulated in ``x``'s."""
  b, t, d = x.shape
  x2, w2 = x.reshape(b * t, d), w.reshape(d, -1)
  if mm and jnp.dtype(mm) != x.dtype:
    out = jnp.dot(x2.astype(mm), w2.astype(mm), preferred_element_type=x.dtype)
  else:
    out = x2 @ w2
  return out.reshape((b, t) + w.shape[1:])


def _adapted(module: nnx.Module, name: str, x: jax.Array, scale: float, mm: str = "") -> jax.Array:
  """``x @ W`` for weight ``name`` of ``module`` (operands in ``mm``, see :func:`_dense`), plus its
  LoRA term ``scale (x A) B`` when it has adapters (:mod:`jaxopd.models.lora`)."""
  dt = x.dtype
  w = getattr(module, name)[...]
  if w.shape[0] != x.shape[-1]:         # several input dimensions (wo: [heads, head_dim, d])
    w = w.reshape(x.shape[-1], -1)
  y = _dense(x, w.astype(mm or dt), mm)
  a = getattr(module, name + "_lora_a", None)
  if a is None:
    return y
  a, b = a[...], getattr(module, name + "_lora_b")[...]
  return y + _dense(_dense(x, a.reshape(-1, a.shape[-1]).astype(dt)), (b * scale).astype(dt))


def _param(rngs: nnx.Rngs, shape, axes, std, dtype) -> nnx.Param:
  return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype), logical_axes=axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


def _ones(shape, axes, dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


class Norm(nnx.Module):
  """LayerNorm (gpt2) or RMSNorm (llama; scale ``1 + w`` with ``norm_plus_one``) over the last
  ``dim`` features (default ``d_model``), statistics in float32."""

  def __init__(self, cfg: ModelConfig, dim: int = 0, axes=("embed",)):
    pd = jnp.dtype(cfg.param_dtype)
    dim = dim or cfg.d_model
    self.rms = cfg.family == "llama"
    self.plus_one = cfg.norm_plus_one
    self.eps = cfg.norm_eps
    self.scale = (_zeros if self.plus_one else _ones)((dim,), axes, pd)
    self.bias = None if self.rms else _zeros((dim,), axes, pd)

  def __call__(self, x):
    dt = x.dtype
    x = x.astype(jnp.float32)
    if self.rms:
      x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
      scale = self.scale[...].astype(jnp.float32)
      return (x * (1.0 + scale if self.plus_one else scale)).astype(dt)
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    x = (x - mu) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...] + self.bias[...]).astype(dt)


def inv_freq(cfg: ModelConfig, local: bool = False) -> jax.Array:
  """The rotary frequencies ``[Dh/2]`` (float32, as transformers computes them) of a full layer,
  or of a sliding one (``local``: ``rope_local_theta`` unscaled where it is set)."""
  dh = cfg.head_dim
  own = local and cfg.rope_local_theta > 0
  theta = cfg.rope_local_theta if own else cfg.rope_theta
  inv = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  if own or cfg.rope_type == "default":
    return inv
  if cfg.rope_type == "linear":
    return inv / cfg.rope_factor
  # llama3: long wavelengths divided by the factor, short ones kept, the band between interpolated.
  f, old = cfg.rope_factor, cfg.rope_original_len
  low_wl, high_wl = old / cfg.rope_low_freq, old / cfg.rope_high_freq
  wl = 2 * math.pi / inv
  scaled = jnp.where(wl > low_wl, inv / f, inv)
  smooth = (old / wl - cfg.rope_low_freq) / (cfg.rope_high_freq - cfg.rope_low_freq)
  smoothed = (1 - smooth) * scaled / f + smooth * scaled
  return jnp.where((wl >= high_wl) & (wl <= low_wl), smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, freqs: jax.Array) -> jax.Array:
  """Rotary embedding, HF layout (halves rotated). ``x: [B, T, H, Dh]``, ``positions: [B, T]``,
  ``freqs [Dh/2]`` (:func:`inv_freq`)."""
  ang = positions.astype(jnp.float32)[..., None] * freqs              # [B, T, Dh/2]
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
    per_head = cfg.qk_norm == "head"
    self.q_norm = (None if cfg.qk_norm == "none" else
                   Norm(cfg, dh, ("head_dim",)) if per_head else Norm(cfg, h * dh, (None,)))
    self.k_norm = (None if cfg.qk_norm == "none" else
                   Norm(cfg, dh, ("head_dim",)) if per_head else Norm(cfg, kv * dh, (None,)))
    if cfg.lora_rank:
      lora.attach(self, "attn", cfg, rngs)

  @property
  def scale(self) -> float:
    return 1.0 / math.sqrt(self.cfg.query_scalar or self.cfg.head_dim)

  def __call__(self, x, positions, key_mask, cache_kv=None, index=None, segment_ids=None, branch_ids=None,
               groups=None, prefix_kv=None, key_pos=None, local=False):
    """``x: [B, T, D]``; ``key_mask: [B, S]`` valid keys (S = T without cache);
    ``segment_ids: [B, T]`` (packed rows, no cache): attend only within a segment;
    ``branch_ids: [B, T]`` (shared-prefix rows, no cache): 0 marks the shared prefix, ``j > 0``
    the tokens of branch j (a response); a token attends to the prefix and its own branch;
    ``groups = (P, G)`` (grouped rows, no cache; see :meth:`Transformer.__call__`);
    ``cache_kv``: this layer's ``(k, v)`` (layouts in :class:`KVCache`), ``prefix_kv`` its shared
    prefix (:meth:`KVCache.layer_prefix`, attended with einsum); ``key_pos [B, S]``: the keys'
    positions (default ``positions``); ``local``: a sliding-window layer (a bool, or a traced
    one under ``scan_layers``); returns (y, new (k, v))."""
    cfg = self.cfg
    dt = x.dtype
    b, t = x.shape[:2]
    q, k, v = (_adapted(self, w, x, cfg.lora_scale, cfg.matmul_dtype) for w in ("wq", "wk", "wv"))
    if self.bq is not None:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if self.q_norm is not None:
      if cfg.qk_norm == "head":
        q, k = self.q_norm(q), self.k_norm(k)
      else:
        q, k = (n(z.reshape(b, t, -1)).reshape(z.shape) for n, z in ((self.q_norm, q), (self.k_norm, k)))
    if cfg.family == "llama":
      freqs = inv_freq(cfg)
      if cfg.sliding_window and cfg.rope_local_theta:
        freqs = jnp.where(local, inv_freq(cfg, True), freqs)
      q, k = rope(q, positions, freqs), rope(k, positions, freqs)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    h, dh = q.shape[2:]
    key_pos = positions if key_pos is None else key_pos
    window = self._window(local)
    keys, values = k, v
    if groups is not None:
      out = self._grouped_attention(q, k, v, key_mask, groups, positions, window)
    else:
      if cache_kv is None:
        q_slot = jnp.arange(t)
      else:
        ck, cv = cache_kv
        keys = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), (0, 0, index, 0))
        values = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), (0, 0, index, 0))
        q_slot = index + jnp.arange(t)
      s = values.shape[1 if cache_kv is None else 2]      # [B, S, n, Dh] or the cache's [B, n, S, Dh]
      allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]   # [B, T, S]
      allowed = window(allowed, positions, key_pos)
      if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
      if branch_ids is not None:
        allowed = allowed & ((branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :]))
      if cfg.attention == "splash" and cache_kv is None:
        out = self._splash(q, keys, values, key_mask, segment_ids, branch_ids, local)
      elif cache_kv is None:
        out = self._attend(q, keys, values, allowed)
      elif prefix_kv is not None:
        pk, pv, pvalid, ppos = prefix_kv
        rows = b // pk.shape[0]
        p_allowed = window(jnp.broadcast_to(jnp.repeat(pvalid, rows, axis=0)[:, None, :], (b, t, pk.shape[2])),
                           positions, jnp.repeat(ppos, rows, axis=0))
        out = self._einsum_attention(q, keys, values, allowed, "bnsk", False, (pk, pv, p_allowed))
      elif cfg.attention == "dot_product":   # the cache holds [B, n, S, Dh]
        out = self._dot_product(q, keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3), allowed)
      else:
        out = self._einsum_attention(q, keys, values, allowed, "bnsk", False)
    out = out.reshape(b, t, h * dh)
    y = _adapted(self, "wo", out, cfg.lora_scale, cfg.matmul_dtype)
    if self.bo is not None:
      y = y + self.bo[...].astype(dt)
    return y, (None if cache_kv is None else (keys, values))

  def _window(self, local):
    """``f(allowed [B, T, S], q_pos [B, T], k_pos [B, S])``: ``allowed`` narrowed to the keys less
    than ``sliding_window`` positions back where this layer is ``local``."""
    w = self.cfg.sliding_window
    if not w or local is False:
      return lambda allowed, q_pos, k_pos: allowed

    def narrow(allowed, q_pos, k_pos):
      near = (q_pos[:, :, None] - k_pos[:, None, :]) < w
      return allowed & (near if local is True else (near | ~local))
    return narrow

  def _splash(self, q, keys, values, key_mask, segment_ids, branch_ids, local):
    cfg = self.cfg
    run = lambda w: splash.attention(q, keys, values, key_mask, segment_ids, branch_ids, scale=self.scale,
                                     softcap=cfg.attn_softcap, window=w)
    if not cfg.sliding_window or local is False:
      return run(0)
    if local is True:
      return run(cfg.sliding_window)
    return jax.lax.cond(local, lambda: run(cfg.sliding_window), lambda: run(0))

  def _dot_product(self, q, keys, values, allowed):
    """``jax.nn.dot_product_attention`` of ``q [B, T, h, Dh]`` over ``[B, S, kv, Dh]`` keys/values."""
    if self.cfg.attn_softcap:
      raise ConfigError(f"config.model.attention='dot_product' cannot soft-cap the attention scores "
                        f"(attn_softcap={self.cfg.attn_softcap}, Gemma 2): use einsum, chunked or splash")
    dt = q.dtype
    return jax.nn.dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=allowed[:, None],
                                        scale=self.scale)

  def _scores(self, scores):
    """Scaled (and soft-capped) float32 scores."""
    scores = scores * self.scale
    cap = self.cfg.attn_softcap
    return cap * jnp.tanh(scores / cap) if cap else scores

  def _attend(self, q, keys, values, allowed):
    """Cache-free attention of ``q [B, T, h, Dh]`` over ``keys``/``values [B, S, kv, Dh]`` where
    ``allowed [B, T, S]``, by ``cfg.attention`` (einsum, dot_product or chunked)."""
    cfg = self.cfg
    if cfg.attention == "dot_product":
      return self._dot_product(q, keys, values, allowed)
    if cfg.attention == "chunked":
      # One chunk of queries at a time: its [B, n, g, C, S] scores exist for one chunk in the forward
      # pass and are recomputed per chunk in the backward pass (map_chunks' checkpointed scan).
      return map_chunks(lambda xs: self._einsum_attention(xs[0], keys, values, xs[1], "bsnk", True),
                        (q, allowed), cfg.attention_chunk)
    return self._einsum_attention(q, keys, values, allowed, "bsnk", True)

  def _grouped_attention(self, q, k, v, key_mask, groups, positions, window):
    """Attention of grouped rows ``[prefix (P) | branch 1 (N) | ... | branch G (N)]``: the prefix
    attends to itself causally; each branch to the prefix's valid keys and to itself causally,
    never to another branch. Computed as two attentions, so no masked branch-by-branch block is
    ever formed: the prefix over ``[B, P]``, the branches as ``[B * G, N]`` rows over their group's
    prefix keys (repeated G times) followed by their own."""
    if self.cfg.attention == "splash":
      raise ConfigError("config.model.attention='splash' cannot run grouped rows (a shared prompt's G responses, "
                        "config.method.share_prompt): use einsum, dot_product or chunked, or share_prompt=False")
    p, g = groups
    b, t, h, dh = q.shape
    n = (t - p) // g
    split = lambda x: (x[:, :p], x[:, p:].reshape((b * g, n) + x.shape[2:]))
    (qp, qs), (kp, ks), (vp, vs), (mp, ms), (pp, ps) = (split(x) for x in (q, k, v, key_mask, positions))
    causal = lambda m: jnp.tril(jnp.ones((m, m), bool))[None]
    out_p = self._attend(qp, kp, vp, window(causal(p) & mp[:, None, :], pp, pp))
    rep = lambda x: jnp.repeat(x, g, axis=0)
    allowed = jnp.concatenate([jnp.broadcast_to(rep(mp)[:, None, :], (b * g, n, p)),
                               causal(n) & ms[:, None, :]], axis=-1)
    allowed = window(allowed, ps, jnp.concatenate([rep(pp), ps], axis=1))
    out_s = self._attend(qs, jnp.concatenate([rep(kp), ks], 1), jnp.concatenate([rep(vp), vs], 1), allowed)
    return jnp.concatenate([out_p, out_s.reshape(b, g * n, h, dh)], axis=1)

  def _einsum_attention(self, q, keys, values, allowed, k_spec, no_cache, prefix_kv=None):
    """Scores materialised ``[B, n, g, T, S]``, accumulated and kept in float32 (bf16 inputs
    too), masked, softmax; ``[B, T, h, Dh]``. With ``prefix_kv`` (a cache's shared prefix,
    ``[Bp, n, P, Dh]`` keys and values and the ``[B, T, P]`` keys each query may see) the scores
    of each group's prefix come first, under one softmax with the row's own."""
    cfg = self.cfg
    dt = q.dtype
    b, t, h, dh = q.shape
    s = allowed.shape[-1]
    n, g = cfg.kv_heads, h // cfg.kv_heads
    qg = q.reshape(b, t, n, g, dh)
    neg = jnp.finfo(jnp.float32).min
    scores = self._scores(jnp.einsum(f"btngk,{k_spec}->bngts", qg, keys.astype(dt),
                                     preferred_element_type=jnp.float32))   # accumulated in float32
    scores = jnp.where(allowed[:, None, None], scores, neg)
    if prefix_kv is not None:
      pk, pv, p_allowed = prefix_kv
      bp, npre = pk.shape[0], pk.shape[2]
      sp = self._scores(jnp.einsum("bjtngk,bnsk->bjngts", qg.reshape(bp, b // bp, t, n, g, dh), pk.astype(dt),
                                   preferred_element_type=jnp.float32))
      sp = jnp.where(p_allowed.reshape(bp, b // bp, 1, 1, t, npre), sp, neg)
      scores = jnp.concatenate([sp.reshape(b, n, g, t, npre), scores], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    if no_cache:
      return jnp.einsum("bngts,bsnk->btngk", probs, values.astype(dt)).reshape(b, t, h, dh)
    from_prefix = 0.0
    if prefix_kv is not None:
      pp, probs = probs[..., :npre].reshape(bp, b // bp, n, g, t, npre), probs[..., npre:]
      from_prefix = jnp.einsum("bjngts,bnsk->bjtngk", pp, pv.astype(dt)).reshape(b, t, h, dh)
    # [B, n, g*T, S] @ [B, n, S, Dh] written as a plain batched matmul: XLA:CPU then hands
    # it to its fast (YNNPACK) kernel; the einsum form lowers to a transposed dot that
    # runs on the slow generic emitter.
    out = jax.lax.dot_general(probs.reshape(b, n, g * t, s), values.astype(dt), (((3,), (2,)), ((0, 1), (0, 1))))
    return out.reshape(b, n, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh) + from_prefix


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.gpt2 = cfg.family == "gpt2"
    self.act = cfg.mlp_act
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
    self.lora_scale = cfg.lora_scale
    self.matmul_dtype = cfg.matmul_dtype
    if cfg.lora_rank:
      lora.attach(self, "mlp", cfg, rngs)

  def _proj(self, x, name):
    return _adapted(self, name, x, self.lora_scale, self.matmul_dtype)

  def __call__(self, x):
    dt = x.dtype
    if self.gpt2:
      mm = self.matmul_dtype
      h = jax.nn.gelu(_dense(x, self.w_in[...].astype(mm or dt), mm) + self.b_in[...].astype(dt), approximate=True)
      h = constrain(h, ("batch", "length", "mlp"))
      return _dense(h, self.w_out[...].astype(mm or dt), mm) + self.b_out[...].astype(dt)
    gate = self._proj(x, "w_gate")
    gate = jax.nn.silu(gate) if self.act == "silu" else jax.nn.gelu(gate, approximate=True)
    h = gate * self._proj(x, "w_up")
    h = constrain(h, ("batch", "length", "mlp"))
    return self._proj(h, "w_down")


class Block(nnx.Module):
  """Attention and MLP sub-layers, each ``x + post(f(pre(x)))``: ``pre`` norms for ``norm_layout``
  pre and sandwich (``ln1``, ``ln2``), ``post`` norms for sandwich and post (``ln1_post``, ``ln2_post``)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pre, post = cfg.norm_layout != "post", cfg.norm_layout != "pre"
    self.ln1 = Norm(cfg) if pre else None
    self.attn = Attention(cfg, rngs)
    self.ln1_post = Norm(cfg) if post else None
    self.ln2 = Norm(cfg) if pre else None
    self.mlp = MLP(cfg, rngs)
    self.ln2_post = Norm(cfg) if post else None

  def __call__(self, x, positions, key_mask, cache_kv=None, index=None, segment_ids=None, branch_ids=None,
               groups=None, prefix_kv=None, key_pos=None, local=False):
    norm = lambda n, z: z if n is None else n(z)
    a, new_kv = self.attn(norm(self.ln1, x), positions, key_mask, cache_kv, index, segment_ids, branch_ids, groups,
                          prefix_kv, key_pos, local)
    x = x + norm(self.ln1_post, a)
    x = x + norm(self.ln2_post, self.mlp(norm(self.ln2, x)))
    return constrain(x, ("batch", "length", "embed")), new_kv


def _remat_block(policy: str, groups=None, local=False):
  """A block's cache-free forward under ``jax.checkpoint`` (``nnx.remat``): ``full`` saves
  nothing inside the block (its input is saved by the caller's graph), ``dots`` saves the
  outputs of un-batched matmuls, i.e. the q/k/v/o and MLP projections (written as 2-D
  matmuls by :func:`_dense`), and recomputes the attention and elementwise work. ``local``: a
  bool, or None to take it (traced, under ``scan_layers``) as the last argument."""
  saveable = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable

  def run(block, x, positions, key_mask, segment_ids, branch_ids, *traced):
    layer_local = traced[0] if local is None else local
    return block(x, positions, key_mask, None, 0, segment_ids, branch_ids, groups, local=layer_local)[0]
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
               groups: tuple[int, int] | None = None, return_hidden: bool = False) -> Output:
    """``tokens: [B, T]`` int; ``positions: [B, T]`` (default: cache.index + arange(T));
    ``attention_mask: [B, T]`` 1 for real tokens (keys at 0 are never attended to;
    default all ones); ``segment_ids: [B, T]`` for packed rows (tokens attend
    within their segment only; pass the per-segment ``positions`` too); ``branch_ids: [B, T]``
    for shared-prefix rows (``[prompt | response 1 | response 2 ...]``, see
    :func:`jaxopd.data.pipeline.share_prompt`: 0 = the shared prefix, j = response j; a token
    attends to the prefix and its own response; pass each response's ``positions``);
    ``groups = (P, G)`` (static) for grouped rows ``[prefix (P) | branch 1 | ... | branch G]`` of
    equal-length branches (a prompt and its G sampled responses,
    :func:`jaxopd.models.heads.grouped_rows`): the
    prefix is encoded once and each branch attends to the prefix's valid tokens
    (``attention_mask``) and to itself, never to another branch; pass each branch's ``positions``
    (it continues the prefix) too."""
    x, hidden, new_cache = self._trunk(tokens, positions, attention_mask, cache, segment_ids, branch_ids,
                                       groups, return_hidden)
    return Output(self.unembed(x), hidden, new_cache)

  def final_hidden(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                   attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                   branch_ids: jax.Array | None = None, groups: tuple[int, int] | None = None) -> jax.Array:
    """The final (normed) hidden states ``[B, T, D]`` of :meth:`__call__`, without the head:
    a loss that needs the logits of only some positions at a time applies :meth:`unembed`
    to chunks of them (no ``[B, T, V]`` array)."""
    return self._trunk(tokens, positions, attention_mask, None, segment_ids, branch_ids, groups, False)[0]

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                    attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    branch_ids: jax.Array | None = None):
    """The ``n_layers + 1`` hidden states ``[B, T, D]`` of ``return_hidden=True`` (embeddings, each
    block's output, the last one after the final norm), without the head."""
    return self._trunk(tokens, positions, attention_mask, None, segment_ids, branch_ids, None, True)[1]

  def output_weight(self) -> jax.Array:
    """The head's weight ``[D, V]`` (``[D, 1]`` with ``head="score"``) in its storage dtype."""
    if self.score is not None:
      return self.score[...]
    return self.embed[...].T if self.lm_head is None else self.lm_head[...]

  def unembed(self, x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Logits of final hidden states ``x [B, T, D]`` in the compute dtype; ``weight``: the
    :meth:`output_weight` array when the caller already holds it (inside a chunk loop)."""
    w = self.output_weight() if weight is None else weight
    mm = self.cfg.matmul_dtype
    logits = _dense(x, w.astype(mm or self.cfg.dtype), mm)
    if self.score is not None:
      return logits
    cap = self.cfg.logit_softcap
    if cap:
      logits = (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)
    return constrain(logits, ("batch", "length", "vocab"))

  def _scan_blocks(self, x, positions, key_mask, segment_ids, branch_ids, groups, remat, return_hidden):
    """The blocks as one ``lax.scan`` (``scan_layers``): the per-layer parameters are stacked
    along a new leading axis for the forward (one extra copy of the blocks' parameters, sharded
    like them; the state, checkpoints and HF import/export keep one module per layer), so XLA
    compiles one block whatever the depth. Returns ``(x, list of each block's output)``."""
    graphdef, first = nnx.split(self.blocks[0])
    states = [first] + [nnx.split(b)[1] for b in self.blocks[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    kinds = set(self.cfg.local_layers)
    uniform = kinds.pop() if len(kinds) == 1 else None           # mixed layer types: a traced per-layer flag
    flags = None if uniform is not None else jnp.asarray(self.cfg.local_layers)
    run = _remat_block(self.cfg.remat, groups, uniform) if remat else None

    def body(h, xs):
      state, flag = xs
      block = nnx.merge(graphdef, state)
      if run is not None:
        h = run(block, h, positions, key_mask, segment_ids, branch_ids, *(() if flag is None else (flag,)))
      else:
        h = block(h, positions, key_mask, None, 0, segment_ids, branch_ids, groups,
                  local=uniform if flag is None else flag)[0]
      return h, (h if return_hidden else None)
    x, ys = jax.lax.scan(body, x, (stacked, flags))
    return x, ([ys[i] for i in range(len(self.blocks))] if return_hidden else [])

  def _trunk(self, tokens, positions, attention_mask, cache, segment_ids, branch_ids, groups, return_hidden):
    if (segment_ids is not None or branch_ids is not None or groups is not None) and cache is not None:
      raise ValueError("segment_ids / branch_ids / groups (packed, shared-prefix or grouped rows) are for "
                       "training forwards, not with a KV cache")
    if groups is not None and (segment_ids is not None or branch_ids is not None):
      raise ValueError("groups (grouped rows) cannot be combined with segment_ids or branch_ids")
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    start = 0 if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    new_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
      key_mask, key_pos = new_mask, positions
    else:
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_mask, cache.index, axis=1)
      key_pos = jax.lax.dynamic_update_slice_in_dim(cache.pos, positions.astype(jnp.int32), cache.index, axis=1)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    x = constrain(x, ("batch", "length", "embed"))
    hidden = [x] if return_hidden else None
    ks, vs = [], []
    remat = cache is None and cfg.remat != "none"
    if cache is None and cfg.scan_layers:
      x, states = self._scan_blocks(x, positions, key_mask, segment_ids, branch_ids, groups, remat, return_hidden)
      if return_hidden:
        hidden.extend(states)
    runs = {local: _remat_block(cfg.remat, groups, local) for local in set(cfg.local_layers)} if remat else {}
    for i, block in enumerate(() if cache is None and cfg.scan_layers else self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      local = cfg.local_layers[i]
      if runs:
        x, new_kv = runs[local](block, x, positions, key_mask, segment_ids, branch_ids), None
      else:
        x, new_kv = block(x, positions, key_mask, kv, start, segment_ids, branch_ids, groups,
                          None if cache is None else cache.layer_prefix(i), key_pos, local)
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
      new_cache = cache._replace(k=tuple(ks), v=tuple(vs), valid=key_mask, pos=key_pos, index=cache.index + t)
    return x, tuple(hidden) if return_hidden else None, new_cache
