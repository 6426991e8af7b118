"""AlignDistil (Zhang et al., ACL 2025): alignment as adaptive token-level distillation
from a teacher made of a DPO model, a reverse DPO model and the SFT reference.
Config and commands: experiments/aligndistil.py; math: :mod:`jaxopd.losses.aligndistil`.

Roles: ``policy`` (trained), ``reference`` (the SFT model), ``dpo`` and, for the ``adaptive`` /
``contrast`` teachers, ``rdpo`` (``none`` for ``theorem1`` / ``gkd``). On the reviews task
:func:`prepare` trains each as a cached stage (:func:`jaxopd.stages.run_dpo`); give a role an
``hf:DIR`` / ``run:WORKDIR`` init and its stage is not run. Data (``config.method.data``):
``on_policy`` (one response per prompt, sampled from the policy in the step: :func:`make_rollout`)
or ``off_policy`` (the chosen responses of the pairs). Loss and metrics: :func:`make_loss_fn`.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import ml_collections

from jaxopd import options, paths, stages as stage_lib, tasks
from jaxopd.data import batched_iterator, suite as suite_lib
from jaxopd.data.tokenizer import check_tokenizer
from jaxopd.errors import ConfigError
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import response_mask
from jaxopd.losses.aligndistil import NEEDS, VARIANTS, sequence_loss, token_terms
from jaxopd.models.heads import chunked_terms
from jaxopd.models import table
from jaxopd.options import at_least, one_of, option, positive
from jaxopd.sampling import SamplingConfig, rollout_config, sample
from jaxopd.tasks import pairs as pair_task

TASKS = ("reviews", "files")   # the tasks it trains on (jaxopd.tasks)

DATA = ("on_policy", "off_policy")
TEACHER_ROLES = ("dpo", "rdpo")


def roles(variant: str) -> dict:
  return {"policy": True, "reference": False, **{n: False for n in NEEDS[variant]}}


def make_loss_fn(variant: str, beta0: float, beta2: float, temperature: float = 1.0, chunk: int = 64,
                 len_norm: bool = True):
  """``loss_fn(models, batch, rng)``: the mean over sequences of the length-normalised
  ``sum_t m_t c_t KL(q_t || softmax(z*_t / T))``. ``batch``: ``tokens``/``loss_mask``
  ``[B, T]`` (sampled rows) or ``[B, 2, T]`` (preference pairs: the chosen side is used).

  Computed from the models' final hidden states in chunks of ``chunk`` positions, each model's LM
  head inside the chunk loop (rematerialised in the backward pass), so no ``[B, T, V]`` logits of
  the four models exist in the step. Metrics (token means unless said): ``kl/teacher`` (to
  ``softmax(z*)``), ``kl/reference`` (to the SFT model), ``coef/mean``, ``coef/max`` (the largest
  ``c_t`` of the step's batch; with ``grad_accum > 1`` the mean over microbatches of their largest),
  ``coef/above_10`` (the fraction of tokens with ``c_t > 10``), ``reward/token`` (the DPO token
  reward of the trained tokens), ``reward/expected`` (its expectation under the policy),
  ``kl/teacher_seq`` (per sequence, summed over tokens), ``length``."""
  if variant not in VARIANTS:
    raise ConfigError(f"config.method.variant={variant!r}: must be one of {VARIANTS}")
  names = ("policy", "reference") + NEEDS[variant]

  def loss_fn(models, batch, rng):
    del rng
    tokens, mask = batch["tokens"], batch["loss_mask"]
    if tokens.ndim == 3:
      tokens, mask = tokens[:, 0], mask[:, 0]
    def per_chunk(z, targets):
      return token_terms(variant, z["policy"], z["reference"], z["dpo"], z.get("rdpo"), targets, beta0, beta2,
                         temperature)

    terms = chunked_terms({n: models[n] for n in names}, tokens, per_chunk, chunk,
                          frozen=[n for n in names if n != "policy"])
    m = response_mask(mask)
    seq = sequence_loss(terms["loss"], m, len_norm)
    tok = lambda x: (jnp.sum(m * x), jnp.sum(m))
    c = terms["coef"]
    b = jnp.float32(tokens.shape[0])
    metrics = {
        "kl/teacher": tok(terms["kl_teacher"]), "kl/reference": tok(terms["kl_reference"]),
        "coef/mean": tok(c), "coef/above_10": tok((c > 10.0).astype(jnp.float32)),
        "coef/max": (jnp.max(jnp.where(m > 0, c, 0.0)), jnp.float32(1.0)),
        "reward/token": tok(terms["reward_token"]), "reward/expected": tok(terms["reward_expected"]),
        "kl/teacher_seq": (jnp.sum(m * terms["kl_teacher"]), b), "length": (jnp.sum(m), b),
    }
    return LossOutput(jnp.sum(seq), b, metrics)
  return loss_fn


def make_rollout(scfg: SamplingConfig):
  """``rollout(models, batch, rng)``: one response per prompt, sampled from the policy."""
  def rollout(models, batch, rng):
    out = sample(models["policy"], batch["prompt"], batch["prompt_len"], rng, scfg)
    return {"tokens": out.tokens, "loss_mask": out.loss_mask}
  return rollout


# --- config, stages -------------------------------------------------------------------------

def stages(c, smoke: bool = False):
  """The DPO and reverse-DPO stage blocks (``config.dpo``, ``config.rdpo``) and their roles."""
  recipe = "tdpo.py:dpo,smoke" if smoke else "tdpo.py:dpo"
  c.dpo = stage_lib.dpo_stage("runs/dpo_stage_smoke" if smoke else "runs/dpo_stage", 8 if smoke else 400,
                         config=recipe)
  c.rdpo = stage_lib.dpo_stage("runs/rdpo_stage_smoke" if smoke else "runs/rdpo_stage", 8 if smoke else 400,
                          reverse=True, config=recipe)
  c.pipeline = (*c.pipeline, "dpo", "rdpo")   # each runs if a role uses it
  c.models.dpo = table.role(init="stage:dpo", trainable=False)
  c.models.rdpo = table.role(init="stage:rdpo", trainable=False)
  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompt_len = c.eval.prompt_len    # on_policy: padded prompt tokens
  c.rollout.max_new_tokens = c.seq_len - c.rollout.prompt_len
  c.rollout.temperature = 1.0


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  variant: str = option(one_of(*VARIANTS))
  data: str = option(one_of(*DATA))
  beta: float = option(positive)
  beta2: float = option(positive)        # the boost of the adaptive teacher
  temperature: float = option(positive)
  chunk: int = option(at_least(0))
  len_norm: bool = option()              # per-sequence length normalisation


def _check(c) -> Options:
  m = Options.of(c.method)
  tasks.require(c, TASKS)
  if "rdpo" in NEEDS[m.variant] and not table.built(c, "rdpo"):
    raise ConfigError(f"config.models.rdpo.init='none': variant {m.variant!r} needs the reverse DPO model "
                      f"(stage:rdpo, hf:DIR or run:WORKDIR)")
  if "rdpo" not in NEEDS[m.variant] and table.built(c, "rdpo"):
    raise ConfigError(f"config.models.rdpo.init={c.models.rdpo.init!r}: variant {m.variant!r} uses no reverse "
                      f"DPO model (set --config.models.rdpo.init=none)")
  if m.data == "on_policy" and c.seq_len != c.rollout.prompt_len + c.rollout.max_new_tokens:
    raise ConfigError(f"config.seq_len={c.seq_len}: on-policy sequences are prompt + response, so it must equal "
                      f"config.rollout.prompt_len + config.rollout.max_new_tokens = "
                      f"{c.rollout.prompt_len} + {c.rollout.max_new_tokens}")
  return m


def prepare(config, workdir: str):
  """The stages ``config.pipeline`` declares: data, SFT base and pairs, then the DPO and reverse
  DPO models (each cached; a stage no role uses is not run). With ``config.data.task = "files"``
  no stage is trained: every role needs a source."""
  del workdir
  _check(config)
  return stage_lib.prepare(config)


def build(config) -> Experiment:
  m = _check(config)
  evaluate = None
  if config.data.task == "files":
    if m.data == "on_policy":        # held-out prompts need a rollout: no eval batches
      p = tasks.get(config, "prompts")(config)
      tok, train_recs, eval_recs = p.tokenizer, p.train, None
    else:
      tok, train_recs, eval_recs = suite_lib.file_records(config.data, "preference", config.seq_len,
                                                          default_tokenizer=table.tokenizer_dir(config))
  else:
    suite = suite_lib.ensure(config.data, verbose=False)
    tok = suite.tokenizer
    check_tokenizer(config, tok, "the reviews task")
    pairs, eval_recs, evaluate = pair_task.pair_data(config)
    train_recs = (suite_lib.prompt_records(suite, "train", config.rollout.prompt_len) if m.data == "on_policy"
                  else pairs)
  policy = table.arch(config, "policy")
  if len(tok) > policy.vocab_size:
    raise ConfigError(f"config.models.policy: its vocab_size={policy.vocab_size} is smaller than the tokenizer's "
                      f"{len(tok)} tokens")
  for n in ("reference",) + NEEDS[m.variant]:
    if table.arch(config, n).vocab_size != policy.vocab_size:
      raise ConfigError(f"config.models.{n}: vocab_size={table.arch(config, n).vocab_size} differs from the "
                        f"policy's {policy.vocab_size} (the teacher mixes the models' logits token by token)")
  rollout = make_rollout(rollout_config(config, tok)) if m.data == "on_policy" else None
  return Experiment(
      roles=roles(m.variant),
      loss_fn=make_loss_fn(m.variant, m.beta, m.beta2, m.temperature, m.chunk, m.len_norm),
      train_data=lambda shard: batched_iterator(train_recs, shard),
      eval_data=(lambda shard: batched_iterator(eval_recs, shard, shuffle=False, repeat=False)) if eval_recs else None,
      rollout=rollout, evaluate=evaluate)


def report(config, workdir: str, summary: dict):
  """The task's evaluation of the SFT reference (before), the DPO teacher and the trained policy
  (after), each with its KL to the reference; summary.json."""
  out = {"variant": config.method.variant, "data": config.method.data, "beta": config.method.beta,
         "beta2": config.method.beta2, "after": summary.eval}
  task_report = tasks.piece(config, "report")      # the task's before/after table (none for your files)
  if task_report:
    task_report(config, out, {"before": config.models.reference, "dpo": config.models.dpo},
                base={"reference": config.models.reference})
  paths.write_json(os.path.join(workdir, "summary.json"), out, indent=2)
  print(f"wrote {os.path.join(workdir, 'summary.json')}")
