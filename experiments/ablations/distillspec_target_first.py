"""DistillSpec's "distil the target first, then the draft" setting (DistillSpec
paper, its model-garden section: distil a large model into a smaller target,
then distil the draft toward that target; the claim is a large latency cut at
a small quality cost).

  python experiments/ablations/distillspec_target_first.py --out runs/ablations/distillspec_target_first \\
      [--small n_layers=2,d_model=64,n_heads=4,n_kv_heads=2] [--small_sft_steps 600] [--steps 300] \\
      [--teacher_draft runs/ablations/distillspec/divergence=tvd_data=student_seed=0] [--rounds 5]

Stages (each ``experiments/distillspec.py`` through jaxopd.main; a stage with a
``summary.json`` is skipped):

1. ``small_target``: the GKD baseline (preset ``gkd``: JSD(0.5), mixed data)
   distils the teacher (the main job's SFT base, 4 layers d128) into the
   ``--small`` model, which starts from its own SFT (``small_sft``,
   ``--small_sft_steps``);
2. ``small_draft``: DistillSpec (TVD, on-policy data) distils the usual 1-layer
   d32 draft toward the small target (``target.source=draft``);
3. ``--teacher_draft``: a draft distilled toward the teacher by the same recipe
   (the grid's TVD / student run; trained into ``OUT/teacher_draft`` if missing).

Then, in one process: quality of the teacher, the small SFT model and the small
target (held-out NLL of corpus reviews, sequence KL to the teacher, gold reward
of samples; speculative decoding is lossless, so an SD system has its target's
quality) and wall time per token at batch 1 of four systems timed interleaved
over ``--rounds`` rounds: teacher, teacher + SD with its draft, small target,
small target + SD with its draft (gamma = 3, greedy and temperature-1
sampling). Writes ``target_first.md``, ``target_first.png`` (quality against
latency) and ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(REPO, "experiments", "distillspec.py")
GAMMA = 3


def _run(name, config, workdir, sets):
  if os.path.exists(os.path.join(workdir, "summary.json")):
    print(f"[{name}] done: {workdir}", flush=True)
    return
  cmd = [sys.executable, "-m", "jaxopd.main", "--config", config, "--workdir", workdir, "--config.progress=False"]
  cmd += [f"--config.{s}" for s in sets]
  print(f"[{name}] {' '.join(cmd)}", flush=True)
  with open(workdir + ".log", "w") as f:
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
  if rc:
    raise SystemExit(f"[{name}] exit {rc}; log: {workdir}.log")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/distillspec_target_first")
  p.add_argument("--small", default="n_layers=2,d_model=64,n_heads=4,n_kv_heads=2",
                 help="the small target's model fields (the rest: the teacher's)")
  p.add_argument("--small_sft_steps", type=int, default=600)
  p.add_argument("--steps", type=int, default=300, help="distillation steps of both stages")
  p.add_argument("--teacher_draft", default="runs/ablations/distillspec/divergence=tvd_data=student_seed=0")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
  a = p.parse_args(argv)
  out = os.path.abspath(a.out)
  os.makedirs(out, exist_ok=True)
  small = [kv.strip() for kv in a.small.split(",") if kv.strip()]
  common = [f"total_steps={a.steps}", f"eval.sd_gammas=({GAMMA},)"]
  small_target, small_draft = os.path.join(out, "small_target"), os.path.join(out, "small_draft")
  _run("small_target", CONFIG + ":gkd", small_target,
       common + [f"model.{kv}" for kv in small] + [f"draft_sft.workdir={os.path.join(out, 'small_sft')}",
                                                    f"draft_sft.total_steps={a.small_sft_steps}"])
  _run("small_draft", CONFIG, small_draft,
       common + [f"target.workdir={small_target}", "target.source=draft"] + [f"target.model.{kv}" for kv in small])
  teacher_draft = os.path.abspath(a.teacher_draft)
  if not os.path.exists(os.path.join(teacher_draft, "summary.json")):
    teacher_draft = os.path.join(out, "teacher_draft")
    _run("teacher_draft", CONFIG, teacher_draft, common)
  res = compare(out, small_target, small_draft, teacher_draft, a.rounds)
  res["args"] = vars(a)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(res, f, indent=2)
  table(res, os.path.join(out, "target_first.md"))
  plot(res, os.path.join(out, "target_first.png"))


def compare(out, small_target, small_draft, teacher_draft, rounds) -> dict:
  sys.path.insert(0, REPO)
  import jax
  import ml_collections
  import numpy as np
  from flax import nnx
  from jaxopd.data import suite as suite_lib
  from jaxopd.methods import distillspec as ds
  from jaxopd.models import table

  def cfg(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
      return ml_collections.ConfigDict(json.load(f))
  c_small, c_draft = cfg(small_target), cfg(small_draft)
  load = lambda workdir, source: ds.on_one_device(ds.load_model(workdir, source))
  stage = lambda init: ds.on_one_device(table.load_model(init)[0])   # a stage's pinned run: init, as the run used it
  teacher = stage(c_small.models.target.init)
  small = load(small_target, "draft")
  small_sft = stage(c_small.models.draft.init)
  d_small = load(small_draft, "draft")
  d_teacher = load(teacher_draft, "draft")
  config = c_draft      # eval settings (prompts, budgets, temperature): every stage shares them
  suite = suite_lib.ensure(config.data, verbose=False)
  res = {"quality": ds.quality(config, suite, {"target": teacher, "small_sft": small_sft, "small": small}),
         "params": {k: int(sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))))
                    for k, m in (("teacher", teacher), ("small", small), ("draft", d_small))}}
  prompt, plen = ds._eval_prompts(suite, config)
  n = config.eval.timing_prompts
  modes = {"greedy": ds._scfg(config, suite, True), "sampling": ds._scfg(config, suite, False)}
  calls = {}
  for m, sc in modes.items():
    calls[("teacher", m)] = ds.sample_call(teacher, sc)
    calls[("teacher+SD", m)] = ds.sd_call(teacher, d_teacher, sc, GAMMA)
    calls[("small", m)] = ds.sample_call(small, sc)
    calls[("small+SD", m)] = ds.sd_call(small, d_small, sc, GAMMA)
  timed = ds.time_per_token(calls, prompt[:n], plen[:n], jax.random.PRNGKey(config.seed + 2), rounds)
  res["timing"] = {}
  for (system, m), (ms, outs) in timed.items():
    r = {"ms_per_token": ms}
    if system.endswith("SD"):
      acc, blocks = (sum(int(np.sum(getattr(o, f))) for o in outs) for f in ("accepted", "blocks"))
      r["tau"] = (acc + blocks) / max(blocks, 1)
    res["timing"].setdefault(system, {})[m] = r
  res["rounds"] = rounds
  return res


SYSTEMS = (("teacher", "target"), ("teacher+SD", "target"), ("small", "small"), ("small+SD", "small"))


def table(res, path):
  q, t = res["quality"], res["timing"]
  base = t["teacher"]
  lines = ["| system | quality of | held-out NLL | seq. KL to teacher | gold reward | ms/token greedy (vs teacher) | "
           "ms/token sampling (vs teacher) | tau greedy / sampling |", "|" + " --- |" * 8]
  for system, model in SYSTEMS:
    r, qq = t[system], q[model]
    tau = " / ".join(f"{r[m]['tau']:.2f}" for m in ("greedy", "sampling")) if "tau" in r["greedy"] else "-"
    name = {"target": "teacher", "small": "small target"}[model]
    lines.append(f"| {system} | {name} | {qq['nll']:.3f} | {qq['kl_ref']:.2f} | {qq['reward']:.3f} | "
                 + " | ".join(f"{r[m]['ms_per_token']:.3f} ({base[m]['ms_per_token'] / r[m]['ms_per_token']:.2f}x)"
                              for m in ("greedy", "sampling")) + f" | {tau} |")
  qs = q["small_sft"]
  lines.append(f"| (small model before distillation) | small SFT | {qs['nll']:.3f} | {qs['kl_ref']:.2f} | "
               f"{qs['reward']:.3f} | - | - | - |")
  p = res["params"]
  lines += ["", f"Batch 1, gamma {GAMMA}, median of {res['rounds']} interleaved rounds; (Nx) = teacher time per token "
            f"/ this system's. Parameters: teacher {p['teacher']:,}, small target {p['small']:,}, draft "
            f"{p['draft']:,}. SD is lossless: an SD system's quality is its target's."]
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def plot(res, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, m in zip(axes, ("greedy", "sampling")):
    for system, model in SYSTEMS:
      x, y = res["timing"][system][m]["ms_per_token"], res["quality"][model]["nll"]
      ax.scatter([x], [y])
      ax.annotate(system, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"ms per token ({m}, batch 1)")
    ax.set_ylabel("held-out NLL (lower is better)")
    ax.set_title(f"quality vs latency, {m}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
