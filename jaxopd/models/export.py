"""A run's model as a Hugging Face directory, or its LoRA adapters in PEFT's format.

  python -m jaxopd.models.export --workdir runs/X [--model policy] --out DIR [--dtype bfloat16] [--tokenizer DIR]
  python -m jaxopd.models.export --workdir runs/X --adapters --out DIR     # a LoRA run: PEFT's two files

A LoRA model exported whole has its adapters folded into its base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from jaxopd import checkpoint as ckpt_lib
from jaxopd import paths
from jaxopd.models import hf, lora, table
from jaxopd.models import safetensors_io as st_io
from jaxopd.models.transformer import ModelConfig


def _tokenizer(path: str):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(path)


def export_run(workdir: str, model: str, out_dir: str, tokenizer_dir: str = "", dtype: str | None = None) -> int:
  """Exports model ``model`` of the latest checkpoint of run ``workdir`` (its architecture
  from the run's ``models.json``); returns the checkpoint step."""
  params, r = table.load_model(f"run:{paths.resolve(workdir)}:{model}", model)
  hf.export(params, r.arch, out_dir, _tokenizer(tokenizer_dir) if tokenizer_dir else None, dtype)
  return r.source.step


def export_adapters(workdir: str, model: str, out_dir: str) -> int:
  """Writes the adapters of LoRA model ``model`` of run ``workdir`` (latest checkpoint) in PEFT's
  format (``adapter_config.json`` + ``adapter_model.safetensors``, loaded onto the base model by
  ``peft.PeftModel.from_pretrained``); returns the checkpoint step."""
  workdir = paths.resolve(workdir)
  rec = table.run_record(workdir).get(model)
  if rec is None or not (rec.get("arch") or {}).get("lora_rank"):
    raise ValueError(f"export --adapters: model {model!r} of {workdir} "
                     + ("was not trained with adapters (export it whole)" if rec else "is not in its models.json"))
  step = ckpt_lib.latest_step(workdir)
  if step is None:
    raise FileNotFoundError(f"export --adapters: {workdir} has no checkpoint")
  arch = ModelConfig(**rec["arch"])
  flat = table.run_adapters(table.Source("run", workdir, model, step), model, arch)
  layout, _ = hf._layout(arch.without_lora())
  tensors, modules = {}, []
  for key, (a, b) in lora.pairs(flat).items():
    module = layout[key].name.removesuffix(".weight")
    a, b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
    r = a.shape[-1]
    tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    modules.append(module.rsplit(".", 1)[1])
  source = rec.get("source", "")
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": arch.lora_rank, "lora_alpha": arch.lora_alpha,
            "lora_dropout": 0.0, "target_modules": sorted(set(modules)), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": source[3:] if source.startswith("hf:") else None}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  st_io.save(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  return step


def main(argv: list[str] | None = None) -> int:
  ex = argparse.ArgumentParser(prog="python -m jaxopd.models.export", description=__doc__.split("\n")[0])
  ex.add_argument("--workdir", required=True, help="the run directory (models.json, checkpoints/)")
  ex.add_argument("--model", default="policy", help="which model (role) of the run")
  ex.add_argument("--out", required=True, help="output directory")
  ex.add_argument("--tokenizer", default="", help="a tokenizer directory to save alongside (optional)")
  ex.add_argument("--dtype", default=None, choices=sorted(hf.EXPORT_DTYPES),
                  help="dtype of the written tensors (default: the parameters')")
  ex.add_argument("--adapters", action="store_true",
                  help="a LoRA model: write its adapters alone, in PEFT's format (default: merged into the base)")
  args = ex.parse_args(argv)
  try:
    if args.adapters:
      step = export_adapters(args.workdir, args.model, args.out)
    else:
      step = export_run(args.workdir, args.model, args.out, args.tokenizer, args.dtype)
    print(f"exported {args.model}{' adapters' if args.adapters else ''} of {args.workdir} (step {step}) to {args.out}")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
