"""Benchmark: DPO and TDPO train-step throughput of jaxopd vs Hugging Face TRL's DPOTrainer (PyTorch CPU).

  python bench/preference_step.py   (a few minutes on 2 CPU cores; --warmup / --repeats / --trl-steps)

Workload (identical on both sides): a Llama-style policy and a frozen Llama-style
reference of the same shape -- vocab 1024, d_model 256, 4 layers, 4 heads
(n_kv_heads 4, head_dim 64), SwiGLU d_ff 1024, RMSNorm, RoPE, untied embeddings,
max_len 128 -- float32; a batch of 8 preference pairs, each 32 prompt + 96
response tokens (seq_len 128), so 8 * 2 * 128 = 2048 tokens go through the
policy (forward + backward) and the reference (forward) per step; AdamW
(b1 0.9, b2 0.95, eps 1e-8, lr 3e-4 constant, no weight decay, global-norm
clipping 1.0). One synthetic batch is reused every step.

jaxopd: ``Trainer.compiled_train_step`` (jitted, donated state, one CPU device,
mesh (1,1,1)) of an ``Experiment`` with the roles ``policy`` (trained) and
``reference`` (frozen), both random-initialised, and whose loss is
``jaxopd.methods.tdpo.make_loss_fn("dpo", 0.1, log_kl=False)`` (DPO) or
``make_loss_fn("tdpo2", 0.1, 0.5)`` (TDPO2, with the token-level forward KL of
the reference against the policy). The batch has random tokens and loss_mask 1
on positions 32..127. Timed: median of ``--repeats`` (10) steps after
``--warmup`` (3) steps, ``time.perf_counter`` around the call and
``jax.block_until_ready`` on the new state and metrics.

TRL: ``trl.DPOTrainer`` (trl 1.16.0, installed into the venv; it kept the
installed torch 2.13.0+cpu and transformers 5.x) with
``transformers.LlamaForCausalLM`` policy and an explicit ``ref_model`` of the
same config (default attention implementation), loss_type sigmoid, beta 0.1,
DPOConfig(per_device_train_batch_size=8, max_length=128,
precompute_ref_log_probs=False, use_cpu=True, bf16/fp16 False, report_to=[],
no eval, no saving, constant LR, optim adamw_torch, gradient_checkpointing=False:
TRL 1.16 turns gradient checkpointing on by default, which recomputes the
forward in the backward; jaxopd does not rematerialise, so it is off for equal
terms). The script prints every DPOConfig field that differs from TRL's
defaults, the effective checkpointing of the policy, and jaxopd's settings. TRL 1.16 has no
``max_prompt_length`` option any more (only ``max_length`` with keep_start
truncation); every pair is exactly 128 tokens, so nothing is truncated.
The dataset is 8 in-memory text pairs over a word-level ``tokenizers``
vocabulary of 1024 tokens (1022 words + <pad> + </s>): prompt 32 words,
chosen/rejected 95 words to which TRL appends </s> -> 96 response tokens.
Timed: ``trainer.train()`` with max_steps = warmup + repeats; a
``TrainerCallback`` records ``perf_counter`` at ``on_step_begin`` and
``on_step_end``, which brackets exactly one optimizer step of the HF training
loop: ``training_step`` (policy forward on the chosen+rejected concatenation,
reference forward under no_grad, DPO loss, backward), grad clipping,
``optimizer.step()``, the LR scheduler step and ``zero_grad``. Data loading /
collation (done before ``on_step_begin``) and logging are outside the
bracket. Median over the steps after the warm-up. Run with
``torch.set_num_threads(1)`` and ``(2)``; the faster is used for the ratio.

Throughput: tokens/s = 8 pairs * 2 * 128 / step time; pairs/s = 8 / step time.

Aims: jaxopd DPO >= 1.5x TRL's tokens/s; TDPO's extra KL term costs <= 25% over
jaxopd DPO (tdpo_overhead_vs_dpo = TDPO time / DPO time - 1 <= 0.25).

Measured (2-core Sapphire Rapids VM, jax 0.10.2, torch 2.13.0+cpu,
transformers 5.23.0, trl 1.16.0, 3 warm-up + 10 timed steps, idle machine:
other processes used 0.00 of the 2 CPUs; 66 s in all):

  jaxopd DPO    473 ms/step  4328 tokens/s  16.9 pairs/s
  jaxopd TDPO   488 ms/step  4200 tokens/s  16.4 pairs/s
  TRL DPO       559 ms/step  3664 tokens/s  14.3 pairs/s  (torch threads=2;
                threads=1: 1004 ms)

  (These TRL figures were taken with TRL's default gradient checkpointing
  on. With it off, on a later day whose machine was slower -- matmul peak
  195-209 GFLOP/s instead of 281 --, 20 timed steps: jaxopd DPO 590 ms,
  TDPO 642 ms, TRL 635 ms: dpo_ratio_vs_trl 1.08; a 10-step run before it
  gave 0.83 with DPO slower than TDPO, i.e. noise.)

  -> dpo_ratio_vs_trl 1.18 (aim >= 1.5x NOT met; an earlier idle run gave
     1.11: TRL 3814, DPO 4223 tokens/s); tdpo_overhead_vs_dpo +3.0% (aim
     <= +25% met).

What limits the step (profiled with jax.profiler and by timing the parts):

* It is the model compute: the policy's forward + backward alone takes 398 ms
  and the reference's forward 99 ms (printed by this script; their sum is
  1.05x the step, which overlaps them). The loss, the token-level KL and
  AdamW together are a few percent. XLA's cost analysis counts 77.9 GFLOP
  per step, run at 165 GFLOP/s = 0.58 of the same process's float32 matmul
  peak (281 GFLOP/s); 1.5x TRL would need 0.74 of that peak.
* Threads are not the gap: pinned to one core (taskset -c 0) the step takes
  920 ms, 1.95x the two-core time.
* Within the step, ~70% of the op time (summed over XLA's two worker
  threads) is the matmuls (YNNPACK fusions); the rest is many small fusions:
  the attention's layout copies, SiLU, RMSNorm and RoPE, AdamW's updates.
* Tried without gain (DPO step, same process, idle): XLA:CPU flags
  ``--xla_cpu_enable_concurrency_optimized_scheduler`` true/false (479 / 489
  ms vs 486 default), ``--xla_cpu_use_onednn=true`` (496),
  ``--xla_cpu_use_xnnpack=false`` (509), ``--xla_cpu_enable_fast_math=true``
  (499); bfloat16 compute (496 vs 466: XLA:CPU does not use the AMX units
  here); one fused q/k/v matmul and one fused gate/up matmul instead of
  separate ones (fwd+bwd 10.3 vs 9.8 ms and 35.2 vs 34.7 ms: no gain).
* Not done: computing the shared prompt once for chosen and rejected (32 of
  the 128 tokens of each row: at most ~12% of the FLOPs, less than the ~21%
  the aim needs, and a different packed batch layout for every preference
  method) and precomputing the reference's log-probs (TRL's
  ``precompute_ref_log_probs``; excluded here because the workload includes
  the reference forward, and TDPO needs the reference's full distribution).

The last line printed is one JSON object: dpo_tokens_per_s, tdpo_tokens_per_s,
trl_tokens_per_s, dpo_ratio_vs_trl, tdpo_overhead_vs_dpo, other_cpu_load and
some extras.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jaxopd.experiment import Experiment  # noqa: E402
from jaxopd.models import ModelConfig, Transformer  # noqa: E402
from jaxopd.methods.tdpo import make_loss_fn  # noqa: E402

from common import pick  # noqa: E402

PAIRS, PROMPT, RESPONSE = pick((8, 32, 96), (2, 4, 4))
SEQ = PROMPT + RESPONSE
VOCAB, D, LAYERS, HEADS, FF = pick((1024, 256, 4, 4, 1024), (1024, 32, 1, 2, 64))
BETA, ALPHA, LR = 0.1, 0.5, 3e-4
TOKENS = PAIRS * 2 * SEQ


def model_cfg() -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                     n_kv_heads=HEADS, d_ff=FF, max_len=SEQ, tie_embeddings=False)


# --- contention check and step timing: bench/common.py
from common import cpu_snapshot as _cpu_snapshot, other_load, time_donated_step  # noqa: E402
from common import compile_train_step, matmul_peak, single_device_config, timed, xla_flops  # noqa: E402
from common import trl_settings, trl_step_timer  # noqa: E402


# --- jaxopd ---------------------------------------------------------------------------------------
def synthetic_batch(seed=0):
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, VOCAB, size=(PAIRS, 2, SEQ)).astype(np.int32)
  tokens[:, 1, :PROMPT] = tokens[:, 0, :PROMPT]   # chosen and rejected share the prompt
  mask = np.zeros((PAIRS, 2, SEQ), np.int32)
  mask[:, :, PROMPT:] = 1
  return {"tokens": tokens, "loss_mask": mask}


def jax_step_time(loss_name, warmup, repeats, chunk=128):
  mc = model_cfg()
  roles = {"policy": True, "reference": False}
  c = single_device_config(mc, PAIRS, SEQ, LR, roles)
  if loss_name == "dpo":
    loss_fn = make_loss_fn("dpo", BETA, log_kl=False, chunk=chunk)
  else:
    loss_fn = make_loss_fn("tdpo2", BETA, ALPHA, chunk=chunk)

  local = synthetic_batch()
  exp = Experiment(roles=roles, loss_fn=loss_fn, train_data=lambda shard: iter([local]))
  compiled, state, frozen, batch, compile_s, _ = compile_train_step(c, exp, local)
  flops = xla_flops(compiled)
  step_s, ts, state, metrics = time_donated_step(compiled, state, frozen, batch, warmup, repeats)
  return step_s, ts, compile_s, float(metrics["loss"]), flops


def jax_parts_time(warmup, repeats):
  """The model compute inside a step, timed alone on the same 16 x 128 tokens: the
  policy's forward + backward (gradient of the summed token log-probs) and the
  reference's forward (its log-probs). Returns (policy s, reference s)."""
  from jaxopd.losses import token_logprobs
  model = Transformer(model_cfg(), nnx.Rngs(params=0))
  gd, params = nnx.split(model, nnx.Param)
  tokens = jax.numpy.asarray(synthetic_batch()["tokens"].reshape(PAIRS * 2, SEQ))

  def logp(p, t):
    return token_logprobs(nnx.merge(gd, p)(t).logits, t).sum()
  policy = timed(jax.jit(jax.grad(logp)), params, tokens, warmup=warmup, repeats=repeats)
  reference = timed(jax.jit(logp), params, tokens, warmup=warmup, repeats=repeats)
  return policy, reference


