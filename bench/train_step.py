"""Benchmark of the SFT train step on the CPU: step time, tokens/s, GFLOP/s vs matmul peak.

  python bench/train_step.py            (about 35 s on 2 idle CPU cores)
  python bench/train_step.py --batch 64 (a variant; --warmup / --repeats too)

What it runs: the real ``jaxopd.train.Trainer.train_step``, jitted by
``Trainer.compiled_train_step`` (donated state, explicit shardings), built
from ``experiments/sft.py``'s ``get_config("sort")`` / ``build()`` with these
overrides: Llama family, 4 layers, d_model 256, 4 heads (head_dim 64),
n_kv_heads 4 (no GQA), d_ff 704 (the Llama default 8/3*d rounded to 32),
vocab 256 (tied embeddings), seq_len = max_len = 128, batch 16, float32,
grad_accum 1, the experiment's AdamW (global-norm clipping), one CPU device
(mesh.num_devices=1, mesh.shape=(1,1,1)), data.task "sort" with
data.sort.max_symbols 62. One batch is drawn from the experiment's ``train_data``
iterator and reused for every step (the step's cost does not depend on the
token values: padding is still computed).

Measured (``time.perf_counter``, ``block_until_ready`` on the outputs,
medians): 5 warm-up + 20 timed steps of the train step; the same for a
jitted forward-only loss and for loss+grad without the optimizer (a cheap
breakdown); and the machine's practical peak, the best median GFLOP/s of
jitted float32 matmuls of a few sizes (the model's own shapes and 1024^3,
2048^3), measured in the same process.

FLOP count (analytic, matmuls only; backward = 2x forward, so a step is 3x
the forward):

  flops/step = 3 * [ 2 * N_mm * B*T  +  2*2 * B*T*T * d_model * n_layers ]

with N_mm = matmul parameters = n_layers * (d*(h*dh) + 2*d*(kv*dh) + (h*dh)*d
+ 3*d*d_ff) + d*vocab (the tied output projection; the embedding lookup is a
gather, not a matmul). The attention term counts the full T x T score and
value matmuls, which is what the model computes (the causal mask is applied
to full scores). Norms, softmax, RoPE, the loss and the AdamW update are not
counted. XLA's own ``cost_analysis()`` flop count of the compiled step is
printed next to it (it also counts elementwise ops).

The last line printed is one JSON object: tokens_per_s, gflops, peak_gflops,
fraction_of_peak, and extras.

What limits the fraction of peak (measured on the 2-core Sapphire Rapids
VM, XLA:CPU of jax 0.10.2; idle: train step ~430-480 ms, ~4.3-4.8k tokens/s,
~90-100 GFLOP/s against a ~280-305 GFLOP/s matmul peak, fraction ~0.32-0.34):

* The forward alone runs at ~185 GFLOP/s (~0.6 of peak); the backward is
  ~4.5x the forward instead of ~2x. A profile (jax.profiler) shows ~25% of
  the op time in transposing copy fusions: the weight gradients of the
  matmuls on 3-D activations ``[B, T, D] @ [D, F]`` (SwiGLU MLP worst: the
  SiLU backward is fused into a [704, 2048] transpose, 10-30 ms per layer;
  q/k/v/o projections and the LM head smaller). The same SwiGLU MLP applied
  to ``x.reshape(B*T, D)`` runs fwd+bwd in 22 ms instead of 57 ms.
  Flattening to 2-D around the dense matmuls (MLP, projections, LM head),
  tried by monkeypatching outside jaxopd, took the step from ~446 to
  ~324 ms (6.3k tokens/s, fraction ~0.44).
* After that: the attention core (RoPE, mask, softmax and the batched
  128x64x128 score/value matmuls, which run at only ~70 GFLOP/s) costs
  ~24 ms fwd+bwd per layer, ~30% of the step for ~7% of the FLOPs; the
  d=256 projections are small matmuls (~130-250 GFLOP/s); norms, the loss
  and AdamW are each a few ms. A larger batch does not help: ``--batch 64``
  gave fraction ~0.32 (vs ~0.34 at 16; both runs under the same outside
  load, so only the ratio is meaningful), so per-op overhead and small
  matrices are not the main limit.
* The machine is shared: other processes halve both the step and the peak.
  The script reports how many CPUs other processes used meanwhile and flags
  the run as CONTENDED above 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jaxopd import config as config_lib  # noqa: E402
from jaxopd import mesh as mesh_lib  # noqa: E402
from jaxopd.experiment import DataShard, LossOutput, load_config  # noqa: E402
from jaxopd.methods import sft  # noqa: E402
from jaxopd.train import Trainer  # noqa: E402

from common import pick  # noqa: E402

WARMUP, REPEATS = pick((5, 20), (0, 1))
BATCH, SEQ = pick((16, 128), (2, 16))


def parse_args(argv=None):
  global WARMUP, REPEATS, BATCH
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=BATCH, help="global batch (default 16)")
  ap.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps after compiling (default 5)")
  ap.add_argument("--repeats", type=int, default=REPEATS, help="timed steps (default 20)")
  a = ap.parse_args(argv)
  WARMUP, REPEATS, BATCH = a.warmup, a.repeats, a.batch


def make_config():
  # the in-code sort task (no corpus to build, no sampled eval)
  c = load_config(os.path.join(ROOT, "experiments", "sft.py:sort"))
  c.batch_size = BATCH
  c.seq_len = SEQ
  c.grad_accum = 1
  c.model.family = "llama"
  c.model.n_layers = 4
  c.model.d_model = 256
  c.model.n_heads = 4
  c.model.n_kv_heads = 4
  c.model.d_ff = 0               # Llama default: ceil(8/3 * 256 / 32) * 32 = 704
  c.model.vocab_size = 256
  c.model.max_len = SEQ
  c.models.policy.dtype = "float32"
  c.data.task = "sort"
  s = c.data.sort
  s.max_symbols = (SEQ - 3) // 2  # 62: records up to the full 128 tokens
  s.num_train = max(256, 4 * BATCH)  # one batch is all the benchmark uses; keep record generation cheap
  s.num_eval = 32
  c.mesh.num_devices = 1
  c.mesh.shape = (1, 1, 1)
  c.progress = False
  return sft, c


from common import cpu_snapshot as _cpu_snapshot, other_load, time_donated_step  # noqa: E402
from common import matmul_peak, timed, xla_flops  # noqa: E402


def analytic_flops(m, batch, seq):
  """Forward matmul FLOPs (dense part, attention part) of one forward pass."""
  d, h, kv, dh, f, L, V = m.d_model, m.n_heads, m.kv_heads, m.head_dim, m.ff_dim, m.n_layers, m.vocab_size
  n_mm = L * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f) + d * V
  tokens = batch * seq
  dense = 2 * n_mm * tokens
  attn = 2 * 2 * batch * seq * seq * (h * dh) * L
  return n_mm, dense, attn


def main(argv=None):
  parse_args(argv)
  t_start = time.perf_counter()
  snap = _cpu_snapshot()
  sft, c = make_config()
  facts = config_lib.validate(c, len(jax.devices()), jax.process_count())
  mesh = mesh_lib.make_mesh(facts["mesh_shape"], facts["num_devices"])
  rules = facts["rules"]
  model = facts["model"]
  experiment = sft.build(c)
  trainer = Trainer(c, experiment, mesh, rules)

  shard = DataShard(seed=c.seed, process_index=0, process_count=1, local_batch=facts["local_batch"])
  local = next(experiment.train_data(shard))

  with jax.set_mesh(mesh), mesh_lib.use_rules(rules):
    batch = trainer.to_global(local, c.batch_size)
    state, frozen = trainer.init()
    step_fn = trainer.compiled_train_step(batch)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    xf = xla_flops(compiled)

    # The train step (state is donated: thread it through).
    step_s, ts, state, metrics = time_donated_step(compiled, state, frozen, batch, WARMUP, REPEATS)
    loss = float(metrics["loss"])

    # Cheap breakdown: forward-only loss, and loss+grad without the optimizer update.
    params = state["params"]
    rng = jax.random.PRNGKey(1)

    def fwd(p, fr, b):
      out = experiment.loss_fn(trainer._merge(p, fr), b, rng)
      return LossOutput(*out).loss

    fwd_s = timed(jax.jit(fwd), params, frozen, batch, warmup=WARMUP, repeats=REPEATS)
    grads = jax.jit(lambda p, fr, b, r: trainer._microbatch_sums(p, fr, state.get("snapshots"), b, r))
    grad_s = timed(grads, params, frozen, batch, rng, warmup=WARMUP, repeats=REPEATS)

  peaks = matmul_peak(BATCH * SEQ)
  peak = max(peaks.values())

  n_mm, dense, attn = analytic_flops(model, BATCH, SEQ)
  flops = 3 * (dense + attn)
  tokens = BATCH * SEQ
  gflops = flops / step_s / 1e9
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); "
        f"model llama L={model.n_layers} d={model.d_model} heads={model.n_heads} kv={model.kv_heads} "
        f"d_ff={model.ff_dim} vocab={model.vocab_size}; params {n_params:,} (matmul {n_mm:,})")
  print(f"batch {BATCH} x seq {SEQ} = {tokens} tokens, float32, one batch reused; "
        f"compile {compile_s:.1f} s; loss after {WARMUP + REPEATS} steps {loss:.4f}")
  print(f"train step : {step_s * 1e3:8.1f} ms median of {REPEATS} "
        f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})")
  print(f"  forward  : {fwd_s * 1e3:8.1f} ms   loss+grad (no optimizer): {grad_s * 1e3:.1f} ms   "
        f"optimizer+rest (difference of medians): {(step_s - grad_s) * 1e3:.1f} ms")
  print(f"tokens/s   : {tokens / step_s:10.0f}")
  print(f"flops/step : {flops / 1e9:.2f} GFLOP analytic (dense {3 * dense / 1e9:.2f} + attention "
        f"{3 * attn / 1e9:.2f})" + (f"; XLA cost_analysis {xf / 1e9:.2f} GFLOP" if xf else ""))
  print(f"achieved   : {gflops:8.1f} GFLOP/s (train step)   forward alone {dense / 1e9 + attn / 1e9:.2f} "
        f"GFLOP in {fwd_s * 1e3:.1f} ms = {(dense + attn) / fwd_s / 1e9:.1f} GFLOP/s")
  for k, v in peaks.items():
    print(f"matmul     : {k:22s} {v:8.1f} GFLOP/s")
  print(f"peak       : {peak:8.1f} GFLOP/s -> fraction of peak {gflops / peak:.3f}")
  other = other_load(snap)
  print(f"total wall : {time.perf_counter() - t_start:.1f} s" + (
      "" if other is None else f"; other processes used {other:.2f} of {os.cpu_count()} CPUs meanwhile"
      + (" -- CONTENDED, numbers are not trustworthy" if other > 0.25 else "")))
  print(json.dumps({
      "tokens_per_s": round(tokens / step_s, 1),
      "gflops": round(gflops, 2),
      "peak_gflops": round(peak, 2),
      "fraction_of_peak": round(gflops / peak, 4),
      "step_ms": round(step_s * 1e3, 2),
      "forward_ms": round(fwd_s * 1e3, 2),
      "grad_ms": round(grad_s * 1e3, 2),
      "flops_per_step": flops,
      "xla_flops_per_step": xf,
      "batch": BATCH, "seq_len": SEQ, "n_layers": model.n_layers, "d_model": model.d_model,
      "n_heads": model.n_heads, "n_kv_heads": model.kv_heads, "d_ff": model.ff_dim,
      "vocab_size": model.vocab_size, "device": jax.devices()[0].platform,
      "other_cpu_load": None if other is None else round(other, 3),
  }))


if __name__ == "__main__":
  main()
