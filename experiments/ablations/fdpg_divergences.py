"""f-DPG ablation: divergence (forward KL = DPG, reverse KL, total variation,
Jensen-Shannon) x target (pointwise, distributional, RLHF), f-DPG paper
(Go et al. 2023), Tables 1-2 / Figure 2 in the controlled setting.

  python experiments/ablations/fdpg_divergences.py --out runs/ablations/fdpg \\
      [--targets pointwise,distributional,rlhf] [--divergences fkl,rkl,tv,js] [--seeds 0] [--steps 300]

Runs the grid with launch/sweep.py (each run: experiments/fdpg.py from the
shared, cached SFT base), then writes ``table.md`` (final held-out metrics,
mean over seeds) and ``curves.png`` (alignment, TV to the target and
distinct-2 over training, one row per target, one line per divergence).
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

COLORS = {"fkl": "tab:blue", "rkl": "tab:red", "tv": "tab:green", "js": "tab:purple"}
COLUMNS = (("sample/alignment", "alignment", 3), ("sample/target/kl_target_policy", "KL(p||pi)", 3),
           ("sample/target/kl_policy_target", "KL(pi||p)", 3), ("sample/target/tv", "TV", 3),
           ("sample/target/js", "JS", 4), ("sample/kl_base", "KL(pi||a)", 3), ("sample/entropy", "entropy", 3),
           ("sample/distinct2", "distinct-2", 3), ("sample/self_bleu", "self-BLEU", 3))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/fdpg")
  p.add_argument("--targets", default="pointwise,distributional,rlhf")
  p.add_argument("--divergences", default="fkl,rkl,tv,js")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plots")
  a = p.parse_args(argv)
  if not a.skip_runs:
    sweep.main(["--config", os.path.join(REPO, "experiments", "fdpg.py"), "--out", a.out,
                "--grid", "method.target=" + a.targets, "--grid", "method.divergence=" + a.divergences,
                "--seeds", a.seeds, "--set", f"total_steps={a.steps}"])
  with open(os.path.join(a.out, "results.jsonl")) as f:
    results = [json.loads(l) for l in f]
  table(results, os.path.join(a.out, "table.md"))
  plots(results, a.out, a.targets.split(","), a.divergences.split(","))


def table(results, path):
  groups = collections.defaultdict(list)
  for r in results:
    if r.get("exit", 0) == 0 and "sample/alignment" in r:
      groups[(r["method.target"], r["method.divergence"])].append(r)
  lines = ["| target | divergence | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
           "|" + " --- |" * (3 + len(COLUMNS))]
  mean = lambda rs, k: sum(float(r[k]) for r in rs) / len(rs)   # KL(pi||p) may be "inf" (pointwise)
  done = set()
  for (target, div), rs in sorted(groups.items()):
    if target not in done:       # the base model's row, from the report's "before"
      done.add(target)
      b = rs[0].get("before")
      if b:
        lines.append(f"| {target} | base a | - | " + " | ".join(f"{float(b[k]):.{d}f}" for k, _, d in COLUMNS) + " |")
    lines.append(f"| {target} | {div} | {len(rs)} | " + " | ".join(f"{mean(rs, k):.{d}f}" for k, _, d in COLUMNS) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def plots(results, out, targets, divergences):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = (("sample/alignment", "alignment"), ("sample/target/tv", "TV(p, pi)"), ("sample/distinct2", "distinct-2"))
  fig, axes = plt.subplots(len(targets), len(keys), figsize=(4.2 * len(keys), 3.2 * len(targets)), squeeze=False)
  for i, target in enumerate(targets):
    for r in results:
      path = os.path.join(out, r["name"], "metrics.jsonl")
      if r.get("exit", 0) != 0 or r["method.target"] != target or not os.path.exists(path):   # failed or not run
        continue
      with open(path) as f:
        ev = [json.loads(l) for l in f if '"split": "eval"' in l and "sample/alignment" in l]
      before = r.get("before", {})
      div = r["method.divergence"]
      for j, (k, label) in enumerate(keys):
        ax = axes[i][j]
        xs = [0] + [e["step"] for e in ev]
        ys = [before.get(k, float("nan"))] + [e[k] for e in ev]
        first = div not in ax.get_legend_handles_labels()[1]
        ax.plot(xs, ys, "-o", ms=2.5, color=COLORS.get(div), alpha=0.8, label=div if first else None)
        ax.set(title=f"{target}: {label}", xlabel="step")
        ax.grid(alpha=0.3)
    axes[i][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
