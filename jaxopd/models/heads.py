"""Per-position quantities of models' next-token distributions, with no ``[B, T, V]`` array.

:func:`chunked_terms` runs each model's trunk once (``final_hidden``: the final
normed hidden states ``[B, T, D]``) and then, over chunks of ``chunk`` positions
(:func:`~jaxopd.losses.common.map_chunks`: one ``lax.scan``, its body under
``jax.checkpoint``), applies every model's LM head inside the loop and hands the
chunk's logits to the caller's ``fn``. So only one chunk of each model's logits
(``[B, chunk, V]``) is alive at a time, in the forward pass and in the backward
pass (where the chunk's logits are recomputed from the saved hidden states);
the head's weight gradient is accumulated across chunks by the scan.

Every method's vocabulary-wide quantities go through here: label log-probs, the
SFT loss and accuracy, entropies, the per-token KL of TDPO/SparsePO, the
divergences of DistillSpec/GKD/on-policy distillation and AlignDistil's teacher.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from jaxopd.losses.common import map_chunks


def chunked_terms(models: Mapping, tokens: jax.Array, fn: Callable[[dict, jax.Array], dict], chunk: int,
                  frozen: Iterable[str] = (), hidden: Mapping | None = None, **forward) -> dict:
  """``fn(logits, targets) -> dict of [B, C, ...]`` over positions ``0 .. T-2`` in chunks of ``chunk``.

  ``models``: name -> Transformer (each run on ``tokens [B, T]`` with ``forward``'s keyword
  arguments: ``positions``, ``attention_mask``, ``segment_ids``, ``branch_ids``); ``logits``: name -> ``[B, C, V]``
  in the model's compute dtype at the chunk's positions; ``targets [B, C]``: the next tokens
  ``tokens[:, 1:]`` there. Names in ``frozen`` get no gradient; ``hidden``: name -> final hidden
  states ``[B, T, D]`` a caller already has (a model's :meth:`hidden_states` ``[-1]``), so its
  trunk does not run twice. Returns the dict of
  ``[B, T-1, ...]`` arrays (position t scores token t + 1, as ``token_logprobs``)."""
  frozen = set(frozen)
  given = dict(hidden or {})
  positions = forward.pop("positions", None)
  hidden, heads = {}, {}
  for name, m in models.items():
    h = (given[name] if name in given else m.final_hidden(tokens, positions, **forward))[:, :-1]
    hidden[name] = jax.lax.stop_gradient(h) if name in frozen else h
    w = m.output_weight()
    heads[name] = jax.lax.stop_gradient(w) if name in frozen else w

  def per_chunk(xs):
    hs, targets = xs
    return fn({n: models[n].unembed(hs[n], heads[n]) for n in models}, targets)
  return map_chunks(per_chunk, (hidden, tokens[:, 1:]), chunk)


def label_logprob(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``log softmax(logits)[targets]`` in float32: ``[B, C, V], [B, C] -> [B, C]``."""
  z = logits.astype(jnp.float32)
  return jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)


def token_logprobs(model, tokens: jax.Array, chunk: int, frozen: bool = False, **forward) -> jax.Array:
  """``log model(tokens[:, t+1] | tokens[:, :t+1])`` ``[B, T-1]``, in chunks (no gradient with ``frozen``)."""
  return chunked_terms({"m": model}, tokens, lambda z, t: {"lp": label_logprob(z["m"], t)}, chunk,
                       frozen=("m",) if frozen else (), **forward)["lp"]
