"""DistillSpec (Zhou et al., ICLR 2024): distil a small draft toward a frozen
target for speculative decoding; with ``eval.mode = "quality"`` (preset
``gkd``) the same module is the GKD baseline (Agarwal et al., ICLR 2024).
Config and commands: experiments/distillspec.py; measured numbers: experiments/distillspec.md.

Pipeline, each stage cached: the reviews data, the target and the undistilled draft (SFT stages:
:func:`prepare`); distillation: the draft, started from its SFT stage, minimises the token-averaged
divergence ``sum m D(p_target || q_draft) / sum m`` (:func:`make_loss_fn`) over batches of the data
source ``method.data`` (:func:`make_rollout`); :func:`report` compares the target, the undistilled
and the distilled draft (acceptance, block efficiency, speed-up: :func:`measure`; draft quality:
:func:`quality`; ``summary.json``, ``summary.png``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopd import options, paths, stages as stage_lib, tasks
from jaxopd import checkpoint as ckpt_lib
from jaxopd.data import batched_iterator, suite as suite_lib
from jaxopd.data.tokenizer import check_tokenizer
from jaxopd.errors import ConfigError
from jaxopd.evaluation import (acceptance_on_draft_prefixes, block_efficiency, compiled, evaluate_policy, heldout_nll,
                               speedup)
from jaxopd.evaluation import sampler as sample_call
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import DIVERGENCES, divergence as divergence_fn
from jaxopd.models.heads import chunked_terms, label_logprob
from jaxopd.models import Transformer, table
from jaxopd.options import at_least, one_of, option, within
from jaxopd.sampling import SamplingConfig, sample, speculative_sample

TASKS = ("reviews", "files")   # the tasks it trains on (jaxopd.tasks)


def _fixed(batch):
  return batch["tokens"].astype(jnp.int32), batch["loss_mask"].astype(jnp.int32)


def _generate(model, batch, rng, scfg):
  out = sample(model, batch["prompt"], batch["prompt_len"], rng, scfg)
  return out.tokens, out.loss_mask


def _mixed(draft, target, batch, rng, scfg, mix_lambda, mix_with):
  """Student-generated with probability ``mix_lambda`` (the coin drawn with ``rng``), else ``mix_with``."""
  k_coin, k_gen = jax.random.split(rng)
  coin = jax.random.uniform(k_coin) < mix_lambda
  source = lambda name: lambda: DATA_TABLE[name](draft, target, batch, k_gen, scfg, mix_lambda, mix_with)[:2]
  tokens, mask = jax.lax.cond(coin, source("student"), source(mix_with))
  return tokens, mask, coin.astype(jnp.float32)


# The training data sources by name (:func:`make_rollout`), each
# ``fn(draft, target, batch, rng, scfg, mix_lambda, mix_with) -> (tokens, loss_mask, student)``, ``student``
# the (scalar) fraction of the rows sampled from the draft.
DATA_TABLE = {
    "fixed": lambda draft, target, batch, rng, scfg, mix_lambda, mix_with: (*_fixed(batch), jnp.zeros(())),
    "teacher": lambda draft, target, batch, rng, scfg, mix_lambda, mix_with: (
        *_generate(target, batch, rng, scfg), jnp.zeros(())),
    "student": lambda draft, target, batch, rng, scfg, mix_lambda, mix_with: (
        *_generate(draft, batch, rng, scfg), jnp.ones(())),
    "mixed": _mixed,
}
DATA_SOURCES = tuple(DATA_TABLE)
EVAL_MODES = ("spec", "quality")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  divergence: str = option(one_of(*DIVERGENCES))
  beta: float = option(within(0, 1))         # jsd's mixture weight
  chunk: int = option(at_least(0))           # positions per chunk of the vocabulary-wide terms
  temperature: float = option(lambda v: None if v > 0 else "must be > 0")
  data: str = option(one_of(*DATA_SOURCES))  # the training batches' source
  mix_with: str = option(lambda v: None if v in ("fixed", "teacher") else "must be fixed or teacher")
  mix_lambda: float = option(within(0, 1))   # mixed: probability of a student-generated microbatch
  t2_scale: bool = option()                  # the divergence times temperature^2
  prompt_len: int = option()                 # of generated batches
  max_new_tokens: int = option()             # of generated batches

  def __post_init__(self):
    if self.divergence != "jsd" and self.beta != 0.5:
      self.refuse("beta", "only divergence=jsd uses beta")
    if self.data != "mixed" and (self.mix_lambda != 0.5 or self.mix_with != "fixed"):
      raise ConfigError("config.method.mix_lambda / mix_with: only data=mixed uses them")


def _check(c) -> Options:
  m, e = Options.of(c.method), c.eval
  if m.prompt_len + m.max_new_tokens != c.seq_len:
    raise ConfigError(f"config.method.max_new_tokens={m.max_new_tokens}: prompt_len + max_new_tokens must equal "
                      f"seq_len={c.seq_len} (generated and corpus batches share one shape)")
  tasks.require(c, TASKS)
  if c.data.task == "files":
    if m.data == "fixed" or (m.data == "mixed" and m.mix_with == "fixed"):
      raise ConfigError(f"config.method.data={m.data!r}: with task=files the training file holds prompts "
                        f"only, so batches are generated: use data=student, teacher, or mixed with "
                        f"mix_with=teacher")
    if c.data.files.max_prompt_len and c.data.files.max_prompt_len != m.prompt_len:
      raise ConfigError(f"config.data.files.max_prompt_len={c.data.files.max_prompt_len}: distillspec's prompt "
                        f"length is config.method.prompt_len={m.prompt_len} (leave the files field at 0)")
  one_of(e, "config.eval", "mode", EVAL_MODES)
  if e.max_gamma < 1 or any(g < 1 for g in e.sd_gammas):
    raise ConfigError(f"config.eval.sd_gammas={tuple(e.sd_gammas)} / max_gamma={e.max_gamma}: gammas must be >= 1")
  stage_archs = (("config.model", c.model), ("config.target.model", c.target.model))
  for name, mc in stage_archs if tasks.has_stages(c) else ():   # files: checked on the roles in build()
    if e.prompt_len + e.max_new_tokens + max(e.sd_gammas) + 2 > mc.max_len or c.seq_len > mc.max_len:
      raise ConfigError(f"{name}.max_len={mc.max_len}: too short for eval.prompt_len + eval.max_new_tokens + "
                        f"gamma + 2 and seq_len")
  if c.target.source not in ("policy", "draft"):
    raise ConfigError(f"config.target.source={c.target.source!r}: must be policy (an SFT run) or draft "
                      f"(a run of this module)")
  if tasks.has_stages(c) and c.model.vocab_size != c.target.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size={c.model.vocab_size}: the draft must share the target's "
                      f"vocabulary ({c.target.model.vocab_size})")
  return m


# --- stages ----------------------------------------------------------------------

def prepare(config, workdir: str):
  """Stages 1-3 (data, target SFT, draft SFT), each cached; the draft starts from stage 3.

  The target is the main job's SFT base (``config.target.workdir``, trained with experiments/sft.py's
  recipe if missing); or, with ``config.target.source = "draft"``, the distilled model of a finished
  run of this module (distil the target first, then the draft:
  experiments/ablations/distillspec_target_first.py). The undistilled draft is the same SFT recipe
  on ``config.model`` (same tokenizer), in ``config.draft_sft.workdir``.
  With ``config.data.task = "files"`` (your prompts) nothing is built: draft and
  target need an ``hf:DIR`` or ``run:WORKDIR`` init."""
  _check(config)
  if config.target.source == "draft" and "target" in stage_lib.staged(config):
    if not ckpt_lib.finished(config.target.workdir, 0):
      raise ConfigError(f"config.target.workdir={config.target.workdir!r}: no checkpoint; with "
                        f"target.source=draft the target is a finished run of this module (train it first)")
    config = copy.deepcopy(config)      # the target: a finished run of this module, not a stage
    stage_lib.fill(config, "target", f"run:{paths.resolve(config.target.workdir)}:draft")
  return stage_lib.prepare(config)


def load_model(workdir: str, source: str = "policy") -> Transformer:
  """Model ``source`` of run ``workdir``'s latest checkpoint, on the first device."""
  return table.load_model(f"run:{workdir}:{source}", source)[0]


