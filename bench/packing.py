"""Benchmark of SFT with packed rows (``config.method.pack``) against one example per row.

  python bench/packing.py                 (about 1 minute on 2 idle CPU cores once the data is built;
                                           building the reviews corpus into --data_dir takes ~1 more)
  python bench/packing.py --repeats 40    (more timed steps)

What it runs: ``experiments/sft.py``'s default config (the reviews corpus, seq_len 64, batch 32,
the 4-layer d_model-128 Llama-style model), on one CPU device, built twice by
``jaxopd.methods.sft.build``: unpacked and with ``method.pack=True``. For each, the real
``Trainer.train_step`` is compiled ahead of time and timed on one batch of that experiment's
own training data (medians of ``--repeats`` steps after ``--warmup``; ``block_until_ready``).

Reported: rows of one epoch of the corpus (the packed rows hold the same examples, first-fit in
order), the fraction of the rows' tokens that are real (not padding), the step time, and from
them the time of one epoch and the real tokens per second; ``speedup`` is the unpacked epoch
time over the packed one (the two steps have the same shapes, so it is close to the row ratio;
the step times are printed to show it). The last line is one JSON object of these figures,
with ``other_load`` (CPUs other processes used meanwhile; above ~0.3 the timings are suspect).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data_dir", default=common.pick("data", ""),
                 help="where the reviews corpus is (built there if missing; tiny mode: a temporary directory)")
  p.add_argument("--warmup", type=int, default=common.pick(3, 0))
  p.add_argument("--repeats", type=int, default=common.pick(20, 1))
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import numpy as np

  from jaxopd.data import suite as suite_lib
  from jaxopd.data.pipeline import pack
  from jaxopd.experiment import DataShard, load_config
  from jaxopd.methods import sft

  import tempfile
  tmp = tempfile.mkdtemp(prefix="bench-packing-")
  load = common.cpu_snapshot()
  out = {}
  for packed in (False, True):
    c = load_config(common.pick("sft.py", "sft.py:smoke"))
    c.data.data_dir = args.data_dir or tmp
    c.mesh.shape, c.mesh.num_devices, c.progress = (1, 1, 1), 1, False
    c.eval.num_prompts = 0
    c.method.pack = packed
    exp = sft.build(c)
    suite = suite_lib.ensure(c.data, verbose=False)
    recs, _ = suite_lib.sft_records(suite, "train", c.seq_len, c.data.over_length, verbose=False)
    pad = suite.tokenizer.pad_token_id
    rows = pack(recs, c.seq_len, pad)[0] if packed else recs
    real = sum(int(np.sum(np.asarray(r["tokens"]) != pad)) for r in recs)
    batch = next(exp.train_data(DataShard(c.seed, 0, 1, c.batch_size)))
    compiled, state, frozen, gbatch, compile_s, _ = common.compile_train_step(c, exp, batch)
    step_s, _, _, _ = common.time_donated_step(compiled, state, frozen, gbatch, args.warmup, args.repeats)
    epoch_s = len(rows) / c.batch_size * step_s
    name = "packed" if packed else "unpacked"
    out[name] = {"rows_per_epoch": len(rows), "real_token_fraction": real / (len(rows) * c.seq_len),
                 "step_ms": 1e3 * step_s, "epoch_s": epoch_s, "real_tokens_per_s": real / epoch_s,
                 "compile_s": compile_s}
    print(f"{name:9s} rows/epoch {len(rows):6d}  real tokens {100 * out[name]['real_token_fraction']:5.1f}%  "
          f"step {1e3 * step_s:7.1f} ms  epoch {epoch_s:7.1f} s  {real / epoch_s:9.0f} real tokens/s", flush=True)
  speedup = out["unpacked"]["epoch_s"] / out["packed"]["epoch_s"]
  res = {"speedup": speedup, "step_time_ratio": out["packed"]["step_ms"] / out["unpacked"]["step_ms"],
         "row_ratio": out["unpacked"]["rows_per_epoch"] / out["packed"]["rows_per_epoch"],
         **{f"{k}_{f}": v for k, d in out.items() for f, v in d.items()}, "other_load": common.other_load(load)}
  print(f"packing speed-up (epoch time, unpacked / packed): {speedup:.2f}x")
  print(json.dumps(res))


if __name__ == "__main__":
  main()
