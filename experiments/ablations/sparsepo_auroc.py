"""SparsePO ablation: the masks as detectors of the gold reward-bearing tokens
over training (the controlled task knows them; the paper can only inspect its
masks qualitatively).

  python experiments/ablations/sparsepo_auroc.py --out runs/ablations/sparsepo_frontier \\
      [--beta 0.1] [--seeds 0] [--steps 400] [--eval_every 50]

Runs learned (shared, independent) and MaPO masks with an eval every
``--eval_every`` steps (the frontier's run names: with ``--set
eval_every=50`` there, the frontier's runs are reused), then writes
``auroc.md`` and ``auroc.png``: AUROC of ``w_u`` (and ``w_d``) on the
held-out pairs' response tokens, and the mean weight on gold vs other tokens,
against the training step. MaPO's mask is a fixed function of the reference,
so its AUROC is flat.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sparsepo_frontier as frontier  # noqa: E402

RESULTS = "auroc_results.jsonl"


def curves(out, results):
  by = collections.defaultdict(list)
  for r in results:
    ev = frontier.evals(out, r, "mask/auroc_u") if r.get("exit") == 0 else []
    if ev:
      by[r["method"]].append(ev)
  return by


def table(by, path):
  steps = sorted({e["step"] for runs in by.values() for ev in runs for e in ev})
  cols = [(m, k) for m in frontier.COLORS if m in by for k in ("u", "d")
          if any(f"mask/auroc_{k}" in e for ev in by[m] for e in ev)]
  lines = ["| step | " + " | ".join(f"{m} AUROC w_{k}" for m, k in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
  for s in steps:
    row = []
    for m, k in cols:
      vals = [e[f"mask/auroc_{k}"] for ev in by[m] for e in ev if e["step"] == s]
      row.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
    lines.append(f"| {s} | " + " | ".join(row) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def plot(by, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for method, runs in by.items():
    c = frontier.COLORS[method]
    for i, ev in enumerate(runs):
      steps = [e["step"] for e in ev]
      lab = (lambda s: s) if i == 0 else (lambda s: None)
      axes[0].plot(steps, [e["mask/auroc_u"] for e in ev], "-o", color=c, ms=3, label=lab(f"{method} w_u"))
      if "mask/auroc_d" in ev[0]:
        axes[0].plot(steps, [e["mask/auroc_d"] for e in ev], ":s", color=c, ms=3, label=lab(f"{method} w_d"))
      if "mask/u_gold" in ev[0]:
        axes[1].plot(steps, [e["mask/u_gold"] for e in ev], "-o", color=c, ms=3, label=lab(f"{method} gold"))
        axes[1].plot(steps, [e["mask/u_other"] for e in ev], "--", color=c, label=lab(f"{method} other"))
  axes[0].axhline(0.5, color="grey", lw=0.8)
  axes[0].set(xlabel="step", ylabel="AUROC (held-out response tokens)", title="mask vs gold reward-bearing tokens")
  axes[1].set(xlabel="step", ylabel="mean w_u", title="mean weight: gold (solid) vs other (dashed)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/sparsepo_frontier")
  p.add_argument("--beta", default="0.1")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--eval_every", type=int, default=50)
  p.add_argument("--set", action="append", default=[], help="field=value for every run (repeatable)")
  p.add_argument("--smoke", action="store_true", help="the :smoke presets (tiny; for tests)")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  a = p.parse_args(argv)
  results = (frontier.load(a.out, RESULTS) if a.skip_runs else
             frontier.run_sweeps(a.out, a.beta, a.seeds, a.steps, "", a.set + [f"eval_every={a.eval_every}"],
                                 smoke=a.smoke, results_name=RESULTS))
  by = curves(a.out, results)
  table(by, os.path.join(a.out, "auroc.md"))
  plot(by, os.path.join(a.out, "auroc.png"))
  print(f"wrote {a.out}/auroc.md, auroc.png, {RESULTS}")


if __name__ == "__main__":
  main()