# --- the method's pure pieces -------------------------------------------------------

def make_rollout(data: str, scfg: SamplingConfig, mix_lambda: float = 0.5, mix_with: str = "fixed"):
  """``rollout(models, batch, rng)``: the training batch of data source ``data``.

  ``batch`` holds corpus rows (``tokens``, ``loss_mask`` ``[B, T]``) and prompts
  (``prompt [B, P]``, ``prompt_len [B]``); generated rows are ``P + N = T``
  tokens. Adds ``student [B]``: 1 where the rows were sampled from the draft.

  ``data``: ``fixed`` (corpus reviews), ``teacher`` (sampled from the target), ``student`` (sampled
  from the draft, on-policy, no gradient through sampling) or ``mixed`` (each microbatch
  student-generated with probability ``mix_lambda``, else ``mix_with``; the coin is drawn with the
  step's PRNG key inside the jitted rollout). ``scfg`` samples at ``method.temperature``, as the
  paper samples and scores at the same temperature.
  """
  if data not in DATA_TABLE:
    raise ValueError(f"config.method.data={data!r}: must be one of {DATA_SOURCES}")
  source = DATA_TABLE[data]

  def rollout(models, batch, rng):
    b = batch["prompt"].shape[0]
    tokens, mask, student = source(models["draft"], models["target"], batch, rng, scfg, mix_lambda, mix_with)
    return {"tokens": tokens, "loss_mask": mask, "student": jnp.full((b,), student, jnp.float32)}
  return rollout


