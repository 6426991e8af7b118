"""Preference pairs as a task: your pair files (``task=files``) or the reviews pipeline's sampled
pairs, their batches (a row per response, or the prompt shared), and the preference methods'
before/after report."""

from __future__ import annotations

import os

from jaxopd import paths, tasks
from jaxopd.data import batched_iterator, suite as suite_lib
from jaxopd.data.pipeline import share_prompt as share_prompt_rows
from jaxopd.tasks import reviews


def swapped(records):
  """Pairs with chosen and rejected exchanged (``config.method.swap``)."""
  return [{**r, "tokens": r["tokens"][::-1].copy(), "loss_mask": r["loss_mask"][::-1].copy()} for r in records]


def pair_data(config):
  """``(train_records, test_records, evaluate)`` of task ``config.data.task``'s pairs: your pair
  files (no sampled evaluation) or the reviews pipeline's sampled pairs with the gold-reward
  evaluation."""
  return tasks.get(config, "pairs")(config)


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


def report(config, workdir: str, summary: dict, label: str):
  """The preference methods' report: on the reviews task the before (the reference) / after table of
  the sampled evaluation (and ``config.compare_with``'s run), summary.json and summary.png in
  ``workdir``; with ``task=files`` summary.json of the last evaluation. ``label``: the run's row (its loss)."""
  from jaxopd import logs
  if config.data.task == "files":
    paths.write_json(os.path.join(workdir, "summary.json"),
                     {"loss": label, "beta": config.method.beta, "after": summary.eval}, indent=2)
    print(f"wrote {os.path.join(workdir, 'summary.json')} (task=files: no sampled before/after evaluation)")
    return
  suite = suite_lib.ensure(config.data, verbose=False)
  evaluate = reviews.evaluate(config, suite)
  models = summary.trainer.models(summary.state, summary.frozen)
  before = evaluate({**models, "policy": models["reference"]}, 0)
  rows = {"sft (before)": before, f"{label} (after)": summary.eval}
  curves = {label: logs.read_metrics(workdir, "eval")}
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
  paths.write_json(os.path.join(workdir, "summary.json"), {"loss": label, "beta": config.method.beta,
                                                          "before": before, "after": summary.eval}, indent=2)
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
