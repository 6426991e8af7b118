"""Benchmark: the DPO and TDPO train step with the prompt shared by chosen and rejected
(``config.method.share_prompt``: one row ``[prompt | chosen | rejected]`` per pair) against a row
per response, on two workloads, in one command.

  python bench/prefix_share.py   (about 5 minutes on 2 CPU cores; --warmup / --repeats / --rounds)

Model (both roles, float32): bench/preference_step.py's Llama-style policy and frozen reference --
vocab 1024, d_model 256, 4 layers, 4 heads, SwiGLU d_ff 1024, untied embeddings; einsum attention;
AdamW lr 3e-4; 8 pairs per step; one synthetic batch of random tokens reused every step, every
response exactly its workload's length (the most the shared layout can save is then known):

* ``long_prompt``: prompt 256, responses 128. A row per response: 2 x 384 tokens per pair.
  Shared: 256 + 2 x 128 + 1 = 513 tokens, padded to 528.
* ``peers``: prompt 32, responses 96 (bench/preference_step.py's workload). A row per response:
  2 x 128. Shared: 32 + 2 x 96 + 1 = 225, padded to 240.

Both layouts run the same loss function (:func:`jaxopd.methods.tdpo.make_loss_fn`; the layout is
read from the batch) from the same initial models and give the same losses (those of the first two
steps are printed, the second after one update; equality is tested in tests/test_prefix_sharing.py).
Timed (:func:`common.time_interleaved`): ``warmup`` untimed steps of each, then ``rounds`` rounds,
each timing every (workload, loss, layout) for ``repeats`` steps; the median over all timed steps. Speed-up = step time of a row per response / shared.

The last line printed is one JSON object: per workload and loss the two step times (ms), the
speed-up, the tokens per pair of each layout, and ``other_cpu_load`` (CPUs used by other
processes meanwhile: above 0.25 the figures are not to be trusted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jaxopd.data.pipeline import share_prompt  # noqa: E402
from jaxopd.experiment import Experiment  # noqa: E402
from jaxopd.methods.tdpo import make_loss_fn  # noqa: E402
from jaxopd.models import ModelConfig  # noqa: E402

from common import compile_train_step, cpu_snapshot, other_load, single_device_config  # noqa: E402
from common import time_interleaved  # noqa: E402

from common import pick  # noqa: E402

PAIRS, VOCAB, D, LAYERS, HEADS, FF, LR = pick((8, 1024, 256, 4, 4, 1024, 3e-4), (2, 1024, 32, 1, 2, 64, 3e-4))
WORKLOADS = pick({"long_prompt": (256, 128), "peers": (32, 96)}, {"long_prompt": (8, 4), "peers": (4, 4)})
LOSSES = {"dpo": dict(loss="dpo", beta=0.1, log_kl=False), "tdpo2": dict(loss="tdpo2", beta=0.1, alpha=0.5)}


def batches(prompt: int, response: int, seed: int = 0):
  """(a row per response ``tokens[B, 2, T]``, shared-prefix rows) of the same random pairs."""
  rs = np.random.RandomState(seed)
  t = prompt + response
  tokens = rs.randint(0, VOCAB, size=(PAIRS, 2, t)).astype(np.int32)
  tokens[:, 1, :prompt] = tokens[:, 0, :prompt]
  mask = np.zeros((PAIRS, 2, t), np.int32)
  mask[:, :, prompt:] = 1
  unshared = {"tokens": tokens, "loss_mask": mask}
  (rows,), stats = share_prompt([[{"tokens": tokens[i], "loss_mask": mask[i]} for i in range(PAIRS)]])
  shared = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return unshared, shared, stats


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--warmup", type=int, default=pick(2, 1))   # >= 1: the first two losses are printed
  ap.add_argument("--repeats", type=int, default=pick(4, 1))
  ap.add_argument("--rounds", type=int, default=pick(2, 1))
  a = ap.parse_args(argv)
  t_start = time.perf_counter()
  snap = cpu_snapshot()
  roles = {"policy": True, "reference": False}
  steps, facts = {}, {}
  for wl, (p, r) in WORKLOADS.items():
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, d_ff=FF,
                      max_len=p + r, tie_embeddings=False)
    unshared, shared, st = batches(p, r)
    facts[wl] = {"tokens_per_pair_rows": 2 * (p + r), "tokens_per_pair_shared": st["row_len"]}
    for ln, kw in LOSSES.items():
      for layout, local in (("rows", unshared), ("shared", shared)):
        c = single_device_config(cfg, PAIRS, p + r, LR, roles)
        exp = Experiment(roles=roles, loss_fn=make_loss_fn(**kw), train_data=lambda shard, b=local: iter([b]))
        compiled, state, frozen, batch, compile_s, _ = compile_train_step(c, exp, local)
        steps[(wl, ln, layout)] = dict(fn=compiled, state=state, frozen=frozen, batch=batch)
        print(f"compiled {wl} {ln} {layout}: rows of {local['tokens'].shape[-1]} tokens, {compile_s:.1f} s",
              flush=True)
  timed = time_interleaved(steps, a.rounds, a.warmup, a.repeats)
  out = {}
  for wl in WORKLOADS:
    for ln in LOSSES:
      rows, shared = (timed[(wl, ln, lay)] for lay in ("rows", "shared"))
      t_rows, t_shared = rows["median"], shared["median"]
      f = facts[wl]
      print(f"{wl:12s} {ln:6s}: a row per response {t_rows * 1e3:7.1f} ms ({f['tokens_per_pair_rows']} tokens/pair), "
            f"shared prompt {t_shared * 1e3:7.1f} ms ({f['tokens_per_pair_shared']} tokens/pair): "
            f"speed-up {t_rows / t_shared:.2f}x; losses of steps 1, 2: {rows['losses'][0]:.6f}, "
            f"{rows['losses'][1]:.6f} vs {shared['losses'][0]:.6f}, {shared['losses'][1]:.6f}",
            flush=True)
      out[f"{wl}_{ln}_rows_ms"] = round(t_rows * 1e3, 1)
      out[f"{wl}_{ln}_shared_ms"] = round(t_shared * 1e3, 1)
      out[f"{wl}_{ln}_speedup"] = round(t_rows / t_shared, 3)
    out[f"{wl}_tokens_per_pair_rows"] = facts[wl]["tokens_per_pair_rows"]
    out[f"{wl}_tokens_per_pair_shared"] = facts[wl]["tokens_per_pair_shared"]
  other = other_load(snap)
  print(f"total wall {time.perf_counter() - t_start:.1f} s; {a.rounds} rounds x {a.repeats} timed steps per "
        f"configuration" + ("" if other is None else f"; other processes used {other:.2f} of {os.cpu_count()} CPUs"
                            + (" -- CONTENDED, numbers are not trustworthy" if other > 0.25 else "")))
  out["other_cpu_load"] = None if other is None else round(other, 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