def make_loss_fn(divergence: str, beta: float = 0.5, temperature: float = 1.0, t2_scale: bool = False,
                 chunk: int = 128):
  """``loss_fn``: ``(sum m D(p_target || q_draft), sum m)`` over the response tokens, every
  vocabulary-wide term from the models' hidden states in chunks of ``chunk`` positions
  (:mod:`jaxopd.models.heads`).

  Both models' logits are divided by ``temperature`` before the divergence (so a temperature
  above 1 distils softened distributions; TRL's GKDTrainer computes its divergence at
  temperature 1 whatever its config, using the temperature for generation only).
  ``t2_scale``: the divergence times ``temperature ** 2``, classic distillation's scaling
  (Hinton et al.) that keeps the gradient's size comparable across temperatures.

  Metrics (token means unless said): ``acceptance/sampling`` (``1 - TVD`` at
  ``temperature``), ``acceptance/greedy`` (argmax agreement), ``nll/draft``,
  ``nll/target`` (untempered), ``data/student`` (fraction of rows).
  """
  def terms(z, targets):          # one chunk of positions: the LM heads inside the loop, no [B, T, V] logits
    q, p = z["draft"], z["target"]
    lp, lq = (jax.nn.log_softmax(x.astype(jnp.float32) / temperature, -1) for x in (p, jax.lax.stop_gradient(q)))
    return {"d": divergence_fn(divergence, p, q, beta=beta, temperature=temperature),
            "accept": jnp.sum(jnp.minimum(jnp.exp(lp), jnp.exp(lq)), -1),
            "agree": (jnp.argmax(p, -1) == jnp.argmax(q, -1)).astype(jnp.float32),
            "nll_draft": -label_logprob(jax.lax.stop_gradient(q), targets), "nll_target": -label_logprob(p, targets)}

  def loss_fn(models, batch, rng):
    del rng
    tokens = batch["tokens"]
    m = batch["loss_mask"][:, 1:].astype(jnp.float32)      # position t predicts token t+1
    t = chunked_terms({"draft": models["draft"], "target": models["target"]}, tokens, terms, chunk,
                      frozen=("target",))
    loss, n = jnp.sum(m * t["d"]), jnp.sum(m)
    if t2_scale:
      loss = loss * temperature ** 2
    metrics = {"acceptance/sampling": jnp.sum(t["accept"] * m), "acceptance/greedy": jnp.sum(t["agree"] * m),
               "nll/draft": jnp.sum(m * t["nll_draft"]), "nll/target": jnp.sum(m * t["nll_target"])}
    if "student" in batch:
      metrics["data/student"] = (jnp.sum(batch["student"]), jnp.asarray(tokens.shape[0], jnp.float32))
    return LossOutput(loss, n, metrics)
  return loss_fn


