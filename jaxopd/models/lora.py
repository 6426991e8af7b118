"""LoRA adapters on the decoder's projections: ``W x + (alpha / rank) B A x``, B starting at zero.

A role with ``config.models.<role>.lora.rank > 0`` gets a pair of :class:`LoRAParam` matrices
next to each targeted projection (``wq_lora_a``, ``wq_lora_b`` ...; applied by the decoder's
``_adapted``); the trainer trains those
alone and keeps the projections themselves frozen (not checkpointed, reloaded from the role's
source on resume). The same base arrays serve a role declared ``init=base:<role>``: the model
without its adapters. :func:`merge` folds adapters into the base (a ``run:`` source, a merged
export); :func:`peft_tensors` writes them as PEFT names them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# target -> (sub-module, weight, number of input dimensions of the weight)
TARGETS = {"q": ("attn", "wq", 1), "k": ("attn", "wk", 1), "v": ("attn", "wv", 1), "o": ("attn", "wo", 2),
           "gate": ("mlp", "w_gate", 1), "up": ("mlp", "w_up", 1), "down": ("mlp", "w_down", 1)}
INITS = ("kaiming", "gaussian")
SUFFIXES = ("_lora_a", "_lora_b")


class LoRAParam(nnx.Param):
  """An adapter matrix: the trained parameters of a LoRA role."""


def attach(module: nnx.Module, part: str, cfg, rngs: nnx.Rngs) -> None:
  """Adds the adapters of ``cfg``'s targets that live in ``module`` (``part``: attn | mlp).
  A: ``in_shape + (rank,)``, PEFT's default init (kaiming-uniform, bound 1/sqrt(fan_in)) or
  normal(1/rank) ("gaussian"); B: ``(rank,) + out_shape``, zeros. Stored in float32."""
  r = cfg.lora_rank
  for t in cfg.lora_targets or tuple(TARGETS):
    where, name, n_in = TARGETS[t]
    if where != part:
      continue
    w = getattr(module, name)
    axes = w.get_metadata()["logical_axes"]
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    fan_in = math.prod(in_shape)
    key = rngs.params()
    if cfg.lora_init == "kaiming":
      a = jax.random.uniform(key, in_shape + (r,), jnp.float32, -1.0, 1.0) / math.sqrt(fan_in)
    else:
      a = jax.random.normal(key, in_shape + (r,), jnp.float32) / r
    setattr(module, name + "_lora_a", LoRAParam(a, logical_axes=tuple(axes[:n_in]) + (None,)))
    setattr(module, name + "_lora_b", LoRAParam(jnp.zeros((r,) + out_shape, jnp.float32),
                                                logical_axes=(None,) + tuple(axes[n_in:])))


def is_adapter(key: str) -> bool:
  """Whether a flattened parameter path (``blocks.0.attn.wq_lora_a``) is an adapter."""
  return key.endswith(SUFFIXES)


def pairs(flat: dict) -> dict:
  """``{weight path: (A, B)}`` of the adapters in a flattened parameter dict."""
  return {k[:-len("_lora_a")]: (flat[k], flat[k[:-len("_lora_a")] + "_lora_b"])
          for k in flat if k.endswith("_lora_a")}


def product(a, b) -> jax.Array:
  """``A @ B`` in float32, shaped like the weight (``in_shape + out_shape``)."""
  r = a.shape[-1]
  return (a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32)).reshape(
      a.shape[:-1] + b.shape[1:])


def merge(flat: dict, scale: float) -> dict:
  """A flattened parameter dict with its adapters folded into the weights (``W + scale A B``,
  in float32, cast back to W's dtype and kept in W's sharding); the adapter entries are dropped."""
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  fold = lambda w, a, b: (w.astype(jnp.float32) + scale * product(a, b)).astype(w.dtype)
  for k, (a, b) in pairs(flat).items():
    w = out[k]
    out[k] = jax.jit(fold, out_shardings=getattr(w, "sharding", None))(w, a, b)
  return out
