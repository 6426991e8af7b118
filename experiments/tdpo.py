"""TDPO (Zeng et al., ICML 2024) and its DPO baseline on the controlled reviews task.

The main job (README command 1 runs it with no flags):

  python -m jaxopd.main --config experiments/tdpo.py --workdir runs/default

runs the whole pipeline, each stage cached so a re-run skips what is done:
1. data: the reviews suite (tokenizer, corpus, prompts) into ``config.data.data_dir``;
2. SFT base: ``experiments/sft.py`` with this config's model in ``config.sft.workdir``;
3. preferences: ``config.prefs.k`` samples per prompt from the SFT policy,
   labelled by the gold reward (``jaxopd.data.preferences``), in the data dir;
4. TDPO: policy and frozen reference both start from the SFT base;
5. report: held-out prompts sampled from the SFT policy ("before") and the
   trained policy ("after"): gold reward, sequence KL to the reference,
   per-token entropy, distinct-n; the same for a DPO run in
   ``config.compare_with`` if one is there; ``summary.json`` and ``summary.png``.

Presets (comma-separated): ``dpo``, ``tdpo1``, ``tdpo2`` (the loss; default
tdpo2), ``smoke`` (tiny sizes, for tests). Defaults of the official code:
beta 0.1, alpha 0.5. Measured numbers: experiments/README.md.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from jaxopd import checkpoint as ckpt_lib
from jaxopd import config as config_lib
from jaxopd import train
from jaxopd.data import batched_iterator, preferences, suite as suite_lib
from jaxopd.errors import ConfigError
from jaxopd.evaluation import evaluate_policy
from jaxopd.experiment import Experiment, load_module, parse_arg
from jaxopd.models import table
from jaxopd.preference import LOSSES, make_loss_fn
from jaxopd.sampling import SamplingConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke",) + LOSSES)
  sft = load_module(os.path.join(HERE, "sft.py")).get_config("smoke" if args.get("smoke") else None)
  c = config_lib.base_config()
  c.total_steps = 400
  c.batch_size = 16              # preference pairs per step
  c.seq_len = 64
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint.every = 200
  c.model = sft.model            # the SFT base's architecture
  c.data = sft.data              # the reviews suite
  # Both start from the SFT stage (trained in config.sft.workdir); give both an
  # hf:DIR or run:WORKDIR init to start from your own model instead (no SFT stage).
  c.models.policy = table.role(init="stage:sft")
  c.models.reference = table.role(init="stage:sft", trainable=False)

  c.method = ml_collections.ConfigDict()
  c.method.loss = "tdpo2"        # dpo | tdpo1 | tdpo2
  c.method.beta = 0.1            # inverse temperature of the implicit reward
  c.method.alpha = 0.5           # tdpo2: weight of the KL margin
  c.method.log_kl = True         # dpo: also compute the sequential KL (detached) for the metrics
  c.method.kl_chunk = 64         # positions per chunk of the vocabulary-wide KL

  c.sft = ml_collections.ConfigDict()
  c.sft.workdir = "runs/sft_base"  # SFT base run (trained here if missing, reused otherwise)
  c.sft.total_steps = 1500       # its length when trained here
  c.sft.config = ""              # "" = experiments/sft.py defaults with this model and data

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

  c.compare_with = "runs/dpo"    # a finished DPO run to put in the report, if present ("" = none)

  for loss in LOSSES:
    if args.get(loss):
      c.method.loss = loss
  if args.get("smoke"):
    c.total_steps = 8
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.eval_every = 4
    c.eval_batches = 1
    c.log_every = 2
    c.checkpoint.every = 4
    c.sft.total_steps = 20
    c.sft.workdir = "runs/sft_smoke"   # the smoke model is not the default architecture
    c.prefs.num_train, c.prefs.num_test, c.prefs.k = 32, 8, 2
    c.prefs.max_new_tokens = 12
    c.eval.num_prompts = 8
    c.eval.max_new_tokens = 12
    c.compare_with = ""
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
  if c.method.kl_chunk <= 0:
    raise ConfigError(f"config.method.kl_chunk={c.method.kl_chunk}: must be positive")
  for f in ("prefs", "eval") if c.data.task == "reviews" else ():
    if c[f].prompt_len + c[f].max_new_tokens > c.model.max_len:
      raise ConfigError(f"config.{f}.max_new_tokens={c[f].max_new_tokens}: prompt_len + max_new_tokens "
                        f"exceeds config.model.max_len={c.model.max_len}")


def _sft_config(c):
  sft = load_module(os.path.join(HERE, "sft.py"))
  s = sft.get_config(c.sft.config or None)
  s.model = c.model
  s.data = c.data
  s.seed = c.seed
  s.mesh = c.mesh
  s.progress = c.progress
  s.total_steps = c.sft.total_steps
  s.optim.warmup_steps = min(s.optim.warmup_steps, s.total_steps)
  s.checkpoint.every = min(s.checkpoint.every, s.total_steps)
  return sft, s


def _prefs_config(c):
  d, p = c.data, c.prefs
  with open(os.path.join(c.sft.workdir, "config.json")) as f:
    steps = json.load(f)["total_steps"]
  return preferences.make_config(
      policy_workdir=os.path.abspath(c.sft.workdir), policy_step=int(steps), world_seed=d.world_seed,
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
  if config.data.task == "files":
    staged = table.uses_stage(config, "sft")
    if staged:
      raise ConfigError(f"config.models.{staged[0]}.init='stage:sft': with task=files no SFT stage is trained "
                        f"here; start it from your model (hf:DIR) or a run (run:WORKDIR)")
    return config
  if config.data.task != "reviews":
    raise ConfigError(f"config.data.task={config.data.task!r}: must be reviews or files")
  suite_lib.ensure(config.data)
  sft, s = _sft_config(config)
  if not ckpt_lib.finished(config.sft.workdir, s.total_steps):
    print(f"[stage] SFT base -> {config.sft.workdir} ({s.total_steps} steps)", flush=True)
    train.run(s, config.sft.workdir, sft.build(s))
  pc = _prefs_config(config)
  print(f"[stage] preferences {pc.name} (k={pc.k}, {pc.mode}) in {config.data.data_dir}", flush=True)
  preferences.prepare(pc, config.data.data_dir)
  for split in ("train", "test"):
    st = preferences.statistics(pc, split, config.data.data_dir)
    print(f"  {split}: {st['pairs']} pairs, chosen reward {st['chosen_reward']:.3f}, "
          f"rejected {st['rejected_reward']:.3f}, label accuracy {st['label_accuracy']:.3f}")
  table.fill_stage(config, "sft", sft_init(config))
  return config


def sft_init(config) -> str:
  """The ``run:`` init of the SFT stage's policy, pinned at its final step."""
  return f"run:{os.path.abspath(config.sft.workdir)}:policy@{config.sft.total_steps}"