# --- build ---------------------------------------------------------------------------

def _records(suite, c, corpus_split, prompt_split, verbose=True):
  corpus, _ = suite_lib.sft_records(suite, corpus_split, c.seq_len, c.data.over_length, verbose=verbose)
  prompts = suite_lib.prompt_records(suite, prompt_split, c.method.prompt_len, verbose=verbose)
  return [{**corpus[i], **prompts[i % len(prompts)]} for i in range(len(corpus))]


def _eval_prompts(suite, c):
  e = c.eval
  prompts = suite_lib.prompt_records(suite, "test", e.prompt_len, verbose=False)[:e.num_prompts]
  return np.stack([p["prompt"] for p in prompts]), np.stack([p["prompt_len"] for p in prompts])


def _scfg(c, source, greedy, temperature=None, max_new_tokens=None):
  """Evaluation sampling settings; ``source``: anything with the ``tokenizer`` (a suite, :class:`Data`)."""
  tok = source.tokenizer
  return SamplingConfig(max_new_tokens=max_new_tokens or c.eval.max_new_tokens, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id, greedy=greedy,
                        temperature=c.eval.temperature if temperature is None else temperature)


class Data(NamedTuple):
  """What a run trains and evaluates on: the reviews suite, or your prompt files."""
  tokenizer: object
  train: list                # records: prompt, prompt_len (and tokens, loss_mask on the reviews task)
  eval: list | None          # fixed held-out batches (reviews task only)
  prompt: np.ndarray | None  # held-out prompts [N, P] of the sampled evaluation (None: no sampled evaluation)
  prompt_len: np.ndarray | None
  reward_fn: object          # the gold reward of the reviews task; None on files


def load_data(config) -> Data:
  """The reviews suite's corpus and prompts, or (``task=files``) TRL prompt files
  (``{"prompt": str}`` or a message list) encoded to ``config.method.prompt_len`` tokens."""
  m, e = config.method, config.eval
  if config.data.task == "files":
    default = table.tokenizer_dir(config, "draft") or table.tokenizer_dir(config, "target")
    tok, train_recs, eval_recs = suite_lib.file_records(config.data, "prompt", config.seq_len,
                                                        max_prompt_len=m.prompt_len, default_tokenizer=default)
    prompt = plen = None
    if eval_recs and e.num_prompts:
      eval_recs = eval_recs[:e.num_prompts]
      prompt = np.stack([r["prompt"] for r in eval_recs])
      plen = np.stack([r["prompt_len"] for r in eval_recs])
    return Data(tok, train_recs, None, prompt, plen, None)
  suite = suite_lib.ensure(config.data, verbose=False)
  check_tokenizer(config, suite.tokenizer, "the reviews task")
  prompt, plen = _eval_prompts(suite, config)
  return Data(suite.tokenizer, _records(suite, config, "train", "train"),
              _records(suite, config, "validation", "test", verbose=False), prompt, plen,
              suite_lib.gold_reward_fn(suite))


