"""Token log-probabilities and the SFT loss, with the label shift in one place.

Convention: ``tokens[B, T]`` and ``loss_mask[B, T]`` are aligned
(mask 1 on the response tokens themselves); ``logits[:, t]`` scores
``tokens[:, t + 1]``. :func:`token_logprobs` returns ``[B, T-1]`` values for
targets ``tokens[:, 1:]`` and :func:`response_mask` the matching ``[B, T-1]``
mask ``loss_mask[:, 1:]``, so every loss multiplies arrays of one shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """``log p(tokens[:, t+1] | tokens[:, :t+1])``: logits ``[B, T, V]``, tokens ``[B, T]`` -> ``[B, T-1]``.

  float32 log-softmax whatever the logits' dtype; the logsumexp is taken once
  and the target logit gathered, so no ``[B, T, V]`` log-prob array is kept.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def response_mask(loss_mask: jax.Array) -> jax.Array:
  """The mask of the targets of :func:`token_logprobs`: ``[B, T] -> [B, T-1]`` float32."""
  return loss_mask[:, 1:].astype(jnp.float32)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(x * mask, axis=axis)


def sft_mask(loss_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """The targets SFT scores, ``[B, T-1]``: :func:`response_mask`, and with packed rows only
  targets predicted from a position of their own segment."""
  m = response_mask(loss_mask)
  if segment_ids is not None:
    m = m * (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(m.dtype)
  return m


def sft_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None = None):
  """Next-token cross-entropy on the masked tokens.

  ``segment_ids [B, T]`` (packed rows): a token is scored only from a position of its own
  segment, so the first token of an example is never predicted from the one before it.
  Returns ``(nll_sum, n_tokens, correct_sum)``: sums, not means, so the trainer
  can divide by the token count of the *global* batch (exact under gradient
  accumulation and sharding).
  """
  lp = token_logprobs(logits, tokens)
  m = sft_mask(loss_mask, segment_ids)
  nll = -masked_sum(lp, m)
  pred = jnp.argmax(logits[:, :-1], axis=-1)
  correct = masked_sum((pred == tokens[:, 1:]).astype(jnp.float32), m)
  return nll, jnp.sum(m), correct


def map_chunks(fn, xs, chunk: int):
  """``fn(xs_chunk) -> pytree of [B, C, ...]`` over chunks of ``chunk`` positions of ``xs`` (a
  pytree of ``[B, T, ...]`` arrays), concatenated back to ``[B, T, ...]``.

  One ``lax.scan`` over the chunks with the body rematerialised (``jax.checkpoint``): a
  chunk's intermediates (e.g. logits made from hidden states inside ``fn``) exist for one
  chunk at a time in the forward pass and are recomputed in the backward pass. ``T`` need
  not be a multiple of ``chunk``: the last chunk is padded (``fn`` sees zeros there) and
  the padding cut off. ``chunk = 0``: every position at once, no scan and no recompute (the
  ``[B, T, ...]`` intermediates are kept for the backward pass: faster where they fit)."""
  if chunk == 0:
    return fn(xs)
  leaves = jax.tree.leaves(xs)
  b, t = leaves[0].shape[:2]
  chunk = max(1, min(chunk, t))
  n = -(-t // chunk)
  pad = n * chunk - t
  padded = jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x, xs)
  body = jax.checkpoint(fn)

  def step(_, i):
    return None, body(jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1), padded))

  _, out = jax.lax.scan(step, None, jnp.arange(n))        # leaves [n, B, chunk, ...]
  return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape((b, n * chunk) + y.shape[3:])[:, :t], out)


class Responses(NamedTuple):
  """The K responses of each of B prompts of a preference batch, in either layout, for losses
  that sum per-token quantities per response.

  * one row per response: ``batch["tokens"] [B, K, T]`` -> ``tokens [B*K, T]``;
  * shared prefix (:func:`jaxopd.data.pipeline.share_prompt`): ``tokens [B, L]`` with
    ``positions`` and ``branch_ids`` -> ``tokens [B, L]``, the model called with ``forward``.

  Per-token arrays of the rows (``[N, L-1]``, position t scoring token t + 1) become per-response
  sums ``[B, K]`` with :meth:`sums`; ``mask [B, K, L-1]`` selects response k's targets, and in
  the shared layout only targets predicted from a position of their own branch (the prompt's
  last-token copy that starts a branch is never a target)."""
  tokens: jax.Array
  forward: dict
  mask: jax.Array
  shared: bool

  def view(self, x: jax.Array) -> jax.Array:
    """``[N, L-1, ...]`` -> ``[B, K, L-1, ...]`` (unshared) or ``[B, 1, L-1, ...]`` (shared)."""
    b, k = self.mask.shape[:2]
    return x[:, None] if self.shared else x.reshape(b, k, *x.shape[1:])

  def sums(self, x: jax.Array) -> jax.Array:
    """Per-response sums ``[B, K]`` of a per-token array ``[N, L-1]``."""
    return jnp.sum(self.mask * self.view(x), axis=-1)

  def lengths(self) -> jax.Array:
    return jnp.sum(self.mask, axis=-1)

  def response(self, k: int) -> "Responses":
    """Response ``k`` alone (``K = 1``): its own rows unshared; the shared rows as they are
    (one forward over the prefix and every branch, the mask of branch k)."""
    if self.shared:
      return self._replace(mask=self.mask[:, k:k + 1])
    b, n = self.mask.shape[:2]
    return self._replace(tokens=self.tokens.reshape(b, n, -1)[:, k], mask=self.mask[:, k:k + 1])


def responses(batch: dict, k: int = 2) -> Responses:
  """The :class:`Responses` of a batch: shared-prefix rows if it has ``branch_ids``."""
  tokens, loss_mask = batch["tokens"], batch["loss_mask"]
  if "branch_ids" in batch:
    br = batch["branch_ids"]
    m = response_mask(loss_mask) * (br[:, 1:] == br[:, :-1]).astype(jnp.float32)
    mask = jnp.stack([m * (br[:, 1:] == j + 1) for j in range(k)], axis=1)
    return Responses(tokens, {"positions": batch["positions"], "branch_ids": br}, mask, True)
  b, kk, t = tokens.shape
  if kk != k:
    raise ValueError(f"a batch of {kk} responses per prompt; this loss takes {k}")
  mask = response_mask(loss_mask.reshape(b * k, t)).reshape(b, k, t - 1)
  return Responses(tokens.reshape(b * k, t), {}, mask, False)
