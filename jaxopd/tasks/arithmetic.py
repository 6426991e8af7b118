"""A verifiable chat task for real instruct models: "What is A + B?" with an exact checker.

* ``python -m jaxopd.tasks.arithmetic data --out DIR``: ``DIR/train.jsonl`` and
  ``DIR/eval.jsonl``, TRL prompt records (``{"prompt": [{"role": "user", ...}]}``), disjoint
  questions, a fixed seed; ``DIR/pairs.jsonl``: the train questions as preference pairs
  ("A + B = sum" chosen, the same with a sum off by 1 to 10 rejected) for offline methods.
* :func:`reward` (``--config.method.reward=jaxopd.tasks.arithmetic:reward``): 1 where the
  last number of the completion is the sum, else 0 (TRL's reward signature).
* ``python -m jaxopd.tasks.arithmetic eval --model hf:DIR|run:WORKDIR --prompts FILE``:
  pass@1 of greedy decoding on the prompts, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

QUESTION = "What is {a} + {b}? Reply with the number only."
_ASKED = re.compile(r"What is (\d+) \+ (\d+)\?")
_NUMBER = re.compile(r"-?\d+")


def questions(n: int, seed: int, low: int = 10, high: int = 99, exclude: set | None = None) -> list[tuple[int, int]]:
  """``n`` distinct pairs ``(a, b)`` of integers in ``[low, high]``, none in ``exclude``."""
  rng = np.random.RandomState(seed)
  out, seen = [], set(exclude or ())
  while len(out) < n:
    a, b = (int(x) for x in rng.randint(low, high + 1, 2))
    if (a, b) not in seen:
      seen.add((a, b))
      out.append((a, b))
  return out


def records(pairs) -> list[dict]:
  return [{"prompt": [{"role": "user", "content": QUESTION.format(a=a, b=b)}]} for a, b in pairs]


def check(prompt: str, completion: str) -> float:
  """1.0 where the completion's last number is the sum asked for in ``prompt`` (the last question in it):
  "47 + 22 = 69" passes, as a bare "69" does."""
  asked = _ASKED.findall(prompt)
  if not asked:
    raise ValueError(f"no 'What is A + B?' question in the prompt {prompt[-80:]!r}")
  a, b = (int(x) for x in asked[-1])
  got = _NUMBER.findall(completion)
  return float(bool(got) and int(got[-1]) == a + b)


def reward(prompts: list[str], completions: list[str], **_) -> list[float]:
  """TRL-style reward: :func:`check` of each (prompt, completion)."""
  return [check(p, c) for p, c in zip(prompts, completions)]


def preference_pairs(pairs, seed: int) -> list[dict]:
  """Conversational pairs: "A + B = sum" chosen, the same with a wrong sum (off by 1 to 10) rejected."""
  rng = np.random.RandomState(seed)
  out = []
  for r, (a, b) in zip(records(pairs), pairs):
    wrong = a + b + int(rng.choice([-1, 1])) * int(rng.randint(1, 11))
    out.append({**r, "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
                "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}"}]})
  return out


def write_data(out: str, train: int = 512, eval_n: int = 64, seed: int = 0) -> tuple[str, str, str]:
  """``(train.jsonl, eval.jsonl, pairs.jsonl)`` under ``out``."""
  os.makedirs(out, exist_ok=True)
  held = questions(eval_n, seed + 1)
  train_pairs = questions(train, seed, exclude=set(held))
  files = {"train": records(train_pairs), "eval": records(held), "pairs": preference_pairs(train_pairs, seed + 2)}
  paths = []
  for name, recs in files.items():
    path = os.path.join(out, f"{name}.jsonl")
    with open(path, "w") as f:
      for r in recs:
        f.write(json.dumps(r) + "\n")
    paths.append(path)
  return tuple(paths)


def pass_at_1(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 16, batch: int = 16) -> dict:
  """Greedy decoding of each chat prompt (the tokenizer's chat template, generation prompt added);
  the fraction :func:`check` accepts, and a few examples."""
  import jax
  from flax import nnx

  from jaxopd import sampling
  texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  width = max(map(len, ids))
  cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                                pad_id=tokenizer.pad_token_id, greedy=True)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, x, n: sampling.sample(nnx.merge(graphdef, s), x, n, jax.random.key(0), cfg))
  scores, examples = [], []
  for i in range(0, len(ids), batch):
    rows = ids[i:i + batch]
    rows = rows + [rows[-1]] * (batch - len(rows))            # one compiled shape; extra rows dropped below
    x = np.array([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], np.int32)
    n = np.array([len(r) for r in rows], np.int32)
    out = run(state, x, n)
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    for j in range(min(batch, len(ids) - i)):
      completion = tokenizer.decode(toks[j, n[j]:n[j] + lens[j]], skip_special_tokens=True)
      scores.append(check(texts[i + j], completion))
      if len(examples) < 3:
        examples.append([prompts[i + j][-1]["content"], completion])
  return {"pass@1": float(np.mean(scores)), "n": len(scores), "examples": examples}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jaxopd.tasks.arithmetic", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("data", help="write train.jsonl and eval.jsonl")
  d.add_argument("--out", required=True)
  d.add_argument("--train", type=int, default=512)
  d.add_argument("--eval", type=int, default=64)
  d.add_argument("--seed", type=int, default=0)
  e = sub.add_parser("eval", help="greedy pass@1 of a model on a prompt file")
  e.add_argument("--model", required=True, help="hf:DIR or run:WORKDIR[:MODEL][@STEP]")
  e.add_argument("--prompts", required=True, help="a JSONL file of prompt records")
  e.add_argument("--tokenizer", default="", help="tokenizer directory (default: the hf: directory)")
  e.add_argument("--max-new-tokens", type=int, default=16)
  args = ap.parse_args(argv)
  if args.cmd == "data":
    print(" ".join(write_data(args.out, args.train, args.eval, args.seed)))
    return 0
  from jaxopd.errors import ConfigError
  from jaxopd.data.tokenizer import load_tokenizer
  from jaxopd.models import table
  try:
    model, _ = table.load_model(args.model, "policy")
    tok_dir = args.tokenizer or (args.model[3:] if args.model.startswith("hf:") else "")
    if not tok_dir:
      raise ConfigError("--tokenizer: needed for a run: model (the hf: directory it started from)")
    tok = load_tokenizer(tok_dir)
    with open(args.prompts) as f:
      prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
  except (ConfigError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(pass_at_1(model, tok, prompts, args.max_new_tokens)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