def build(config) -> Experiment:
  m = _check(config)
  data = load_data(config)
  tok = data.tokenizer
  draft_cfg, target_cfg = table.arch(config, "draft"), table.arch(config, "target")
  if draft_cfg.vocab_size != target_cfg.vocab_size:
    raise ConfigError(f"config.models.draft: its vocab_size={draft_cfg.vocab_size} differs from the target's "
                      f"{target_cfg.vocab_size}; the draft must share the target's vocabulary")
  if tasks.has_stages(config) and len(tok) != draft_cfg.vocab_size:   # the stages are built on its vocabulary
    raise ConfigError(f"config.models.draft: its vocab_size={draft_cfg.vocab_size} differs from the reviews "
                      f"tokenizer's {len(tok)} tokens")
  if len(tok) > draft_cfg.vocab_size:
    raise ConfigError(f"config.models.draft: its vocab_size={draft_cfg.vocab_size} is smaller than the "
                      f"tokenizer's {len(tok)} tokens")
  e = config.eval
  if data.prompt is not None:
    need = data.prompt.shape[1] + e.max_new_tokens + max(e.sd_gammas) + 2
    for name, arch in (("draft", draft_cfg), ("target", target_cfg)):
      if need > arch.max_len:
        raise ConfigError(f"config.eval.max_new_tokens={e.max_new_tokens}: prompt ({data.prompt.shape[1]}) + "
                          f"max_new_tokens + gamma + 2 = {need} exceeds config.models.{name}'s max_len={arch.max_len}")
  scfg = SamplingConfig(max_new_tokens=m.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                        temperature=m.temperature)
  eval_recs = data.eval
  loss_fn = make_loss_fn(m.divergence, m.beta, m.temperature, bool(m.t2_scale), m.chunk)
  return Experiment(roles={"draft": True, "target": False}, loss_fn=loss_fn,
                    train_data=lambda shard: batched_iterator(data.train, shard),
                    eval_data=(lambda shard: batched_iterator(eval_recs, shard, shuffle=False, repeat=False))
                    if eval_recs else None,
                    evaluate=make_evaluate(config, data) if data.prompt is not None else None,
                    rollout=make_rollout(m.data, scfg, m.mix_lambda, m.mix_with))


def make_evaluate(config, data: Data):
  """Host-side eval on the held-out prompts: acceptance on draft prefixes (greedy, sampling;
  spec mode) and the draft's sampled quality (sequence KL to the target, entropy, distinct-n;
  the gold reward on the reviews task)."""
  prompt, plen = data.prompt, data.prompt_len
  greedy, sampling = _scfg(config, data, True), _scfg(config, data, False)
  rng = jax.random.PRNGKey(config.seed + 1)

  def evaluate(models, step):
    draft, target = models["draft"], models["target"]
    out = {}
    if config.eval.mode == "spec":
      out["alpha/greedy"] = prefix_acceptance(target, draft, prompt, plen, rng, greedy)
      out["alpha/sampling"] = prefix_acceptance(target, draft, prompt, plen, rng, sampling)
    q = evaluate_policy(draft, target, prompt, plen, rng, sampling, data.reward_fn)
    out.update({f"sample/{k}": v for k, v in q.items()})
    return out
  return evaluate


# --- measurements (host side, compiled once per model structure and config) --------------

def _prefix_acceptance(cfg, target, draft, prompt, plen, rng):
  return acceptance_on_draft_prefixes(target, draft, prompt, plen, rng, cfg)


def _speculative(cfg, gamma, lenience, target, draft, prompt, plen, rng):
  return speculative_sample(target, draft, prompt, plen, rng, cfg, gamma, lenience)


def prefix_acceptance(target, draft, prompt, plen, rng, cfg: SamplingConfig) -> float:
  """alpha on draft-generated prefixes: argmax agreement if ``cfg.greedy``, else ``1 - TVD``."""
  acc = compiled(_prefix_acceptance, (cfg,), target, draft)(jnp.asarray(prompt), jnp.asarray(plen), rng)
  return float(acc.greedy if cfg.greedy else acc.sampling)


