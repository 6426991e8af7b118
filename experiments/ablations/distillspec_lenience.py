"""DistillSpec ablation: lossy speculative decoding, quality vs latency as the
lenience varies (DistillSpec paper, lenience figure).

  python experiments/ablations/distillspec_lenience.py \\
      --run runs/ablations/distillspec/divergence=tvd_data=student_seed=0 \\
      --out runs/ablations/distillspec_lenience [--leniences 1,0.5,0.2,0.1,0.05] [--gamma 3]

For the undistilled and the distilled draft of a finished
``experiments/distillspec.py`` run, speculative sampling (temperature
``eval.temperature``) with acceptance ``min(1, p / (eps q))`` for each lenience
eps (1 = lossless), each held-out prompt decoded alone (batch 1): time per
token (median of ``--repeats`` rounds) and, of the outputs, the gold reward,
the target's per-token NLL of the response (how far the output drifts from
the target's distribution) and tokens per target call. Plain target and plain
draft sampling are the two ends. Writes ``lenience.md``, ``lenience.png``
and ``results.jsonl`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", default="runs/ablations/distillspec/divergence=tvd_data=student_seed=0")
  p.add_argument("--out", default="runs/ablations/distillspec_lenience")
  p.add_argument("--leniences", default="1,0.5,0.2,0.1,0.05")
  p.add_argument("--gamma", type=int, default=3)
  p.add_argument("--prompts", type=int, default=96)
  p.add_argument("--repeats", type=int, default=2)
  a = p.parse_args(argv)

  import jax
  import ml_collections
  import numpy as np

  from jaxopd.data import suite as suite_lib
  from jaxopd.evaluation import compiled
  from jaxopd.methods import distillspec as ds
  from jaxopd.models import table
  with open(os.path.join(a.run, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  suite = suite_lib.ensure(config.data, verbose=False)
  target = ds.on_one_device(table.load_model(config.models.target.init, "target")[0])
  drafts = {"draft_sft": table.load_model(config.models.draft.init, "draft")[0],
            "distilled": ds.load_model(a.run, source="draft")}
  config.eval.num_prompts = a.prompts
  prompt, plen = ds._eval_prompts(suite, config)
  cfg = ds._scfg(config, suite, False)
  leniences = [float(x) for x in a.leniences.split(",")]
  calls = {("target",): ds.sample_call(target, cfg)}
  for name, d in drafts.items():
    calls[(name,)] = ds.sample_call(ds.on_one_device(d), cfg)
    for eps in leniences:
      calls[(name, eps)] = ds.sd_call(target, ds.on_one_device(d), cfg, a.gamma, eps)
  timed = ds.time_per_token(calls, prompt, plen, jax.random.PRNGKey(config.seed + 3), a.repeats)

  reward_fn = suite_lib.gold_reward_fn(suite)
  nll_fn = compiled(ds.nll_sums, (), target)   # the target's NLL of each decoder's samples
  t_ms = timed[("target",)][0]
  results = []
  for key, (ms, outs) in timed.items():
    reward, nll, n = [], 0.0, 0
    for o in outs:
      reward.append(float(reward_fn(np.asarray(o.tokens), np.asarray(o.loss_mask))[0]))
      nll += float(nll_fn(o.tokens, o.loss_mask)[0])
      n += int(np.sum(o.loss_mask))
    r = {"decoder": key[0] if len(key) == 1 else f"SD {key[0]}", "draft": key[0] if key[0] != "target" else None,
         "lenience": key[1] if len(key) > 1 else None, "ms_per_token": ms, "speedup": t_ms / ms,
         "reward": float(np.mean(reward)), "reward_se": float(np.std(reward) / np.sqrt(len(reward))),
         "target_nll": nll / max(n, 1), "length": n / len(outs)}
    if len(key) > 1:
      acc, blocks = (sum(int(np.sum(getattr(o, f))) for o in outs) for f in ("accepted", "blocks"))
      r["tau"] = (acc + blocks) / max(blocks, 1)
    results.append(r)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "results.jsonl"), "w") as f:
    for r in results:
      f.write(json.dumps(r) + "\n")
  lines = ["| decoder | lenience | tokens per target call | ms / token | speed-up vs target | gold reward | "
           "target NLL of output (nats/token) |", "|" + " --- |" * 7]
  for r in results:
    lines.append(f"| {r['decoder']} | {r['lenience'] if r['lenience'] is not None else '-'} | "
                 f"{r.get('tau', float('nan')):.2f} | {r['ms_per_token']:.3f} | {r['speedup']:.2f} | "
                 f"{r['reward']:.3f} ± {r['reward_se']:.3f} | {r['target_nll']:.3f} |")
  lines += ["", f"gamma = {a.gamma}, temperature {cfg.temperature}, {len(prompt)} held-out prompts decoded one by "
            f"one, median of {a.repeats} timing rounds; run {a.run}."]
  with open(os.path.join(a.out, "lenience.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  plot(results, os.path.join(a.out, "lenience.png"))


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
  colors = {"draft_sft": "tab:gray", "distilled": "tab:blue"}
  for ax, x, key, xlabel, label in (
      (axes[0], "tau", "target_nll", "tokens per target call", "target NLL of the output (nats/token)"),
      (axes[1], "ms_per_token", "target_nll", "ms per token (batch 1)", "target NLL of the output (nats/token)"),
      (axes[2], "ms_per_token", "reward", "ms per token (batch 1)", "gold reward of the output")):
    for draft, color in colors.items():
      rs = [r for r in results if r["draft"] == draft and r["lenience"] is not None]
      ax.plot([r[x] for r in rs], [r[key] for r in rs], "-o", color=color, label=f"SD, {draft}")
      for r in rs:
        ax.annotate(f"ε={r['lenience']:g}", (r[x], r[key]), fontsize=7)
      if x == "ms_per_token":
        plain = next(r for r in results if r["decoder"] == draft)
        ax.scatter([plain[x]], [plain[key]], marker="x", color=color, s=60, label=f"{draft} alone")
    t = next(r for r in results if r["decoder"] == "target")
    ax.scatter([t[x] if x == "ms_per_token" else 1.0], [t[key]], marker="*", color="tab:red", s=120,
               label="target alone")
    ax.set(xlabel=xlabel, ylabel=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("lossy speculative sampling: quality vs latency as the lenience ε varies")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
