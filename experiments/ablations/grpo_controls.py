"""GRPO ablations on the digits task (experiments/grpo.py), one command per study:

  python experiments/ablations/grpo_controls.py --study dapo  --out runs/ablations/grpo_dapo  [--steps 200]
  python experiments/ablations/grpo_controls.py --study prorl --out runs/ablations/grpo_prorl [--steps 1000]
  python experiments/ablations/grpo_controls.py --study opd   --out runs/ablations/grpo_opd   [--steps 200]
  python experiments/ablations/grpo_controls.py --study rpd   --out runs/ablations/grpo_rpd   [--steps 200]
  python experiments/ablations/grpo_controls.py --study redi  --out runs/ablations/redi_traces [--steps 300]
      [--seeds 0] [--set data.data_dir=... --set sft.workdir=... --set teacher.workdir=...] [--skip_runs]

* ``dapo`` (DAPO's pieces): the default (clip-higher 0.2 / 0.28, token-mean, no KL) against
  symmetric clip, + dynamic sampling, seq_mean_token_mean (GRPO's), and Dr. GRPO (its
  advantage and aggregation);
* ``prorl`` (ProRL): long training with KL + reference reset + clip 0.2 / 0.4 + dynamic
  sampling + temperature 1.2, against plain GRPO (no KL, symmetric clip, no reset), pass@k up
  to k = 64 per level against the SFT base;
* ``opd`` (VLA-OPD): on-policy distillation toward the teacher (the SFT recipe on every level,
  longer) with reverse KL, forward KL and hard cross-entropy on the teacher's argmax;
  entropy, pass@k and forgetting (held-out NLL on the easy levels the base was trained on);
* ``rpd`` (RPD): GRPO plus lambda_d times the reverse KL to the teacher, lambda_d in
  {0, 0.1, 1, 1 cosine-annealed}: does the student reach the teacher, and faster than RL alone;
* ``redi`` (REDI, experiments/redi.py:digits): stage 2 on the teacher's (positive, negative)
  trace pairs from the stage-1 model (SFT on the positives), alpha in {0, 0.5, 0.8, 1}, against
  SimPO and DPO on the same pairs; the positives' log-likelihood change and margin; rows for
  stage 1, the SFT base and the teacher.

Each arm is one sweep (launch/sweep.py) on the same cached SFT base (and teacher); writes
``OUT/results.jsonl``, ``OUT/<study>.md`` (final pass@1 / pass@k, greedy pass rate, entropy,
held-out NLL, per-level pass@1 and pass@k, and the SFT base's and teacher's rows) and
``OUT/<study>.png`` (pass@1 against step, the policy's entropy against step, and pass@k
against k on the hardest levels the base solves at all).
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

CONFIG = os.path.join(REPO, "experiments", "grpo.py")
STUDIES = {
    "dapo": [
        ("default (clip-higher, token_mean)", "", []),
        ("symmetric clip 0.2", "", ["method.eps_high=0.2"]),
        ("+ dynamic sampling", "dapo", []),
        ("seq_mean_token_mean", "", ["method.aggregation=seq_mean_token_mean"]),
        ("dr_grpo", "", ["method.aggregation=dr_grpo", "method.advantage=dr_grpo"]),
    ],
    "prorl": [
        ("plain GRPO", "", ["method.eps_high=0.2"]),
        ("ProRL (KL + reset + clip 0.4 + dyn. + T 1.2)", "prorl", []),
    ],
    "opd": [
        ("OPD reverse KL", "opd", []),
        ("OPD forward KL", "opd", ["method.distill=forward_kl"]),
        ("OPD hard CE", "opd", ["method.distill=hard_ce"]),
    ],
    "rpd": [
        ("GRPO (lambda_d 0)", "", []),
        ("RPD lambda_d 0.1", "rpd", ["method.lambda_d=0.1"]),
        ("RPD lambda_d 1", "rpd", []),
        ("RPD lambda_d 1, cosine", "rpd", ["method.distill_schedule=cosine"]),
    ],
    "redi": [
        ("REDI alpha 0 (SFT on the pairs' positives)", "digits", ["method.alpha=0"]),
        ("REDI alpha 0.5", "digits", ["method.alpha=0.5"]),
        ("REDI alpha 0.8 (the paper's)", "digits", ["method.alpha=0.8"]),
        ("REDI alpha 1 (symmetric)", "digits", ["method.alpha=1.0"]),
        ("SimPO (beta 2, gamma 1)", "digits", ["method.loss=simpo"]),
        ("DPO (beta 0.1, reference = stage 1)", "digits", ["method.loss=dpo", "method.beta=0.1"]),
    ],
}
STUDY_CONFIG = {"redi": os.path.join(REPO, "experiments", "redi.py")}   # the others: experiments/grpo.py
# The rows of the reference models, from a run's summary.json: (its key, the table's label).
REFERENCE_ROWS = {"redi": [("before", "stage 1: SFT on the positive traces (the start)"), ("sft base", "SFT base"),
                           ("teacher", "teacher (the traces' model)")]}
# The plot's middle panel (a train metric over steps) where it is not the policy's entropy.
MIDDLE_PANEL = {"redi": ("logps/chosen_change", "positives' log-likelihood change from the start (nats/token)")}
# Columns read from the last train record (``train:<metric>``), beyond the entropy every study shows.
TRAIN_COLUMNS = {"redi": [("train:logps/chosen_change", "positives' change (nats/token)"),
                          ("train:logps/margin_norm", "margin (nats/token)")]}
# The clip binds only where the ratio leaves 1: with one update per rollout (pi_old = pi) it never does,
# so the clip and ProRL studies take 4 optimizer updates per rollout (DAPO / ProRL train on minibatches).
STUDY_SET = {"prorl": ["eval.samples=64", "eval_every=200", "method.updates_per_rollout=4"],
             "dapo": ["method.updates_per_rollout=4"], "opd": [], "rpd": [], "redi": []}


def arm_dir(i: int) -> str:
  return f"arm{i}"


def run_sweeps(study, out, seeds, steps, extra):
  results = []
  for i, (label, preset, fields) in enumerate(STUDIES[study]):
    sub = os.path.join(out, arm_dir(i))
    given = {x.split("=", 1)[0] for x in extra}     # a --set of a study's own field replaces it
    sets = [f"total_steps={steps}"] + [x for x in STUDY_SET[study] + fields if x.split("=", 1)[0] not in given] + extra
    config = STUDY_CONFIG.get(study, CONFIG)
    sweep.main(["--config", config + (f":{preset}" if preset else ""), "--out", sub, "--seeds", seeds]
               + [x for s in sets for x in ("--set", s)])
    with open(os.path.join(sub, "results.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        r.update(arm=label, dir=os.path.join(arm_dir(i), r["name"]))
        results.append(r)
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    for r in results:
      f.write(json.dumps(r) + "\n")
  return results


def read(path, split):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [e for e in map(json.loads, f) if e.get("split") == split]


def _ks(r):
  return sorted(int(k.split("@")[1]) for k in r if k.startswith("sample/pass@"))


def _levels(r):
  return sorted({int(k.split("/")[1][5:]) for k in r if k.startswith("sample/level") and k.endswith("/greedy")})


def teacher_row(out, results):
  """The teacher's pass@k (the summary of a run that had one), or None."""
  for r in results:
    summ = os.path.join(out, r["dir"], "summary.json")
    if os.path.exists(summ):
      s = json.load(open(summ))
      if "teacher" in s:
        return s["teacher"]
  return None