def build(config) -> Experiment:
  _check(config)
  if config.data.task == "files":
    _, train_recs, test_recs = suite_lib.file_records(config.data, "preference", config.seq_len,
                                                      default_tokenizer=table.tokenizer_dir(config))
    evaluate = None       # no gold reward for your data: eval = held-out pair metrics only
  else:
    suite = suite_lib.ensure(config.data, verbose=False)
    pc = _prefs_config(config)
    train_recs, st = preferences.records(pc, "train", config.data.data_dir, suite.tokenizer, config.seq_len,
                                         config.data.over_length, config.prefs.prompt_len)
    test_recs, _ = preferences.records(pc, "test", config.data.data_dir, suite.tokenizer, config.seq_len,
                                       config.data.over_length, config.prefs.prompt_len)
    print(f"preference pairs: {st}")
    evaluate = make_evaluate(config, suite)
  m = config.method
  loss_fn = make_loss_fn(m.loss, m.beta, m.alpha, m.log_kl, m.kl_chunk)

  return Experiment(roles={"policy": True, "reference": False}, loss_fn=loss_fn,
                    train_data=lambda shard: batched_iterator(train_recs, shard),
                    eval_data=(lambda shard: batched_iterator(test_recs, shard, shuffle=False, repeat=False))
                    if test_recs else None,
                    evaluate=evaluate)


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

  def evaluate(params, frozen, step):
    res = evaluate_policy(params["policy"], frozen["reference"], prompt, plen, rng, scfg, reward_fn)
    return {f"sample/{k}": v for k, v in res.items()}
  return evaluate


def report(config, workdir: str, summary: dict):
  """Before/after table (and DPO if cached), summary.json and summary.png in ``workdir``."""
  from jaxopd import logs
  if config.data.task == "files":
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({"loss": config.method.loss, "beta": config.method.beta, "after": summary["eval"]}, f, indent=2)
    print(f"wrote {os.path.join(workdir, 'summary.json')} (task=files: no sampled before/after evaluation)")
    return
  suite = suite_lib.ensure(config.data, verbose=False)
  evaluate = make_evaluate(config, suite)
  _, frozen = summary["trainer"].models(summary["state"], summary["frozen"])
  before = evaluate({"policy": frozen["reference"]}, frozen, 0)
  rows = {"sft (before)": before, f"{config.method.loss} (after)": summary["eval"]}
  curves = {config.method.loss: logs.read_metrics(workdir, "eval")}
  other = config.compare_with
  if other and os.path.exists(os.path.join(other, "summary.json")) and \
      os.path.abspath(other) != os.path.abspath(workdir):
    with open(os.path.join(other, "summary.json")) as f:
      o = json.load(f)
    rows[f"{o['loss']} ({other})"] = o["after"]
    curves[o["loss"]] = logs.read_metrics(other, "eval")
  keys = ["sample/reward", "sample/kl_ref", "sample/entropy", "sample/distinct2", "loss", "rewards/accuracies"]
  print("\n" + f"{'':<24}" + "".join(f"{k.split('/')[-1]:>14}" for k in keys))
  for name, r in rows.items():
    print(f"{name:<24}" + "".join(f"{r.get(k, float('nan')):>14.4f}" for k in keys))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"loss": config.method.loss, "beta": config.method.beta, "before": before,
               "after": summary["eval"]}, f, indent=2)
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
  fig.savefig(path, dpi=100)
  plt.close(fig)
