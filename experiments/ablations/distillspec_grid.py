"""DistillSpec ablation: divergence (FKL, RKL, JSD(0.5), TVD) x data source
(fixed, teacher, student, mixed) -> acceptance (greedy, sampling), block
efficiency and measured speed-up (DistillSpec paper, its divergence x data
figures).

  python experiments/ablations/distillspec_grid.py --out runs/ablations/distillspec \\
      [--design cross|full] [--steps 300] [--seeds 0] [--set eval.sd_gammas=(3,)]
  # the committed results: --seeds 0,1,2 --design full,full,cross

``full`` runs all 16 cells; ``cross`` (default, what fits a shared 2-core CPU)
runs every divergence on student (on-policy) data and every data source with
TVD: 7 cells. ``--design`` is one design for every seed or one per seed. The
table averages each cell over its seeds. Each run is ``experiments/distillspec.py`` through jaxopd.main
(shared cached target and draft SFT stages; a finished run, one with a
``summary.json``, is skipped). Then re-times SD with every finished run's draft,
the undistilled draft and the target in one process, interleaved
(``--retime_rounds``; per-run timings come from different moments of a
shared machine's load). Writes ``results.jsonl`` (one line per run),
``grid.md`` (table) and ``grid.png`` (acceptance per cell; measured vs
predicted speed-up) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "launch"))

import sweep  # noqa: E402

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
DATA = ("fixed", "teacher", "student", "mixed")


def cells(design, divergences, data):
  if design == "full":
    return [(d, s) for d in divergences for s in data]
  div = [("tvd", "student")] + [(d, "student") for d in divergences if d != "tvd"]
  src = [("tvd", s) for s in data if s != "student"]
  out = [div[0]]          # interleaved, so a partial grid still covers both axes
  for i in range(max(len(div), len(src) + 1)):
    out += [x for x in (src[i] if i < len(src) else None, div[i + 1] if i + 1 < len(div) else None) if x]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/distillspec")
  p.add_argument("--design", default="cross",
                 help="cross | full, or one per seed (--seeds 0,1 --design full,cross: seed 0 full, seed 1 cross)")
  p.add_argument("--divergences", default=",".join(DIVERGENCES))
  p.add_argument("--data", default=",".join(DATA))
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--seeds", default="0")
  p.add_argument("--set", action="append", default=["eval.sd_gammas=(3,)"], help="field=value for every run")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  p.add_argument("--retime_rounds", type=int, default=7, help="rounds of the joint re-timing (0 = none)")
  a = p.parse_args(argv)
  config = os.path.join(REPO, "experiments", "distillspec.py")
  seeds = [int(x) for x in a.seeds.split(",")]
  designs = a.design.split(",")
  if len(designs) == 1:
    designs *= len(seeds)
  if len(designs) != len(seeds) or any(d not in ("cross", "full") for d in designs):
    raise SystemExit(f"--design {a.design!r}: cross or full, once or once per seed ({len(seeds)} seeds)")
  todo = [({"method.divergence": d, "method.data": s}, seed) for seed, design in zip(seeds, designs)
          for d, s in cells(design, a.divergences.split(","), a.data.split(","))]
  os.makedirs(a.out, exist_ok=True)
  results = []
  for i, (values, seed) in enumerate(todo):
    name = sweep.run_name(values, seed)
    workdir = os.path.join(a.out, name)
    rc = 0
    if not a.skip_runs and not os.path.exists(os.path.join(workdir, "summary.json")):
      cmd = sweep.command(config, a.out, values, seed, [f"total_steps={a.steps}"] + a.set)
      with open(workdir + ".log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
      print(f"[{i + 1}/{len(todo)}] {name}: exit {rc}", flush=True)
    results.append({"name": name, "seed": seed, "exit": rc, **values, **collect(workdir)})
  if a.retime_rounds:
    retime(results, a.out, a.retime_rounds)
  with open(os.path.join(a.out, "results.jsonl"), "w") as f:
    for r in results:
      f.write(json.dumps(r) + "\n")
  table(results, os.path.join(a.out, "grid.md"))
  plot(results, os.path.join(a.out, "grid.png"))


def collect(workdir) -> dict:
  """Flat numbers of a run's summary.json: distilled and undistilled ('sft_') drafts."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    s = json.load(f)
  out = {"cost_ratio": s["timing"]["cost_ratio"]}
  for mode, ms in s["timing"]["target_ms_per_token"].items():
    out[f"target_ms/{mode}"] = ms
  for draft, prefix in (("distilled", ""), ("draft_sft", "sft_")):
    q = s["quality"][draft]
    out.update({f"{prefix}reward": q["reward"], f"{prefix}nll": q["nll"], f"{prefix}kl_target": q["kl_ref"]})
    for mode, r in s["drafts"][draft].items():
      out[f"{prefix}alpha/{mode}"] = r["alpha_prefix"]
      for g, sd in r["sd"].items():
        for k in ("tau", "tau_formula", "alpha", "speedup", "speedup_formula", "ms_per_token"):
          out[f"{prefix}{k}/{mode}/g{g}"] = sd[k]
  out["target_reward"] = s["quality"]["target"]["reward"]
  out["target_nll"] = s["quality"]["target"]["nll"]
  return out