def sd_call(target, draft, cfg: SamplingConfig, gamma: int, lenience: float = 1.0):
  """``f(prompt, prompt_len, rng) -> SpecOutput``: compiled speculative decoding with these models."""
  fn = compiled(_speculative, (cfg, gamma, lenience), target, draft)
  return lambda p, l, r: fn(jnp.asarray(p), jnp.asarray(l), r)


def time_per_token(calls: dict, prompt, plen, rng, repeats: int) -> dict:
  """Wall time per generated token of each ``calls[name](prompt, prompt_len, rng)``,
  decoding each prompt alone (batch 1). One untimed warm-up (compile), then
  ``repeats`` rounds that time every call in turn, so load changes on a shared
  machine hit all of them alike. Returns ``name -> (median ms per token, last outputs)``."""
  rows = [(prompt[i:i + 1], plen[i:i + 1], jax.random.fold_in(rng, i)) for i in range(len(prompt))]
  for call in calls.values():
    jax.block_until_ready(call(*rows[0]))
  times = {k: [] for k in calls}
  outs = {}
  for _ in range(repeats):
    for name, call in calls.items():
      t0, outs[name] = time.perf_counter(), []
      for p, l, r in rows:
        o = call(p, l, r)
        jax.block_until_ready(o)
        outs[name].append(o)
      times[name].append(time.perf_counter() - t0)
  return {k: (1e3 * statistics.median(times[k]) / max(sum(int(np.sum(o.lengths)) for o in outs[k]), 1), outs[k])
          for k in calls}


def alpha_from_tau(tau: float, gamma: int) -> float:
  """The i.i.d. acceptance alpha whose block efficiency is ``tau`` (bisection)."""
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if float(block_efficiency(mid, gamma)) < tau else (lo, mid)
  return (lo + hi) / 2


def on_one_device(model):
  """``model`` with its arrays on the first device: models from the trainer's mesh and
  from a checkpoint then share one compiled evaluation (jit keys on input shardings)."""
  g, s = nnx.split(model)
  return nnx.merge(g, jax.device_put(s, jax.sharding.SingleDeviceSharding(jax.devices()[0])))


