"""Benchmark: SparsePO train-step throughput against TDPO on the same workload.

  python bench/sparsepo_step.py   (a few minutes on 2 CPU cores; --warmup / --repeats / --rounds)

Workload: bench/preference_step.py's (Llama-style policy and frozen reference,
vocab 1024, d_model 256, 4 layers, 8 pairs of 32 prompt + 96 response tokens,
AdamW, one CPU device, one synthetic batch reused), through
``Trainer.compiled_train_step`` with the loss of:

* ``tdpo1`` / ``tdpo2``: ``jaxopd.methods.tdpo.make_loss_fn`` (beta 0.1, alpha 0.5);
* ``sparsepo_shared`` / ``sparsepo_indep``: ``jaxopd.methods.sparsepo.make_loss_fn("learned", ...)``
  with the mask model (one or two heads on the reference's 4 hidden states,
  ``init="ones"`` so no ReLU is dead) as a second trainable model (weight
  decay 0.01), L1 0.001 on both masks;
* ``mapo``: ``make_loss_fn("mapo", True, ...)`` (activation mask, no extra model).

SparsePO's reference forward also returns its hidden states. All steps are
compiled first; then ``--rounds`` rounds each time ``--repeats`` steps of every
variant in turn (after ``--warmup`` steps per variant), so that drifting load
hits all variants alike. Reported: the median step time per variant over all
rounds, tokens/s (8 * 2 * 128 / step time), and the overhead of each SparsePO
variant over TDPO1 (the objective it reduces to with all-ones masks).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
  if p not in sys.path:
    sys.path.insert(0, p)

from common import compile_train_step, cpu_snapshot, other_load, single_device_config  # noqa: E402
from common import pick, time_interleaved  # noqa: E402
from preference_step import ALPHA, BETA, LR, PAIRS, SEQ, TOKENS, model_cfg, synthetic_batch  # noqa: E402

from jaxopd.methods import sparsepo, tdpo as preference  # noqa: E402
from jaxopd.experiment import Experiment  # noqa: E402

VARIANTS = ("tdpo1", "tdpo2", "sparsepo_shared", "sparsepo_indep", "mapo")


def build_step(name):
  """(compiled step, state, frozen, batch, compile seconds) of one variant."""
  mc = model_cfg()
  roles = {"policy": True, "reference": False}
  c = single_device_config(mc, PAIRS, SEQ, LR, roles)
  learned = name.startswith("sparsepo")
  shared = name != "sparsepo_indep"
  if name in ("tdpo1", "tdpo2"):
    loss_fn = preference.make_loss_fn(name, BETA, ALPHA if name == "tdpo2" else 0.5)
  elif learned:
    loss_fn = sparsepo.make_loss_fn("learned", shared, BETA, 1e-3, 1e-3)
  else:
    loss_fn = sparsepo.make_loss_fn("mapo", True, BETA)

  def init_heads(rng):
    return {"mask": sparsepo.SparseMask(mc.n_layers, mc.d_model, shared, nnx.Rngs(params=rng), "ones")}

  if learned:
    c.optim.groups.mask = {"weight_decay": 0.01}
  local = synthetic_batch()
  exp = Experiment(roles=roles, init_heads=init_heads if learned else None, loss_fn=loss_fn,
                   train_data=lambda s: iter([local]))
  return compile_train_step(c, exp, local)[:5]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--warmup", type=int, default=pick(2, 0))
  ap.add_argument("--repeats", type=int, default=pick(5, 1))
  ap.add_argument("--rounds", type=int, default=pick(3, 1))
  a = ap.parse_args(argv)
  snap = cpu_snapshot()
  t_start = time.perf_counter()
  steps = {}
  for n in VARIANTS:
    compiled, state, frozen, batch, comp = build_step(n)
    steps[n] = dict(fn=compiled, state=state, frozen=frozen, batch=batch)
    print(f"{n:16s} compiled in {comp:.1f} s", flush=True)
  timed = time_interleaved(steps, a.rounds, a.warmup, a.repeats)
  times = {n: t["ts"] for n, t in timed.items()}
  med = {n: t["median"] for n, t in timed.items()}
  for n in VARIANTS:
    print(f"{n:16s} {med[n] * 1e3:8.1f} ms median of {len(times[n])} (min {min(times[n]) * 1e3:.1f}, max "
          f"{max(times[n]) * 1e3:.1f}); {TOKENS / med[n]:7.0f} tokens/s; vs tdpo1 {med[n] / med['tdpo1'] - 1:+.1%}")
  other = other_load(snap)
  print(f"total wall {time.perf_counter() - t_start:.1f} s" + (
      "" if other is None else f"; other processes used {other:.2f} of {os.cpu_count()} CPUs meanwhile"
      + (" -- CONTENDED, numbers are not trustworthy" if other > 0.25 else "")))
  print(json.dumps({
      **{f"{n}_step_ms": round(med[n] * 1e3, 2) for n in VARIANTS},
      **{f"{n}_tokens_per_s": round(TOKENS / med[n], 1) for n in VARIANTS},
      **{f"{n}_overhead_vs_tdpo1": round(med[n] / med["tdpo1"] - 1, 3) for n in VARIANTS if n != "tdpo1"},
      "tokens_per_step": TOKENS, "samples_per_variant": a.rounds * a.repeats,
      "other_cpu_load": None if other is None else round(other, 3)}))


if __name__ == "__main__":
  main()