def reference_rows(study, out, results, teacher):
  """``(label, metrics)`` of the models the arms are compared with (the start, the teacher, ...)."""
  if study not in REFERENCE_ROWS:
    before = next((r["before"] for r in results if "before" in r), None)
    return [(n, ref) for n, ref in (("SFT base (before)", before), ("teacher", teacher)) if ref]
  for r in results:
    summ = os.path.join(out, r["dir"], "summary.json")
    if os.path.exists(summ):
      s = json.load(open(summ))
      return [(label, s[key]) for key, label in REFERENCE_ROWS[study] if key in s]
  return []


def table(study, results, teacher, path):
  groups = collections.defaultdict(list)
  for r in results:
    if r.get("exit") == 0 and "sample/pass@1" in r:
      groups[r["arm"]].append(r)
  rows = [(arm, groups[arm]) for arm, _, _ in STUDIES[study] if arm in groups]
  any_r = next((rs[0] for _, rs in rows), None)
  if any_r is None:
    print("no finished runs")
    return
  kmax = _ks(any_r)[-1]
  levels = _levels(any_r)
  cols = [("sample/pass@1", "pass@1"), (f"sample/pass@{kmax}", f"pass@{kmax}"), ("sample/greedy", "greedy"),
          ("train:entropy", "entropy (train, last)"), ("heldout/nll_easy", "held-out NLL (easy)")]
  cols += TRAIN_COLUMNS.get(study, [])
  lvl_cols = [(f"sample/level{lv}/pass@1", f"L{lv} p@1") for lv in levels if lv > 4] + \
             [(f"sample/level{lv}/pass@{kmax}", f"L{lv} p@{kmax}") for lv in levels if lv > 4]
  allc = cols + lvl_cols
  lines = ["| arm | seeds | " + " | ".join(c[1] for c in allc) + " |", "|" + " --- |" * (len(allc) + 2)]
  fmt = lambda v: "-" if v != v else f"{v:.3f}"

  def cell(rs, k):     # mean ± std over seeds (the std where there are several)
    v, sd = sweep.seed_stats(rs, k)
    return fmt(v) + ("" if sd != sd else f" ± {sd:.3f}")
  for arm, rs in rows:
    for r in rs:
      tr = read(os.path.join(os.path.dirname(path), r["dir"]), "train")
      for k, _ in allc:
        if k.startswith("train:"):
          r[k] = tr[-1].get(k[6:], float("nan")) if tr else float("nan")
    lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cell(rs, k) for k, _ in allc) + " |")
  for name, ref in reference_rows(study, os.path.dirname(path), results, teacher):
    lines.append(f"| {name} | - | " + " | ".join(fmt(ref.get(k, float("nan"))) for k, _ in allc) + " |")
  lines += [""] + progress_table(rows, os.path.dirname(path), cell)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def progress_table(rows, out, cell):
  """pass@1 (held-out, all levels) at every evaluation step of the runs, per arm: how fast each
  gets there (mean ± std over seeds)."""
  at = {}
  for arm, rs in rows:
    for r in rs:
      for e in read(os.path.join(out, r["dir"]), "eval"):
        at.setdefault(arm, {}).setdefault(e["step"], []).append({"p": e["sample/pass@1"]})
  steps = sorted({s for per in at.values() for s in per})
  if not steps:
    return []
  lines = ["pass@1 at each evaluation step:", "", "| arm | " + " | ".join(f"step {s}" for s in steps) + " |",
           "|" + " --- |" * (len(steps) + 1)]
  for arm, per in at.items():
    lines.append(f"| {arm} | " + " | ".join(cell(per[s], "p") if s in per else "-" for s in steps) + " |")
  return lines


