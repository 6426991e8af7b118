"""LoRA vs full fine-tuning: the DPO train step at a real model's shapes on the CPU.

  python bench/lora_step.py                        # SmolLM2-135M shapes, ~3 min on 2 idle cores
  python bench/lora_step.py --preset qwen2-0.5b --seq 64 --repeats 3

Both steps are the real ``Trainer.train_step`` of ``experiments/tdpo.py:dpo`` (random weights of
the preset's shapes, one CPU device, float32, synthetic pairs of ``seq`` tokens in TRL's format,
the same batch every step): full fine-tuning with a separate frozen reference, and LoRA (rank
``--rank`` on all seven projections) with the reference declared ``base:policy``. Printed: the
median step time of each (``--repeats`` after 2 warm-ups, ``block_until_ready``), the bytes of the
trained parameters + AdamW state and of the frozen arrays, and the ratios. The TPU compiler's bytes
at 8B on v5e-8 / v5p-8 are launch/fit_table.py's (``--lora 16``; launch/README.md). The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "launch"), os.path.dirname(os.path.abspath(__file__))]


from common import pick  # noqa: E402


def _bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(preset: str, seq: int, pairs: int, rank: int, repeats: int, data: dict) -> dict:
  import aot_memory
  import fit_table
  from common import time_donated_step, trainer_step
  tiny = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64,
          "model.vocab_size": 1024}
  config = fit_table.cell_config("dpo", data, seq, pairs, arch=None if preset else tiny, remat="none", scan=True,
                                 lora=rank)
  if preset:
    aot_memory.apply_preset(config, preset)
  for role in config.models:     # the CPU's own precision, and its own mesh
    config.models[role].dtype = config.models[role].param_dtype = "float32"
  config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
  st = trainer_step(config, "tdpo")
  trained = _bytes(st["state"]["params"]) + _bytes(st["state"]["opt_state"])
  held = _bytes(st["frozen"])
  med, times, _, metrics = time_donated_step(st["fn"], st["state"], st["frozen"], st["batch"], 2, repeats)
  return {"step_s": med, "times": [round(x, 3) for x in times],
          "trained_bytes": trained, "frozen_bytes": held, "loss": float(metrics["loss"])}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=pick("smollm2-135m", ""))
  p.add_argument("--seq", type=int, default=pick(128, 16))
  p.add_argument("--pairs", type=int, default=2)
  p.add_argument("--rank", type=int, default=pick(16, 2))
  p.add_argument("--repeats", type=int, default=pick(5, 1))
  a = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import fit_table
  data = fit_table.write_data(tempfile.mkdtemp(), a.seq // 2, a.seq - a.seq // 2, n=4 * a.pairs)
  full = measure(a.preset, a.seq, a.pairs, 0, a.repeats, data)
  adapters = measure(a.preset, a.seq, a.pairs, a.rank, a.repeats, data)
  gib = 2 ** 30
  print(f"DPO step, {a.preset} shapes, {a.pairs} pairs x {a.seq} tokens, float32, 1 CPU device")
  for name, r in (("full fine-tuning", full), (f"LoRA rank {a.rank}", adapters)):
    print(f"  {name:<17} step {1e3 * r['step_s']:8.0f} ms (median of {r['times']})   trained params + AdamW "
          f"{r['trained_bytes'] / gib:7.3f} GiB   frozen {r['frozen_bytes'] / gib:6.3f} GiB")
  out = {"preset": a.preset, "seq": a.seq, "pairs": a.pairs, "rank": a.rank,
         "full_step_s": full["step_s"], "lora_step_s": adapters["step_s"],
         "step_time_ratio": adapters["step_s"] / full["step_s"],
         "trained_bytes_ratio": adapters["trained_bytes"] / full["trained_bytes"],
         "full_trained_gib": full["trained_bytes"] / gib, "lora_trained_gib": adapters["trained_bytes"] / gib,
         "full_frozen_gib": full["frozen_bytes"] / gib, "lora_frozen_gib": adapters["frozen_bytes"] / gib}
  print(f"  LoRA / full: step time {out['step_time_ratio']:.2f}x, trained params + AdamW "
        f"{100 * out['trained_bytes_ratio']:.2f}%")
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
