"""The shapes of real models, for ahead-of-time compile-and-fit reports and benchmarks.

``PRESETS[name]`` is a :class:`ModelConfig` with the architecture of the named
model, its fields taken from the model's Hugging Face ``config.json``
(sizes, heads, vocabulary, tied embeddings, rotary base and scaling, norms, q/k norm,
sliding windows: what :func:`jaxopd.models.hf.config_from_hf` reads). Weights are random: these
are shapes, not checkpoints
(a real checkpoint is ``init="hf:DIR"``, whose ``config.json`` gives the same fields).
"""

from __future__ import annotations

from jaxopd.errors import ConfigError
from jaxopd.models.transformer import ModelConfig

PRESETS = {
    # openai-community/gpt2
    "gpt2-124m": ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                             max_len=1024, tie_embeddings=True),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": ModelConfig(family="llama", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                              n_kv_heads=2, d_ff=4864, max_len=131072, qkv_bias=True, rope_theta=1e6,
                              norm_eps=1e-6, tie_embeddings=True),
    # Qwen/Qwen2-1.5B
    "qwen2-1.5b": ModelConfig(family="llama", vocab_size=151936, d_model=1536, n_layers=28, n_heads=12,
                              n_kv_heads=2, d_ff=8960, max_len=131072, qkv_bias=True, rope_theta=1e6,
                              norm_eps=1e-6, tie_embeddings=True),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": ModelConfig(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                             n_kv_heads=8, d_ff=14336, max_len=8192, rope_theta=5e5, norm_eps=1e-5,
                             tie_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the real model of the test suite: jaxopd.models.gguf)
    "smollm2-135m": ModelConfig(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, d_ff=1536, max_len=8192, rope_theta=1e5, norm_eps=1e-5,
                                tie_embeddings=True),
    # Qwen/Qwen3-1.7B
    "qwen3-1.7b": ModelConfig(family="llama", vocab_size=151936, d_model=2048, n_layers=28, n_heads=16,
                              n_kv_heads=8, d_ff=6144, d_head=128, qk_norm="head", max_len=40960, rope_theta=1e6,
                              norm_eps=1e-6, tie_embeddings=True, hf_type="qwen3"),
    # Qwen/Qwen3-8B
    "qwen3-8b": ModelConfig(family="llama", vocab_size=151936, d_model=4096, n_layers=36, n_heads=32,
                            n_kv_heads=8, d_ff=12288, d_head=128, qk_norm="head", max_len=40960, rope_theta=1e6,
                            norm_eps=1e-6, tie_embeddings=False, hf_type="qwen3"),
    # meta-llama/Llama-3.1-8B
    "llama3.1-8b": ModelConfig(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                               n_kv_heads=8, d_ff=14336, max_len=131072, rope_theta=5e5, norm_eps=1e-5,
                               rope_type="llama3", rope_factor=8.0, rope_low_freq=1.0, rope_high_freq=4.0,
                               rope_original_len=8192, tie_embeddings=False),
    # google/gemma-3-4b-it (its text model): 5 sliding-window layers (1024) to 1 global
    "gemma3-4b": ModelConfig(family="llama", vocab_size=262208, d_model=2560, n_layers=34, n_heads=8,
                             n_kv_heads=4, d_ff=10240, d_head=256, qk_norm="head", norm_layout="sandwich",
                             norm_plus_one=True, mlp_act="gelu_tanh", embed_scale=True, query_scalar=256.0,
                             max_len=131072, rope_theta=1e6, rope_type="linear", rope_factor=8.0,
                             rope_local_theta=1e4, sliding_window=1024,
                             layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(34)),
                             norm_eps=1e-6, tie_embeddings=True, hf_type="gemma3_text"),
}


def get(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"model preset {name!r}: must be one of {sorted(PRESETS)}")
  return PRESETS[name]


def num_params(cfg: ModelConfig) -> int:
  """Parameter count of a :class:`~jaxopd.models.Transformer` of ``cfg`` (no allocation)."""
  d, f, h, kv, dh = cfg.d_model, cfg.ff_dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  gpt2 = cfg.family == "gpt2"
  attn = d * h * dh + 2 * d * kv * dh + h * dh * d
  if gpt2 or cfg.qkv_bias:
    attn += h * dh + 2 * kv * dh
  attn += d if gpt2 else 0
  mlp = (2 * d * f + f + d) if gpt2 else 3 * d * f
  norms = (2 if gpt2 else 1) * d * (4 if cfg.norm_layout == "sandwich" else 2)
  norms += {"none": 0, "head": 2 * dh, "full": (h + kv) * dh}[cfg.qk_norm]
  per_layer = attn + mlp + norms
  total = cfg.n_layers * per_layer + cfg.vocab_size * d + (2 if gpt2 else 1) * d
  if gpt2:
    total += cfg.max_len * d
  if not cfg.tie_embeddings:
    total += d * cfg.vocab_size
  return total


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
  """Weights a token's forward multiplies by: ``(per block, LM head)``."""
  d, f, h, kv, dh = cfg.d_model, cfg.ff_dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  mlp = (2 if cfg.family == "gpt2" else 3) * d * f
  return d * h * dh + 2 * d * kv * dh + h * dh * d + mlp, d * cfg.vocab_size


def token_flops(cfg: ModelConfig, keys: int, head: bool = True) -> int:
  """Matmul FLOPs of one token's forward attending over ``keys`` keys: 2 per multiply-add of every
  weight, and ``4 keys h dh`` per block for the attention's scores and weighted sum.
  ``head=False``: the trunk only."""
  block, lm_head = matmul_params(cfg)
  return cfg.n_layers * (2 * block + 4 * keys * cfg.n_heads * cfg.head_dim) + (2 * lm_head if head else 0)


def forward_flops(cfg: ModelConfig, sequences: int, length: int, head: bool = True) -> float:
  """Matmul FLOPs of one forward over ``sequences`` rows of ``length`` tokens, as XLA executes
  it: every token attends over all ``length`` keys (the causal mask does not skip work;
  :func:`token_flops`)."""
  return float(sequences * length * token_flops(cfg, length, head))


def decode_flops(cfg: ModelConfig, sequences: int, prompt: int, new_tokens: int, samples: int = 1) -> float:
  """Sampling ``new_tokens`` per row after a ``prompt``-token prefill with a KV cache of
  ``prompt + new_tokens`` slots (every slot is attended to, valid or not, as the sampler does);
  ``samples = G > 1``: each of the ``sequences`` prompts is prefilled once into a cache of its
  ``prompt`` slots, then its G rows decode over those and their own ``new_tokens`` slots."""
  slots = prompt + new_tokens
  prefill = sequences * prompt * token_flops(cfg, prompt if samples > 1 else slots)
  return float(prefill + sequences * samples * new_tokens * token_flops(cfg, slots))
