"""GRPO with DAPO's and ProRL's controls, on-policy distillation (VLA-OPD) and RL with a
teacher term (RPD), through the one train step. Math: :mod:`jaxopd.losses.grpo`;
config and commands: experiments/grpo.py (every field commented there).

Inside the jitted train step, :func:`make_rollout` prefills each prompt once, samples
``config.method.group_size`` = G responses from it, scores them (:func:`make_reward`) and computes
the group advantages; :func:`make_loss_fn` applies the clipped surrogate, the optional KL to the
``reference`` (ProRL's resets: :func:`make_reset`) and the optional teacher term
(``config.method.distill``; ``pg = False``: pure on-policy distillation). Per-token quantities come
from the models' final hidden states in chunks, at the response slots only (:func:`token_terms`;
no ``[B, T, V]`` logits in the step), each prompt encoded once for its rows (:func:`share_group`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd import options, paths, rewards, stages, tasks
from jaxopd.data import batched_iterator, digits
from jaxopd.errors import ConfigError
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.models import heads
from jaxopd.losses.grpo import (ADVANTAGES, AGGREGATIONS, CORRECTIONS, DISTILL, KL_ESTIMATORS, RATIO_LEVELS,
                                SCHEDULES, aggregate, distill_per_token, distill_weight, group_advantages, group_std,
                                kept_groups, policy_loss, rollout_correction)
from jaxopd.models import table
from jaxopd.options import at_least, one_of, option, positive
from jaxopd.sampling import SamplingConfig, rollout_config, sample

TASKS = ("digits", "reviews", "files")   # the tasks it trains on (jaxopd.tasks)
CHECK = "check"
GOLD = "gold"
SAMPLER_DTYPES = ("", "float32", "bfloat16", "bfloat16_matmul")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  """``config.method`` (experiments/grpo.py comments each field), declared in the order of its checks."""
  advantage: str = option(one_of(*ADVANTAGES))
  kl: str = option(one_of(*KL_ESTIMATORS))
  aggregation: str = option(one_of(*AGGREGATIONS))
  distill_schedule: str = option(one_of(*SCHEDULES))
  ratio_level: str = option(one_of(*RATIO_LEVELS))
  rollout_correction: str = option(one_of(*CORRECTIONS))
  sampler_dtype: str = option(one_of(*SAMPLER_DTYPES))   # "": the policy's; bfloat16_matmul: matmul_dtype
  distill: str = option(lambda v: None if not v or v in DISTILL else f"must be '' (none) or one of {DISTILL}")
  group_size: int = option(lambda v: None if v >= 2 else "must be >= 2 (advantages are relative to a group)")
  eps_low: float = option(at_least(0), lambda v: None if v < 1 else
                          "must be < 1 (the ratio's lower clip is 1 - eps_low)")
  eps_high: float = option(at_least(0))
  beta_kl: float = option(at_least(0))
  reset_kl: float = option(at_least(0))
  lambda_d: float = option(at_least(0))
  rollout_cap: float = option(lambda v: None if v > 1 else "must be > 1 (TIS's truncation, MIS's band [1/cap, cap])")
  distill_temperature: float = option(positive)
  chunk: int = option(at_least(0))
  updates_per_rollout: int = option(at_least(1))
  reward: str = option()   # check | gold | module:function | model (checked against the task in _check)
  pg: bool = option()      # the RL term
  dynamic_sampling: bool = option()
  train_groups: int = option()   # 0: all (checked against batch_size in _check)
  reset_every: int = option()
  share_prompt: bool = option()

  def __post_init__(self):
    if not self.pg and not self.distill:
      self.refuse("pg", "with no RL term the loss is the distillation term; set config.method.distill "
                  "(reverse_kl, forward_kl or hard_ce)")
    if self.distill and self.lambda_d == 0:
      raise ConfigError(f"config.method.distill={self.distill!r} with lambda_d=0: the term would weigh nothing "
                        f"(set lambda_d > 0, or distill='')")
    if (self.reset_every or self.reset_kl) and not uses_reference(self):
      raise ConfigError("config.method.reset_every / reset_kl: a reset moves the reference, and there is none "
                        "(beta_kl=0 or pg=False builds no reference model)")


def uses_reference(m) -> bool:
  return m.pg and m.beta_kl > 0


def share_group(m, grad_accum: int) -> int:
  """How many consecutive rows of each loss call continue one prompt: the rollout writes a
  prompt's G samples as consecutive rows; with ``updates_per_rollout = mu > 1`` the trainer then
  splits the rollout into mu minibatches of ``grad_accum`` microbatches, each taking every
  (mu x grad_accum)-th row, so G / (mu x grad_accum) of a prompt's rows stay together (checked to
  divide). 1 without ``m.share_prompt`` (every row encodes its own prompt)."""
  if not m.share_prompt:
    return 1
  splits = m.updates_per_rollout * grad_accum if m.updates_per_rollout > 1 else 1
  return m.group_size // splits


def roles(m) -> dict:
  out = {"policy": True}
  if m.distill:
    out["teacher"] = False
  if m.reward == rewards.MODEL:
    out["reward"] = False
  return out


# --- the step's pieces ------------------------------------------------------------------------

def token_terms(models, rows, prompt_width: int, chunk: int, group: int = 1, teacher: str = "",
                kind: str = "reverse_kl", temperature: float = 1.0):
  """Per-token terms ``[R, N]`` of the sampled rows' responses (``rows``: ``tokens [R, P + N]``,
  ``prompt_len [R]``; response coordinates, :func:`jaxopd.models.heads.response_terms`): ``lp``
  (policy log-prob), ``entropy`` (the policy's, no gradient) and, with ``teacher`` a role name,
  ``distill`` (:func:`distill_per_token` against it), from hidden states in chunks; ``group = s``:
  runs of s rows share a prompt, encoded once per run."""
  roles = {"policy": models["policy"], **({teacher: models[teacher]} if teacher else {})}

  def per_chunk(z, targets):
    zp = z["policy"].astype(jnp.float32)
    lse = jax.nn.logsumexp(zp, axis=-1)
    out = {"lp": jnp.take_along_axis(zp, targets[..., None], axis=-1)[..., 0] - lse}
    zs = jax.lax.stop_gradient(zp)
    out["entropy"] = jax.lax.stop_gradient(lse) - jnp.sum(jax.nn.softmax(zs, axis=-1) * zs, axis=-1)
    if teacher:
      out["distill"] = distill_per_token(zp, z[teacher], kind, temperature)
    return out
  return heads.response_terms(roles, rows["tokens"], rows["prompt_len"], prompt_width, per_chunk, chunk, group,
                              frozen=(teacher,) if teacher else ())


def sampled_logprobs(model, rows, prompt_width: int, chunk: int, group: int = 1):
  """``log model(response token j | ...)`` ``[R, N]`` of sampled rows (response coordinates), no
  gradient, in chunks."""
  return heads.response_terms({"m": model}, rows["tokens"], rows["prompt_len"], prompt_width,
                              lambda z, t: {"lp": heads.label_logprob(z["m"], t)}, chunk, group, frozen=("m",))["lp"]


def make_reward(kind: str, eos_id: int, host_fn=None, reward_pad: int = -1):
  """``reward(models, tokens, loss_mask, batch) -> [R]`` float32, inside the step: ``check`` (the
  digits task's exact checker, on device), ``gold`` (the reviews task's gold reward, on the host:
  ``host_fn``), ``model`` (the ``reward`` role, a Hugging Face sequence-classification directory, on
  device) or ``module:function`` (your function on the decoded texts, on the host: ``host_fn`` from
  :func:`jaxopd.rewards.load`)."""
  if kind == CHECK:
    return lambda models, t, m, b: digits.check(t, m, b["answer"], b["answer_len"], eos_id)
  if kind == rewards.MODEL:
    return lambda models, t, m, b: rewards.score(models["reward"], t, m, reward_pad)
  shape = lambda t: jax.ShapeDtypeStruct((t.shape[0],), jnp.float32)
  return lambda models, t, m, b: jax.pure_callback(
      lambda tt, mm: np.asarray(host_fn(tt, mm), np.float32), shape(t), t, m)


def sampler_graph(arch, dtype: str):
  """The graph of the policy computing in ``dtype`` (the sampler's precision; its weights are cast
  to it at use), to merge the policy's state into; None for the policy's own. ``bfloat16_matmul``:
  the projections' and head's operands in bfloat16, accumulated and the rest in float32
  (:attr:`jaxopd.models.ModelConfig.matmul_dtype`)."""
  new = {"matmul_dtype": "bfloat16"} if dtype == "bfloat16_matmul" else {"dtype": dtype}
  if not dtype or all(getattr(arch, k) == v for k, v in new.items()):
    return None
  from flax import nnx

  from jaxopd.models.transformer import Transformer
  return nnx.split(nnx.eval_shape(lambda: Transformer(dataclasses.replace(arch, **new), nnx.Rngs(0))))[0]


def make_rollout(scfg: SamplingConfig, group: int, reward_fn, m, total_steps: int, need_old: bool,
                 train_every: int = 0, sampler=None):
  """``rollout(models, batch, rng)``: G samples per prompt, scored; advantages, row weights,
  the distillation weight, the sampler's log-probs of its tokens (``lp_rollout``) and
  (``need_old``) the rollout-time log-probs (response coordinates, each prompt encoded once with
  ``m.share_prompt``). ``train_every = k``: train on 1 in k of the sampled groups, kept groups
  first (``batch_size / train_groups``). ``sampler``: :func:`sampler_graph`'s graph (None: the policy)."""
  def rollout(models, batch, rng):
    policy = models["policy"]
    if sampler is not None:
      from flax import nnx
      policy = nnx.merge(sampler, nnx.state(policy))
    out = sample(policy, batch["prompt"], batch["prompt_len"], rng, scfg, repeats=group)
    rep = lambda x: jnp.repeat(x, group, axis=0)
    extra = {k: rep(v) for k, v in batch.items() if k not in ("prompt", "prompt_len", "step")}
    r = reward_fn(models, out.tokens, out.loss_mask, extra)
    groups = r.reshape(-1, group)
    kept = kept_groups(groups)
    n = groups.shape[0]
    rows = {"tokens": out.tokens, "loss_mask": out.loss_mask, "prompt_len": rep(batch["prompt_len"]), "reward": r,
            "adv": group_advantages(groups, m.advantage).reshape(-1),
            "weight": rep(kept.astype(jnp.float32)) if m.dynamic_sampling else jnp.ones_like(r),
            "group_std": rep(group_std(groups)), "kept": rep(kept.astype(jnp.float32)),
            "lambda_d": jnp.full_like(r, distill_weight(batch["step"][0], total_steps, m.lambda_d,
                                                        m.distill_schedule)),
            "lp_rollout": heads.response_slots(out.model_logprobs, rep(batch["prompt_len"]), scfg.max_new_tokens)}
    if train_every:         # DAPO's over-sampling: the kept groups first, in batch order
      order = jnp.argsort(~kept, stable=True)[:n // train_every]
      idx = (order[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)
      kept_frac = jnp.mean(kept.astype(jnp.float32))
      rows = jax.tree.map(lambda x: x[idx], rows)
      rows["kept"] = jnp.full_like(rows["reward"], kept_frac)   # of the sampled groups
    if need_old:
      rows["lp_old"] = sampled_logprobs(models["policy"], rows, batch["prompt"].shape[1], m.chunk,
                                        group if m.share_prompt else 1)
    return rows
  return rollout


def make_loss_fn(m, max_len: int, check_reward: bool, group: int = 1):
  """The loss on rollout rows of ``max_len`` response slots; ``group = s``: runs of s consecutive
  rows share a prompt (:func:`share_group`), which each per-token forward encodes once.

  Metrics (TRL / verl names where they exist): ``reward/mean``, ``reward/std`` (mean over groups
  of the group's std), ``pass@1`` (check reward), ``kept_fraction``, ``clip_ratio/low|high|region``,
  ``kl``, ``entropy``, ``response_length/mean``, ``distill`` (the teacher term's token mean) and the
  sampler-mismatch ``rollout/*`` (:func:`jaxopd.losses.grpo.rollout_correction`)."""
  teacher = "teacher" if m.distill else ""
  with_ref = uses_reference(m)

  def loss_fn(models, batch, rng):
    del rng
    tokens = batch["tokens"]
    width = tokens.shape[1] - max_len
    terms = token_terms(models, batch, width, m.chunk, group, teacher, m.distill or "reverse_kl",
                        m.distill_temperature)
    msk = heads.response_slots(batch["loss_mask"], batch["prompt_len"], max_len).astype(jnp.float32)
    w = batch["weight"]
    lp = terms["lp"]
    lp_ref = sampled_logprobs(models["reference"], batch, width, m.chunk, group) if with_ref else None
    lp_old = batch["lp_old"] if "lp_old" in batch else jax.lax.stop_gradient(lp)
    tw, keep, mismatch = rollout_correction(lp_old, batch["lp_rollout"], msk, m.rollout_correction, m.rollout_cap)
    w = w * keep
    mw = msk * w[:, None]
    pg_sum, count, metrics = policy_loss(lp, lp_old, batch["adv"], msk, m.eps_low, m.eps_high, m.beta_kl, lp_ref,
                                         m.kl, m.aggregation, max_len, w, m.ratio_level, tw)
    metrics.update(mismatch)
    total = pg_sum if m.pg else jnp.float32(0.0)
    if teacher:
      d = terms["distill"]
      d_sum, _ = aggregate(d * batch["lambda_d"][:, None], mw, m.aggregation, max_len, w)
      total = total + d_sum
      metrics["distill"] = (jnp.sum(d * mw), jnp.sum(mw))
      metrics["lambda_d"] = (jnp.sum(batch["lambda_d"]), jnp.float32(tokens.shape[0]))
    if not m.pg:
      metrics = {k: v for k, v in metrics.items() if k in ("distill", "lambda_d", "kl") or k.startswith("rollout/")}
    rows = jnp.float32(tokens.shape[0])
    per_row = lambda x: (jnp.sum(x), rows)
    metrics.update({
        "reward/mean": per_row(batch["reward"]), "reward/std": per_row(batch["group_std"]),
        "kept_fraction": per_row(batch["kept"]), "entropy": (jnp.sum(terms["entropy"] * msk), jnp.sum(msk)),
        "response_length/mean": per_row(jnp.sum(msk, axis=-1)),
    })
    if check_reward:
      metrics["pass@1"] = per_row(batch["reward"])
    return LossOutput(total, count, metrics)
  return loss_fn


def make_reset(m):
  """ProRL's reference reset rule: every ``reset_every`` steps and/or when ``kl > reset_kl``.

  The ``reference`` is a copy of the policy taken at the start and at each reset, held in the train
  state (``beta_kl = 0`` builds none); at a reset it becomes the current policy and the optimizer
  state is re-initialised (``resets`` counts them in the log)."""
  if not (m.reset_every or m.reset_kl):
    return None

  def reset(step, metrics):
    do = jnp.zeros((), bool)
    if m.reset_every:
      do = do | (step % m.reset_every == 0)
    if m.reset_kl:
      do = do | (metrics["kl"] > m.reset_kl)
    return do
  return reset


# --- config checks, data, build ---------------------------------------------------------------

def _check(c) -> Options:
  m = Options.of(c.method)
  tasks.require(c, TASKS)
  if not m.distill and table.built(c, "teacher"):
    raise ConfigError(f"config.models.teacher.init={c.models.teacher.init!r}: only config.method.distill uses a "
                      f"teacher (leave it at none)")
  if m.distill and not table.built(c, "teacher"):
    raise ConfigError(f"config.models.teacher.init='none': config.method.distill={m.distill!r} needs a teacher "
                      f"(stage:teacher, hf:DIR or run:WORKDIR)")
  rows = c.batch_size * m.group_size if not m.train_groups else m.train_groups * m.group_size
  if m.updates_per_rollout > 1 and rows % (m.updates_per_rollout * c.grad_accum):
    raise ConfigError(f"config.method.updates_per_rollout={m.updates_per_rollout}: the rollout's {rows} rows must "
                      f"split into {m.updates_per_rollout} minibatches of grad_accum={c.grad_accum} microbatches")
  if m.share_prompt and m.updates_per_rollout > 1 and m.group_size % (m.updates_per_rollout * c.grad_accum):
    raise ConfigError(f"config.method.share_prompt: each loss call sees every "
                      f"{m.updates_per_rollout * c.grad_accum}-th rollout row (updates_per_rollout x grad_accum), "
                      f"which must divide group_size={m.group_size} so that a prompt's samples stay together; "
                      f"or set share_prompt=False")
  for name in ("policy", "teacher") if m.share_prompt else ():
    if name in c.models and c.models[name].get("attention") == "splash" and table.built(c, name):
      raise ConfigError(f"config.models.{name}.attention='splash' with config.method.share_prompt: the splash "
                        f"kernel cannot attend a prompt's responses to their shared prompt (use einsum, "
                        f"dot_product or chunked, or share_prompt=False)")
  if m.train_groups and not 0 < m.train_groups <= c.batch_size:
    raise ConfigError(f"config.method.train_groups={m.train_groups}: must be in [1, batch_size={c.batch_size}]")
  if m.train_groups and (c.batch_size % m.train_groups or (c.batch_size // c.grad_accum) % (c.batch_size //
                                                                                         m.train_groups)):
    raise ConfigError(f"config.method.train_groups={m.train_groups}: must divide batch_size={c.batch_size} so "
                      f"that each microbatch trains on the same share of its groups")
  tasks.check_reward(c)
  if c.seq_len != c.rollout.prompt_len + c.rollout.max_new_tokens:
    raise ConfigError(f"config.seq_len={c.seq_len}: sampled sequences are prompt + response, so it must equal "
                      f"config.rollout.prompt_len + config.rollout.max_new_tokens = "
                      f"{c.rollout.prompt_len} + {c.rollout.max_new_tokens}")
  return m


def prepare(config, workdir: str):
  """The stages ``config.pipeline`` declares: the SFT base (digits: on the easy levels) and, for
  the distillation variants, the teacher (the same recipe, longer; digits: every level), each
  cached; with ``task=files`` none (every role needs a source)."""
  del workdir
  _check(config)
  return stages.prepare(config)


def build(config) -> Experiment:
  m = _check(config)
  data = tasks.get(config, "prompts")(config)
  tok, train_recs = data.tokenizer, data.train
  host_fn = data.gold if m.reward == GOLD else None
  policy = table.arch(config, "policy")
  if len(tok) > policy.vocab_size:
    raise ConfigError(f"config.models.policy: its vocab_size={policy.vocab_size} is smaller than the tokenizer's "
                      f"{len(tok)} tokens")
  if m.distill and table.arch(config, "teacher").vocab_size != policy.vocab_size:
    raise ConfigError(f"config.models.teacher: vocab_size={table.arch(config, 'teacher').vocab_size} differs "
                      f"from the policy's {policy.vocab_size} (the distillation term compares them token by token)")
  reward_pad = -1
  if m.reward == rewards.MODEL:
    rdir = table.source_dir(config, "reward")
    rewards.check_model(tok, rdir, table.arch(config, "reward"))
    reward_pad = rewards.pad_id(rdir)
  elif m.reward not in (CHECK, GOLD):
    probe = [tok.decode(r["prompt"][:int(r["prompt_len"])].tolist(), skip_special_tokens=True)
             for r in train_recs[:2]]
    host_fn = rewards.load(m.reward, tok, probe_prompts=probe)
  scfg = rollout_config(config, tok)
  reward_fn = make_reward(m.reward, scfg.eos_id, host_fn, reward_pad)
  mu = int(m.updates_per_rollout)
  return Experiment(
      roles=roles(m),
      loss_fn=make_loss_fn(m, config.rollout.max_new_tokens, m.reward == CHECK, share_group(m, config.grad_accum)),
      train_data=lambda shard: batched_iterator(train_recs, shard),
      rollout=make_rollout(scfg, m.group_size, reward_fn, m, config.total_steps, need_old=mu > 1,
                           train_every=config.batch_size // m.train_groups if m.train_groups else 0,
                           sampler=sampler_graph(policy, m.sampler_dtype)),
      evaluate=data.evaluate, updates_per_rollout=mu,
      snapshots={"reference": "policy"} if uses_reference(m) else {},
      reset=make_reset(m) if uses_reference(m) else None, host_fault=getattr(host_fn, "fault", None))


def report(config, workdir: str, summary: dict):
  """The task's evaluation (:mod:`jaxopd.tasks`: digits pass@k per level, the reviews gold reward)
  of the starting policy (before), the teacher (distillation variants) and the trained policy
  (after); summary.json."""
  out = {"method": {k: config.method[k] for k in ("advantage", "aggregation", "beta_kl", "eps_low", "eps_high",
                                                  "dynamic_sampling", "distill", "lambda_d", "pg")},
         "after": summary.eval}
  task_report = tasks.piece(config, "report")      # the task's before/after table (none for your files)
  if task_report:
    task_report(config, out, {"before": config.models.policy, "teacher": config.models.teacher})
  paths.write_json(os.path.join(workdir, "summary.json"), out, indent=2)
  print(f"wrote {os.path.join(workdir, 'summary.json')}")
