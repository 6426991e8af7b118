"""SparsePO (Christopoulou et al., Findings EMNLP 2025; official code
huawei-noah/HEBO, folder SparsePO) on the preference pipeline (its stages
the ``pairs`` stage of :mod:`jaxopd.stages`, its evaluation and report :mod:`jaxopd.tasks.pairs`). Config:
experiments/sparsepo.py.

The step (:func:`make_loss_fn`): token masks from the frozen reference model (:func:`token_weights`:
``learned`` or ``mapo``), then the pure loss of :mod:`jaxopd.losses.sparsepo`. Batch as in
:mod:`jaxopd.methods.tdpo`: ``tokens[B, 2, T]``, ``loss_mask[B, 2, T]`` (0 = chosen, 1 = rejected), and
optionally ``gold[B, 2, T]`` (1 on the tokens that carry the gold reward, for the mask statistics
only). The reference's logits and hidden states are detached where they are produced, so the policy
gets no gradient through the mask input.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopd import errors, options, paths, stages as stage_lib, tasks
from jaxopd.data import batched_iterator, preferences, suite as suite_lib
from jaxopd.errors import ConfigError
from jaxopd.evaluation import compiled
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import forward_kl, response_mask
from jaxopd.models.heads import chunked_terms, label_logprob
from jaxopd.losses.sparsepo import activation_mask, l1_penalty, sequence_terms, sparsepo_loss
from jaxopd.tasks import pairs as pair_task
from jaxopd.models import table
from jaxopd.options import at_least, one_of, option, positive

TASKS = ("reviews", "files")   # the tasks it trains on (jaxopd.tasks)

INITS = ("positive", "uniform", "ones")     # the learned mask's initialisers (MaskHead); the first is the default
DEFAULT_INIT = INITS[0]
PROBE_TRAIN_PAIRS = 64                      # training pairs the dead-mask check probes (with the held-out ones)


def _uniform(rngs: nnx.Rngs, shape, low, high) -> nnx.Param:
  return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, low, high),
                   logical_axes=(None,) * len(shape))


class MaskHead(nnx.Module):
  """``w = relu(sum_l a_l relu(W_l LN(h^l) + b_l))``: hidden ``[L, N, T, D]`` -> weights ``[N, T]``.

  One LayerNorm (with scale and bias) shared by the layers, as the official
  ``SimpleMaskAllLayers``; no dropout (the official default is 0.01). Inits:

  * ``"uniform"``: the official one, PyTorch's ``nn.Linear`` default
    ``U(+-1/sqrt(fan_in))`` for ``W``, ``b`` (fan-in D) and ``a`` (fan-in L). Nothing
    keeps its output positive: if every ``a_l < 0`` (probability 2^-L) or the
    ``relu(W_l h + b_l)`` with ``a_l > 0`` are all zero, ``w = 0`` on every token, the
    loss is log 2 and no gradient reaches the policy or the head (dead from step 0;
    the 2-layer smoke model, seed 0).
  * ``"positive"`` (the default): the official ``W``; ``b = 1 + U(+-1/sqrt(D))`` (the
    official draw shifted by +1) and ``a ~ U(0, 2/L)`` (positive, mean 1/L) instead
    of ``U(+-1/sqrt(L))``. With ``a >= 0`` the outer ReLU cuts nothing; the
    LayerNormed input has unit RMS, so ``W_l LN(h)`` has standard deviation about
    ``1/sqrt(3)`` and ``W_l LN(h) + b_l < 0`` on about 4% of the tokens per layer;
    ``E[w] ~= sum_l a_l E[relu(N(1, 1/3))] ~= 1.01 sum_l a_l``, about 1 (TDPO1's
    weight) with a per-token spread. States with a dominant shared direction make
    ``W_l LN(h)`` nearly constant per layer, so a layer can be cut on every token
    (about 4% of the draws), the whole mask only if every layer is: rare, not
    impossible, and :func:`check_masks` stops such a run. The mask starts dense:
    its sparsity has to be learned (or come from the L1 penalty), where the
    official init starts sparse by chance.
  * ``"ones"``: ``W = 0``, ``b = 1``, ``a = 1/L``, so the mask starts at exactly 1 (TDPO1).
  """

  def __init__(self, n_layers: int, d_model: int, rngs: nnx.Rngs, init: str = DEFAULT_INIT, eps: float = 1e-5):
    if init not in INITS:
      raise ValueError(f"mask init={init!r}: must be one of {INITS}")
    self.eps = eps
    self.ln_scale = nnx.Param(jnp.ones((d_model,), jnp.float32), logical_axes=(None,))
    self.ln_bias = nnx.Param(jnp.zeros((d_model,), jnp.float32), logical_axes=(None,))
    bound, bound_a = 1 / math.sqrt(d_model), 1 / math.sqrt(n_layers)
    if init == "uniform":                                 # a is 2-D in every init: weight-decayed like a matrix
      self.w = _uniform(rngs, (n_layers, d_model), -bound, bound)
      self.b = _uniform(rngs, (n_layers,), -bound, bound)
      self.a = _uniform(rngs, (n_layers, 1), -bound_a, bound_a)
    elif init == "positive":
      self.w = _uniform(rngs, (n_layers, d_model), -bound, bound)
      self.b = _uniform(rngs, (n_layers,), 1 - bound, 1 + bound)
      self.a = _uniform(rngs, (n_layers, 1), 0.0, 2.0 / n_layers)
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

  def __init__(self, n_layers: int, d_model: int, shared: bool, rngs: nnx.Rngs, init: str = DEFAULT_INIT):
    self.shared = shared
    self.u = MaskHead(n_layers, d_model, rngs, init)
    self.d = None if shared else MaskHead(n_layers, d_model, rngs, init)

  def __call__(self, hidden: jax.Array):
    w_u = self.u(hidden)
    return w_u, (w_u if self.d is None else self.d(hidden))


def _learned_weights(mask_model, hidden, ref_logit_mean, m):
  stacked = jnp.stack([h[:, :-1] for h in hidden[1:]])      # the states after each block, as the official
  return mask_model(jax.lax.stop_gradient(stacked))


def _mapo_weights(mask_model, hidden, ref_logit_mean, m):
  w = activation_mask({"resid": [h[:, :-1] for h in hidden], "logits": [ref_logit_mean[..., None]]}, m)
  return w, w


# The masks by name (:func:`token_weights`), each ``fn(mask_model, hidden, ref_logit_mean, m) -> (w_u, w_d)``,
# and whether it reads ``ref_logit_mean`` (the step computes that vocabulary-wide term only then; else None).
MASK_TABLE = {"learned": (_learned_weights, False), "mapo": (_mapo_weights, True)}
MASKS = tuple(MASK_TABLE)


def token_weights(mask: str, mask_model, hidden, ref_logit_mean, m):
  """``(w_u, w_d)``, each ``[N, T-1]`` aligned with ``token_logprobs``, from the reference's
  detached outputs: ``hidden`` (``n_layers + 1`` arrays ``[N, T, D]``) and ``ref_logit_mean``
  ``[N, T-1]``, the mean over the vocabulary of its logits at each position (MaPO's logit
  activation: the mask averages each activation over its trailing dimensions anyway).

  ``learned``: ``mask_model``, a :class:`SparseMask` (role "mask", its own optimizer group) on the
  states after each block; each eval checks that it is not all zeros (:func:`check_masks`: stops or
  warns). ``mapo``: :func:`jaxopd.losses.sparsepo.activation_mask` of the reference's residual
  stream (the embeddings, every block's output, the final-norm output) and its logits, one mask for
  both terms; the official MaPO also hooks MLP post-activations, q/k/v and the intra-block residual
  points, which this model does not expose."""
  if mask not in MASK_TABLE:
    raise ValueError(f"config.method.mask={mask!r}: must be one of {MASKS}")
  return MASK_TABLE[mask][0](mask_model, hidden, ref_logit_mean, m)


def _logit_mean(z):
  return jnp.mean(z.astype(jnp.float32), axis=-1)


def reference_outputs(reference, tokens, chunk: int = 128):
  """The reference's detached hidden states (``n_layers + 1`` arrays ``[N, T, D]``) and the
  per-position mean of its logits ``[N, T-1]`` (in chunks: no ``[N, T, V]`` array)."""
  hidden = tuple(jax.lax.stop_gradient(h) for h in reference.hidden_states(tokens))
  t = chunked_terms({"reference": reference}, tokens, lambda z, _: {"mean": _logit_mean(z["reference"])}, chunk,
                    frozen=("reference",), hidden={"reference": hidden[-1]})
  return t["mean"], hidden


def make_loss_fn(mask: str, shared: bool, beta: float, lambda_u: float = 0.0, lambda_d: float = 0.0,
                 chunk: int = 128):
  """``loss_fn(models, batch, rng)`` for SparsePO with ``mask`` in ``learned | mapo``.

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

  def loss_fn(models, batch, rng):
    del rng
    tokens, lmask = batch["tokens"], batch["loss_mask"]
    b, _, t = tokens.shape
    flat, flat_mask = tokens.reshape(b * 2, t), lmask.reshape(b * 2, t)
    hidden = tuple(jax.lax.stop_gradient(h) for h in models["reference"].hidden_states(flat))

    def terms(z, targets):       # the LM heads inside the chunk loop: no [N, T, V] logits
      out = {"lp_pi": label_logprob(z["policy"], targets), "lp_ref": label_logprob(z["reference"], targets),
             "kl": forward_kl(z["reference"], z["policy"])}
      if MASK_TABLE[mask][1]:
        out["mean"] = _logit_mean(z["reference"])
      return out
    tt = chunked_terms({"policy": models["policy"], "reference": models["reference"]}, flat, terms, chunk,
                       frozen=("reference",), hidden={"reference": hidden[-1]})
    m = response_mask(flat_mask)
    w_u, w_d = token_weights(mask, models.get("mask"), hidden, tt.get("mean"), m)
    lp_pi, lp_ref, k = tt["lp_pi"], tt["lp_ref"], tt["kl"]
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


# --- the method on the preference pipeline ---------------------------------------

def label(config) -> str:
  m = config.method
  return "mapo" if m.mask == "mapo" else f"sparsepo-{'shared' if m.shared else 'indep'}"


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  mask: str = option(one_of(*MASKS))
  shared: bool = option()                  # learned: one mask for w_u and w_d
  beta: float = option(positive)
  lambda_u: float = option(at_least(0))    # L1 penalty on w_u (learned only)
  lambda_d: float = option(at_least(0))    # L1 penalty on w_d (learned only)
  mask_init: str = option(one_of(*INITS))  # the learned mask's initialiser (MaskHead)
  chunk: int = option(at_least(0))         # positions per chunk of the vocabulary-wide terms

  def __post_init__(self):
    if self.mask == "mapo":
      if not self.shared:
        self.refuse("shared", "MaPO has one mask for both terms (use mask=learned)")
      if self.lambda_u or self.lambda_d:
        raise ConfigError(f"config.method.lambda_u={self.lambda_u}, lambda_d={self.lambda_d}: the MaPO mask is "
                          f"detached, an L1 penalty on it does nothing (use 0)")
      if self.mask_init != DEFAULT_INIT:
        self.refuse("mask_init", "only the learned mask is initialised")


def _check(c) -> Options:
  m = Options.of(c.method)
  tasks.require(c, TASKS)
  if m.mask == "mapo" and "mask" in c.optim.groups:
    raise ConfigError("config.optim.groups.mask: MaPO has no mask model to train (the preset ':mapo' "
                      "drops this group)")
  return m


def prepare(config, workdir: str):
  """The stages ``config.pipeline`` declares (data, SFT base, pairs; cached); policy and reference
  start from the SFT base, the mask head from its initialiser. MaPO (no mask model) drops the
  default config's ``mask`` optimizer group."""
  del workdir
  if config.method.mask == "mapo" and "mask" in config.optim.groups:
    config = copy.deepcopy(config)
    del config.optim.groups["mask"]        # --config.method.mask=mapo on the default config
  _check(config)
  return stage_lib.prepare(config)


def build(config) -> Experiment:
  m = _check(config)
  model_cfg = table.arch(config, "policy")
  train_recs, test_recs, sample_eval = pair_task.pair_data(config)
  gold_piece = tasks.piece(config, "gold_tokens")
  if gold_piece:            # the task's reward-bearing tokens, for the mask's statistics
    gold = gold_piece(config)
    train_recs = [dict(r, gold=gold(r["tokens"])) for r in train_recs]
    test_recs = [dict(r, gold=gold(r["tokens"])) for r in test_recs]
  loss_fn = make_loss_fn(m.mask, m.shared, m.beta, m.lambda_u, m.lambda_d, m.chunk)

  def init_heads(rng):
    return {"mask": SparseMask(model_cfg.n_layers, model_cfg.d_model, m.shared, nnx.Rngs(params=rng),
                                        m.mask_init)}

  probe = train_recs[:PROBE_TRAIN_PAIRS]
  return Experiment(roles={"policy": True, "reference": False},
                    init_heads=init_heads if m.mask == "learned" else None, loss_fn=loss_fn,
                    train_data=lambda shard: batched_iterator(train_recs, shard),
                    eval_data=(lambda shard: batched_iterator(test_recs, shard, shuffle=False, repeat=False))
                    if test_recs else None,
                    evaluate=make_evaluate(config, sample_eval, test_recs, probe)
                    if sample_eval is not None or m.mask == "learned" else None)


def _token_weights(mask, reference, mask_model, tokens, loss_mask):
  ref_mean, hidden = reference_outputs(reference, tokens)
  m = response_mask(loss_mask)
  w_u, w_d = token_weights(mask, mask_model, hidden, ref_mean, m)
  return w_u, w_d, m


def mask_weights(config, mask_model, reference, tokens, loss_mask):
  """Token weights on ``tokens[N, T]``: ``(w_u, w_d, m)`` numpy ``[N, T-1]`` (entry t weights token t+1)."""
  fn = compiled(_token_weights, (config.method.mask,), reference, mask_model)
  out = fn(jnp.asarray(tokens), jnp.asarray(loss_mask))
  return tuple(np.asarray(x) for x in jax.device_get(out))


class DeadMaskError(errors.TrainingError):
  """The learned reward mask is zero on every probed response token: the run cannot learn the preference."""


def check_masks(config, w_u, w_d, m, step: int) -> None:
  """The dead-mask check of a learned mask on probed pairs, ``w_u``, ``w_d``, ``m`` ``[N, T-1]``.

  ``w_u`` zero on every response token (``m > 0``): U = 0 on both sides, so the
  policy gets no preference signal (shared mask: the loss is exactly log 2 and
  nothing has a gradient), and the ReLU-dead head gets no gradient either
  (AdamW's weight decay alone moves it): stops with :class:`DeadMaskError` (a
  ``TrainingError``: the CLI prints it on one line). Only the independent ``w_d``
  zero everywhere: the loss is DPO with token reward weights ``w_u``, a working
  objective but not SparsePO's KL-constrained one: warns, one printed line.
  Both name ``step``; the trainer evaluates at ``config.eval_every`` and at the
  end, so a mask dead from step 0 stops at the first eval (the train metric
  ``mask/u_zero`` = 1 shows it from step 1).
  """
  valid = m > 0
  if not valid.any():
    return
  init = config.method.mask_init
  fix = ("use config.method.mask_init=positive (the default) or ones" if init == "uniform" else
         "try " + ("config.method.mask_init=ones, " if init != "ones" else "")
         + "a lower mask learning rate (config.optim.groups.mask.lr) or a smaller lambda_u")
  where = f"on every response token of the {len(m)} probed sequences at step {step}"
  if not np.any(w_u[valid] != 0):
    raise DeadMaskError(f"SparsePO: the learned mask w_u is zero {where} (dead mask: U = 0, no gradient reaches "
                        f"the policy through the reward term, nor the mask head); {fix}")
  if not config.method.shared and not np.any(w_d[valid] != 0):
    print(f"warning: SparsePO: the learned KL mask w_d is zero {where} (dead KL head: the loss is DPO with token "
          f"reward weights w_u, no KL term); {fix}", flush=True)


def make_evaluate(config, sample_eval, test_recs, probe_recs=()):
  """The dead-mask check (:func:`check_masks`, learned mask) on the held-out pairs and ``probe_recs`` (the
  first training pairs), then ``sample_eval`` (the reviews task's sampled evaluation, or None) and the
  mask's AUROC on the held-out pairs' reward-bearing tokens."""
  test_recs = list(test_recs or [])
  learned = config.method.mask == "learned"
  recs = list(test_recs) + (list(probe_recs) if learned else [])
  n_test = 2 * len(test_recs)
  tokens = np.stack([r["tokens"] for r in recs]).reshape(-1, config.seq_len)
  lmask = np.stack([r["loss_mask"] for r in recs]).reshape(-1, config.seq_len)
  gold = (np.stack([r["gold"] for r in test_recs]).reshape(-1, config.seq_len)[:, 1:]
          if test_recs and "gold" in test_recs[0] else None)
  independent = learned and not config.method.shared

  def evaluate(models, step):
    w_u, w_d, m = mask_weights(config, models.get("mask"), models["reference"], tokens, lmask)
    if learned:
      check_masks(config, w_u, w_d, m, step)          # before sampling: a dead run stops at once
    out = sample_eval(models, step) if sample_eval is not None else {}
    if gold is not None:
      valid = m[:n_test] > 0
      out["mask/auroc_u"] = auroc(w_u[:n_test][valid], gold[valid])
      if independent:
        out["mask/auroc_d"] = auroc(w_d[:n_test][valid], gold[valid])
    return out
  return evaluate


def examples(config, suite, models, n: int, split: str = "test") -> list[dict]:
  """The first ``n`` held-out pairs' responses (chosen, then rejected) with their per-token weights."""
  pc = stage_lib.prefs_config(config)
  recs, _ = preferences.records(pc, split, config.data.data_dir, suite.tokenizer, config.seq_len,
                                config.data.over_length, config.prefs.prompt_len)
  recs = recs[:max(1, (n + 1) // 2)]
  tokens = np.stack([r["tokens"] for r in recs]).reshape(-1, config.seq_len)
  lmask = np.stack([r["loss_mask"] for r in recs]).reshape(-1, config.seq_len)
  gold = tasks.piece(config, "gold_tokens")(config)(tokens)
  w_u, w_d, _ = mask_weights(config, models.get("mask"), models["reference"], tokens, lmask)
  vocab = suite.tokenizer.convert_ids_to_tokens(list(range(len(suite.tokenizer))))
  special = {suite.tokenizer.pad_token_id, suite.tokenizer.bos_token_id}
  out = []
  for i in range(min(n, len(tokens))):
    resp = [t for t in range(1, config.seq_len) if lmask[i, t]]
    prompt = [t for t in range(config.seq_len) if not lmask[i, t] and tokens[i, t] not in special
              and (not resp or t < resp[0])]
    out.append({"side": "chosen" if i % 2 == 0 else "rejected",
                "prompt": [vocab[tokens[i, t]] for t in prompt],
                "words": [vocab[tokens[i, t]] for t in resp],
                "w_u": [float(w_u[i, t - 1]) for t in resp],      # w[:, t-1] weights token t
                "w_d": [float(w_d[i, t - 1]) for t in resp],
                "gold": [int(gold[i, t]) for t in resp]})
  return out


def heatmap(panels: dict, path: str, key: str = "w_u"):
  """One panel per mask (``{title: examples}``): each response's words on a background coloured by
  its token weight (``key``), the prompt in grey, reward-bearing words underlined."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import colors
  width, char_w, line_h = 118, 1.0, 1.0
  layouts, total = [], 0
  for title, exs in panels.items():
    lines = []
    for ex in exs:
      row, col = [], 0
      items = [(w, None, 0) for w in ex["prompt"]] + list(zip(ex["words"], ex[key], ex["gold"]))
      for word, weight, g in items:
        if col + len(word) + 1 > width and row:
          lines.append(row)
          row, col = [], 0
        row.append((col, word, weight, g))
        col += len(word) + 1
      lines.append(row)
      lines.append([(0, f"({ex['side']})", None, 0)])
    vmax = max([max(ex[key], default=0.0) for ex in exs] + [1e-6])
    layouts.append((title, lines, vmax))
    total += len(lines) + 2
  fig, ax = plt.subplots(figsize=(width * 0.105, total * 0.26 + 0.6))
  ax.set_xlim(0, width)
  ax.set_ylim(total, 0)
  ax.axis("off")
  y = 0
  cmap = matplotlib.colormaps["YlOrRd"]
  for title, lines, vmax in layouts:
    norm = colors.Normalize(0.0, vmax)
    ax.text(0, y + 0.8, f"{title}   (colour: {key}, 0 pale yellow -> {vmax:.2f} red; underlined: gold reward-bearing)",
            fontsize=9, fontweight="bold", family="monospace")
    y += 1.6
    for line in lines:
      for col, word, weight, g in line:
        kw = dict(fontsize=8, family="monospace", va="center")
        if weight is None:
          ax.text(col * char_w, y + 0.5, word, color="grey", **kw)
        else:
          ax.text(col * char_w, y + 0.5, word, bbox=dict(boxstyle="square,pad=0.1", lw=0,
                  facecolor=cmap(norm(weight))), **kw)
          if g:
            ax.plot([col * char_w, (col + len(word)) * char_w], [y + 0.9, y + 0.9], color="black", lw=0.8)
      y += line_h
    y += 0.4
  paths.savefig(fig, path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def report(config, workdir: str, summary: dict):
  """TDPO's before/after table and summary files, the mask statistics, mask_examples.json and heatmap.png."""
  pair_task.report(config, workdir, summary, label(config))
  ev = summary.eval
  names = ("u", "d") if config.method.mask == "learned" and not config.method.shared else ("u",)
  for n in names:
    print(f"mask w_{n}: zero fraction {ev.get(f'mask/{n}_zero', float('nan')):.3f}, mean "
          f"{ev.get(f'mask/{n}_mean', float('nan')):.3f}, on gold reward-bearing tokens "
          f"{ev.get(f'mask/{n}_gold', float('nan')):.3f} vs others {ev.get(f'mask/{n}_other', float('nan')):.3f}, "
          f"AUROC {ev.get(f'mask/auroc_{n}', float('nan')):.3f}")
  if tasks.piece(config, "gold_tokens") is None:    # the examples show the task's reward-bearing tokens
    return
  suite = suite_lib.ensure(config.data, verbose=False)
  models = summary.trainer.models(summary.state, summary.frozen)
  exs = examples(config, suite, models, config.heatmap_examples)
  paths.write_json(os.path.join(workdir, "mask_examples.json"), {"label": label(config), "examples": exs})
  heatmap({label(config): exs}, os.path.join(workdir, "heatmap.png"))
  print(f"wrote {os.path.join(workdir, 'mask_examples.json')} and heatmap.png")
