"""A grid over config fields and seeds: run locally one process per run, emitted
as a SLURM array, or run on a TPU pod; results gathered into one table.

  python launch/sweep.py --config experiments/tdpo.py --out runs/sweeps/frontier \\
      --grid method.loss=dpo,tdpo1,tdpo2 --grid method.beta=0.05,0.1,0.2 --seeds 0,1 \\
      [--set total_steps=200 ...] [--parallel 1] [--dry_run]
  ... --slurm sweep.sbatch [--slurm_nodes 2 --slurm_gpus_per_node 8 --sbatch_arg=--account=X]
  ... --gather                                   # results.jsonl from finished runs (after SLURM / a pod)
  ... --tpu NAME --zone ZONE --accelerator v4-32 # each run in turn on every worker (launch/tpu_pod.py)

Each run is ``python -m jaxopd.main --config CONFIG --workdir OUT/<name> --config.<k>=<v> ...``
(so it resumes if re-launched, and skips when finished); its ``summary.json``
and last eval record are gathered into ``OUT/results.jsonl`` (one line per
run: the grid values, the seed and the metrics). ``--parallel`` > 1 runs
several at once: on a 2-core CPU machine keep it at 1, every run already uses
both cores. ``--slurm PATH`` writes (``-`` prints) an array script, one array
task per run, each ``srun`` one process per GPU (jax reads the SLURM
environment); submit it with ``sbatch``,
then ``--gather``. With ``--tpu`` the slice is created or reused, the code
shipped and installed once, the runs go one after another over the whole
slice, and worker 0 gathers the table (``--out`` must be shared storage there).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_pod  # noqa: E402  (launch/ is a directory of scripts, not a package)


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


def main_args(config: str, out: str, values: dict, seed: int, fixed: list[str]) -> list[str]:
  """The ``jaxopd.main`` arguments of one run."""
  args = ["--config", config, "--workdir", os.path.join(out, run_name(values, seed)), f"--config.seed={seed}",
          "--config.progress=False"]
  args += [f"--config.{k}={v}" for k, v in values.items()]
  args += [f"--config.{s}" for s in fixed]
  return args


def command(config: str, out: str, values: dict, seed: int, fixed: list[str], python: str = sys.executable):
  return [python, "-m", "jaxopd.main"] + main_args(config, out, values, seed, fixed)


def slurm_script(a, todo: list) -> str:
  """A SLURM array script: task ``i`` runs ``todo[i]`` with one process per GPU (srun)."""
  n = len(todo)
  gather = shlex.join(["python", "launch/sweep.py", "--config", a.config, "--out", a.out, "--seeds", a.seeds]
                      + sum((["--grid", g] for g in a.grid), []) + ["--gather"])
  lines = [
      "#!/bin/bash",
      f"# jaxopd sweep: {n} runs of {a.config}, one SLURM array task each (written by launch/sweep.py).",
      f"#   mkdir -p {shlex.quote(a.out)} && sbatch THIS_FILE     then, once every task is done:",
      f"#   {gather}",
      "#SBATCH --job-name=jaxopd-sweep",
      f"#SBATCH --array=0-{n - 1}" + (f"%{a.parallel}" if a.parallel > 1 else ""),
      f"#SBATCH --nodes={a.slurm_nodes}",
      "# One process per GPU, each seeing all the node's GPUs: jax gives process i GPU i (SLURM_LOCALID).",
      f"#SBATCH --ntasks-per-node={a.slurm_gpus_per_node}",
      f"#SBATCH --gpus-per-node={a.slurm_gpus_per_node}",
      f"#SBATCH --time={a.slurm_time}",
      f"#SBATCH --output={os.path.join(a.out, 'slurm-%A_%a.out')}",
      "# SIGTERM 2 min before the time limit: checkpoint and exit 143; a requeued task resumes.",
      "#SBATCH --signal=TERM@120",
      "#SBATCH --requeue",
  ] + [f"#SBATCH {x}" for x in a.sbatch_arg] + [
      "set -euo pipefail",
      f"cd {shlex.quote(os.getcwd())}",
      f"PY=\"${{JAXOPD_PYTHON:-{sys.executable}}}\"",
      "case \"$SLURM_ARRAY_TASK_ID\" in",
  ]
  for i, (values, seed) in enumerate(todo):
    args = shlex.join(main_args(a.config, a.out, values, seed, a.set))
    lines.append(f"  {i}) srun --kill-on-bad-exit=1 \"$PY\" -m jaxopd.main {args} ;;")
  lines += ["  *) echo \"no run $SLURM_ARRAY_TASK_ID\" >&2; exit 2 ;;", "esac", ""]
  return "\n".join(lines)


def gather(out: str, todo: list, codes: list | None = None) -> int:
  """Writes ``OUT/results.jsonl``; returns how many runs have no final metrics (or failed)."""
  missing = 0
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    for i, (values, seed) in enumerate(todo):
      got = collect(os.path.join(out, run_name(values, seed)))
      rec = {"name": run_name(values, seed), "seed": seed}
      if codes is not None:
        rec["exit"] = codes[i]
      rec.update(values)
      rec.update(got)
      missing += (codes[i] != 0) if codes is not None else ("step" not in got)
      f.write(json.dumps(rec) + "\n")
  return missing


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


def seed_stats(results: list[dict], key: str) -> tuple[float, float]:
  """``(mean, std)`` of a metric over the seeds' result records (population standard deviation;
  NaN where no record has the metric, the std also with fewer than two)."""
  import statistics
  vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
  if not vals:
    return float("nan"), float("nan")
  return sum(vals) / len(vals), statistics.pstdev(vals) if len(vals) > 1 else float("nan")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="experiment module[:preset]")
  p.add_argument("--out", required=True, help="sweep directory (one workdir per run inside)")
  p.add_argument("--grid", action="append", default=[], help="field=v1,v2 (repeatable)")
  p.add_argument("--seeds", default="0", help="comma-separated seeds")
  p.add_argument("--set", action="append", default=[], help="field=value fixed for every run (repeatable)")
  p.add_argument("--parallel", type=int, default=1, help="runs at once (locally; SLURM: array tasks at once)")
  p.add_argument("--dry_run", "--dry-run", action="store_true", help="print the commands only")
  p.add_argument("--gather", action="store_true", help="only gather results.jsonl from the run directories")
  s = p.add_argument_group("SLURM array")
  s.add_argument("--slurm", default="", help="write the array script to this path ('-': print) instead of running")
  s.add_argument("--slurm_nodes", type=int, default=1, help="nodes per run")
  s.add_argument("--slurm_gpus_per_node", type=int, default=8, help="processes (one GPU each) per node")
  s.add_argument("--slurm_time", default="24:00:00", help="time limit per run")
  s.add_argument("--sbatch_arg", action="append", default=[], help="extra #SBATCH line, e.g. --account=X")
  t = p.add_argument_group("TPU pod (launch/tpu_pod.py)")
  tpu_pod.add_pod_args(t, name_flag="--tpu", required=False, dry_run=False)
  a = p.parse_args(argv)
  grid = parse_grid(a.grid)
  seeds = [int(s) for s in a.seeds.split(",")]
  todo = list(runs(grid, seeds))
  if a.slurm:
    text = slurm_script(a, todo)
    if a.slurm == "-":
      print(text, end="")
    else:
      os.makedirs(a.out, exist_ok=True)   # SLURM does not create the --output directory
      with open(a.slurm, "w") as f:
        f.write(text)
      print(f"{a.slurm}: {len(todo)} array tasks; submit with: sbatch {a.slurm}")
    return 0
  if a.name:
    if not a.zone:
      p.error("--tpu needs --zone")
    pod = tpu_pod.Pod(a)
    sh = tpu_pod.Shell(a.dry_run)
    rc = tpu_pod.run_all(pod, sh, [main_args(a.config, a.out, v, s, a.set) for v, s in todo])
    if not a.delete:   # the table, written on the pod's shared storage by worker 0
      gather_args = ["launch/sweep.py", "--config", a.config, "--out", a.out, "--seeds", a.seeds,
                     *sum((["--grid", g] for g in a.grid), []), "--gather"]
      sh(pod.ssh(f"cd {tpu_pod.REMOTE_DIR} && {tpu_pod.VENV}/bin/python {shlex.join(gather_args)}", worker="0"),
         check=False)
    return rc
  if a.gather:
    missing = gather(a.out, todo)
    print(f"{len(todo) - missing} of {len(todo)} runs have final metrics; {os.path.join(a.out, 'results.jsonl')}")
    return 1 if missing else 0
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
  failed = gather(a.out, todo, codes)
  print(f"{len(todo) - failed} of {len(todo)} runs finished; results in {os.path.join(a.out, 'results.jsonl')}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
