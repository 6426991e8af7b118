"""A grid over config fields and seeds, run locally one process per run.

  python launch/sweep.py --config experiments/tdpo.py --out runs/sweeps/frontier \\
      --grid method.loss=dpo,tdpo1,tdpo2 --grid method.beta=0.05,0.1,0.2 --seeds 0,1 \\
      [--set total_steps=200 ...] [--parallel 1] [--dry_run]

Each run is ``python -m jaxopd.main --config CONFIG --workdir OUT/<name> --config.<k>=<v> ...``
(so it resumes if re-launched, and skips when finished); its ``summary.json``
and last eval record are gathered into ``OUT/results.jsonl`` (one line per
run: the grid values, the seed and the metrics). ``--parallel`` > 1 runs
several at once: on a 2-core CPU machine keep it at 1, every run already uses
both cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import os
import subprocess
import sys


def parse_grid(items: list[str]) -> dict[str, list[str]]:
  grid = {}
  for item in items:
    if "=" not in item:
      raise SystemExit(f"--grid {item!r}: expected field=v1,v2,...")
    k, v = item.split("=", 1)
    grid[k.strip()] = [x.strip() for x in v.split(",") if x.strip()]
    if not grid[k.strip()]:
      raise SystemExit(f"--grid {item!r}: no values")
  return grid


def run_name(values: dict, seed: int) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in values.items()]
  return "_".join(parts + [f"seed={seed}"]).replace("/", "-")


def runs(grid: dict, seeds: list[int]):
  keys = list(grid)
  for combo in itertools.product(*(grid[k] for k in keys)):
    for seed in seeds:
      yield dict(zip(keys, combo)), seed


def command(config: str, out: str, values: dict, seed: int, fixed: list[str]) -> list[str]:
  cmd = [sys.executable, "-m", "jaxopd.main", "--config", config, "--workdir",
         os.path.join(out, run_name(values, seed)), f"--config.seed={seed}", "--config.progress=False"]
  cmd += [f"--config.{k}={v}" for k, v in values.items()]
  cmd += [f"--config.{s}" for s in fixed]
  return cmd


def collect(workdir: str) -> dict:
  """The run's final eval metrics (and summary.json's before/after when it has one)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      evals = [json.loads(l) for l in f if '"split": "eval"' in l]
    if evals:
      out.update({k: v for k, v in evals[-1].items() if k != "split"})
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      s = json.load(f)
    if "before" in s:
      out["before"] = s["before"]
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="experiment module[:preset]")
  p.add_argument("--out", required=True, help="sweep directory (one workdir per run inside)")
  p.add_argument("--grid", action="append", default=[], help="field=v1,v2 (repeatable)")
  p.add_argument("--seeds", default="0", help="comma-separated seeds")
  p.add_argument("--set", action="append", default=[], help="field=value fixed for every run (repeatable)")
  p.add_argument("--parallel", type=int, default=1, help="runs at once")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  a = p.parse_args(argv)
  grid = parse_grid(a.grid)
  seeds = [int(s) for s in a.seeds.split(",")]
  todo = list(runs(grid, seeds))
  cmds = [command(a.config, a.out, v, s, a.set) for v, s in todo]
  if a.dry_run:
    for c in cmds:
      print(" ".join(c))
    return 0
  os.makedirs(a.out, exist_ok=True)
  log = lambda v, s: os.path.join(a.out, run_name(v, s) + ".log")

  def one(i):
    (values, seed), cmd = todo[i], cmds[i]
    with open(log(values, seed), "w") as f:
      rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"[{i + 1}/{len(todo)}] {run_name(values, seed)}: exit {rc}", flush=True)
    return rc

  with cf.ThreadPoolExecutor(max_workers=max(1, a.parallel)) as ex:
    codes = list(ex.map(one, range(len(todo))))
  with open(os.path.join(a.out, "results.jsonl"), "w") as f:
    for (values, seed), rc in zip(todo, codes):
      rec = {"name": run_name(values, seed), "seed": seed, "exit": rc, **values,
             **collect(os.path.join(a.out, run_name(values, seed)))}
      f.write(json.dumps(rec) + "\n")
  failed = sum(c != 0 for c in codes)
  print(f"{len(todo) - failed} of {len(todo)} runs finished; results in {os.path.join(a.out, 'results.jsonl')}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
