"""The SparsePO step: token masks from the frozen reference model, then the pure
loss of :mod:`jaxopd.losses.sparsepo` (Christopoulou et al., Findings EMNLP
2025; official code huawei-noah/HEBO, folder SparsePO).

Batch as in :mod:`jaxopd.preference`: ``tokens[B, 2, T]``, ``loss_mask[B, 2, T]``
(0 = chosen, 1 = rejected), and optionally ``gold[B, 2, T]`` (1 on the tokens
that carry the gold reward, for the mask statistics only). The reference runs
once with ``return_hidden=True``; its logits and hidden states are detached
where they are produced, so the policy gets no gradient through the mask input.

Masks (``w[:, t]`` weights target token t+1 and is computed from the reference
states at position t, as the official ``reference_states[:, :-1]``):

* ``learned``: :class:`SparseMask`, a trainable model ("mask", its own optimizer
  group) with one head shared by ``w_u`` and ``w_d`` or one head each;
* ``mapo``: :func:`jaxopd.losses.sparsepo.activation_mask` of the reference's
  residual stream (the embeddings, every block's output, the final-norm
  output: what ``Transformer(return_hidden=True)`` exposes) and its logits. The
  official MaPO also hooks MLP post-activations, q/k/v and the intra-block
  residual points, which this model does not expose. One mask for both terms.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopd.experiment import LossOutput
from jaxopd.losses import forward_kl_per_token, response_mask, token_logprobs
from jaxopd.losses.sparsepo import activation_mask, l1_penalty, sequence_terms, sparsepo_loss

MASKS = ("learned", "mapo")
INITS = ("uniform", "ones")


def _uniform(rngs: nnx.Rngs, shape, bound) -> nnx.Param:
  return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound),
                   logical_axes=(None,) * len(shape))


class MaskHead(nnx.Module):
  """``w = relu(sum_l a_l relu(W_l LN(h^l) + b_l))``: hidden ``[L, N, T, D]`` -> weights ``[N, T]``.

  One LayerNorm (with scale and bias) shared by the layers, as the official
  ``SimpleMaskAllLayers``; no dropout (the official default is 0.01).
  ``init="uniform"``: PyTorch's ``nn.Linear`` default, ``U(+-1/sqrt(fan_in))``
  for ``W``, ``b`` and ``a`` (the official code); ``init="ones"``: ``W = 0``,
  ``b = 1``, ``a = 1/L``, so the mask starts at exactly 1 (TDPO1).
  """

  def __init__(self, n_layers: int, d_model: int, rngs: nnx.Rngs, init: str = "uniform", eps: float = 1e-5):
    if init not in INITS:
      raise ValueError(f"mask init={init!r}: must be one of {INITS}")
    self.eps = eps
    self.ln_scale = nnx.Param(jnp.ones((d_model,), jnp.float32), logical_axes=(None,))
    self.ln_bias = nnx.Param(jnp.zeros((d_model,), jnp.float32), logical_axes=(None,))
    if init == "uniform":
      self.w = _uniform(rngs, (n_layers, d_model), 1 / math.sqrt(d_model))
      self.b = _uniform(rngs, (n_layers,), 1 / math.sqrt(d_model))
      self.a = _uniform(rngs, (n_layers, 1), 1 / math.sqrt(n_layers))   # 2-D: weight-decayed like a matrix
    else:
      self.w = nnx.Param(jnp.zeros((n_layers, d_model), jnp.float32), logical_axes=(None, None))
      self.b = nnx.Param(jnp.ones((n_layers,), jnp.float32), logical_axes=(None,))
      self.a = nnx.Param(jnp.full((n_layers, 1), 1.0 / n_layers, jnp.float32), logical_axes=(None, None))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    h = hidden.astype(jnp.float32)
    mu = jnp.mean(h, -1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), -1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(var + self.eps) * self.ln_scale[...] + self.ln_bias[...]
    per_layer = jax.nn.relu(jnp.einsum("lntd,ld->lnt", h, self.w[...]) + self.b[...][:, None, None])
    return jax.nn.relu(jnp.einsum("lnt,l->nt", per_layer, self.a[...][:, 0]))


class SparseMask(nnx.Module):
  """The learned mask model: ``hidden [L, N, T, D] -> (w_u, w_d)``, each ``[N, T]``.

  ``shared``: one head serves both; otherwise ``u`` and ``d`` are independent heads.
  """

  def __init__(self, n_layers: int, d_model: int, shared: bool, rngs: nnx.Rngs, init: str = "uniform"):
    self.shared = shared
    self.u = MaskHead(n_layers, d_model, rngs, init)
    self.d = None if shared else MaskHead(n_layers, d_model, rngs, init)

  def __call__(self, hidden: jax.Array):
    w_u = self.u(hidden)
    return w_u, (w_u if self.d is None else self.d(hidden))


def token_weights(mask: str, mask_model, hidden, ref_logits, m):
  """``(w_u, w_d)``, each ``[N, T-1]`` aligned with ``token_logprobs``, from the reference's
  detached outputs: ``hidden`` (``n_layers + 1`` arrays ``[N, T, D]``), ``ref_logits [N, T, V]``."""
  if mask == "learned":
    stacked = jnp.stack([h[:, :-1] for h in hidden[1:]])      # the states after each block, as the official
    return mask_model(jax.lax.stop_gradient(stacked))
  if mask == "mapo":
    w = activation_mask({"resid": [h[:, :-1] for h in hidden], "logits": [ref_logits[:, :-1]]}, m)
    return w, w
  raise ValueError(f"config.method.mask={mask!r}: must be one of {MASKS}")


def reference_outputs(reference, tokens):
  """The reference's logits and hidden states, detached: ``[N, T]`` -> ``([N, T, V], tuple of [N, T, D])``."""
  out = reference(tokens, return_hidden=True)
  return jax.lax.stop_gradient(out.logits), tuple(jax.lax.stop_gradient(h) for h in out.hidden)