# --- TRL ------------------------------------------------------------------------------------------
def trl_step_time(threads, warmup, repeats):
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
  from trl import DPOConfig, DPOTrainer

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  words = [f"w{i}" for i in range(VOCAB - 2)]
  vocab = {"<pad>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<pad>")
  rs = np.random.RandomState(0)

  def text(n):
    return " ".join(words[i] for i in rs.randint(0, len(words), size=n))

  rows = [{"prompt": text(PROMPT), "chosen": " " + text(RESPONSE - 1), "rejected": " " + text(RESPONSE - 1)}
          for _ in range(PAIRS)]
  ds = Dataset.from_list(rows)

  lc = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
  policy = LlamaForCausalLM(lc).float()
  ref = LlamaForCausalLM(lc).float()

  timer = trl_step_timer()
  args = DPOConfig(output_dir="/tmp/preference_step_trl", per_device_train_batch_size=PAIRS, max_length=SEQ,
                   precompute_ref_log_probs=False, use_cpu=True, bf16=False, fp16=False, report_to=[],
                   eval_strategy="no", save_strategy="no", logging_steps=10**6, max_steps=warmup + repeats,
                   learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                   adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, beta=BETA,
                   loss_type=["sigmoid"], gradient_accumulation_steps=1, dataloader_num_workers=0,
                   disable_tqdm=True, seed=0,
                   gradient_checkpointing=False)   # TRL 1.16's default is True (it would recompute the forward)
  trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                       callbacks=[timer])
  # Check the token accounting of the prepared dataset once.
  ex = trainer.train_dataset[0]
  lens = (len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"]))
  out = trainer.train()
  ts = timer.ts[warmup:]
  settings = trl_settings(args, policy)
  return statistics.median(ts), ts, lens, float(out.training_loss), {
      "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
      "attn": getattr(policy.config, "_attn_implementation", None)}, settings


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--warmup", type=int, default=pick(3, 0))
  ap.add_argument("--repeats", type=int, default=pick(10, 1))
  ap.add_argument("--chunk", type=int, default=128, help="the loss's chunk (0: every position at once, no recompute)")
  a = ap.parse_args(argv)
  t_start = time.perf_counter()
  snap = _cpu_snapshot()

  res, flops = {}, {}
  for name in ("dpo", "tdpo"):
    med, ts, comp, loss, flops[name] = jax_step_time(name, a.warmup, a.repeats, a.chunk)
    res[name] = med
    print(f"jaxopd {name:4s}: {med * 1e3:8.1f} ms median of {a.repeats} (min {min(ts) * 1e3:.1f}, "
          f"max {max(ts) * 1e3:.1f}); compile {comp:.1f} s; loss {loss:.4f}; "
          f"{TOKENS / med:8.0f} tokens/s, {PAIRS / med:6.2f} pairs/s", flush=True)

  pol_s, ref_s = jax_parts_time(a.warmup, a.repeats)
  peaks = matmul_peak(TOKENS)
  peak = max(peaks.values())
  print(f"inside the DPO step: policy forward+backward alone {pol_s * 1e3:.1f} ms, reference forward alone "
        f"{ref_s * 1e3:.1f} ms, sum {(pol_s + ref_s) * 1e3:.1f} ms = {(pol_s + ref_s) / res['dpo']:.2f} of the step",
        flush=True)

  trl_res = {}
  versions = {}
  for th in (1, 2):
    med, ts, lens, loss, versions, trl_cfg = trl_step_time(th, a.warmup, a.repeats)
    trl_res[th] = med
    print(f"TRL DPO threads={th}: {med * 1e3:8.1f} ms median of {len(ts)} (min {min(ts) * 1e3:.1f}, "
          f"max {max(ts) * 1e3:.1f}); prompt/chosen/rejected tokens {lens}; train loss {loss:.4f}; "
          f"{TOKENS / med:8.0f} tokens/s, {PAIRS / med:6.2f} pairs/s", flush=True)
  best_th = min(trl_res, key=trl_res.get)
  trl_s = trl_res[best_th]

  print(f"versions: jax {jax.__version__}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
  print("TRL DPOConfig settings that differ from its defaults: "
        + ", ".join(f"{k}={v!r}" for k, v in sorted(trl_cfg.items())))
  print(f"jaxopd settings: float32 params and compute, attention=einsum, no rematerialisation, grad_accum 1, "
        f"mesh (1,1,1) on 1 CPU device, AdamW b1 0.9 b2 0.95 eps 1e-8 lr {LR} constant, no weight decay, "
        f"clip 1.0, beta {BETA} (alpha {ALPHA} for TDPO2), reference forward in the step")
  print(f"tokens/step {TOKENS} ({PAIRS} pairs x 2 x {SEQ}); TRL uses torch threads={best_th} (faster)")
  print(f"jaxopd DPO  : {TOKENS / res['dpo']:8.0f} tokens/s  {PAIRS / res['dpo']:6.2f} pairs/s")
  print(f"jaxopd TDPO : {TOKENS / res['tdpo']:8.0f} tokens/s  {PAIRS / res['tdpo']:6.2f} pairs/s")
  print(f"TRL DPO     : {TOKENS / trl_s:8.0f} tokens/s  {PAIRS / trl_s:6.2f} pairs/s")
  ratio = trl_s / res["dpo"]
  overhead = res["tdpo"] / res["dpo"] - 1
  print(f"DPO vs TRL  : {ratio:.2f}x (aim >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")
  print(f"TDPO vs DPO : {overhead * 100:+.1f}% (aim <= +25%: {'met' if overhead <= 0.25 else 'NOT met'})")
  frac = need = None
  if flops["dpo"]:
    gf = flops["dpo"] / res["dpo"] / 1e9
    frac, need = gf / peak, flops["dpo"] / (trl_s / 1.5) / 1e9 / peak
    print(f"DPO step    : {flops['dpo'] / 1e9:.1f} GFLOP (XLA cost analysis) at {gf:.0f} GFLOP/s = {frac:.2f} of the "
          f"float32 matmul peak {peak:.0f} GFLOP/s (" + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + f"); 1.5x TRL would need {need:.2f} of that peak")
  other = other_load(snap)
  print(f"total wall : {time.perf_counter() - t_start:.1f} s" + (
      "" if other is None else f"; other processes used {other:.2f} of {os.cpu_count()} CPUs meanwhile"
      + (" -- CONTENDED, numbers are not trustworthy" if other > 0.25 else "")))
  print(json.dumps({
      "dpo_tokens_per_s": round(TOKENS / res["dpo"], 1),
      "tdpo_tokens_per_s": round(TOKENS / res["tdpo"], 1),
      "trl_tokens_per_s": round(TOKENS / trl_s, 1),
      "dpo_ratio_vs_trl": round(ratio, 3),
      "tdpo_overhead_vs_dpo": round(overhead, 3),
      "dpo_step_ms": round(res["dpo"] * 1e3, 2),
      "tdpo_step_ms": round(res["tdpo"] * 1e3, 2),
      "trl_step_ms": round(trl_s * 1e3, 2),
      "trl_step_ms_by_threads": {str(k): round(v * 1e3, 2) for k, v in trl_res.items()},
      "trl_threads": best_th,
      "tokens_per_step": TOKENS,
      "policy_fwd_bwd_ms": round(pol_s * 1e3, 2),
      "reference_fwd_ms": round(ref_s * 1e3, 2),
      "dpo_gflop_per_step": None if not flops["dpo"] else round(flops["dpo"] / 1e9, 2),
      "peak_gflops": round(peak, 1),
      "dpo_fraction_of_peak": None if frac is None else round(frac, 3),
      "fraction_of_peak_needed_for_1p5x": None if need is None else round(need, 3),
      "other_cpu_load": None if other is None else round(other, 3),
      "trl_gradient_checkpointing": bool(trl_cfg.get("gradient_checkpointing (effective)")),
  }))


if __name__ == "__main__":
  main()
