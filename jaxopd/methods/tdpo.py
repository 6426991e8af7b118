"""DPO (Rafailov et al., 2023) and TDPO (Zeng et al., ICML 2024): the preference
step (shared with SparsePO), the preference pipeline (data, SFT base, sampled
pairs labelled by the gold reward), sampled evaluation and the before/after
report. Config: experiments/tdpo.py (``:dpo`` for DPO).

The step runs policy and frozen reference on chosen and rejected sequences,
then the pure losses of :mod:`jaxopd.losses.preference`.

Batch: ``tokens[B, 2, T]``, ``loss_mask[B, 2, T]`` (pair axis: 0 = chosen,
1 = rejected), the pair axis folded into the batch for one forward per model;
or, with ``config.method.share_prompt``, one row per pair ``[prompt | chosen |
rejected]`` (``tokens``, ``loss_mask``, ``positions``, ``branch_ids`` ``[B, L]``:
:func:`jaxopd.data.pipeline.share_prompt`), the prompt encoded once and each
response attending to it and to itself only (equal losses and gradients:
tests/test_prefix_sharing.py). The reference's outputs are detached where they
are produced.

Metrics use TRL's names: ``rewards/chosen`` (``beta R(y_w)`` for DPO, ``beta (R
+ K)`` for TDPO as in the official code), ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``; plus the sequential KL ``kl/chosen``, ``kl/rejected``,
``kl/margin`` (= K_l - K_w).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxopd import paths
from jaxopd.data import batched_iterator, preferences, suite as suite_lib
from jaxopd.data.pipeline import share_prompt as share_prompt_rows
from jaxopd.errors import ConfigError
from jaxopd.evaluation import evaluate_policy
from jaxopd.experiment import Experiment, LossOutput, load_config
from jaxopd.losses import dpo_loss, forward_kl, ipo_loss, tdpo_loss
from jaxopd.losses.common import responses
from jaxopd.models.heads import chunked_terms, label_logprob

from jaxopd.methods import sft
from jaxopd.models import table
from jaxopd.sampling import SamplingConfig

@dataclasses.dataclass(frozen=True)
class PairLoss:
  """A preference loss: ``fn(r, kl, beta, alpha) -> [B]`` per pair from the log-ratios ``r`` and
  sequential KLs ``kl`` (``[B, 2]``: chosen, rejected); ``kl``: whether it needs the KL (then it
  also enters the implicit reward ``beta (r + kl)``)."""
  fn: Callable
  kl: bool = False


# The preference losses by name: a new variant is one function and one entry.
PAIR_LOSSES = {
    "dpo": PairLoss(lambda r, kl, beta, alpha: dpo_loss(r[:, 0], r[:, 1], beta)),
    "ipo": PairLoss(lambda r, kl, beta, alpha: ipo_loss(r[:, 0], r[:, 1], beta)),
    "tdpo1": PairLoss(lambda r, kl, beta, alpha: tdpo_loss(r[:, 0], r[:, 1], kl[:, 0], kl[:, 1], beta, alpha, 1),
                      kl=True),
    "tdpo2": PairLoss(lambda r, kl, beta, alpha: tdpo_loss(r[:, 0], r[:, 1], kl[:, 0], kl[:, 1], beta, alpha, 2),
                      kl=True),
}
LOSSES = tuple(PAIR_LOSSES)


def pair_terms(models, rows, with_kl: bool, chunk: int):
  """Per-response sums over the responses of :class:`~jaxopd.losses.common.Responses` ``rows``:
  logratio R, policy log-prob, sequential KL K (``[B, 2]`` each), from the policy's and the
  frozen reference's hidden states in chunks of ``chunk`` positions (the LM heads inside the
  loop: no ``[N, T, V]`` logits; :mod:`jaxopd.models.heads`)."""
  def terms(z, targets):
    out = {"lp_pi": label_logprob(z["policy"], targets), "lp_ref": label_logprob(z["reference"], targets)}
    if with_kl:
      out["kl"] = forward_kl(z["reference"], z["policy"])      # KL(p_ref || p_pi) over the vocabulary
    return out
  t = chunked_terms({"policy": models["policy"], "reference": models["reference"]}, rows.tokens, terms, chunk,
                    frozen=("reference",), **rows.forward)
  logratio = rows.sums(t["lp_pi"] - t["lp_ref"])
  logps = rows.sums(t["lp_pi"])
  kl = rows.sums(t["kl"]) if with_kl else None
  return logratio, logps, kl


def make_loss_fn(loss: str, beta: float, alpha: float = 0.5, log_kl: bool = True, chunk: int = 128):
  """``loss_fn(models, batch, rng)`` for ``loss`` of :data:`PAIR_LOSSES`, on pair batches in
  either layout (:func:`jaxopd.losses.common.responses`: a row per response, or shared-prefix rows).

  ``log_kl``: a loss without the KL also computes it, detached, for the metrics.
  """
  if loss not in PAIR_LOSSES:
    raise ValueError(f"config.method.loss={loss!r}: must be one of {LOSSES}")
  variant = PAIR_LOSSES[loss]

  def loss_fn(models, batch, rng):
    del rng
    rows = responses(batch)
    b = rows.mask.shape[0]
    r, lps, kl = pair_terms(models, rows, variant.kl or log_kl, chunk)
    if kl is not None and not variant.kl:
      kl = jax.lax.stop_gradient(kl)
    losses = variant.fn(r, kl, beta, alpha)
    reward = beta * jax.lax.stop_gradient(r + kl if variant.kl else r)
    metrics = {
        "rewards/chosen": jnp.sum(reward[:, 0]),
        "rewards/rejected": jnp.sum(reward[:, 1]),
        "rewards/margins": jnp.sum(reward[:, 0] - reward[:, 1]),
        "rewards/accuracies": jnp.sum((reward[:, 0] > reward[:, 1]).astype(jnp.float32)),
        "logps/chosen": jnp.sum(jax.lax.stop_gradient(lps[:, 0])),
        "logps/rejected": jnp.sum(jax.lax.stop_gradient(lps[:, 1])),
    }
    if kl is not None:
      k = jax.lax.stop_gradient(kl)
      metrics.update({"kl/chosen": jnp.sum(k[:, 0]), "kl/rejected": jnp.sum(k[:, 1]),
                      "kl/margin": jnp.sum(k[:, 1] - k[:, 0])})
    return LossOutput(jnp.sum(losses), jnp.float32(b), metrics)

  return loss_fn


# --- the preference pipeline ------------------------------------------------------

def pipeline(c, smoke: bool = False):
  """Adds the preference pipeline's fields to config ``c`` (TDPO, DPO, SparsePO): the controlled
  task's model and data, the SFT stage, preference construction, sampled evaluation, and
  policy and reference starting from the SFT stage."""
  c.model = suite_lib.default_model(smoke)   # the SFT base's architecture
  c.data = suite_lib.data_config(smoke)      # the reviews suite
  # Both start from the SFT stage (trained in config.sft.workdir); give both an
  # hf:DIR or run:WORKDIR init to start from your own model instead (no SFT stage).
  c.models.policy = table.role(init="stage:sft")
  c.models.reference = table.role(init="stage:sft", trainable=False)
  # The smoke model is not the default architecture: its own SFT run (experiments/sft.py's recipe).
  c.sft = sft.stage("runs/sft_smoke" if smoke else "runs/sft_base", 20 if smoke else 1500)

  c.prefs = ml_collections.ConfigDict()
  c.prefs.num_train = 2000       # prompts -> train pairs
  c.prefs.num_test = 200         # held-out prompts -> eval pairs
  c.prefs.k = 4                  # samples per prompt
  c.prefs.mode = "best_worst"    # best_worst | bradley_terry
  c.prefs.bt_temperature = 0.1   # bradley_terry label noise
  c.prefs.temperature = 1.0      # sampling temperature
  c.prefs.max_new_tokens = 48    # response budget
  c.prefs.prompt_len = 16        # padded prompt tokens

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 256       # held-out prompts sampled at each eval
  c.eval.max_new_tokens = 48     # response budget
  c.eval.temperature = 1.0       # sampling temperature
  c.eval.prompt_len = 16         # padded prompt tokens
  if smoke:
    c.prefs.num_train, c.prefs.num_test, c.prefs.k = 32, 16, 2   # 16: a batch after identical pairs are dropped
    c.prefs.max_new_tokens = 12
    c.eval.num_prompts = 8
    c.eval.max_new_tokens = 12
  return c


def _check(c):
  if c.method.loss not in LOSSES:
    raise ConfigError(f"config.method.loss={c.method.loss!r}: must be one of {LOSSES}")
  if c.method.beta <= 0:
    raise ConfigError(f"config.method.beta={c.method.beta}: must be positive")
  if c.method.alpha < 0:
    raise ConfigError(f"config.method.alpha={c.method.alpha}: must be >= 0")
  if c.method.loss != "tdpo2" and c.method.alpha != 0.5:
    raise ConfigError(f"config.method.alpha={c.method.alpha}: only tdpo2 uses alpha")
  if c.method.chunk <= 0:
    raise ConfigError(f"config.method.chunk={c.method.chunk}: must be positive")
  if PAIR_LOSSES[c.method.loss].kl and not c.method.log_kl:
    raise ConfigError(f"config.method.log_kl=False: {c.method.loss}'s loss is made of the sequential KL, so it is "
                      f"always computed and logged; the option is for the losses without it")
  for f in ("prefs", "eval") if c.data.task == "reviews" else ():
    if c[f].prompt_len + c[f].max_new_tokens > c.model.max_len:
      raise ConfigError(f"config.{f}.max_new_tokens={c[f].max_new_tokens}: prompt_len + max_new_tokens "
                        f"exceeds config.model.max_len={c.model.max_len}")


def prefs_config(c):
  d, p = c.data, c.prefs
  steps = paths.read_json(os.path.join(c.sft.workdir, "config.json"))["total_steps"]
  return preferences.make_config(
      policy_workdir=paths.resolve(c.sft.workdir), policy_step=int(steps), world_seed=d.world_seed,
      prompts_num_train=d.num_prompts_train, prompts_num_test=d.num_prompts_test,
      prompt_min_words=d.prompt_min_words, prompt_max_words=d.prompt_max_words, num_train=p.num_train,
      num_test=p.num_test, k=p.k, mode=p.mode, bt_temperature=p.bt_temperature, temperature=p.temperature,
      max_new_tokens=p.max_new_tokens, prompt_len=p.prompt_len, seed=c.seed)


def prepare(config, workdir: str):
  """Stages 1-3: data, SFT base, preference pairs (each cached); the ``stage:sft`` roles
  start from the SFT base.

  With ``config.data.task = "files"`` (your own preference data) nothing is
  built: every role needs an ``hf:DIR`` or ``run:WORKDIR`` init.
  """
  _check(config)
  return prepare_pairs(config)


def prepare_pairs(config):
  """The preference pipeline's stages (data, SFT base, pairs; shared with SparsePO, REDI,
  AlignDistil), or nothing with ``task=files``; the ``stage:sft`` roles get the SFT base."""
  if config.data.task == "files":
    table.refuse_stages(config, "sft")
    return config
  if config.data.task != "reviews":
    raise ConfigError(f"config.data.task={config.data.task!r}: must be reviews or files")
  suite_lib.ensure(config.data)
  sft_init = sft.run_stage(config, config.sft, config.model)
  pc = prefs_config(config)
  print(f"[stage] preferences {pc.name} (k={pc.k}, {pc.mode}) in {config.data.data_dir}", flush=True)
  preferences.prepare(pc, config.data.data_dir)
  for split in ("train", "test"):
    st = preferences.statistics(pc, split, config.data.data_dir)
    print(f"  {split}: {st['pairs']} pairs, chosen reward {st['chosen_reward']:.3f}, "
          f"rejected {st['rejected_reward']:.3f}, label accuracy {st['label_accuracy']:.3f}")
  table.fill_stage(config, "sft", sft_init)
  return config


def _swapped(records):
  """Pairs with chosen and rejected exchanged (``config.method.swap``)."""
  return [{**r, "tokens": r["tokens"][::-1].copy(), "loss_mask": r["loss_mask"][::-1].copy()} for r in records]


def pair_data(config):
  """``(train_records, test_records, evaluate)`` of the preference pipeline: your pair files
  (``task=files``; no sampled evaluation, no gold reward) or the reviews pairs with the
  sampled gold-reward evaluation (:func:`make_evaluate`). Shared by DPO/TDPO, REDI, AlignDistil."""
  if config.data.task == "files":
    _, train_recs, test_recs = suite_lib.file_records(config.data, "preference", config.seq_len,
                                                      default_tokenizer=table.tokenizer_dir(config))
    return train_recs, test_recs, None
  suite = suite_lib.ensure(config.data, verbose=False)
  table.check_tokenizer(config, suite.tokenizer, "the reviews task")
  pc = prefs_config(config)
  train_recs, st = preferences.records(pc, "train", config.data.data_dir, suite.tokenizer, config.seq_len,
                                       config.data.over_length, config.prefs.prompt_len)
  test_recs, _ = preferences.records(pc, "test", config.data.data_dir, suite.tokenizer, config.seq_len,
                                     config.data.over_length, config.prefs.prompt_len)
  print(f"preference pairs: {st}")
  return train_recs, test_recs, make_evaluate(config, suite)


def pair_batches(train_recs, test_recs, share_prompt: bool = False):
  """``(train_data, eval_data)`` functions of an Experiment over pair records; with
  ``share_prompt`` (``config.method.share_prompt``) in shared-prefix rows, the prompt once per
  pair (:func:`jaxopd.data.pipeline.share_prompt`; both splits cut to one row length)."""
  if share_prompt:
    (train_recs, test_recs), st = share_prompt_rows([train_recs, test_recs or []])
    print(f"shared-prompt rows: {st['pairs']} pairs in rows of {st['row_len']} tokens; {st['tokens']} tokens, "
          f"{st['unshared_tokens']} with a row per response ({st['unshared_tokens'] / max(st['tokens'], 1):.2f}x)")
  return (lambda shard: batched_iterator(train_recs, shard),
          (lambda shard: batched_iterator(test_recs, shard, shuffle=False, repeat=False)) if test_recs else None)


def build(config) -> Experiment:
  _check(config)
  train_recs, test_recs, evaluate = pair_data(config)
  m = config.method
  if m.swap:
    train_recs, test_recs = _swapped(train_recs), (_swapped(test_recs) if test_recs else test_recs)
  loss_fn = make_loss_fn(m.loss, m.beta, m.alpha, m.log_kl, m.chunk)
  train_data, eval_data = pair_batches(train_recs, test_recs, m.share_prompt)
  return Experiment(roles={"policy": True, "reference": False}, loss_fn=loss_fn, train_data=train_data,
                    eval_data=eval_data, evaluate=evaluate)


# --- DPO as a stage of other pipelines (AlignDistil's DPO and reverse DPO models) -------------

def dpo_stage(workdir: str, total_steps: int, reverse: bool = False, config: str = "tdpo.py:dpo"):
  """The config block of a DPO stage: its run directory, length, whether it is the reverse
  model (chosen and rejected swapped), and the recipe it follows (a TDPO config module of
  experiments/); model, data, pairs, SFT base, seed and mesh come from the pipeline's config."""
  b = ml_collections.ConfigDict()
  b.workdir = workdir            # the stage's run (trained here if unfinished, reused otherwise)
  b.total_steps = total_steps    # its length
  b.reverse = reverse            # train on rejected over chosen
  b.config = config              # its recipe: "tdpo.py:dpo" (DPO) or another loss of experiments/tdpo.py
  return b