def measure(config, suite, target, drafts: dict) -> dict:
  """The report's speculative-decoding numbers for each draft in ``drafts`` (name -> model).

  Per decoding mode (greedy, sampling at ``eval.temperature``): alpha on draft
  prefixes of the ``eval.num_prompts`` held-out prompts and the formula's
  block efficiency / speed-up for gamma 1..``eval.max_gamma``; for each gamma
  in ``eval.sd_gammas``, SD at batch 1 on the first ``eval.timing_prompts``
  prompts: acceptance rate (accepted / proposed), tokens per target call tau,
  the alpha that gives this tau under the i.i.d. formula, and time per token
  against plain target decoding of the same prompts. The cost ratio c is a
  draft's time per token over the target's, both decoding greedily alone.
  """
  e = config.eval
  target = on_one_device(target)
  drafts = {k: on_one_device(v) for k, v in drafts.items()}
  prompt, plen = _eval_prompts(suite, config)
  tp, tl = prompt[:e.timing_prompts], plen[:e.timing_prompts]
  rng = jax.random.PRNGKey(config.seed + 2)
  gammas = list(range(1, e.max_gamma + 1))
  modes = {"greedy": _scfg(config, suite, True), "sampling": _scfg(config, suite, False)}
  calls = {("target", mode): sample_call(target, cfg) for mode, cfg in modes.items()}
  calls.update({(name, "alone"): sample_call(d, modes["greedy"]) for name, d in drafts.items()})
  calls.update({(name, mode, g): sd_call(target, d, cfg, g) for name, d in drafts.items()
                for mode, cfg in modes.items() for g in e.sd_gammas})
  timed = time_per_token(calls, tp, tl, rng, e.timing_repeats)
  t_ms = {mode: timed[("target", mode)][0] for mode in modes}
  cost = {name: timed[(name, "alone")][0] / t_ms["greedy"] for name in drafts}
  c = float(np.mean(list(cost.values())))     # the drafts share one architecture
  out = {"timing": {"target_ms_per_token": t_ms, "cost_ratio": c, "cost_ratio_per_draft": cost}, "drafts": {}}
  for mode, cfg in modes.items():
    for name, d in drafts.items():
      r = out["drafts"].setdefault(name, {}).setdefault(mode, {})
      r["alpha_prefix"] = alpha = prefix_acceptance(target, d, prompt, plen, rng, cfg)
      r["tau_formula"] = [float(block_efficiency(alpha, g)) for g in gammas]
      r["speedup_formula"] = [float(speedup(alpha, g, c)) for g in gammas]
      r["sd"] = {}
      for g in e.sd_gammas:
        ms, outs = timed[(name, mode, g)]
        acc, blocks, prop = (sum(int(np.sum(getattr(o, f))) for o in outs) for f in ("accepted", "blocks", "proposed"))
        tau = (acc + blocks) / max(blocks, 1)
        r["sd"][str(g)] = {"acceptance_rate": acc / max(prop, 1), "tau": tau, "alpha": alpha_from_tau(tau, g),
                           "tau_formula": float(block_efficiency(alpha, g)),
                           "ms_per_token": ms, "speedup": t_ms[mode] / ms,
                           "speedup_formula": float(speedup(alpha, g, c))}
  return out


def quality(config, suite, models: dict) -> dict:
  """Gold reward, sequence KL to the target, entropy, distinct-2 of samples; held-out NLL."""
  prompt, plen = _eval_prompts(suite, config)
  recs, _ = suite_lib.sft_records(suite, "test", config.seq_len, config.data.over_length, verbose=False)
  recs = recs[:config.eval.nll_examples]
  reward_fn = suite_lib.gold_reward_fn(suite)
  rng = jax.random.PRNGKey(config.seed + 1)
  models = {k: on_one_device(v) for k, v in models.items()}
  target = models["target"]
  out = {}
  for name, mdl in models.items():
    q = evaluate_policy(mdl, target, prompt, plen, rng, _scfg(config, suite, False), reward_fn)
    q["nll"] = heldout_nll(mdl, recs, min(64, len(recs)))
    out[name] = q
  return out


# --- report --------------------------------------------------------------------------

