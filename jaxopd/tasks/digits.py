"""The digits task (:mod:`jaxopd.data.digits`): SFT records of the easy levels, pass@k per
difficulty level of sampled answers, the greedy pass rate and the held-out NLL of the easy levels,
and the before/after table of a run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd import stages, tasks
from jaxopd.data import digits, traces
from jaxopd.data.tokenizer import check_tokenizer
from jaxopd.errors import ConfigError
from jaxopd.evaluation import compiled, heldout_nll, pass_at_k, to_host
from jaxopd.sampling import SamplingConfig, rollout_config
from jaxopd.tasks import Prompts, SftData


def sft_data(config, arch) -> SftData:
  """The gold answers of levels up to ``config.data.sft_max_level`` (the SFT base of GRPO and REDI;
  the teacher stage raises it to every level); pass@k is the RL methods' evaluation, not SFT's."""
  suite = digits.ensure(config.data)
  check_tokenizer(config, suite.tokenizer, "the digits task")
  if len(suite.tokenizer) > arch.vocab_size:
    raise ConfigError(f"config.model.vocab_size={arch.vocab_size}: the digits tokenizer has "
                      f"{len(suite.tokenizer)} tokens")
  if config.eval.num_prompts:
    raise ConfigError("config.eval.num_prompts: sampled evaluation needs the reviews task's gold reward; "
                      "set it to 0 with task=digits (experiments/sft.py:digits; pass@k is GRPO's evaluation)")
  lv = config.data.sft_max_level
  train, _ = digits.sft_records(suite, "train", config.seq_len, max_level=lv)
  evals, _ = digits.sft_records(suite, "test", config.seq_len, max_level=lv)
  return SftData(train, evals, suite.tokenizer.pad_token_id)


def pair_data(config):
  """``(train_records, None, evaluate)``: (positive, negative) pairs of a teacher's traces (the
  traces stage, ``config.traces``), up to ``pairs_per_prompt`` per prompt, with pass@k per level."""
  if "traces" not in config:
    raise ConfigError("config.traces: the digits task's pairs are a teacher's traces; declare a traces stage "
                      "(experiments/redi.py:digits)")
  suite = digits.ensure(config.data, verbose=False)
  check_tokenizer(config, suite.tokenizer, "the digits task")
  where = stages.traces_dir(config)
  train = traces.pair_records(traces.load(where), suite.tokenizer, config.seq_len,
                              int(config.traces.pairs_per_prompt))
  print(f"trace pairs: {len(train)} (positive, negative) pairs from {where}")
  if len(train) < config.batch_size:
    raise ConfigError(f"config.batch_size={config.batch_size}: the traces give only {len(train)} pairs "
                      f"(raise config.traces.num_prompts or samples)")
  return train, None, _heldout(config, suite)[1]


def _heldout(config, suite):
  """``(records, evaluate)``: the first ``config.eval.num_prompts`` held-out prompts with their
  answers, and pass@k per level on them (None without ``num_prompts`` and ``samples``)."""
  test = digits.prompt_records(suite, "test", config.rollout.prompt_len, config.rollout.max_new_tokens - 1,
                               verbose=False)[:config.eval.num_prompts]
  return test, evaluate(config, suite, test) if config.eval.num_prompts and config.eval.samples else None


def prompts(config) -> Prompts:
  """Every level's prompts with their answers (the checker's reference, up to the response budget
  less the EOS); the evaluation: pass@k per level on ``config.eval.num_prompts`` held-out prompts."""
  suite = digits.ensure(config.data, verbose=False)
  check_tokenizer(config, suite.tokenizer, "the digits task")
  train = digits.prompt_records(suite, "train", config.rollout.prompt_len, config.rollout.max_new_tokens - 1)
  return Prompts(suite.tokenizer, train, *_heldout(config, suite))


def _eval_draw(scfg, n, model, prompt, plen, answer, alen, rng):
  out, ok = traces.draw(scfg, n, model, prompt, plen, answer, alen, rng)
  return ok, jnp.mean(out.lengths.astype(jnp.float32))


def evaluate_pass_at_k(model, records, scfg: SamplingConfig, n: int, rng, batch: int = 64) -> dict:
  """``pass@k`` (k = 1, 2, 4, ... <= n; unbiased from n samples per prompt) overall and per level,
  ``greedy`` (the greedy pass rate), ``length`` (mean sampled response length)."""
  draw = compiled(_eval_draw, (scfg, n), model)
  draw_greedy = compiled(_eval_draw, (dataclasses.replace(scfg, greedy=True), 1), model)
  level = np.asarray([int(r["level"]) for r in records])
  correct, greedy_ok, lengths = [], [], []
  for i in range(0, len(records), batch):
    chunk = records[i:i + batch]
    arrs = [jnp.asarray(np.stack([r[k] for r in chunk])) for k in ("prompt", "prompt_len", "answer", "answer_len")]
    ok, length = to_host(draw(*arrs, jax.random.fold_in(rng, i)))
    g, _ = to_host(draw_greedy(*arrs, rng))
    correct.append(np.asarray(ok).sum(axis=1))
    greedy_ok.append(np.asarray(g)[:, 0])
    lengths.append(float(length) * len(chunk))
  correct, greedy_ok = np.concatenate(correct), np.concatenate(greedy_ok)
  ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= n]
  out = {"greedy": float(np.mean(greedy_ok)), "length": sum(lengths) / len(records)}
  for k in ks:
    out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
  for lv in sorted(set(level.tolist())):
    sel = level == lv
    for k in ks:
      out[f"level{lv}/pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct[sel]]))
    out[f"level{lv}/greedy"] = float(np.mean(greedy_ok[sel]))
  return out


def evaluate(config, suite, test_recs):
  """``evaluate(models, step)``: :func:`evaluate_pass_at_k` of the policy on the held-out prompts
  (``sample/...``) and its per-token NLL on the held-out SFT examples of the easy levels
  (``heldout/nll_easy``: forgetting of what the SFT base was trained on)."""
  scfg = rollout_config(config, suite.tokenizer, config.eval.temperature)
  easy, _ = digits.sft_records(suite, "test", config.seq_len, max_level=config.data.sft_max_level, verbose=False)

  def run(models, step):
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)
    res = {f"sample/{k}": v for k, v in evaluate_pass_at_k(models["policy"], test_recs, scfg, config.eval.samples,
                                                           rng).items()}
    res["heldout/nll_easy"] = heldout_nll(models["policy"], easy, min(64, len(easy)))
    return res
  return run


def report(config, out: dict, sources: dict, base: dict | None = None) -> dict:
  """Adds to ``out`` (which holds ``"after"``, the run's last evaluation) the digits evaluation
  of each ``sources`` entry (name -> a role block of ``config.models``, or an init string;
  ``none`` / ``random`` skipped; ``base``: other roles) and prints the pass@k table; returns ``out``."""
  run = _heldout(config, digits.ensure(config.data, verbose=False))[1]
  if run is None:
    return out
  ks = sorted(int(k.split("@")[1]) for k in out["after"] if k.startswith("sample/pass@"))
  keys = [f"sample/pass@{k}" for k in ks] + ["sample/greedy", "heldout/nll_easy"]
  return tasks.evaluate_sources(config, run, sources, out, keys, base)
