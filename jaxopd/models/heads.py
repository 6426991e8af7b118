"""Per-position quantities of models' next-token distributions, with no ``[B, T, V]`` array.

:func:`chunked_terms` runs each model's trunk once (the final normed hidden states ``[B, T, D]``)
and then applies every model's LM head over chunks of positions (:func:`head_terms`), so only one
chunk of each model's logits (``[B, chunk, V]``) is alive at a time, forward and backward. Every
method's vocabulary-wide quantities go through here: label log-probs, the SFT loss and accuracy,
entropies, the per-token KL of TDPO/SparsePO, the divergences of DistillSpec/GKD/on-policy
distillation and AlignDistil's teacher. :func:`response_terms` does the same for sampled rows
(prompt, response, padding) on the response positions only, in response coordinates ``[R, N]``;
with ``group = s`` (GRPO's s consecutive samples of one prompt) each prompt is encoded once
(:func:`grouped_rows`).
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
  given = dict(hidden or {})
  positions = forward.pop("positions", None)
  hidden = {name: (given[name] if name in given else m.final_hidden(tokens, positions, **forward))[:, :-1]
            for name, m in models.items()}
  return head_terms(models, hidden, tokens[:, 1:], fn, chunk, frozen)


def head_terms(models: Mapping, hidden: Mapping, targets: jax.Array, fn: Callable, chunk: int,
               frozen: Iterable[str] = ()) -> dict:
  """The chunk loop of :func:`chunked_terms`: ``fn(logits, targets)`` over chunks of ``chunk``
  positions of ``hidden`` (name -> ``[B, C, D]``, the final states that predict ``targets [B, C]``),
  each model's head applied inside the loop; names in ``frozen`` get no gradient.

  One ``lax.scan`` (:func:`~jaxopd.losses.common.map_chunks`), its body under ``jax.checkpoint``: in
  the backward pass a chunk's logits are recomputed from the saved hidden states, and the head's
  weight gradient is accumulated across chunks by the scan."""
  frozen = set(frozen)
  stop = lambda name, x: jax.lax.stop_gradient(x) if name in frozen else x
  hidden = {n: stop(n, hidden[n]) for n in models}
  weights = {n: stop(n, m.output_weight()) for n, m in models.items()}

  def per_chunk(xs):
    hs, tg = xs
    return fn({n: models[n].unembed(hs[n], weights[n]) for n in models}, tg)
  return map_chunks(per_chunk, (hidden, targets), chunk)


def grouped_rows(tokens: jax.Array, prompt_len: jax.Array, prompt_width: int, group: int) -> dict:
  """Sampled rows ``tokens [R, P + N]`` (the sampler's layout: prompt, response, padding; ``R``
  rows in runs of ``group`` consecutive rows that continue the same prompt) as grouped rows
  ``[R / group, P + group * N]``: ``[prompt (right-padded to P) | response 1 | ... | response
  group]``, each response ``N`` slots from its first token, with ``attention_mask`` (the
  prompt's padding off) and ``positions`` (a response continues its prompt), for the model's
  ``groups=(P, group)`` forward."""
  r, t = tokens.shape
  p, n = prompt_width, t - prompt_width
  plen = prompt_len.astype(jnp.int32)
  responses = response_slots(tokens, plen, n)
  first = plen[::group]
  prompt_mask = jnp.arange(p)[None, :] < first[:, None]
  resp_pos = jnp.broadcast_to(first[:, None] + jnp.arange(n)[None, :], (r // group, n))
  return {"tokens": jnp.concatenate([tokens[::group, :p], responses.reshape(r // group, group * n)], axis=1),
          "attention_mask": jnp.concatenate([prompt_mask, jnp.ones((r // group, group * n), bool)], axis=1),
          "positions": jnp.concatenate([jnp.broadcast_to(jnp.arange(p)[None, :], (r // group, p)),
                                        jnp.tile(resp_pos, (1, group))], axis=1)}


def response_hidden(model, tokens: jax.Array, prompt_len: jax.Array, prompt_width: int, group: int = 1):
  """``[R, N, D]``: the final hidden states that predict each response slot ``j`` of sampled rows
  ``tokens [R, P + N]`` (position ``prompt_len - 1 + j`` of a row); ``group > 1``: from one
  grouped forward (:func:`grouped_rows`), each prompt encoded once for its ``group`` rows."""
  r, t = tokens.shape
  n = t - prompt_width
  plen = prompt_len.astype(jnp.int32)
  if group <= 1:
    h = model.final_hidden(tokens)
    return jnp.take_along_axis(h, (plen[:, None] - 1 + jnp.arange(n)[None, :])[..., None], axis=1)
  rows = grouped_rows(tokens, plen, prompt_width, group)
  h = model.final_hidden(rows["tokens"], rows["positions"], attention_mask=rows["attention_mask"],
                         groups=(prompt_width, group))
  last = jnp.take_along_axis(h[:, :prompt_width], (plen[::group] - 1)[:, None, None], axis=1)   # [R/g, 1, D]
  branches = h[:, prompt_width:].reshape(r, n, h.shape[-1])
  return jnp.concatenate([jnp.repeat(last, group, axis=0), branches[:, :-1]], axis=1)


def response_terms(models: Mapping, tokens: jax.Array, prompt_len: jax.Array, prompt_width: int,
                   fn: Callable[[dict, jax.Array], dict], chunk: int, group: int = 1,
                   frozen: Iterable[str] = ()) -> dict:
  """:func:`chunked_terms` on the response slots of sampled rows ``tokens [R, P + N]`` only:
  ``fn(logits, targets)`` with ``targets`` the responses' tokens, returning ``[R, N, ...]``
  arrays in response coordinates (slot ``j`` = the response's ``j``-th token; mask them with
  :func:`response_slots` of the loss mask). ``group``: see :func:`response_hidden`."""
  hidden = {name: response_hidden(m, tokens, prompt_len, prompt_width, group) for name, m in models.items()}
  targets = response_slots(tokens, prompt_len, tokens.shape[1] - prompt_width)
  return head_terms(models, hidden, targets, fn, chunk, frozen)


def response_slots(x: jax.Array, prompt_len: jax.Array, n: int) -> jax.Array:
  """``x [R, P + N]`` (tokens or a loss mask in the sampler's layout) at each row's response
  slots: ``[R, N]``, slot ``j`` = position ``prompt_len + j``."""
  return jnp.take_along_axis(x, prompt_len.astype(jnp.int32)[:, None] + jnp.arange(n)[None, :], axis=1)


def label_logprob(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``log softmax(logits)[targets]`` in float32: ``[B, C, V], [B, C] -> [B, C]``."""
  z = logits.astype(jnp.float32)
  return jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)


def token_logprobs(model, tokens: jax.Array, chunk: int, frozen: bool = False, **forward) -> jax.Array:
  """``log model(tokens[:, t+1] | tokens[:, :t+1])`` ``[B, T-1]``, in chunks (no gradient with ``frozen``)."""
  return chunked_terms({"m": model}, tokens, lambda z, t: {"lp": label_logprob(z["m"], t)}, chunk,
                       frozen=("m",) if frozen else (), **forward)["lp"]