def run_dpo_stage(config, node, sft_init: str, what: str = "DPO") -> str:
  """Trains DPO stage ``node`` (policy and reference from ``sft_init``, on pipeline ``config``'s
  pairs) unless its run is finished; returns the pinned ``run:`` init of its policy. A finished
  run trained with the other pair order is a ConfigError (the two stages need two directories)."""
  s = load_config(node.config)
  if s.method.name != "tdpo":
    raise ConfigError(f"{node.config!r}: a DPO stage needs a TDPO config (its method is {s.method.name!r})")
  for k in ("model", "data", "prefs", "sft", "eval", "seed", "mesh", "progress"):
    s[k] = config[k]
  s.models.policy.init = s.models.reference.init = sft_init
  s.method.swap = bool(node.reverse)
  s.compare_with = ""
  s.total_steps = node.total_steps
  s.optim.warmup_steps = min(s.optim.warmup_steps, s.total_steps)
  s.checkpoint.every = min(s.checkpoint.every, s.total_steps)
  s.eval_every = 0
  recorded = os.path.join(node.workdir, "config.json")
  if paths.isfile(recorded):
    was = bool(paths.read_json(recorded).get("method", {}).get("swap", False))
    if was != s.method.swap:
      raise ConfigError(f"{node.workdir}: this DPO run was trained with method.swap={was}, the {what} stage needs "
                        f"swap={s.method.swap}; give the stage its own workdir")
  sft.train_stage(s, node.workdir, build, what)
  return f"run:{paths.resolve(node.workdir)}:policy@{node.total_steps}"


