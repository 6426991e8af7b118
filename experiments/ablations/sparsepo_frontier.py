"""SparsePO ablation: the reward-KL frontier of SparsePO (learned mask, shared and
independent), MaPO, TDPO (1 and 2) and DPO over beta (SparsePO paper, IMDb
sentiment-control figure), with the masks scored against the gold
reward-bearing tokens.

  python experiments/ablations/sparsepo_frontier.py --out runs/ablations/sparsepo_frontier \\
      [--betas 0.1] [--seeds 0] [--steps 400] [--baselines dpo,tdpo1,tdpo2]

Three sweeps (launch/sweep.py) into ``OUT/learned``, ``OUT/mapo`` and
``OUT/baselines``, all on the main job's cached SFT base and preference pairs;
then ``OUT/results.jsonl`` (every run, with a ``method`` field),
``OUT/frontier.md`` (table) and ``OUT/frontier.png`` (gold reward vs sequence
KL to the reference over training, final points marked).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "launch"))

import sweep  # noqa: E402

COLORS = {"sparsepo-shared": "tab:purple", "sparsepo-indep": "tab:pink", "mapo": "tab:brown",
          "tdpo1": "tab:green", "tdpo2": "tab:blue", "dpo": "tab:orange"}


def method_of(r: dict) -> str:
  if "method.loss" in r:
    return r["method.loss"]
  if r.get("method.mask") == "mapo" or r.get("sweep") == "mapo":
    return "mapo"
  return "sparsepo-shared" if str(r.get("method.shared")) == "True" else "sparsepo-indep"


def run_sweeps(out, betas, seeds, steps, baselines, extra=(), shared="True,False", smoke=False, mapo=True,
               results_name="results.jsonl"):
  """The sweeps (learned masks ``shared`` in True/False, MaPO, the ``baselines``) into ``out``; returns every
  run's record with ``method`` and ``dir`` added, also written to ``out/results_name``. Finished runs are
  not retrained (the sweep resumes them), so the ablations can share one ``out``."""
  sp = os.path.join(REPO, "experiments", "sparsepo.py")
  fixed = ["--set", f"total_steps={steps}"] + [x for s in extra for x in ("--set", s)]
  suffix = ":smoke" if smoke else ""
  plans = [("learned", sp + suffix, ["--grid", "method.shared=" + shared])] if shared else []
  if mapo:
    plans.append(("mapo", sp + (":smoke,mapo" if smoke else ":mapo"), []))
  if baselines:
    plans.append(("baselines", os.path.join(REPO, "experiments", "tdpo.py") + suffix,
                  ["--grid", "method.loss=" + baselines, "--set", "compare_with="]))
  results = []
  for name, config, grid in plans:
    sub = os.path.join(out, name)
    sweep.main(["--config", config, "--out", sub, "--grid", "method.beta=" + betas, "--seeds", seeds]
               + grid + fixed)
    with open(os.path.join(sub, "results.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        r["sweep"] = name
        r["method"] = method_of(r)
        r["dir"] = os.path.join(name, r["name"])
        results.append(r)
  with open(os.path.join(out, results_name), "w") as f:
    for r in results:
      f.write(json.dumps(r) + "\n")
  return results


def load(out, results_name="results.jsonl"):
  with open(os.path.join(out, results_name)) as f:
    return [json.loads(l) for l in f]


def mean(rs, k):
  vals = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
  return sum(vals) / len(vals) if vals else float("nan")


def fmt(x, spec):
  return "-" if x != x else format(x, spec)


def table(results, path):
  groups = collections.defaultdict(list)
  for r in results:
    if r.get("exit") == 0 and "sample/reward" in r:
      groups[(r["method"], float(r["method.beta"]))].append(r)
  order = list(COLORS)
  lines = ["| method | beta | seeds | gold reward | seq. KL(pi||ref) | KL chosen | KL rejected | KL margin | "
           "pair accuracy | distinct-2 | mask zeros (u/d) | mask on gold / other (u) | AUROC u / d |",
           "|" + " --- |" * 13]
  for (method, beta), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
    zeros = fmt(mean(rs, "mask/u_zero"), ".3f") + ("" if "mask/d_zero" not in rs[0] else
                                                   " / " + fmt(mean(rs, "mask/d_zero"), ".3f"))
    gold = (fmt(mean(rs, "mask/u_gold"), ".3f") + " / " + fmt(mean(rs, "mask/u_other"), ".3f")
            if "mask/u_gold" in rs[0] else "-")
    auc = fmt(mean(rs, "mask/auroc_u"), ".3f") + ("" if "mask/auroc_d" not in rs[0] else
                                                  " / " + fmt(mean(rs, "mask/auroc_d"), ".3f"))
    if "mask/u_zero" not in rs[0]:
      zeros, auc = "-", "-"
    lines.append(f"| {method} | {beta} | {len(rs)} | {mean(rs, 'sample/reward'):.3f} | "
                 f"{mean(rs, 'sample/kl_ref'):.2f} | {mean(rs, 'kl/chosen'):.2f} | {mean(rs, 'kl/rejected'):.2f} | "
                 f"{mean(rs, 'kl/margin'):.2f} | {mean(rs, 'rewards/accuracies'):.3f} | "
                 f"{mean(rs, 'sample/distinct2'):.3f} | {zeros} | {gold} | {auc} |")
  before = next((r["before"] for r in results if "before" in r), None)
  if before:
    lines.append(f"| SFT (before) | - | - | {before['sample/reward']:.3f} | 0 | - | - | - | - | "
                 f"{before['sample/distinct2']:.3f} | - | - | - |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def evals(out, r, key="sample/reward"):
  with open(os.path.join(out, r["dir"], "metrics.jsonl")) as f:
    return [e for e in (json.loads(l) for l in f) if e.get("split") == "eval" and key in e]


def plot(results, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.8))
  for r in results:
    if r.get("exit") != 0:
      continue
    ev = evals(out, r)
    if not ev:
      continue
    c = COLORS[r["method"]]
    ax.plot([e["sample/kl_ref"] for e in ev], [e["sample/reward"] for e in ev], "-", color=c, alpha=0.35, lw=1)
    ax.scatter([ev[-1]["sample/kl_ref"]], [ev[-1]["sample/reward"]], color=c, s=30,
               label=r["method"] if r["method"] not in ax.get_legend_handles_labels()[1] else None)
    ax.annotate(f"β={r['method.beta']}", (ev[-1]["sample/kl_ref"], ev[-1]["sample/reward"]), fontsize=7)
  ax.set(xlabel="sequence KL(policy || reference), held-out samples", ylabel="gold reward",
         title="reward vs KL (lines: training; dots: final)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "frontier.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/sparsepo_frontier")
  p.add_argument("--betas", default="0.1")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--baselines", default="dpo,tdpo1,tdpo2", help="experiments/tdpo.py losses ('' = none)")
  p.add_argument("--set", action="append", default=[], help="field=value for every run (repeatable)")
  p.add_argument("--smoke", action="store_true", help="the :smoke presets (tiny; for tests)")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  a = p.parse_args(argv)
  results = load(a.out) if a.skip_runs else run_sweeps(a.out, a.betas, a.seeds, a.steps, a.baselines, a.set,
                                                        smoke=a.smoke)
  table(results, os.path.join(a.out, "frontier.md"))
  plot(results, a.out)
  print(f"wrote {a.out}/frontier.md, frontier.png, results.jsonl")


if __name__ == "__main__":
  main()