def report(config, workdir: str, summary: dict):
  """Undistilled vs distilled draft (and the target): table, summary.json, summary.png.
  With ``task=files``: summary.json with the final evaluation (the report's corpus NLL, gold
  reward and speculative-decoding timings are measured on the reviews task only). With
  ``eval.mode = "quality"`` only the quality part (:func:`quality`) is measured."""
  from jaxopd import logs
  m = config.method
  if config.data.task == "files":
    res = {"method": {k: m[k] for k in ("divergence", "beta", "temperature", "data", "mix_lambda", "mix_with")},
           "steps": summary.step, "eval_mode": config.eval.mode, "eval": summary.eval,
           "curves": logs.read_metrics(workdir, "eval")}
    paths.write_json(os.path.join(workdir, "summary.json"), res, indent=2)
    print(f"wrote {os.path.join(workdir, 'summary.json')} (task=files: the final evaluation only)")
    return
  suite = suite_lib.ensure(config.data, verbose=False)
  models = summary.trainer.models(summary.state, summary.frozen)
  target, distilled = models["target"], models["draft"]
  drafts = {"distilled": distilled}
  if config.models.draft.init != "random":
    drafts = {"draft_sft": table.load_model(config.models.draft.init, "draft")[0], **drafts}
  res = {"method": {k: m[k] for k in ("divergence", "beta", "temperature", "data", "mix_lambda", "mix_with")},
         "steps": summary.step, "eval_mode": config.eval.mode,
         "quality": quality(config, suite, {"target": target, **drafts})}
  q = res["quality"]
  print(f"\n{'model':<12}{'gold reward':>12}{'held-out NLL':>14}{'KL to target':>14}{'entropy':>10}")
  for name, r in q.items():
    print(f"{name:<12}{r['reward']:>12.4f}{r['nll']:>14.4f}{r['kl_ref']:>14.3f}{r['entropy']:>10.4f}")
  if config.eval.mode == "spec":
    res.update(measure(config, suite, target, drafts))
    t = res["timing"]
    print(f"\ncost ratio c = {t['cost_ratio']:.3f}; target "
          + ", ".join(f"{k} {v:.3f} ms/token" for k, v in t["target_ms_per_token"].items()))
    print(f"{'draft':<12}{'mode':<10}{'alpha':>7}{'gamma':>6}{'SD alpha':>9}{'tau':>7}{'tau(f)':>7}"
          f"{'speedup':>8}{'pred.':>7}   (alpha: 1-TVD / argmax agreement on draft prefixes; SD alpha: "
          f"from the measured tau)")
    for name, modes in res["drafts"].items():
      for mode, r in modes.items():
        for g, s in r["sd"].items():
          print(f"{name:<12}{mode:<10}{r['alpha_prefix']:>7.3f}{g:>6}{s['alpha']:>9.3f}{s['tau']:>7.2f}"
                f"{s['tau_formula']:>7.2f}{s['speedup']:>8.2f}{s['speedup_formula']:>7.2f}")
  res["curves"] = logs.read_metrics(workdir, "eval")
  paths.write_json(os.path.join(workdir, "summary.json"), res, indent=2)
  _plot(res, os.path.join(workdir, "summary.png"))
  print(f"wrote {os.path.join(workdir, 'summary.json')} and summary.png")


def _plot(res, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  spec = "drafts" in res
  fig, axes = plt.subplots(1, 3 if spec else 1, figsize=(15 if spec else 5, 4), squeeze=False)
  axes = axes[0]
  curves = [r for r in res["curves"] if "sample/reward" in r]
  ax = axes[0]
  steps = [r["step"] for r in curves]
  for k, style in (("alpha/greedy", "-o"), ("alpha/sampling", "-s"), ("sample/reward", "--^")):
    if curves and k in curves[0]:
      ax.plot(steps, [r[k] for r in curves], style, label=k)
  ax.set(xlabel="distillation step", title="draft during distillation (held-out prompts)")
  if spec:
    colors = {"draft_sft": "tab:gray", "distilled": "tab:blue"}
    for name, modes in res["drafts"].items():
      for mode, r in modes.items():
        ls = "-" if mode == "greedy" else "--"
        gam = list(range(1, len(r["tau_formula"]) + 1))
        axes[1].plot(gam, r["tau_formula"], ls, color=colors.get(name), label=f"{name} {mode} (formula)")
        axes[1].scatter([int(g) for g in r["sd"]], [s["tau"] for s in r["sd"].values()], color=colors.get(name),
                        marker="o" if mode == "greedy" else "s")
        axes[2].plot(gam, r["speedup_formula"], ls, color=colors.get(name), label=f"{name} {mode} (formula)")
        axes[2].scatter([int(g) for g in r["sd"]], [s["speedup"] for s in r["sd"].values()],
                        color=colors.get(name), marker="o" if mode == "greedy" else "s")
    axes[1].set(xlabel="gamma", ylabel="tokens per target call", title="block efficiency (markers: SD runs)")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set(xlabel="gamma", ylabel="speed-up over target decoding",
                title=f"speed-up, c = {res['timing']['cost_ratio']:.2f} (markers: measured)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.savefig(fig, path, dpi=100)
  plt.close(fig)