def make_evaluate(config, suite):
  """Sampled held-out evaluation: gold reward, KL to reference, entropy, distinct-n."""
  e = config.eval
  prompts = suite_lib.prompt_records(suite, "test", e.prompt_len, verbose=False)[:e.num_prompts]
  prompt = np.stack([p["prompt"] for p in prompts])
  plen = np.stack([p["prompt_len"] for p in prompts])
  scfg = SamplingConfig(max_new_tokens=e.max_new_tokens, eos_id=suite.tokenizer.eos_token_id,
                        pad_id=suite.tokenizer.pad_token_id, temperature=e.temperature)
  reward_fn = suite_lib.gold_reward_fn(suite)
  rng = jax.random.PRNGKey(config.seed + 1)   # the same samples' randomness at every eval

  def evaluate(models, step):
    res = evaluate_policy(models["policy"], models.get("reference"), prompt, plen, rng, scfg, reward_fn)
    return {f"sample/{k}": v for k, v in res.items()}
  return evaluate


def report(config, workdir: str, summary: dict):
  """Before/after table (and DPO if cached), summary.json and summary.png in ``workdir``."""
  from jaxopd import logs
  if config.data.task == "files":
    paths.write_json(os.path.join(workdir, "summary.json"),
                     {"loss": config.method.loss, "beta": config.method.beta, "after": summary["eval"]}, indent=2)
    print(f"wrote {os.path.join(workdir, 'summary.json')} (task=files: no sampled before/after evaluation)")
    return
  suite = suite_lib.ensure(config.data, verbose=False)
  evaluate = make_evaluate(config, suite)
  models = summary["trainer"].models(summary["state"], summary["frozen"])
  before = evaluate({**models, "policy": models["reference"]}, 0)
  rows = {"sft (before)": before, f"{config.method.loss} (after)": summary["eval"]}
  curves = {config.method.loss: logs.read_metrics(workdir, "eval")}
  other = config.compare_with
  if other and paths.exists(os.path.join(other, "summary.json")) and \
      paths.resolve(other) != paths.resolve(workdir):
    o = paths.read_json(os.path.join(other, "summary.json"))
    rows[f"{o['loss']} ({other})"] = o["after"]
    curves[o["loss"]] = logs.read_metrics(other, "eval")
  keys = ["sample/reward", "sample/kl_ref", "sample/entropy", "sample/distinct2", "loss", "rewards/accuracies"]
  print("\n" + f"{'':<24}" + "".join(f"{k.split('/')[-1]:>14}" for k in keys))
  for name, r in rows.items():
    print(f"{name:<24}" + "".join(f"{r.get(k, float('nan')):>14.4f}" for k in keys))
  paths.write_json(os.path.join(workdir, "summary.json"), {"loss": config.method.loss, "beta": config.method.beta,
                                                          "before": before, "after": summary["eval"]}, indent=2)
  _plot(curves, before, os.path.join(workdir, "summary.png"))
  print(f"wrote {os.path.join(workdir, 'summary.json')} and summary.png")


def _plot(curves, before, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, recs in curves.items():
    recs = [r for r in recs if "sample/reward" in r]
    steps = [0] + [r["step"] for r in recs]
    reward = [before["sample/reward"]] + [r["sample/reward"] for r in recs]
    kl = [0.0] + [r["sample/kl_ref"] for r in recs]
    axes[0].plot(steps, reward, marker="o", label=name)
    axes[1].plot(kl, reward, marker="o", label=name)
  axes[0].set(xlabel="step", ylabel="gold reward (held-out samples)", title="reward over training")
  axes[1].set(xlabel="sequence KL(policy || reference)", ylabel="gold reward", title="reward vs KL")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  paths.savefig(fig, path, dpi=100)
  plt.close(fig)
