"""SparsePO ablation: how sparse the learned masks get as beta changes (SparsePO
paper: mask sparsity analysis), shared and independent masks.

  python experiments/ablations/sparsepo_sparsity.py --out runs/ablations/sparsepo_frontier \\
      [--betas 0.05,0.1,0.3,0.8] [--seeds 0] [--steps 400] [--shared True,False] [--set ...]

Runs the learned-mask sweep of experiments/ablations/sparsepo_frontier.py
(the same run names, so an ``--out`` shared with the frontier reuses its
finished runs), then writes ``sparsity.md`` and ``sparsity.png``: the fraction
of exact zeros of ``w_u`` (and ``w_d``), the mean weight on gold
reward-bearing tokens and on the others, and the AUROC, all on the held-out
pairs at the last step, against beta.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sparsepo_frontier as frontier  # noqa: E402

RESULTS = "sparsity_results.jsonl"


def table(results, path):
  groups = collections.defaultdict(list)
  for r in results:
    if r.get("exit") == 0 and "mask/u_zero" in r:
      groups[(r["method"], float(r["method.beta"]))].append(r)
  m, f = frontier.mean, frontier.fmt
  lines = ["| mask | beta | seeds | zeros w_u | zeros w_d | mean w_u | w_u gold / other | w_d gold / other | "
           "AUROC w_u | AUROC w_d | gold reward | seq. KL |", "|" + " --- |" * 12]
  for (method, beta), rs in sorted(groups.items()):
    lines.append(f"| {method} | {beta} | {len(rs)} | {f(m(rs, 'mask/u_zero'), '.3f')} | "
                 f"{f(m(rs, 'mask/d_zero'), '.3f')} | {f(m(rs, 'mask/u_mean'), '.3f')} | "
                 f"{f(m(rs, 'mask/u_gold'), '.3f')} / {f(m(rs, 'mask/u_other'), '.3f')} | "
                 f"{f(m(rs, 'mask/d_gold'), '.3f')} / {f(m(rs, 'mask/d_other'), '.3f')} | "
                 f"{f(m(rs, 'mask/auroc_u'), '.3f')} | {f(m(rs, 'mask/auroc_d'), '.3f')} | "
                 f"{m(rs, 'sample/reward'):.3f} | {m(rs, 'sample/kl_ref'):.2f} |")
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return groups


def plot(groups, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for method in sorted({k[0] for k in groups}):
    betas = sorted(b for (mm, b) in groups if mm == method)
    get = lambda key: [frontier.mean(groups[(method, b)], key) for b in betas]
    c = frontier.COLORS[method]
    axes[0].plot(betas, get("mask/u_zero"), "-o", color=c, label=f"{method} w_u")
    axes[1].plot(betas, get("mask/u_gold"), "-o", color=c, label=f"{method} w_u gold")
    axes[1].plot(betas, get("mask/u_other"), "--o", color=c, label=f"{method} w_u other")
    axes[2].plot(betas, get("mask/auroc_u"), "-o", color=c, label=f"{method} w_u")
    if method == "sparsepo-indep":
      axes[0].plot(betas, get("mask/d_zero"), ":s", color=c, label=f"{method} w_d")
      axes[2].plot(betas, get("mask/auroc_d"), ":s", color=c, label=f"{method} w_d")
  for ax, title in zip(axes, ("fraction of zero weights", "mean weight (gold vs other tokens)",
                              "AUROC vs gold reward-bearing tokens")):
    ax.set(xscale="log", xlabel="beta", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[2].axhline(0.5, color="grey", lw=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/sparsepo_frontier")
  p.add_argument("--betas", default="0.05,0.1,0.3,0.8")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--shared", default="True,False", help="learned-mask variants: True (shared), False (independent)")
  p.add_argument("--set", action="append", default=[], help="field=value for every run (repeatable)")
  p.add_argument("--smoke", action="store_true", help="the :smoke presets (tiny; for tests)")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  a = p.parse_args(argv)
  results = (frontier.load(a.out, RESULTS) if a.skip_runs else
             frontier.run_sweeps(a.out, a.betas, a.seeds, a.steps, "", a.set, shared=a.shared, smoke=a.smoke, mapo=False,
                                 results_name=RESULTS))
  groups = table(results, os.path.join(a.out, "sparsity.md"))
  plot(groups, os.path.join(a.out, "sparsity.png"))
  print(f"wrote {a.out}/sparsity.md, sparsity.png, {RESULTS}")


if __name__ == "__main__":
  main()
