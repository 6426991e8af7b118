"""``model.attention = "splash"``: the TPU splash-attention Pallas kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``) for training forwards (:func:`attention`).

Causal attention with padding and packed segments, expressed as the kernel's segment ids, lets a
valid query see exactly the keys the einsum path lets it see; grouped-query attention, sliding
windows and soft-capping are the kernel's own, scores and softmax float32 inside it whatever the
input dtype. Not expressible: the shared-prefix branch mask (``branch_ids``: a prefix key must match
every branch's id), refused with a one-line error; the KV-cache path (prefill and decode) uses the
einsum path. Off TPU (tests, the CPU) the kernel runs in Pallas' interpret mode: the same kernel
code, slowly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxopd.errors import ConfigError

BLOCKS = (512, 256, 128)


def padded_length(t: int) -> int:
  """Sequences are padded to a multiple of 128 for the kernel (its blocks are multiples of 128)."""
  return -(-t // 128) * 128


def block_size(t: int) -> int:
  """The kernel's query / key block for a (padded) length ``t``: the largest of 512, 256, 128 dividing it."""
  return next(b for b in BLOCKS if t % b == 0)


def _platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def _kernel(heads: int, t: int, interpret: bool, softcap: float = 0.0, window: int = 0):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = block_size(t)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  one = sm.LocalMask((t, t), (window - 1, 0), 0) if window else sm.CausalMask((t, t))
  mask = sm.MultiHeadMask([one for _ in range(heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                            attn_logits_soft_cap=softcap or None), sk


def _local(q, k, v, seg, interpret: bool, softcap: float = 0.0, window: int = 0):
  """The kernel on local blocks: ``q [B, H, T, Dh]``, ``k, v [B, KV, T, Dh]``, ``seg [B, T]``."""
  kernel, sk = _kernel(q.shape[1], q.shape[2], interpret, softcap, window)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(q, k, v, seg)


def attention(q, k, v, key_mask, segment_ids=None, branch_ids=None, scale: float | None = None,
              softcap: float = 0.0, window: int = 0):
  """``q [B, T, H, Dh]``, ``k, v [B, T, KV, Dh]``, ``key_mask [B, T]`` -> ``[B, T, H, Dh]``
  (causal; ``segment_ids [B, T]`` for packed rows; scores times ``scale``, default
  ``1/sqrt(Dh)``, soft-capped at ``softcap`` if > 0; keys less than ``window`` back if > 0).

  Segment ids: a valid token of segment ``s`` gets id ``s + 1`` (``1`` without packing), a padding
  token ``0``, so a valid query sees the valid keys of its segment at or before it; a padding query
  sees the padding keys before it (its output is garbage either way and no loss reads it; the
  einsum path gives it the valid keys instead). ``H`` must be a multiple of ``KV``. The window is
  the kernel's ``LocalMask`` (slot distance equals position distance within a row or a packed
  segment). The kernel works on one example ``[heads, T, Dh]``: vmapped over the batch and, under
  a mesh, run in a ``shard_map`` over the mesh rules' ``batch`` and ``heads`` axes (the sequence is
  not split); sequences are padded at the end to :func:`padded_length`; KV heads that the tensor
  axis does not divide are repeated to the query heads first. TPU or interpret mode is read from
  the mesh's devices, so an ahead-of-time compile for abstract TPU devices on a CPU host gets the
  real kernel."""
  if branch_ids is not None:
    raise ConfigError("config.model.attention='splash' cannot express the shared-prefix mask of "
                      "config.method.share_prompt (its segment ids cannot let prefix keys match every branch); "
                      "use attention=chunked or dot_product with share_prompt")
  from jaxopd import mesh as mesh_lib
  b, t, h, dh = q.shape
  kv = k.shape[2]
  seg = jnp.where(key_mask, 1 if segment_ids is None else segment_ids.astype(jnp.int32) + 1, 0).astype(jnp.int32)
  tp = padded_length(t)                 # padding at the end: segment 0, after every real query
  pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
  q, k, v, seg = (pad(x) if tp != t else x for x in (q, k, v, seg))
  q = (q * (1.0 / math.sqrt(dh) if scale is None else scale)).transpose(0, 2, 1, 3)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = lambda o: o.transpose(0, 2, 1, 3)[:, :t]
  interpret = _platform() != "tpu"
  mesh = jax.sharding.get_abstract_mesh()
  rules = mesh_lib.active_rules()
  if mesh is None or mesh.empty or rules is None:
    return out(_local(q, k, v, seg, interpret, softcap, window))
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  n = lambda axes: int(np.prod([sizes[a] for a in axes])) if axes else 1
  batch = mesh_lib.mesh_axes("batch", rules)
  if b % n(batch):
    batch = ()
  heads = tuple(a for a in mesh_lib.mesh_axes("heads", rules) if a not in batch)
  if h % n(heads):
    heads = ()
  if heads and kv % n(heads):      # the tensor axis does not divide the KV heads: repeat them to H
    k, v = jnp.repeat(k, h // kv, axis=1), jnp.repeat(v, h // kv, axis=1)
  bspec = batch if len(batch) > 1 else (batch[0] if batch else None)
  hspec = heads if len(heads) > 1 else (heads[0] if heads else None)
  qs = P(bspec, hspec, None, None)
  fn = jax.shard_map(functools.partial(_local, interpret=interpret, softcap=softcap, window=window), mesh=mesh,
                     in_specs=(qs, qs, qs, P(bspec, None)), out_specs=qs, check_vma=False)
  return out(fn(q, k, v, seg))
