"""Compile-and-fit table: methods x real model shapes x TPU topologies, compiled by the TPU compiler.

  python launch/fit_table.py --out runs/fit_table                     # the table in launch/README.md
  python launch/fit_table.py --out runs/fit_seq --cells seq            # TDPO at sequence 1024 / 2048 / 4096
  python launch/fit_table.py --out runs/fit_share --cells share --models qwen2-1.5b --prompt 768   # prompt shared
  python launch/fit_table.py --out runs/fit_grpo --cells grpo --models qwen2-0.5b --prompt 512 --seq 1536 --batch 8
  python launch/fit_table.py --out /tmp/f --cells grid --methods tdpo --models qwen2-0.5b --seq 256 --batch 8
  python launch/fit_table.py --out runs/fit_families --methods sft,dpo --models qwen3-1.7b,gemma3-4b,qwen3-8b,llama3.1-8b

Each cell is one ``launch/aot_memory.py --json --topology T --preset M`` run in its own
process (the real train step of the method, built by its experiment module, lowered
and compiled for the abstract devices of the topology; nothing is allocated). The
data is synthetic and in the methods' own file formats (``config.data.task=files``):
a word-level tokenizer and TRL-format records whose prompt and response lengths are
exact, so every batch has the cell's shapes: SFT rows of ``seq`` tokens; DPO/TDPO/SparsePO
pairs of ``seq``-token sequences; f-DPG and DistillSpec prompts of ``seq/2`` tokens,
with ``seq/2`` new tokens sampled inside the step; GRPO (``--cells grpo``) ``batch`` prompts of
``--prompt`` tokens, each sampled 8 times to ``seq`` tokens inside the step.

Settings of every cell (printed in the table's header): FSDP over every chip
(``mesh.shape=(1,-1,1)``), bf16 compute, float32 trainable parameters (AdamW state
float32), bf16 frozen models, ``remat=full`` on trainable roles, ``attention=dot_product``,
``scan_layers=True`` (``--scan_layers false``: unrolled, for the compile-time comparison).

Writes ``results.jsonl`` (one aot_memory report per cell, with the cell) and
``table.md`` in ``--out``; prints the table; the last line is one JSON object of
per-cell GiB, fit and roofline figures.

FLOPs per chip are counted from the shapes (:func:`step_flops`), not taken from XLA's cost
analysis, which counts a loop body once (the layer scan, the position chunks, a sampler's
decode steps); ``tests/test_aot_tpu.py`` checks the count against XLA's on a step without
loops. The roofline is that count over the chip's peak bf16 FLOP/s
(``aot_memory.CHIPS``): a lower bound on the step time, reached at 100% MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = [f"w{i}" for i in range(200)]

# method -> (experiment config, file format, config overrides given (prompt, response) lengths)
NO_EVAL = {"eval.num_prompts": 0}
METHODS = {
    "sft": ("sft.py", "lm", lambda p, r: NO_EVAL),
    "dpo": ("tdpo.py:dpo", "preference", lambda p, r: NO_EVAL),
    "tdpo": ("tdpo.py", "preference", lambda p, r: NO_EVAL),
    "sparsepo": ("sparsepo.py", "preference", lambda p, r: NO_EVAL),
    "fdpg": ("fdpg.py", "prompt", lambda p, r: {
        "method.target": "rlhf", "method.reward": "fit_table:length_reward", "method.conditional": True,
        "rollout.prompt_len": p, "rollout.max_new_tokens": r,
        # host-side evaluation only (prepare() fits it; no part of the compiled train step):
        "eval.contexts": 1, "eval.log_z": "(0.0,)"}),
    "distillspec": ("distillspec.py", "prompt", lambda p, r: {
        "method.data": "student", "method.prompt_len": p, "method.max_new_tokens": r, **NO_EVAL}),
    "redi": ("redi.py", "preference", lambda p, r: NO_EVAL),
    "grpo": ("grpo.py", "prompt", lambda p, r: {
        "method.reward": "fit_table:length_reward", "method.group_size": GROUP, "rollout.prompt_len": p,
        "rollout.max_new_tokens": r, **NO_EVAL}),
}
GROUP = 8        # GRPO's samples per prompt in the cells (its batch counts prompts)
FROZEN_ROLES = {"dpo": ["reference"], "tdpo": ["reference"], "sparsepo": ["reference"], "redi": ["reference"],
                "fdpg": ["base"], "distillspec": ["target"], "sft": [], "grpo": []}
TRAINABLE_ROLES = {"sft": ["policy"], "dpo": ["policy"], "tdpo": ["policy"], "sparsepo": ["policy"],
                   "redi": ["policy"], "fdpg": ["policy"], "distillspec": ["draft"], "grpo": ["policy"]}
GRID_METHODS = ("sft", "dpo", "tdpo", "sparsepo", "fdpg", "distillspec")   # the README table's (GRPO: --cells grpo)

# The grid of the README table: model -> topology (a slice its size is trained on).
GRID = {"qwen2-0.5b": ("v5e:2x2", 1024), "qwen2-1.5b": ("v5e:4x4", 1024), "llama3-8b": ("v5p:2x2x4", 2048)}
# Current families on their natural slices (``--models`` picks them; launch/README.md's families table).
SLICES = {**GRID, "qwen3-1.7b": ("v5e:2x4", 1024), "gemma3-4b": ("v5e:4x4", 1024), "qwen3-8b": ("v5p:2x2x4", 2048),
          "llama3.1-8b": ("v5p:2x2x4", 2048)}


def shared_len(prompt: int, response: int) -> int:
  """The row length :func:`jaxopd.data.pipeline.share_prompt` gives a pair of a ``prompt``-token
  prompt and two ``response``-token responses."""
  import numpy as np
  sys.path.insert(0, REPO)
  from jaxopd.data.pipeline import share_prompt
  mask = np.zeros((2, prompt + response), np.int32)
  mask[:, prompt:] = 1
  return share_prompt([[{"tokens": np.zeros_like(mask), "loss_mask": mask}]])[1]["row_len"]


def step_flops(method: str, cfg, batch: int, seq: int, remat: str, prompt: int = 0, share: bool = False,
               lora: bool = False) -> float:
  """Matmul FLOPs of one train step of ``method`` (all chips), counted from the shapes
  (:func:`jaxopd.models.presets.forward_flops` / ``decode_flops``): a trained model costs a forward,
  a backward of twice that, the position chunks' LM heads once more (rematerialised by
  ``map_chunks``) and, with ``remat=full``, its trunk once more (``dots``: the attention once more);
  a frozen model one forward; a sampler its prefill and decode steps. SparsePO's mask head and
  f-DPG's host-side reward are not counted (small). Pairs (``prompt`` tokens of ``seq``, default
  half) are ``2 batch`` rows of ``seq`` or, with ``share``, ``batch`` rows of :func:`shared_len`
  (attention counted over the whole row: the branch mask is applied to dense scores). GRPO:
  ``batch`` prompts x :data:`GROUP` samples, each prompt prefilled once; the loss's forward over a
  row per sample or, with ``share``, one grouped row per prompt (the prompt's attention over
  itself, each response's over the prompt and itself), the LM head at the response slots only.
  ``lora``: the trained model's backward computes no weight gradients (one forward's worth, not
  two; the adapters' own matmuls are not counted)."""
  from jaxopd.models.presets import decode_flops, forward_flops, matmul_params, token_flops
  p = prompt or seq // 2
  r = seq - p
  attention = lambda rows, n: (forward_flops(cfg, rows, n, head=False)
                               - rows * n * cfg.n_layers * 2 * matmul_params(cfg)[0])

  def trained_from(trunk, head, attn):
    again = {"none": 0.0, "full": trunk, "dots": attn}[remat]
    return (2 if lora else 3) * (trunk + head) + head + again

  def trained(rows, n=seq):
    full, trunk = forward_flops(cfg, rows, n), forward_flops(cfg, rows, n, head=False)
    return trained_from(trunk, full - trunk, attention(rows, n))
  frozen = lambda rows, n=seq: forward_flops(cfg, rows, n)
  if method == "sft":
    return trained(batch)
  if method in ("dpo", "tdpo", "sparsepo"):
    rows, n = (batch, shared_len(p, r)) if share else (2 * batch, seq)
    return trained(rows, n) + frozen(rows, n)
  if method in ("fdpg", "distillspec"):     # sample from the trained model, score with the frozen one, train
    return decode_flops(cfg, batch, p, r) + frozen(batch) + trained(batch)
  if method == "grpo":
    keys = lambda n: token_flops(cfg, n, head=False)
    if share:       # a prompt's tokens attend over the prompt, a response's over the prompt and itself
      tokens, trunk = batch * (p + GROUP * r), batch * (p * keys(p) + GROUP * r * keys(p + r))
    else:
      tokens, trunk = batch * GROUP * seq, batch * GROUP * seq * keys(seq)
    head = batch * GROUP * r * 2 * matmul_params(cfg)[1]
    return decode_flops(cfg, batch, p, r, samples=GROUP) + trained_from(trunk, head, trunk - tokens * keys(0))
  raise ValueError(f"no FLOP count for method {method!r}")


def length_reward(prompts, completions):
  """f-DPG's reward for the synthetic cells (a ``module:function`` reward; its value does not
  change the compiled step)."""
  del prompts
  return [float(len(c.split())) for c in completions]


def write_data(root: str, prompt_len: int, response_len: int, n: int = 64) -> dict:
  """A word-level tokenizer (BOS prepended, EOS appended) and one file per format, every
  prompt exactly ``prompt_len`` tokens and every response exactly ``response_len``."""
  sys.path.insert(0, REPO)
  from jaxopd.data.tokenizer import build_tokenizer
  tok_dir = os.path.join(root, "tokenizer")
  build_tokenizer(WORDS, tok_dir)
  words = lambda k, off: " ".join(WORDS[(off + j) % len(WORDS)] for j in range(k))
  files = {}
  for fmt in ("lm", "preference", "prompt"):
    path = os.path.join(root, f"{fmt}.jsonl")
    with open(path, "w") as f:
      for i in range(n):
        rec = {"prompt": words(prompt_len - 1, i)}             # + BOS
        if fmt == "lm":
          rec["completion"] = words(response_len - 1, i + 7)     # + EOS
        elif fmt == "preference":
          rec["chosen"], rec["rejected"] = words(response_len - 1, i + 7), words(response_len - 1, i + 11)
        f.write(json.dumps(rec) + "\n")
    files[fmt] = path
  return dict(tokenizer=tok_dir, **files)


def cell_args(method: str, model: str, topology: str, seq: int, batch: int, data: dict, remat: str = "full",
              scan: bool = True, attention: str = "dot_product", prompt: int = 0, share: bool = False,
              lora: int = 0):
  spec, fmt, extra = METHODS[method]
  p = prompt or seq // 2
  r = seq - p
  ov = {"data.task": "files", "data.files.train": data[fmt], "data.files.eval": "",
        "data.files.tokenizer": data["tokenizer"], "seq_len": seq, "batch_size": batch, "grad_accum": 1,
        "mesh.shape": "(1,-1,1)", "checkpoint.async_save": False}
  ov.update(extra(p, r))
  if share or method == "grpo":       # GRPO's default is True: its row-per-sample cells set False
    ov["method.share_prompt"] = share
  if method == "fdpg":          # its build reads held-out prompts for evaluation (not part of the step)
    ov["data.files.eval"] = data["prompt"]
  for role in TRAINABLE_ROLES[method]:
    ov.update({f"models.{role}.dtype": "bfloat16", f"models.{role}.param_dtype": "float32",
               f"models.{role}.remat": remat, f"models.{role}.attention": attention,
               f"models.{role}.scan_layers": scan})
  for role in FROZEN_ROLES[method]:
    ov.update({f"models.{role}.dtype": "bfloat16", f"models.{role}.param_dtype": "bfloat16",
               f"models.{role}.attention": attention, f"models.{role}.scan_layers": scan})
  if lora:      # adapters on the trained role, its base frozen in bf16; a reference is that base
    for role in TRAINABLE_ROLES[method]:
      ov.update({f"models.{role}.lora.rank": lora, f"models.{role}.param_dtype": "bfloat16"})
    for role in FROZEN_ROLES[method]:
      if role in ("reference", "base"):
        ov[f"models.{role}.init"] = "base:policy"
  return (["--config", spec, "--topology", topology, "--preset", model, "--json"]
          + [f"--config.{k}={v}" for k, v in ov.items()])


def cell_config(method: str, data: dict, seq: int, batch: int, arch: dict | None = None, spec: str = "", **kw):
  """The config a cell compiles, in this process: ``method``'s experiment config (or ``spec``) with
  :func:`cell_args`' overrides (``kw``: its keyword arguments), random inits, then ``arch``
  (dotted fields, e.g. a small ``model.d_model``)."""
  import aot_memory
  from jaxopd.experiment import load_config
  config = load_config(spec or METHODS[method][0])
  for a in cell_args(method, "", "", seq, batch, data, **kw):
    if a.startswith("--config."):
      key, _, value = a[len("--config."):].partition("=")
      aot_memory.override(config, key, value)
  aot_memory.random_inits(config)
  for k, v in (arch or {}).items():
    aot_memory.override(config, k, str(v))
  return config


def run_cell(args: list[str], timeout: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.path.join(REPO, "launch"), REPO]),
             TPU_ACCELERATOR_TYPE="", TF_CPP_MIN_LOG_LEVEL="3")
  try:
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "aot_memory.py")] + args, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"compile timed out after {timeout} s"}
  lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
  if p.returncode != 0 or not lines:
    err = [x for x in p.stderr.splitlines() if x.startswith("error:") or "Error" in x]
    return {"error": (err[-1] if err else p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed")[:300]}
  return json.loads(lines[-1])


GIB = 2 ** 30


def add_flops(cell: dict, r: dict, remat: str) -> dict:
  """The report with the step's counted FLOPs per chip and the compute roofline: FLOPs per chip
  over the chip's peak bf16 FLOP/s (a lower bound on the step time)."""
  from jaxopd.models import presets
  if "error" in r:
    return r
  cfg = presets.get(cell["model"])
  flops = step_flops(cell["method"], cfg, cell["batch"], cell["seq"], remat, cell.get("prompt", 0),
                     cell.get("share", False), bool(cell.get("lora"))) / r["devices"]
  # FSDP check: per-chip parameter + optimizer bytes times the chips over one full copy
  # (float32 parameters and AdamW's two float32 moments: 12 bytes per parameter); with LoRA,
  # the adapters' share of full fine-tuning's.
  fsdp = (r["params"] + r["opt_state"]) * r["devices"] / (12 * presets.num_params(cfg))
  return dict(r, flops_per_chip=flops, roofline_s=flops / r["chip"]["bf16_flops"], fsdp_ratio=fsdp)


def out_of_memory(r: dict):
  """``(temporaries needed, HBM available)`` in GiB when the TPU compiler refused the step for
  lack of HBM (its RESOURCE_EXHAUSTED error; XLA prints 1024-based units), else None."""
  import re
  m = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", r.get("error", ""))
  return (float(m.group(1)), float(m.group(2))) if m else None


def row(cell: dict, r: dict) -> str:
  name = cell["method"] + (f" LoRA r{cell['lora']}" if cell.get("lora") else "") + (f" (prompt {cell['prompt']}{', shared' if cell.get('share') else ''})"
                           if cell.get("prompt") else "")
  head = f"| {name} | {cell['model']} | {cell['topology']} | {cell['seq']} | {cell['batch']} |"
  oom = out_of_memory(r)
  if oom:
    return head + (f" > {oom[0]:.2f} / {oom[1]:.0f} | **no** (compiler: temporaries alone {oom[0]:.2f} GiB) "
                   f"| | | {oom[0]:.2f} | | | |")
  if "error" in r:
    return head + f" error: {r['error']} | | | | | | | |"
  fits = "yes" if r["total"] <= r["hbm_limit"] else "**no**"
  po = (r["params"] + r["opt_state"]) / GIB
  return (head + f" {r['total'] / GIB:.2f} / {r['hbm_limit'] / GIB:.0f} | {fits} | {po:.2f} ({r['fsdp_ratio']:.3f}/N) | "
          f"{r['frozen'] / GIB:.2f} | {r['temp'] / GIB:.2f} | {r['flops_per_chip']:.3g} | "
          f"{1e3 * r['roofline_s']:.0f} | {r['compile_s']:.0f} |")


HEADER = ("| method | model | topology | seq | batch | GiB per chip (used / HBM) | fits | params + opt GiB (x N / one copy) | "
          "frozen GiB | temp GiB | FLOPs per chip | roofline ms | compile s |\n" + "|" + " --- |" * 13)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--cells", default="grid", choices=("grid", "seq", "share", "grpo"),
                 help="grid: methods x models (each on its topology of GRID); seq: TDPO on --models[0] at "
                      "sequence 1024 / 2048 / 4096; share: DPO and TDPO on --models[0] with --prompt of the "
                      "sequence, a row per response and the prompt shared (method.share_prompt); grpo: GRPO "
                      "on --models[0], --batch prompts x 8 samples of --prompt + the rest of --seq tokens, "
                      "a row per sample and grouped rows (method.share_prompt)")
  p.add_argument("--prompt", type=int, default=0, help="prompt tokens of a pair's sequence (default: half)")
  p.add_argument("--methods", default=",".join(GRID_METHODS))
  p.add_argument("--models", default=",".join(GRID))
  p.add_argument("--topology", default="", help="one topology for every cell (default: GRID's per model)")
  p.add_argument("--seq", type=int, default=0, help="sequence length (default: GRID's per model)")
  p.add_argument("--batch", type=int, default=32, help="sequences per step (pairs for DPO/TDPO/SparsePO, prompts for GRPO)")
  p.add_argument("--remat", default="full", help="remat of the trainable roles: none | full | dots")
  p.add_argument("--scan_layers", default="true", choices=("true", "false"),
                 help="every role's blocks as one lax.scan (compile time independent of depth)")
  p.add_argument("--attention", default="dot_product", help="every role's attention: einsum | dot_product | chunked | splash")
  p.add_argument("--lora", type=int, default=0, help="LoRA rank of the trained roles (0: full fine-tuning); "
                 "their base and a DPO-style reference (base:policy) then bf16, frozen")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
  p.add_argument("--retable", action="store_true", help="rewrite table.md from --out's results.jsonl (no compile)")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  if a.retable:
    with open(os.path.join(a.out, "results.jsonl")) as f:
      done = [json.loads(x) for x in f]
    rows = [row(d["cell"], add_flops(d["cell"], d["report"], d.get("remat", a.remat))) for d in done]
    with open(os.path.join(a.out, "table.md"), "w") as f:
      f.write(HEADER + "\n" + "\n".join(rows) + "\n")
    print(HEADER + "\n" + "\n".join(rows))
    return 0
  models = a.models.split(",")
  cells = []
  if a.cells == "grid":
    for model in models:
      topo, seq = SLICES[model]
      for method in a.methods.split(","):
        cells.append(dict(method=method, model=model, topology=a.topology or topo, seq=a.seq or seq,
                          batch=a.batch, lora=a.lora))
  elif a.cells == "seq":
    topo = a.topology or SLICES[models[0]][0]
    for seq in (1024, 2048, 4096):
      cells.append(dict(method="tdpo", model=models[0], topology=topo, seq=seq, batch=a.batch))
  else:
    topo, seq = SLICES[models[0]]
    for method in ("dpo", "tdpo") if a.cells == "share" else ("grpo",):
      for share in (False, True):
        cells.append(dict(method=method, model=models[0], topology=a.topology or topo, seq=a.seq or seq,
                          batch=a.batch, prompt=a.prompt or (a.seq or seq) // 2, share=share, lora=a.lora))
  data = {}
  print(HEADER, flush=True)
  rows, summary = [], {}
  with open(os.path.join(a.out, "results.jsonl"), "w") as f:
    for cell in cells:
      p_len = cell.get("prompt") or cell["seq"] // 2
      if (cell["seq"], p_len) not in data:
        data[cell["seq"], p_len] = write_data(os.path.join(a.out, f"data_{cell['seq']}_{p_len}"), p_len,
                                              cell["seq"] - p_len)
      r = run_cell(cell_args(cell["method"], cell["model"], cell["topology"], cell["seq"], cell["batch"],
                             data[cell["seq"], p_len], a.remat, a.scan_layers == "true", a.attention,
                             cell.get("prompt", 0), cell.get("share", False), cell.get("lora", 0)), a.timeout)
      r = add_flops(cell, r, a.remat)
      f.write(json.dumps({"cell": cell, "remat": a.remat, "scan_layers": a.scan_layers, "attention": a.attention,
                          "report": r}) + "\n")
      f.flush()
      rows.append(row(cell, r))
      print(rows[-1], flush=True)
      key = f"{cell['method']}/{cell['model']}/{cell['topology']}/{cell['seq']}" + (
          f"/lora{cell['lora']}" if cell.get("lora") else "") + (
          f"/prompt{cell['prompt']}{'/shared' if cell.get('share') else ''}" if cell.get("prompt") else "")
      oom = out_of_memory(r)
      summary[key] = ({"fits": False, "temp_gib": oom[0]} if oom else {"error": r["error"]} if "error" in r else
                      {"gib": round(r["total"] / GIB, 3), "fits": r["total"] <= r["hbm_limit"],
                       "param_opt_gib": round((r["params"] + r["opt_state"]) / GIB, 3),
                       "fsdp_ratio": round(r["fsdp_ratio"], 4),
                       "roofline_ms": round(1e3 * r["roofline_s"], 1), "flops_per_chip": r["flops_per_chip"],
                       "compile_s": r["compile_s"]})
  settings = (f"FSDP over every chip, batch {a.batch} (pairs for DPO/TDPO/SparsePO, prompts x {GROUP} for GRPO), "
              f"bf16 compute, float32 trainable parameters and AdamW state, bf16 frozen models, remat={a.remat} on "
              f"trainable roles, "
              f"attention={a.attention}, scan_layers={a.scan_layers}")
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write(settings + "\n\n" + HEADER + "\n" + "\n".join(rows) + "\n")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
