"""TDPO2 alpha sweep (TDPO paper: alpha weights the KL margin; the official default is 0.5).

  python experiments/ablations/tdpo_alpha.py --out runs/ablations/tdpo_alpha [--alphas 0.1,0.5,1.0,2.0] [--seeds 0]

Runs TDPO2 at beta 0.1 for each alpha with launch/sweep.py (the main job's
cached SFT base and pairs), then writes ``alpha.md`` (gold reward, sequence
KL, chosen/rejected KL and margin, pair accuracy, entropy, distinct-2 per
alpha, mean over seeds) and ``alpha.png`` (reward and KL against alpha).
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

COLUMNS = ("sample/reward", "sample/kl_ref", "kl/chosen", "kl/rejected", "kl/margin", "rewards/accuracies",
           "sample/entropy", "sample/distinct2")


def alpha_sweep(config: str, out: str, alphas: str, seeds: str, steps: int, sets: list[str], columns,
                xlabel: str, xscale: str, skip_runs: bool = False, field: str = "method.alpha"):
  """One config ``field`` (default ``method.alpha``) over ``alphas`` x ``seeds`` with launch/sweep.py
  (``config``, fields ``sets``), then ``out/<name>.md`` (``columns`` per value, mean over seeds) and
  ``out/<name>.png`` (reward and KL against it), ``name`` the field's last part. Shared by the TDPO2
  and REDI alpha ablations and AlignDistil's beta2 sweep."""
  name = field.split(".")[-1]
  if not skip_runs:
    sweep.main(["--config", config, "--out", out, "--grid", f"{field}=" + alphas, "--seeds", seeds,
                "--set", f"total_steps={steps}"] + [x for s in sets for x in ("--set", s)])
  with open(os.path.join(out, "results.jsonl")) as f:
    results = [r for r in map(json.loads, f) if r.get("exit") == 0 and "sample/reward" in r]
  groups = collections.defaultdict(list)
  for r in results:
    groups[float(r[field])].append(r)
  rows = {alpha: {c: sum(r[c] for r in rs) / len(rs) for c in columns} | {"seeds": len(rs)}
          for alpha, rs in sorted(groups.items())}
  lines = [f"| {name} | seeds | " + " | ".join(c.split("/")[-1] for c in columns) + " |",
           "|" + " --- |" * (len(columns) + 2)]
  for alpha, row in rows.items():
    lines.append(f"| {alpha} | {row['seeds']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  xs = list(rows)
  ax.plot(xs, [rows[x]["sample/reward"] for x in xs], "-o", color="tab:blue", label="gold reward")
  ax.set(xlabel=xlabel, ylabel="gold reward", xscale=xscale)
  ax2 = ax.twinx()
  ax2.plot(xs, [rows[x]["sample/kl_ref"] for x in xs], "-s", color="tab:red", label="seq. KL")
  ax2.set_ylabel("sequence KL(policy || reference)")
  fig.legend(loc="upper center", ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/tdpo_alpha")
  p.add_argument("--alphas", default="0.1,0.5,1.0,2.0")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  a = p.parse_args(argv)
  alpha_sweep(os.path.join(REPO, "experiments", "tdpo.py"), a.out, a.alphas, a.seeds, a.steps,
              ["method.loss=tdpo2", "compare_with="], COLUMNS, "alpha (TDPO2, beta 0.1)", "log", a.skip_runs)


if __name__ == "__main__":
  main()
