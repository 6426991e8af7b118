"""TDPO ablations: the reward-KL frontier of DPO, TDPO1 and TDPO2 over beta
(and seeds), and the sequential KL of chosen vs rejected responses over
training (TDPO paper, IMDb figure and its KL analysis).

  python experiments/ablations/tdpo_frontier.py --out runs/ablations/tdpo_frontier \\
      [--betas 0.05,0.1,0.3] [--seeds 0] [--steps 400]

Runs the grid with launch/sweep.py (each run is the main job's TDPO stage with
the shared, cached SFT base and preference pairs; seeds other than 0 sample
their own pairs), then writes ``frontier.md`` (table), ``frontier.png``
(gold reward vs sequence KL to the reference, one point per eval of every
run, final points marked) and ``kl_curves.png`` (held-out chosen/rejected
sequential KL over training for beta = the middle value).
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

LOSSES = ("dpo", "tdpo1", "tdpo2")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/tdpo_frontier")
  p.add_argument("--betas", default="0.05,0.1,0.3")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plots")
  a = p.parse_args(argv)
  config = os.path.join(REPO, "experiments", "tdpo.py")
  if not a.skip_runs:
    sweep.main(["--config", config, "--out", a.out, "--grid", "method.loss=" + ",".join(LOSSES),
                "--grid", "method.beta=" + a.betas, "--seeds", a.seeds, "--set", f"total_steps={a.steps}",
                "--set", "compare_with="])
  with open(os.path.join(a.out, "results.jsonl")) as f:
    results = [json.loads(l) for l in f]
  table(results, os.path.join(a.out, "frontier.md"))
  plots(results, a.out, a.betas.split(",")[len(a.betas.split(",")) // 2])


def table(results, path):
  groups = collections.defaultdict(list)
  for r in results:
    if r.get("exit") == 0 and "sample/reward" in r:
      groups[(r["method.loss"], float(r["method.beta"]))].append(r)
  lines = ["| loss | beta | seeds | gold reward | seq. KL(pi||ref) | KL chosen | KL rejected | KL margin | "
           "pair accuracy | distinct-2 |", "|" + " --- |" * 10]
  mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
  for (loss, beta), rs in sorted(groups.items()):
    lines.append(f"| {loss} | {beta} | {len(rs)} | {mean(rs, 'sample/reward'):.3f} | {mean(rs, 'sample/kl_ref'):.2f} | "
                 f"{mean(rs, 'kl/chosen'):.2f} | {mean(rs, 'kl/rejected'):.2f} | {mean(rs, 'kl/margin'):.2f} | "
                 f"{mean(rs, 'rewards/accuracies'):.3f} | {mean(rs, 'sample/distinct2'):.3f} |")
  before = next((r["before"] for r in results if "before" in r), None)
  if before:
    lines.append(f"| SFT (before) | - | - | {before['sample/reward']:.3f} | 0 | - | - | - | - | "
                 f"{before['sample/distinct2']:.3f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def plots(results, out, mid_beta):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = dict(zip(LOSSES, ("tab:orange", "tab:green", "tab:blue")))
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for r in results:
    if r.get("exit") != 0:
      continue
    with open(os.path.join(out, r["name"], "metrics.jsonl")) as f:
      ev = [json.loads(l) for l in f if '"split": "eval"' in l and "sample/reward" in l]
    loss = r["method.loss"]
    ax.plot([e["sample/kl_ref"] for e in ev], [e["sample/reward"] for e in ev], "-", color=colors[loss],
            alpha=0.35, lw=1)
    ax.scatter([ev[-1]["sample/kl_ref"]], [ev[-1]["sample/reward"]], color=colors[loss], s=30,
               label=loss if loss not in ax.get_legend_handles_labels()[1] else None)
    ax.annotate(f"β={r['method.beta']}", (ev[-1]["sample/kl_ref"], ev[-1]["sample/reward"]), fontsize=7)
  ax.set(xlabel="sequence KL(policy || reference), held-out samples", ylabel="gold reward",
         title="reward vs KL (lines: training; dots: final)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "frontier.png"), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(LOSSES), figsize=(12, 3.6), sharey=True)
  for ax, loss in zip(axes, LOSSES):
    for r in results:
      if r.get("exit") != 0 or r["method.loss"] != loss or str(r["method.beta"]) != mid_beta:
        continue
      with open(os.path.join(out, r["name"], "metrics.jsonl")) as f:
        ev = [json.loads(l) for l in f if '"split": "eval"' in l and "kl/chosen" in l]
      steps = [e["step"] for e in ev]
      ax.plot(steps, [e["kl/chosen"] for e in ev], "-o", color="tab:green", label="chosen", ms=3)
      ax.plot(steps, [e["kl/rejected"] for e in ev], "-o", color="tab:red", label="rejected", ms=3)
    ax.set(title=f"{loss} (β={mid_beta})", xlabel="step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("sequential KL on held-out pairs")
  handles, labels = axes[0].get_legend_handles_labels()
  axes[0].legend(handles[:2], labels[:2])
  fig.tight_layout()
  fig.savefig(os.path.join(out, "kl_curves.png"), dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
