"""AlignDistil ablation: the teacher variants (adaptive = AlignDistil, contrast, theorem1,
gkd-to-DPO) on-policy and off-policy, against DPO and TDPO2 (AlignDistil paper, Tables 1-2
and the convergence figure), on the controlled reviews task.

  python experiments/ablations/aligndistil_variants.py --out runs/ablations/aligndistil \\
      [--variants adaptive,contrast,theorem1,gkd] [--data on_policy,off_policy] [--seeds 0] [--steps 400] \\
      [--set data.data_dir=... --set sft.workdir=...]

One sweep (launch/sweep.py) per variant x data (each its own preset, so theorem1 / gkd build
no reverse DPO model and off_policy takes the official beta2 = 10), every run on the same
cached SFT base, pairs, DPO and reverse-DPO stages (the first run trains them); a TDPO2
sweep as the baseline; DPO is the DPO stage itself (experiments/tdpo.py:dpo, 400 steps).
Writes ``OUT/results.jsonl``, ``OUT/variants.md`` (final gold reward, sequence KL to the
SFT reference, entropy, distinct-2, the adaptive coefficient's mean / max / fraction above
10; mean ± standard deviation over seeds) and ``OUT/variants.png`` (reward against KL, and
reward against step, over training).
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

COLORS = {"adaptive": "tab:red", "contrast": "tab:purple", "theorem1": "tab:green", "gkd": "tab:brown",
          "dpo": "tab:orange", "tdpo2": "tab:blue"}


def run_sweeps(out, variants, data, seeds, steps, extra):
  fixed = ["--set", f"total_steps={steps}"] + [x for s in extra for x in ("--set", s)]
  ad = os.path.join(REPO, "experiments", "aligndistil.py")
  results = []
  plans = [(f"{v}_{d}", f"{ad}:{v},{d}", v, d) for d in data for v in variants]
  plans.append(("tdpo2", os.path.join(REPO, "experiments", "tdpo.py") + ":tdpo2", "tdpo2", "offline"))
  for name, config, method, kind in plans:
    sub = os.path.join(out, name)
    args = ["--config", config, "--out", sub, "--seeds", seeds] + fixed
    if method == "tdpo2":   # the TDPO config has no AlignDistil stages
      args = ["--config", config, "--out", sub, "--seeds", seeds, "--set", f"total_steps={steps}",
              "--set", "compare_with="] + [x for s in extra if s.split("=")[0] in ("data.data_dir", "sft.workdir")
                                           for x in ("--set", s)]
    sweep.main(args)
    with open(os.path.join(sub, "results.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        r.update(method=method, data=kind, dir=os.path.join(name, r["name"]))
        results.append(r)
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    for r in results:
      f.write(json.dumps(r) + "\n")
  return results


def evals(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [e for e in map(json.loads, f) if e.get("split") == "eval" and "sample/reward" in e]


def dpo_stage(out, results):
  """The DPO stage's run (its final sampled evaluation), read from a finished AlignDistil run's config."""
  for r in results:
    if r["method"] in ("adaptive", "contrast", "theorem1", "gkd") and r.get("exit") == 0:
      with open(os.path.join(out, r["dir"], "config.json")) as f:
        path = json.load(f)["models"]["dpo"]["init"][len("run:"):].split(":")[0]   # the DPO stage's directory
      ev = evals(path)
      if ev:
        return {"method": "dpo", "data": "offline", "path": path, **ev[-1]}
  return None


def table(results, dpo, path):
  groups = collections.defaultdict(list)
  for r in results:
    if r.get("exit") == 0 and "sample/reward" in r:
      groups[(r["method"], r["data"])].append(r)
  if dpo:
    groups[("dpo", "offline")].append(dpo)
  cols = [("sample/reward", "gold reward", ".3f"), ("sample/kl_ref", "seq. KL(pi||ref)", ".2f"),
          ("sample/entropy", "entropy", ".3f"), ("sample/distinct2", "distinct-2", ".3f"),
          ("coef/mean", "c mean", ".2f"), ("coef/max", "c max", ".1f"), ("coef/above_10", "c > 10", ".3f")]
  lines = ["| method | data | seeds | " + " | ".join(c[1] for c in cols) + " |", "|" + " --- |" * (len(cols) + 3)]
  order = list(COLORS)
  for (method, kind), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
    cells = []
    for key, _, spec in cols:
      v, sd = sweep.seed_stats(rs, key)
      cells.append("-" if v != v else format(v, spec) + ("" if sd != sd or key.startswith("coef/") else
                                                          f" ± {format(sd, spec)}"))
    lines.append(f"| {method} | {kind} | {len(rs)} | " + " | ".join(cells) + " |")
  before = next((r["before"] for r in results if "before" in r), None)
  if before:
    lines.append(f"| SFT (before) | - | - | {before['sample/reward']:.3f} | 0 | {before['sample/entropy']:.3f} | "
                 f"{before['sample/distinct2']:.3f} | - | - | - |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def plot(results, dpo, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  curves = [(r["method"], r["data"], evals(os.path.join(out, r["dir"]))) for r in results if r.get("exit") == 0]
  if dpo:
    curves.append(("dpo", "offline", evals(dpo["path"])))
  seen = set()
  for method, kind, ev in curves:
    if not ev:
      continue
    label = f"{method} ({kind})"
    style = "--" if kind == "off_policy" else "-"
    kw = dict(color=COLORS[method], label=None if label in seen else label)
    seen.add(label)
    axes[0].plot([e["sample/kl_ref"] for e in ev], [e["sample/reward"] for e in ev], style, marker="o", ms=3, **kw)
    axes[1].plot([e["step"] for e in ev], [e["sample/reward"] for e in ev], style, marker="o", ms=3, color=kw["color"])
  axes[0].set(xlabel="sequence KL(policy || SFT reference)", ylabel="gold reward", title="reward vs KL")
  axes[1].set(xlabel="step", ylabel="gold reward", title="reward vs training step")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "variants.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/aligndistil")
  p.add_argument("--variants", default="adaptive,contrast,theorem1,gkd")
  p.add_argument("--data", default="on_policy,off_policy")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--set", action="append", default=[], help="field=value for every run (repeatable)")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  a = p.parse_args(argv)
  if a.skip_runs:
    with open(os.path.join(a.out, "results.jsonl")) as f:
      results = [json.loads(l) for l in f]
  else:
    results = run_sweeps(a.out, a.variants.split(","), a.data.split(","), a.seeds, a.steps, a.set)
  dpo = dpo_stage(a.out, results)
  table(results, dpo, os.path.join(a.out, "variants.md"))
  plot(results, dpo, a.out)
  print(f"wrote {a.out}/variants.md, variants.png, results.jsonl")


if __name__ == "__main__":
  main()