def make_loss_fn(mask: str, shared: bool, beta: float, lambda_u: float = 0.0, lambda_d: float = 0.0,
                 kl_chunk: int = 128):
  """``loss_fn(params, frozen, batch, rng)`` for SparsePO with ``mask`` in ``learned | mapo``.

  Metrics: TRL's ``rewards/*`` with the official SparsePO reward ``beta (U + D)``
  (detached), ``logps/*``, the unweighted sequential KL ``kl/chosen``,
  ``kl/rejected``, ``kl/margin`` (= K_l - K_w, comparable with TDPO's), the
  weighted one ``kl_weighted/*`` (= -D), and over response tokens
  ``mask/u_mean``, ``mask/u_zero`` (fraction of exact zeros), with ``gold`` in
  the batch ``mask/u_gold`` and ``mask/u_other`` (mean weight on reward-bearing
  tokens and on the others); the same ``mask/d_*`` for independent masks.
  """
  if mask not in MASKS:
    raise ValueError(f"config.method.mask={mask!r}: must be one of {MASKS}")
  independent = mask == "learned" and not shared

  def loss_fn(params, frozen, batch, rng):
    del rng
    tokens, lmask = batch["tokens"], batch["loss_mask"]
    b, _, t = tokens.shape
    flat, flat_mask = tokens.reshape(b * 2, t), lmask.reshape(b * 2, t)
    pi_logits = params["policy"](flat).logits
    ref_logits, hidden = reference_outputs(frozen["reference"], flat)
    m = response_mask(flat_mask)
    w_u, w_d = token_weights(mask, params.get("mask"), hidden, ref_logits, m)
    lp_pi = token_logprobs(pi_logits, flat)
    lp_ref = token_logprobs(ref_logits, flat)
    k = forward_kl_per_token(ref_logits, pi_logits, kl_chunk)
    u, d = sequence_terms(lp_pi, lp_ref, k, m, w_u, w_d)
    u, d = u.reshape(b, 2), d.reshape(b, 2)
    losses = sparsepo_loss(u[:, 0], u[:, 1], d[:, 0], d[:, 1], beta)
    if lambda_u or lambda_d:
      pair = lambda x: x.reshape(b, 2, t - 1)
      losses = losses + l1_penalty(pair(w_u), pair(w_d), pair(m), lambda_u, lambda_d, shared)
    reward = beta * jax.lax.stop_gradient(u + d)
    logps = jax.lax.stop_gradient(jnp.sum(m * lp_pi, axis=-1).reshape(b, 2))
    kl = jax.lax.stop_gradient(jnp.sum(m * k, axis=-1).reshape(b, 2))
    wkl = jax.lax.stop_gradient(-d)
    metrics = {
        "rewards/chosen": jnp.sum(reward[:, 0]),
        "rewards/rejected": jnp.sum(reward[:, 1]),
        "rewards/margins": jnp.sum(reward[:, 0] - reward[:, 1]),
        "rewards/accuracies": jnp.sum((reward[:, 0] > reward[:, 1]).astype(jnp.float32)),
        "logps/chosen": jnp.sum(logps[:, 0]),
        "logps/rejected": jnp.sum(logps[:, 1]),
        "kl/chosen": jnp.sum(kl[:, 0]), "kl/rejected": jnp.sum(kl[:, 1]),
        "kl/margin": jnp.sum(kl[:, 1] - kl[:, 0]),
        "kl_weighted/chosen": jnp.sum(wkl[:, 0]), "kl_weighted/rejected": jnp.sum(wkl[:, 1]),
    }
    gold = batch["gold"].reshape(b * 2, t)[:, 1:].astype(jnp.float32) if "gold" in batch else None
    for name, w in (("u", w_u), ("d", w_d)) if independent else (("u", w_u),):
      metrics.update(mask_stats(name, jax.lax.stop_gradient(w), m, gold))
    return LossOutput(jnp.sum(losses), jnp.float32(b), metrics)

  return loss_fn


def mask_stats(name: str, w, m, gold=None) -> dict:
  """``(sum, count)`` metrics of a mask over response tokens (see :func:`make_loss_fn`)."""
  n = jnp.sum(m)
  out = {f"mask/{name}_mean": (jnp.sum(w * m), n),
         f"mask/{name}_zero": (jnp.sum((w == 0).astype(jnp.float32) * m), n)}
  if gold is not None:
    out[f"mask/{name}_gold"] = (jnp.sum(w * m * gold), jnp.sum(m * gold))
    out[f"mask/{name}_other"] = (jnp.sum(w * m * (1 - gold)), jnp.sum(m * (1 - gold)))
  return out


def auroc(scores, labels) -> float:
  """Area under the ROC curve of ``scores`` as a detector of ``labels`` (ties count one half); NaN
  without both classes."""
  s = np.asarray(scores, np.float64).ravel()
  y = np.asarray(labels).ravel().astype(bool)
  npos, nneg = int(y.sum()), int((~y).sum())
  if npos == 0 or nneg == 0:
    return float("nan")
  _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
  mid_rank = np.cumsum(counts) - (counts - 1) / 2.0        # 1-based average rank of each distinct value
  ranks = mid_rank[inv]
  return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))