def plot(study, results, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  arms = [a for a, _, _ in STUDIES[study]]
  colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  seen = set()
  before = next((r["before"] for r in results if "before" in r), None)
  before_label = dict(REFERENCE_ROWS.get(study, [])).get("before", "SFT base")
  middle, middle_label = MIDDLE_PANEL.get(study, ("entropy", "policy entropy on its samples (nats/token)"))
  for r in results:
    if r.get("exit") != 0:
      continue
    path = os.path.join(out, r["dir"])
    ev, tr = read(path, "eval"), read(path, "train")
    kw = dict(color=colors[r["arm"]], label=None if r["arm"] in seen else r["arm"])
    seen.add(r["arm"])
    axes[0].plot([e["step"] for e in ev], [e["sample/pass@1"] for e in ev], marker="o", ms=3, **kw)
    axes[1].plot([e["step"] for e in tr], [e.get(middle, float("nan")) for e in tr], lw=0.8, color=kw["color"])
    if ev:
      last = ev[-1]
      hard = [lv for lv in _levels(last) if lv > 5]
      ks = _ks(last)
      y = [sum(last[f"sample/level{lv}/pass@{k}"] for lv in hard) / max(len(hard), 1) for k in ks]
      axes[2].plot(ks, y, marker="o", ms=3, color=kw["color"])
  if before:
    ks = _ks(before)
    hard = [lv for lv in _levels(before) if lv > 5]
    axes[2].plot(ks, [sum(before[f"sample/level{lv}/pass@{k}"] for lv in hard) / max(len(hard), 1) for k in ks],
                 "k--", marker="s", ms=3, label=before_label)
    axes[0].axhline(before["sample/pass@1"], color="k", ls="--", lw=0.8)
  axes[0].set(xlabel="step", ylabel="pass@1 (held-out, all levels)", title="pass@1 vs step")
  axes[1].set(xlabel="step", ylabel=middle_label, title=f"{middle} vs step")
  axes[2].set(xlabel="k", ylabel="pass@k, levels above the SFT levels", xscale="log", title="pass@k vs k")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{study}.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--study", required=True, choices=sorted(STUDIES))
  p.add_argument("--out", default="")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--set", action="append", default=[], help="field=value for every run (repeatable)")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  a = p.parse_args(argv)
  out = a.out or f"runs/ablations/grpo_{a.study}"
  if a.skip_runs:
    with open(os.path.join(out, "results.jsonl")) as f:
      results = [json.loads(l) for l in f]
  else:
    results = run_sweeps(a.study, out, a.seeds, a.steps, a.set)
  table(a.study, results, teacher_row(out, results), os.path.join(out, f"{a.study}.md"))
  plot(a.study, results, out)
  print(f"wrote {out}/{a.study}.md, {a.study}.png, results.jsonl")


if __name__ == "__main__":
  main()
