"""f-DPG (Go et al., ICML 2023) as an on-policy method of the one trainer: targets,
the rollout (sample, score, update log Z and the baseline), the loss, the
pipeline (the SFT base of :mod:`jaxopd.stages`, the target fit),
evaluation against the true target and the report. Config: experiments/fdpg.py.

A target is ``p(x) = P(x) / Z`` with ``log P(x) = log a(x) + log phi(x)``: ``a``
is the frozen base model (role ``base``), ``phi`` a scorer of the sampled
sequence (:class:`Target`). Each step :func:`make_rollout` samples from the proposal (the policy,
or offline a frozen copy replaced by the policy when it gets closer to the target, as disco's
``_update_proposal_if_better`` does) and updates log Z and the baseline in disco's order; the method
state lives in the trainer's ``state["method"]`` (:func:`init_state`). Importance weights are valid
only under pure ancestral sampling: any other sampling setting is refused (:func:`check_sampling`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopd import options, paths, stages as stage_lib, tasks
from jaxopd import rewards
from jaxopd.data import batched_iterator, group_rows, reviews
from jaxopd.errors import ConfigError
from jaxopd.evaluation import compiled, distinct_n, self_bleu, to_host, token_entropy
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import token_logprobs, response_mask
from jaxopd.losses.fdpg import (F_DIVERGENCES, Baseline, LogZ, context_weights, divergence_estimates,
                                group_baselines, pseudo_reward, surrogate_loss)
from jaxopd.models import Transformer, heads, table
from jaxopd.options import at_least, one_of, option, positive
from jaxopd.sampling import SamplingConfig, rollout_config, sample
from jaxopd.tasks import Prompts

TASKS = ("reviews", "files")   # the tasks it trains on (jaxopd.tasks)

TARGETS = ("pointwise", "distributional", "rlhf")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  """``config.method`` (experiments/fdpg.py comments each field), declared in the order of its checks."""
  target: str = option(one_of(*TARGETS))
  divergence: str = option(one_of(*F_DIVERGENCES))
  eps: float = option()             # pointwise: b's floor; -1 = auto
  words: str = option()             # pointwise: "|"-separated
  topic: str = option(one_of(*reviews.TOPIC_NAMES))
  topic_mean: float = option()      # distributional: target E_p[phi]
  lambdas: tuple = option()         # distributional: () until prepare() fits them
  reward_beta: float = option()     # rlhf: P = a exp(r / beta)
  reward: str = option()            # rlhf: gold | module:function | model
  conditional: bool = option()      # one log Z per training prompt
  offline: bool = option()          # sample from a proposal
  proposal_every: int = option(positive)
  baseline_window: int = option(positive)
  fit_samples: int = option(positive)
  samples_per_context: int = option(positive)
  chunk: int = option(at_least(0))

  def __post_init__(self):
    if self.target != "pointwise" and self.eps != -1.0:
      self.refuse("eps", "the floor applies to pointwise targets only (leave it at -1)")
    if self.target == "rlhf" and self.reward_beta <= 0:
      self.refuse("reward_beta", "must be positive")
    if self.target == "distributional" and not 0.0 < self.topic_mean < 1.0:
      self.refuse("topic_mean", "must be in (0, 1)")
    if self.reward != "gold" and self.target != "rlhf":
      self.refuse("reward", "only target=rlhf uses a reward")


@dataclasses.dataclass(frozen=True)
class Target:
  """``log phi(x)`` of a sequence, jittable: ``phi`` is

  * pointwise: ``b(x) in {0, 1}``: the response contains one of ``token_ids``;
    ``log b = -inf`` where it does not (``eps > 0`` floors ``b`` at ``eps``,
    needed for reverse KL);
  * distributional: ``exp(lambda . features(x))`` with ``features[k] = 1`` if the
    response contains one of ``feature_ids[k]`` (e.g. a topic's nouns);
  * rlhf: ``exp(r(x) / beta)`` with a host-side reward function (``jax.pure_callback``), or,
    with ``reward_fn=None``, the reward model ``models["reward"]`` run on device
    (:func:`jaxopd.rewards.score`; ``reward_pad``: the pad id it skips).

  The reward-bearing methods take ``models`` (the step's dict of models, or one with
  the reward role alone) so a reward model is an argument, never a baked constant.
  """
  kind: str
  token_ids: tuple = ()                   # pointwise
  feature_ids: tuple = ()                 # distributional: tuple of tuples of ids
  lambdas: tuple = ()                     # distributional coefficients
  reward_fn: Callable | None = None       # rlhf: (tokens [B, T], mask [B, T]) -> [B] numpy; None: models["reward"]
  beta: float = 1.0                       # rlhf temperature
  reward_pad: int = -1                    # rlhf with a reward model: its pad id (-1: none)

  def features(self, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """``[B, K]`` float32: 1 where the response contains one of ``feature_ids[k]``."""
    ids = self.feature_ids if self.kind == "distributional" else (self.token_ids,)
    resp = loss_mask.astype(bool)
    cols = [jnp.any(jnp.isin(tokens, jnp.asarray(group, jnp.int32)) & resp, axis=1) for group in ids]
    return jnp.stack(cols, axis=1).astype(jnp.float32)

  def reward(self, tokens: jax.Array, loss_mask: jax.Array, models=None) -> jax.Array:
    if self.reward_fn is None:
      return rewards.score(models["reward"], tokens, loss_mask, self.reward_pad)
    shape = jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32)
    fn = lambda t, m: np.asarray(self.reward_fn(t, m), np.float32)
    return jax.pure_callback(fn, shape, tokens, loss_mask)

  def alignment(self, tokens: jax.Array, loss_mask: jax.Array, models=None) -> jax.Array:
    """``[B]``: ``b(x)`` (pointwise), the first feature (distributional), ``r(x)`` (rlhf)."""
    if self.kind == "rlhf":
      return self.reward(tokens, loss_mask, models)
    return self.features(tokens, loss_mask)[:, 0]

  def log_phi(self, tokens: jax.Array, loss_mask: jax.Array, eps: float = 0.0, models=None) -> jax.Array:
    if self.kind == "pointwise":
      b = jnp.maximum(self.features(tokens, loss_mask)[:, 0], eps)
      return jnp.where(b > 0, jnp.log(jnp.where(b > 0, b, 1.0)), -jnp.inf)
    if self.kind == "distributional":
      return self.features(tokens, loss_mask) @ jnp.asarray(self.lambdas, jnp.float32)
    if self.kind == "rlhf":
      return self.reward(tokens, loss_mask, models) / self.beta
    raise ValueError(f"config.method.target={self.kind!r}: must be one of {TARGETS}")


def check_sampling(cfg: SamplingConfig, field: str = "config.rollout"):
  """f-DPG's importance weights and log Z need samples from the model itself."""
  if not cfg.is_ancestral:
    raise ConfigError(
        f"{field}: f-DPG needs pure ancestral sampling (temperature 1, top_k 0, top_p 1, not greedy); got "
        f"temperature={cfg.temperature}, top_k={cfg.top_k}, top_p={cfg.top_p}, greedy={cfg.greedy}")


def fit_lambdas(features: np.ndarray, targets: np.ndarray, iters: int = 100) -> np.ndarray:
  """GDC moment matching: ``lambda`` with ``E_p[features] = targets`` for
  ``p ~ a(x) exp(lambda . features)``, from samples of ``a`` (self-normalised
  importance sampling). Newton's method on the convex dual
  ``log E_a[exp(lambda . f)] - lambda . targets``; float64 numpy."""
  f = np.asarray(features, np.float64)
  mu = np.asarray(targets, np.float64)
  lo, hi = f.min(0), f.max(0)
  bad = (mu <= lo) | (mu >= hi)
  if np.any(bad):
    raise ValueError(f"moment targets {mu[bad].tolist()} are outside the range the base samples reach "
                     f"({lo[bad].tolist()}..{hi[bad].tolist()}): no finite lambda matches them")
  lam = np.zeros(f.shape[1])
  for _ in range(iters):
    s = f @ lam
    w = np.exp(s - s.max())
    w /= w.sum()
    m = w @ f
    cov = (f - m).T @ ((f - m) * w[:, None]) + 1e-12 * np.eye(f.shape[1])
    step = np.linalg.solve(cov, m - mu)
    lam -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  return lam


def init_state(num_contexts: int, baseline_window: int, proposal_state=None) -> dict:
  """The method state: log Z per context, baseline, and (offline) the proposal."""
  state = {"log_z": LogZ.init(num_contexts), "baseline": Baseline.init(baseline_window)}
  if proposal_state is not None:
    state.update(proposal=proposal_state, proposal_set=jnp.bool_(False), swaps=jnp.int32(0),
               rollouts=jnp.int32(0), kl_policy=jnp.float32(0), kl_proposal=jnp.float32(0))
  return state


def _sequence_logp(model, tokens, loss_mask, chunk: int):
  """``log model(response | prompt)`` ``[B]``, the LM head inside a chunk loop (:mod:`jaxopd.models.heads`)."""
  return jnp.sum(heads.token_logprobs(model, tokens, chunk) * response_mask(loss_mask), axis=1)


def make_rollout(target: Target, divergence: str, scfg: SamplingConfig, eps: float = 0.0,
                 offline: bool = False, proposal_every: int = 16, group: int = 0, chunk: int = 64):
  """``rollout(models, batch, rng, state) -> (batch, state)`` for the trainer (``state``: the
  method state of :func:`init_state`).

  ``batch``: ``prompt [B, P]``, ``prompt_len [B]``, ``context [B]`` (index of
  the context's log Z; all 0 when unconditional). ``eps`` floors a pointwise
  ``b`` in the *training* target; the metrics use the true target (``eps=0``).
  ``proposal_every``: rollouts between proposal checks (offline).
  The batch's rows are sampled once each; with ``config.method.samples_per_context`` = k the
  data pipeline fills each microbatch with ``B / k`` prompts k times each, consecutive rows
  (:func:`build`), as disco samples several continuations per context: a context's running
  log Z then has k samples at its first visit (with one, ``t = pi / q = 1`` on-policy and the
  pseudo-reward carries no signal).

  ``group``: the rows of one context (k; 0 = the whole batch is one context, unconditional);
  with ``group > 1`` each context's prompt is prefilled once and its KV cache kept once as the
  shared prefix of its ``group`` rows (:func:`jaxopd.sampling.sample` with ``repeats``: the same
  samples as sampling every row).
  As in disco (``disco/tuners/tuner.py``, ``losses/f_divergence.py``): log Z takes every sample
  of the batch before any advantage; the windowed baseline is updated once per context, in
  order, so a context's advantage uses the earlier contexts' rewards
  (:func:`jaxopd.losses.fdpg.group_baselines`); a context with no valid log Z yet adds nothing
  to the window and nothing to the loss, which averages each valid context's mean over its
  samples (``batch["weight"]``, :func:`jaxopd.losses.fdpg.context_weights`). One difference:
  with gradient accumulation jaxopd averages over the valid contexts of the whole step, disco
  over those of each minibatch and then over minibatches (the same when every microbatch has
  the same number of valid contexts).
  """
  check_sampling(scfg)
  if divergence not in F_DIVERGENCES:
    raise ConfigError(f"config.method.divergence={divergence!r}: must be one of {F_DIVERGENCES}")
  if not 0.0 <= eps < 1.0:
    raise ConfigError(f"config.method.eps={eps}: must be in [0, 1)")
  if target.kind == "pointwise" and divergence == "rkl" and eps <= 0:
    raise ConfigError("config.method.eps=0: reverse KL on a pointwise target needs the epsilon floor "
                      "b_eps = max(b, eps) > 0 (log P = -inf where the constraint fails); set e.g. eps=1e-3")

  def rollout(models, batch, rng, state):
    policy = models["policy"]
    ctx = batch["context"].astype(jnp.int32)
    if offline:
      gd, pol_state = nnx.split(policy)
      prop_state = jax.tree.map(lambda q, p: jnp.where(state["proposal_set"], q, p), state["proposal"], pol_state)
      proposal = nnx.merge(gd, prop_state)
    else:
      proposal = policy
    if group > 1:   # rows come in groups of `group` copies of a prompt: prefill each prompt once
      out = sample(proposal, batch["prompt"][::group], batch["prompt_len"][::group], rng, scfg, repeats=group)
    else:
      out = sample(proposal, batch["prompt"], batch["prompt_len"], rng, scfg)
    tokens, mask = out.tokens, out.loss_mask
    q_logp = jnp.sum(out.logprobs, axis=1)
    a_logp = _sequence_logp(models["base"], tokens, mask, chunk)
    pi_logp = _sequence_logp(policy, tokens, mask, chunk) if offline else q_logp
    log_score = a_logp + target.log_phi(tokens, mask, eps, models)
    true_score = a_logp + target.log_phi(tokens, mask, 0.0, models) if eps > 0 else log_score
    log_z = state["log_z"].update(log_score, q_logp, ctx)
    lz = log_z.value[ctx]
    valid = jnp.isfinite(lz)
    r = pseudo_reward(pi_logp - (log_score - jnp.where(valid, lz, 0.0)), divergence)
    k = group or r.shape[0]
    b, baseline = group_baselines(state["baseline"], r, valid, k)
    new = dict(state, log_z=log_z, baseline=baseline)
    if offline:
      # disco: accumulate KL(p||pi) and KL(p||q) estimates; every `proposal_every`
      # rollouts, replace q by pi if pi is closer, then reset the estimates.
      kl_pi = divergence_estimates(pi_logp, q_logp, log_score, jnp.where(valid, lz, 0.0))["kl_target_policy"]
      kl_q = divergence_estimates(q_logp, q_logp, log_score, jnp.where(valid, lz, 0.0))["kl_target_policy"]
      n = state["rollouts"] + 1
      kp, kq = state["kl_policy"] + kl_pi, state["kl_proposal"] + kl_q
      check = n % proposal_every == 0
      swap = check & (kp < kq)
      new.update(proposal=jax.tree.map(lambda q, p: jnp.where(swap | ~state["proposal_set"], p, q),
                                       prop_state, pol_state),
                 proposal_set=jnp.bool_(True), swaps=state["swaps"] + swap.astype(jnp.int32), rollouts=n,
                 kl_policy=jnp.where(check, 0.0, kp), kl_proposal=jnp.where(check, 0.0, kq))
    train = {"tokens": tokens, "loss_mask": mask, "proposal_logp": q_logp, "log_score": log_score,
             "log_z": lz, "baseline": b, "weight": context_weights(valid, k), "true_score": true_score,
             "base_logp": a_logp, "alignment": target.alignment(tokens, mask, models)}
    if offline:
      train["swaps"] = jnp.broadcast_to(new["swaps"].astype(jnp.float32), q_logp.shape)
    return train, new
  return rollout


def make_loss_fn(divergence: str, on_policy: bool = False, chunk: int = 64):
  """The surrogate loss of :func:`jaxopd.losses.fdpg.surrogate_loss` plus metrics:
  importance-sampled divergences to the (true) target with the running log Z,
  alignment, ``KL(pi || a)`` and the pseudo-reward.

  ``on_policy`` (samples drawn from the policy itself): the importance weight
  ``pi / q`` is exactly 1 (on-policy), so ``q`` is taken to be the forward
  pass's own (detached) log-probability, not the sampler's: the two differ by
  the numerics of the two computations (in bf16 by percents over a sequence),
  which would otherwise bias the gradient."""
  def loss_fn(models, batch, rng):
    del rng
    tokens, mask = batch["tokens"], batch["loss_mask"]
    pi_logp = _sequence_logp(models["policy"], tokens, mask, chunk)
    sg = jax.lax.stop_gradient(pi_logp)
    q_logp = sg if on_policy else batch["proposal_logp"]
    loss, n, r = surrogate_loss(pi_logp, q_logp, batch["log_score"], batch["log_z"], batch["baseline"], divergence,
                                batch["weight"])
    w = jnp.exp(sg - q_logp)                      # pi / q (exactly 1 on-policy)
    lz = jnp.where(jnp.isfinite(batch["log_z"]), batch["log_z"], 0.0)
    div = divergence_estimates(sg, q_logp, batch["true_score"], lz)
    rows = jnp.float32(tokens.shape[0])           # metrics are means over samples, the loss over contexts
    metrics = {f"target/{k}": (v * rows, rows) for k, v in div.items()}
    metrics.update({k: (v, rows) for k, v in {
        "alignment": jnp.sum(w * batch["alignment"]),
        "kl_base": jnp.sum(w * (sg - batch["base_logp"])),
        "pseudo_reward": jnp.sum(r),
        "baseline": jnp.sum(batch["baseline"]),
        "log_z": jnp.sum(lz),
        "length": jnp.sum(mask.astype(jnp.float32)),
        "valid_contexts": jnp.sum(jnp.isfinite(batch["log_z"]).astype(jnp.float32)),
    }.items()})
    if "swaps" in batch:
      metrics["proposal_swaps"] = (jnp.sum(batch["swaps"]), rows)
    return LossOutput(loss, n, metrics)
  return loss_fn


# --- the pipeline on the reviews task ---------------------------------------------

def prompt_len(c) -> int:
  """Prompt tokens of a training sequence: the padded prompt (conditional) or BOS alone."""
  return c.rollout.prompt_len if c.method.conditional else 1


def _check(c) -> Options:
  m = Options.of(c.method)
  tasks.require(c, TASKS)
  rewards.check_config(c, "gold", "the reviews task's")
  if c.data.task == "files":
    if m.target != "rlhf" or m.reward == "gold":
      raise ConfigError(f"config.method.target={m.target!r}: with task=files the target is rlhf with your reward "
                        f"(--config.method.target=rlhf --config.method.reward=module:function or model); the pointwise "
                        f"and distributional targets are defined on the reviews vocabulary")
    if not m.conditional:
      raise ConfigError("config.method.conditional=False: with task=files each prompt is a context "
                        "(--config.method.conditional=True)")
  per_host = c.batch_size // c.grad_accum // jax.process_count()
  if m.conditional and per_host % m.samples_per_context:
    raise ConfigError(f"config.method.samples_per_context={m.samples_per_context}: must divide each host's "
                      f"microbatch config.batch_size / config.grad_accum / processes = {per_host}")
  if c.seq_len != prompt_len(c) + c.rollout.max_new_tokens:
    raise ConfigError(f"config.seq_len={c.seq_len}: f-DPG's sequences are prompt + response, so it must equal "
                      f"{prompt_len(c)} + config.rollout.max_new_tokens={c.rollout.max_new_tokens}")
  if tasks.has_stages(c) and c.seq_len > c.model.max_len:   # the stages' architecture (files: the roles')
    raise ConfigError(f"config.rollout.max_new_tokens={c.rollout.max_new_tokens}: prompt + response exceeds "
                      f"config.model.max_len={c.model.max_len}")
  if _eval_contexts(c) <= 0:
    raise ConfigError(f"config.eval.contexts={c.eval.contexts}: must be positive")
  if c.eval.num_samples % _eval_contexts(c) != 0:
    raise ConfigError(f"config.eval.num_samples={c.eval.num_samples}: must be a multiple of the "
                      f"{_eval_contexts(c)} evaluation contexts")
  check_sampling(SamplingConfig(max_new_tokens=1, eos_id=0, temperature=c.rollout.temperature,
                                     top_k=c.rollout.top_k, top_p=c.rollout.top_p))
  return m


def _eps(m) -> float:
  """The pointwise floor actually used (reverse KL needs one: log P = -inf where b = 0)."""
  if m.eps != -1.0:
    return float(m.eps)
  return 1e-3 if (m.target == "pointwise" and m.divergence == "rkl") else 0.0


def _eval_contexts(c) -> int:
  return c.eval.contexts if c.method.conditional else 1


def _word_ids(tok, words: str, field: str, skip_unknown: bool = False) -> tuple:
  """Token ids of ``"w1|w2"``; a word outside the vocabulary (this world's
  corpus never uses it) is an error, or skipped for a topic's noun list."""
  ids = []
  for w in [w.strip() for w in words.split("|") if w.strip()]:
    i = tok.convert_tokens_to_ids(w)
    if i is None or i == tok.unk_token_id:
      if skip_unknown:
        continue
      raise ConfigError(f"{field}={words!r}: {w!r} is not a word of the reviews vocabulary")
    ids.append(int(i))
  if not ids:
    raise ConfigError(f"{field}={words!r}: none of these words is in the reviews vocabulary")
  return tuple(ids)


def load_data(config) -> Prompts:
  """The task's prompts (:mod:`jaxopd.tasks`: the reviews suite's, or your prompt files), with its
  held-out ones: the evaluation contexts."""
  data = tasks.get(config, "prompts")(config)
  if not data.test:
    raise ConfigError("config.data.files.eval is empty: f-DPG's evaluation scores held-out prompts (its log Z "
                      "is fitted per evaluation context)")
  return data


def make_target(c, data: Prompts, lambdas=None) -> Target:
  m, tok = c.method, data.tokenizer
  if m.target == "pointwise":
    return Target("pointwise", token_ids=_word_ids(tok, m.words, "config.method.words"))
  if m.target == "distributional":
    ids = _word_ids(tok, "|".join(reviews.TOPIC_NOUNS[m.topic]), "config.method.topic", skip_unknown=True)
    lam = tuple(float(x) for x in (m.lambdas if lambdas is None else lambdas)) or (0.0,)
    return Target("distributional", feature_ids=(ids,), lambdas=lam)
  if m.reward == "gold":
    return Target("rlhf", reward_fn=data.gold, beta=float(m.reward_beta))
  if m.reward == rewards.MODEL:
    rdir = table.source_dir(c, "reward")
    rewards.check_model(tok, rdir, table.arch(c, "reward"))
    return Target("rlhf", reward_fn=None, beta=float(m.reward_beta), reward_pad=rewards.pad_id(rdir))
  prompt, plen = _prompts(c, data, "train", 2)
  probe = [tok.decode(p[:n].tolist(), skip_special_tokens=True) for p, n in zip(prompt, plen)]
  fn = rewards.load(m.reward, tok, probe_prompts=probe)
  return Target("rlhf", reward_fn=fn, beta=float(m.reward_beta))


def _prompts(c, data: Prompts, split: str, n: int | None = None):
  """(prompt [N, P], prompt_len [N]); unconditional: N rows of BOS."""
  if not c.method.conditional:
    n = n or 1
    return np.full((n, 1), data.tokenizer.bos_token_id, np.int32), np.ones((n,), np.int32)
  recs = (data.train if split == "train" else data.test)[:n]
  return np.stack([r["prompt"] for r in recs]), np.stack([r["prompt_len"] for r in recs])


# --- stages --------------------------------------------------------------------

def prepare(config, workdir: str):
  """Data and SFT base (cached stages), then the target fit (a stage; copied to workdir/target.json).

  With ``config.data.task = "files"`` (your prompts and reward function) no SFT
  stage is trained: policy and base need an ``hf:DIR`` or ``run:WORKDIR`` init."""
  m = _check(config)
  config = stage_lib.prepare(config)     # a copy: the fit's lambda and log Z are filled in below
  fit = _fit_target(config, workdir)
  with config.unlocked():
    if m.target == "distributional" and not m.lambdas:
      config.method.lambdas = tuple(fit["lambdas"])
    config.eval.log_z = tuple(fit["log_z"])
  return config


def _draw_and_score(scfg, target, model, reward_model, prompt, plen, rng):
  """Samples of ``model`` and what the target needs of them: its features ``[B, K]``, or the
  reward ``[B, 1]`` (rlhf; ``reward_model``: the reward role, or None)."""
  out = sample(model, prompt, plen, rng, scfg)
  if target.kind == "rlhf":
    return out.tokens, out.loss_mask, target.reward(out.tokens, out.loss_mask, {"reward": reward_model})[:, None]
  return out.tokens, out.loss_mask, target.features(out.tokens, out.loss_mask)


def _reward_fingerprint(c) -> str:
  """What the reward's code or weights are (cached fits depending on the reward are refitted
  when it changes): the function's source file, or the reward model's weight files."""
  if c.method.reward == rewards.MODEL:
    return table.fingerprint(table.resolve_one(c, "reward").source)
  return rewards.fingerprint(c.method.reward) if c.method.reward != "gold" else ""


def _load_reward_model(c):
  """The reward role as a model (host-side work: the target fit), or None."""
  if c.method.reward != rewards.MODEL:
    return None
  r = c.models.reward
  return table.load_model(r.init, "reward", dtype=r.dtype, param_dtype=r.param_dtype)[0]


def _fit_target(config, workdir: str) -> dict:
  """lambda (distributional) and the true target's log Z per evaluation context, from base samples.

  A stage under ``config.data.data_dir/fdpg_targets/`` (:func:`jaxopd.stages.run`: runs of a sweep
  share one fit), copied to ``workdir/target.json``."""
  m = config.method
  inputs = {"sft": table.weights_init(config, "base"), "target": m.target, "words": m.words, "topic": m.topic,
            "topic_mean": m.topic_mean, "lambdas": list(m.lambdas), "reward_beta": m.reward_beta,
            "conditional": m.conditional, "fit_samples": m.fit_samples, "contexts": _eval_contexts(config),
            "max_new_tokens": config.rollout.max_new_tokens, "seed": config.seed, "reward": m.reward,
            "reward_source": _reward_fingerprint(config),
            "data": config.data.to_dict()}
  where = stage_lib.run(os.path.join(config.data.data_dir, "fdpg_targets"), "target", inputs,
                        lambda where: paths.write_json(os.path.join(where, "target.json"), _fit(config), indent=2))
  out = {**paths.read_json(os.path.join(where, "target.json")), "stage": where}
  paths.write_json(os.path.join(workdir, "target.json"), out, indent=2)
  return out


def _fit(config) -> dict:
  m = config.method
  data = load_data(config)
  base, _ = table.load_model(table.weights_init(config, "base"), "base")
  reward_model = _load_reward_model(config)
  k = _eval_contexts(config)
  prompt, plen = _prompts(config, data, "test", k)
  if len(prompt) < k:
    raise ConfigError(f"config.eval.contexts={k}: the held-out prompts are only {len(prompt)}")
  scfg = rollout_config(config, data.tokenizer)
  target0 = make_target(config, data, lambdas=(0.0,))
  draw = compiled(_draw_and_score, (scfg, target0), base, reward_model)

  chunk = 512
  feats, ctx_ids = [], []
  rng = jax.random.PRNGKey(config.seed + 7)
  for ci in range(k):
    done = 0
    while done < m.fit_samples:
      n = min(chunk, m.fit_samples - done)
      rng, sub = jax.random.split(rng)
      toks, mask, f = jax.device_get(draw(np.repeat(prompt[ci:ci + 1], n, 0), np.repeat(plen[ci:ci + 1], n), sub))
      feats.append(np.asarray(f, np.float64))
      ctx_ids.append(np.full(n, ci))
      done += n
  feats, ctx_ids = np.concatenate(feats), np.concatenate(ctx_ids)
  out = {} if m.target == "rlhf" else {"base_rate": float(feats[:, 0].mean())}
  if m.target == "pointwise":
    log_phi = np.where(feats[:, 0] > 0, 0.0, -np.inf)
  elif m.target == "distributional":
    lam = np.asarray(m.lambdas, np.float64) if m.lambdas else fit_lambdas(feats, np.array([m.topic_mean]))
    out["lambdas"] = lam.tolist()
    log_phi = feats @ lam
  else:
    r = feats[:, 0]
    log_phi = r / m.reward_beta
    out["base_reward"], out["base_reward_std"] = float(np.mean(r)), float(np.std(r))
    # E_P[r] of the target itself, per context by self-normalised importance sampling of the
    # base samples (weights phi = exp(r / beta)), averaged over the contexts
    w = [np.exp(log_phi[ctx_ids == ci] - log_phi[ctx_ids == ci].max()) for ci in range(k)]
    out["target_reward"] = float(np.mean([wi @ r[ctx_ids == ci] / wi.sum() for ci, wi in enumerate(w)]))
  # Samples are from a, so Z = E_a[P / a] = E_a[phi] per context.
  log_z = []
  for ci in range(k):
    lp = log_phi[ctx_ids == ci]
    if not np.any(np.isfinite(lp)):
      raise ValueError(f"target fit: none of {len(lp)} base samples of context {ci} satisfies "
                       f"config.method.words={m.words!r}; Z cannot be estimated (choose a more frequent word "
                       f"or raise config.method.fit_samples)")
    mx = lp[np.isfinite(lp)].max()
    log_z.append(float(mx + np.log(np.mean(np.exp(lp - mx)))))
  out["log_z"] = log_z
  rate = (f"base reward {out['base_reward']:.4f} (std {out['base_reward_std']:.4f}), target's "
          f"{out['target_reward']:.4f}" if m.target == "rlhf"
          else f"base rate {out['base_rate']:.4f}")
  print(f"[stage] target {m.target}: {rate}"
        + (f", lambda {out['lambdas']}" if "lambdas" in out else "")
        + f", log Z {np.round(log_z[:4], 4).tolist()}{' ...' if k > 4 else ''} "
        f"({m.fit_samples} base samples per context)", flush=True)
  return out


def build(config) -> Experiment:
  m = _check(config)
  if len(config.eval.log_z) != _eval_contexts(config):
    raise ConfigError(f"config.eval.log_z has {len(config.eval.log_z)} values for {_eval_contexts(config)} "
                      f"evaluation contexts: run through jaxopd.main (prepare() fits them)")
  if m.target == "distributional" and not m.lambdas:
    raise ConfigError("config.method.lambdas is empty: run through jaxopd.main (prepare() fits them)")
  data = load_data(config)
  model_cfg = table.arch(config, "policy")
  if len(data.tokenizer) > model_cfg.vocab_size:
    raise ConfigError(f"config.models.policy: its vocab_size={model_cfg.vocab_size} is smaller than the "
                      f"tokenizer's {len(data.tokenizer)} tokens")
  target = make_target(config, data)
  scfg = rollout_config(config, data.tokenizer)
  if m.conditional:
    prompt, plen = _prompts(config, data, "train")
    records = [{"prompt": p, "prompt_len": l, "context": np.int32(i)} for i, (p, l) in enumerate(zip(prompt, plen))]
  else:
    bos = np.array([data.tokenizer.bos_token_id], np.int32)
    records = [{"prompt": bos, "prompt_len": np.int32(1), "context": np.int32(0)}] * max(config.batch_size, 64)
  num_contexts = len(records) if m.conditional else 1
  k = int(m.samples_per_context) if m.conditional else 1
  rollout = make_rollout(target, m.divergence, scfg, eps=_eps(m), offline=bool(m.offline),
                         proposal_every=int(m.proposal_every) * config.grad_accum, group=k if m.conditional else 0,
                         chunk=int(m.chunk))

  def train_data(shard):   # B / k prompts per step, each k times in one microbatch (none read and left unused)
    if k == 1:
      return batched_iterator(records, shard)
    rows = group_rows(shard.local_batch, k, config.grad_accum)
    return batched_iterator(records, shard._replace(local_batch=shard.local_batch // k), rows=rows)

  def method_init():
    proposal = None
    if m.offline:   # overwritten by the policy (= the base) at the first rollout
      proposal = nnx.state(Transformer(model_cfg, nnx.Rngs(params=0)), nnx.Param)
    return init_state(num_contexts, int(m.baseline_window), proposal)

  loss_fn = make_loss_fn(m.divergence, on_policy=not m.offline, chunk=int(m.chunk))
  roles = {"policy": True, "base": False, **({"reward": False} if m.reward == rewards.MODEL else {})}
  return Experiment(roles=roles, loss_fn=loss_fn, train_data=train_data, rollout=rollout, init_state=method_init,
                    evaluate=make_evaluate(config, data, target), host_fault=getattr(target.reward_fn, "fault", None))


def make_evaluate(config, data: Prompts, target: Target):
  """Held-out samples from the policy, scored against the true target (no eps floor)."""
  e = config.eval
  k = _eval_contexts(config)
  prompt, plen = _prompts(config, data, "test", k)
  per = e.num_samples // k
  prompt, plen = np.repeat(prompt, per, 0), np.repeat(plen, per)
  log_z = np.repeat(np.asarray(e.log_z, np.float32), per)
  scfg = rollout_config(config, data.tokenizer)
  rng = jax.random.PRNGKey(config.seed + 1)

  def evaluate(models, step):
    fn = compiled(_sample_and_score, (scfg, target), models["policy"], models["base"], models.get("reward"))
    toks, mask, res = to_host(fn(prompt, plen, log_z, rng))
    resp = [t[mm == 1].tolist() for t, mm in zip(np.asarray(toks), np.asarray(mask))]
    out = {f"sample/{n}": float(v) for n, v in res.items()}
    out.update({"sample/distinct1": distinct_n(resp, 1), "sample/distinct2": distinct_n(resp, 2),
                "sample/self_bleu": self_bleu(resp[:e.bleu_samples]),
                "sample/length": float(np.mean([len(r) for r in resp]))})
    return out
  return evaluate


def _sample_and_score(scfg, target, policy, base, reward_model, prompt, plen, log_z, rng):
  """Samples of the policy scored against the true target: IS divergence estimates, alignment,
  KL to the base, entropy (one compiled call; report() reuses training's through jax's cache)."""
  out = sample(policy, prompt, plen, rng, scfg)
  m = response_mask(out.loss_mask)
  logits = policy(out.tokens).logits
  pi = jnp.sum(token_logprobs(logits, out.tokens) * m, 1)
  a = jnp.sum(token_logprobs(base(out.tokens).logits, out.tokens) * m, 1)
  rm = {"reward": reward_model}
  log_p_score = a + target.log_phi(out.tokens, out.loss_mask, models=rm)
  res = {f"target/{n}": v for n, v in divergence_estimates(pi, pi, log_p_score, log_z).items()}
  res.update({"alignment": jnp.mean(target.alignment(out.tokens, out.loss_mask, rm)),
              "kl_base": jnp.mean(pi - a), "entropy": token_entropy(logits[:, :-1], m)})
  return out.tokens, out.loss_mask, res

KEYS = ("sample/alignment", "sample/target/kl_target_policy", "sample/target/kl_policy_target", "sample/target/tv",
        "sample/target/js", "sample/kl_base", "sample/entropy", "sample/distinct2", "sample/self_bleu")


def report(config, workdir: str, summary: dict):
  """Before (the base) / after table, summary.json and summary.png in ``workdir``."""
  from jaxopd import logs
  data = load_data(config)
  evaluate = make_evaluate(config, data, make_target(config, data))
  models = summary.trainer.models(summary.state, summary.frozen)
  before = evaluate({**models, "policy": models["base"]}, 0)
  after = summary.eval
  print("\n" + f"{'':<12}" + "".join(f"{k.split('/')[-1]:>18}" for k in KEYS))
  for name, r in (("base", before), (f"{config.method.divergence} (after)", after)):
    print(f"{name:<12}" + "".join(f"{r.get(k, float('nan')):>18.4f}" for k in KEYS))
  m = config.method
  paths.write_json(os.path.join(workdir, "summary.json"),
                   {"target": m.target, "divergence": m.divergence, "offline": bool(m.offline),
                    "conditional": bool(m.conditional), "before": before, "after": after}, indent=2)
  _plot(logs.read_metrics(workdir, "eval"), before, os.path.join(workdir, "summary.png"), config)
  print(f"wrote {os.path.join(workdir, 'summary.json')} and summary.png")


def _plot(recs, before, path, config):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  recs = [r for r in recs if "sample/alignment" in r]
  steps = [0] + [r["step"] for r in recs]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, key, label in ((axes[0], "sample/alignment", "alignment"),
                         (axes[1], "sample/target/tv", "TV(p, pi)"),
                         (axes[2], "sample/distinct2", "distinct-2")):
    ax.plot(steps, [before[key]] + [r[key] for r in recs], marker="o")
    ax.set(xlabel="step", ylabel=label, title=f"{config.method.target}, {config.method.divergence}: {label}")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.savefig(fig, path, dpi=100)
  plt.close(fig)