def retime(results, out, rounds):
  """Times every finished run's distilled draft, the undistilled draft and the target
  in one process, interleaved over ``rounds`` (each run's own report timed them in
  separate processes, at different moments of a shared machine's load): adds
  ``rt_speedup/<mode>`` (and ``rt_*`` of the undistilled draft) to each result."""
  import ml_collections
  sys.path.insert(0, REPO)
  from jaxopd.data import suite as suite_lib
  import jax
  ok = [r for r in results if "alpha/greedy" in r]
  if not ok:
    return
  from jaxopd.methods import distillspec as ds
  from jaxopd.models import table
  with open(os.path.join(out, ok[0]["name"], "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  g = int(_gamma(ok[0]))
  suite = suite_lib.ensure(config.data, verbose=False)
  target = ds.on_one_device(table.load_model(config.models.target.init, "target")[0])
  drafts = {"draft_sft": ds.on_one_device(table.load_model(config.models.draft.init, "draft")[0])}
  drafts.update({r["name"]: ds.on_one_device(ds.load_model(os.path.join(out, r["name"]), "draft"))
                 for r in ok})
  prompt, plen = ds._eval_prompts(suite, config)
  n = config.eval.timing_prompts
  modes = {"greedy": ds._scfg(config, suite, True), "sampling": ds._scfg(config, suite, False)}
  calls = {("target", m): ds.sample_call(target, cfg) for m, cfg in modes.items()}
  calls.update({(name, m): ds.sd_call(target, d, cfg, g) for name, d in drafts.items() for m, cfg in modes.items()})
  timed = ds.time_per_token(calls, prompt[:n], plen[:n], jax.random.PRNGKey(config.seed + 2), rounds)
  for r in ok:
    for m in modes:
      r[f"rt_ms/{m}"] = timed[(r["name"], m)][0]
      r[f"rt_speedup/{m}"] = timed[("target", m)][0] / timed[(r["name"], m)][0]
      r[f"rt_sft_speedup/{m}"] = timed[("target", m)][0] / timed[("draft_sft", m)][0]
      r[f"rt_vs_sft/{m}"] = timed[("draft_sft", m)][0] / timed[(r["name"], m)][0]
      r["rt_rounds"] = rounds


def _gamma(r):
  return next(k.split("/g")[-1] for k in r if k.startswith("tau/greedy/g"))


def by_cell(results):
  """Finished runs averaged per (divergence, data) cell over seeds; ``seeds`` = how many."""
  cells_ = {}
  for r in results:
    if "alpha/greedy" in r:
      cells_.setdefault((r["method.divergence"], r["method.data"]), []).append(r)
  out = []
  for runs in cells_.values():
    m = dict(runs[0])
    for k, v in m.items():
      if isinstance(v, float):
        m[k] = sum(x[k] for x in runs) / len(runs)
    m["seeds"] = len(runs)
    out.append(m)
  return out


def matrix(ok, g) -> list[str]:
  """Divergence x data source: alpha greedy / alpha sampling / tau sampling, mean over seeds."""
  divs = [d for d in DIVERGENCES if any(r["method.divergence"] == d for r in ok)]
  data = [s for s in DATA if any(r["method.data"] == s for r in ok)]
  cell = {(r["method.divergence"], r["method.data"]): r for r in ok}
  lines = ["| divergence \\ data | " + " | ".join(data) + " |", "|" + " --- |" * (len(data) + 1)]
  for d in divs:
    row = [f"{cell[d, s]['alpha/greedy']:.3f} / {cell[d, s]['alpha/sampling']:.3f} / "
           f"{cell[d, s][f'tau/sampling/g{g}']:.2f} (n={cell[d, s]['seeds']})" if (d, s) in cell else "-"
           for s in data]
    lines.append(f"| {d} | " + " | ".join(row) + " |")
  return lines + ["", "Cells: alpha greedy / alpha sampling (draft prefixes) / tau sampling (SD runs), mean over n "
                  "seeds.", ""]


def table(results, path):
  ok = by_cell(results)
  if not ok:
    print("no finished runs")
    return
  g = _gamma(ok[0])
  lines = matrix(ok, g) + ["| divergence | data | seeds | alpha greedy | alpha sampling | tau greedy (formula) | tau sampling (formula) | "
           "speed-up greedy: measured (formula) | speed-up sampling: measured (formula) | "
           "SD time vs undistilled draft (greedy / sampling) | draft gold reward | draft held-out NLL |",
           "|" + " --- |" * 12]
  rt = "rt_speedup/greedy" in ok[0]
  if rt:     # the joint re-timing replaces the per-run timings
    lines[-2] = lines[-2].replace("speed-up greedy: measured", "speed-up greedy: measured jointly").replace(
        "speed-up sampling: measured", "speed-up sampling: measured jointly")
  sp = (lambda r, m: r[f"rt_speedup/{m}"]) if rt else (lambda r, m: r[f"speedup/{m}/g{g}"])
  vs = (lambda r, m: r[f"rt_vs_sft/{m}"]) if rt else (
      lambda r, m: r[f"sft_ms_per_token/{m}/g{g}"] / r[f"ms_per_token/{m}/g{g}"])
  sft_sp = (lambda r, m: r[f"rt_sft_speedup/{m}"]) if rt else (lambda r, m: r[f"sft_speedup/{m}/g{g}"])
  f = lambda x: f"{x:.3f}"
  for r in ok:
    lines.append(
        f"| {r['method.divergence']} | {r['method.data']} | {r['seeds']} | {f(r['alpha/greedy'])} | {f(r['alpha/sampling'])} | "
        f"{r[f'tau/greedy/g{g}']:.2f} ({r[f'tau_formula/greedy/g{g}']:.2f}) | "
        f"{r[f'tau/sampling/g{g}']:.2f} ({r[f'tau_formula/sampling/g{g}']:.2f}) | "
        f"{sp(r, 'greedy'):.2f} ({r[f'speedup_formula/greedy/g{g}']:.2f}) | "
        f"{sp(r, 'sampling'):.2f} ({r[f'speedup_formula/sampling/g{g}']:.2f}) | "
        f"{vs(r, 'greedy'):.2f}x / {vs(r, 'sampling'):.2f}x | "
        f"{f(r['reward'])} | {f(r['nll'])} |")
  r = ok[0]
  lines.append(f"| undistilled draft | - | - | {f(r['sft_alpha/greedy'])} | {f(r['sft_alpha/sampling'])} | "
               f"{r[f'sft_tau/greedy/g{g}']:.2f} ({r[f'sft_tau_formula/greedy/g{g}']:.2f}) | "
               f"{r[f'sft_tau/sampling/g{g}']:.2f} ({r[f'sft_tau_formula/sampling/g{g}']:.2f}) | "
               f"{sft_sp(r, 'greedy'):.2f} ({r[f'sft_speedup_formula/greedy/g{g}']:.2f}) | "
               f"{sft_sp(r, 'sampling'):.2f} ({r[f'sft_speedup_formula/sampling/g{g}']:.2f}) | 1 | "
               f"{f(r['sft_reward'])} | {f(r['sft_nll'])} |")
  lines.append(f"| target | - | - | - | - | - | - | 1 | 1 | - | {f(r['target_reward'])} | {f(r['target_nll'])} |")
  lines.append("")
  lines.append(f"gamma = {g}; alpha on draft-generated prefixes (greedy: argmax agreement; sampling: 1 - TVD); "
               f"tau = tokens per target call of SD runs at batch 1. Speed-up = plain target decoding time per "
               f"token / SD time per token, batch 1, median of timing rounds"
               + (f" ({ok[0]['rt_rounds']} rounds timing all drafts in one process, interleaved)" if rt else
                  " (each run's own report)")
               + f"; formula = tau(alpha) / (gamma c + 1) with each run's measured c (mean "
               f"{sum(x['cost_ratio'] for x in ok) / len(ok):.3f}). Rows with seeds > 1 are means over seeds. "
               f"The undistilled row's alpha/tau are the first cell's measurement of the shared undistilled "
               f"draft.")
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = by_cell(results)
  if not ok:
    return
  g = _gamma(ok[0])
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
  labels = [f"{r['method.divergence']}\n{r['method.data']}" for r in ok]
  x = range(len(ok))
  for ax, mode in zip(axes[:2], ("greedy", "sampling")):
    ax.bar(x, [r[f"alpha/{mode}"] for r in ok], color="tab:blue", label="distilled")
    ax.axhline(ok[0][f"sft_alpha/{mode}"], color="k", ls="--", label="undistilled draft")
    lo = min(min(r[f"alpha/{mode}"] for r in ok), ok[0][f"sft_alpha/{mode}"])
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set(title=f"acceptance alpha, {mode} (draft prefixes)")
    ax.legend(fontsize=7)
  ax = axes[2]
  for mode, marker in (("greedy", "o"), ("sampling", "s")):
    key = (lambda r, p: r[f"rt_{p}speedup/{mode}"]) if "rt_speedup/greedy" in ok[0] else (
        lambda r, p: r[f"{p}speedup/{mode}/g{g}"])
    ax.scatter([r[f"speedup_formula/{mode}/g{g}"] for r in ok], [key(r, "") for r in ok],
               marker=marker, label=f"distilled, {mode}")
    ax.scatter([ok[0][f"sft_speedup_formula/{mode}/g{g}"]], [key(ok[0], "sft_")], marker=marker,
               color="k", label=f"undistilled, {mode}")
  lim = ax.get_xlim()
  ax.plot(lim, lim, "k:", lw=0.8)
  ax.set(xlabel="predicted speed-up tau/(gamma c + 1)", ylabel="measured speed-up", title=f"speed-up, gamma={g}")
  ax.legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
