"""Teacher traces labelled by a verifiable rule (REDI's data), on the digits task.

A teacher samples ``k`` responses to each of the first ``num_prompts`` train prompts (config:
experiments/redi.py, preset ``digits``); each is labelled by the task's exact checker
(:func:`jaxopd.data.digits.check`): positive when it is exactly the answer then EOS, negative
otherwise; lengths are kept as sampled. :func:`write` stores them in a stage directory
(:func:`jaxopd.stages.run`, addressed by :func:`settings`) as ``traces.jsonl`` and
``statistics.json``; :func:`positive_records` (REDI's stage 1) and :func:`pair_records` (stage 2)
turn them into trainer records.
"""

from __future__ import annotations

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.data import digits
from jaxopd.errors import ConfigError
from jaxopd.sampling import SamplingConfig, sample

FILE = "traces.jsonl"


def draw(scfg: SamplingConfig, n: int, model, prompt, plen, answer, alen, rng):
  """``n`` samples per prompt and their labels: ``(SampleOutput [B*n rows, prompt-major], correct
  [B, n])``."""
  out = sample(model, prompt, plen, rng, scfg, repeats=n)
  rep = lambda x: jnp.repeat(x, n, axis=0)
  ok = digits.check(out.tokens, out.loss_mask, rep(answer), rep(alen), scfg.eos_id)
  return out, ok.reshape(-1, n)


def settings(teacher: str, node, scfg: SamplingConfig, seed: int, data_name: str) -> dict:
  """What a set of traces is made from: the inputs of its stage."""
  return {"teacher": teacher, "num_prompts": int(node.num_prompts), "samples": int(node.samples),
          "temperature": float(scfg.temperature), "max_new_tokens": int(scfg.max_new_tokens), "seed": int(seed),
          "data": data_name}


def write(where: str, node, model, teacher: str, suite, prompt_recs, scfg: SamplingConfig, seed: int,
          batch: int = 64) -> None:
  """Samples and labels ``node.samples`` traces for each of the first ``node.num_prompts`` prompts
  into directory ``where``. ``model``: a zero-argument function giving the teacher; ``teacher``: its
  init string.

  ``traces.jsonl`` holds one line per trace in TRL's unpaired-preference form plus what the
  records need exactly::

    {"prompt": "sort 3 1 =", "completion": "1 3", "label": true, "truncated": false,
     "level": 2, "prompt_index": 17}

  (``truncated``: the response reached the budget without EOS, so no EOS is appended when it
  is encoded).
  """
  from jaxopd.evaluation import compiled, to_host
  if node.num_prompts > len(prompt_recs):
    raise ConfigError(f"config.traces.num_prompts={node.num_prompts}: the train split has {len(prompt_recs)} prompts")
  recs = prompt_recs[:node.num_prompts]
  print(f"[stage] traces: {node.samples} samples of {teacher} for each of {len(recs)} prompts "
        f"(temperature {scfg.temperature}) -> {where}", flush=True)
  m = model()
  fn = compiled(draw, (scfg, int(node.samples)), m)
  tok = suite.tokenizer
  rng = jax.random.PRNGKey(seed)
  lines = []
  for i in range(0, len(recs), batch):
    chunk = recs[i:i + batch]
    arrs = [jnp.asarray(np.stack([r[k] for r in chunk])) for k in ("prompt", "prompt_len", "answer", "answer_len")]
    out, ok = to_host(fn(*arrs, jax.random.fold_in(rng, i)))
    tokens, mask, ok = np.asarray(out.tokens), np.asarray(out.loss_mask) != 0, np.asarray(ok)
    for j, r in enumerate(chunk):
      p = r["prompt"][:int(r["prompt_len"])].tolist()
      for g in range(int(node.samples)):
        row = j * int(node.samples) + g
        resp = tokens[row][mask[row]].tolist()
        truncated = not resp or resp[-1] != scfg.eos_id
        body = resp if truncated else resp[:-1]
        lines.append({"prompt": tok.decode(p), "completion": tok.decode(body), "label": bool(ok[j, g] > 0.5),
                      "truncated": truncated, "level": int(r["level"]), "prompt_index": i + j})
  os.makedirs(where, exist_ok=True)
  with open(os.path.join(where, FILE), "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  with open(os.path.join(where, "statistics.json"), "w") as f:
    json.dump(statistics(lines, int(node.pairs_per_prompt)), f, indent=2)


def load(workdir: str) -> list[dict]:
  """The traces of a directory made by :func:`write`."""
  with open(os.path.join(workdir, FILE)) as f:
    return [json.loads(line) for line in f]


def _by_prompt(lines):
  groups = collections.defaultdict(lambda: ([], []))
  for t in lines:
    groups[t["prompt_index"]][0 if t["label"] else 1].append(t)
  return groups


def statistics(lines: list[dict], pairs_per_prompt: int = 1) -> dict:
  """Counts: traces, positives, their rate per level, prompts with both labels / only positives /
  only negatives, pairs (at ``pairs_per_prompt``), truncated negatives, mean lengths in words."""
  groups = _by_prompt(lines)
  per_level = collections.defaultdict(lambda: [0, 0])
  for t in lines:
    per_level[t["level"]][0] += int(t["label"])
    per_level[t["level"]][1] += 1
  words = lambda ts: float(np.mean([len(t["completion"].split()) for t in ts])) if ts else 0.0
  pos = [t for t in lines if t["label"]]
  neg = [t for t in lines if not t["label"]]
  return {"traces": len(lines), "positives": len(pos), "negatives": len(neg), "prompts": len(groups),
          "prompts_both": sum(1 for p, n in groups.values() if p and n),
          "prompts_only_positive": sum(1 for p, n in groups.values() if p and not n),
          "prompts_only_negative": sum(1 for p, n in groups.values() if n and not p),
          "pairs": sum(min(len(p), len(n), pairs_per_prompt) for p, n in groups.values()),
          "negatives_truncated": sum(1 for t in neg if t["truncated"]),
          "positive_words": words(pos), "negative_words": words(neg),
          "positive_rate_per_level": {str(k): v[0] / v[1] for k, v in sorted(per_level.items())}}


def _encode(tok, t: dict, seq_len: int):
  """``(tokens[T], loss_mask[T])`` of a trace (EOS appended unless truncated), or None if longer than T."""
  p = tok(t["prompt"], add_special_tokens=False)["input_ids"]
  c = tok(t["completion"], add_special_tokens=False)["input_ids"] + ([] if t["truncated"] else [tok.eos_token_id])
  seq = p + c
  if len(seq) > seq_len:
    return None
  tokens = np.full(seq_len, tok.pad_token_id, np.int32)
  tokens[:len(seq)] = seq
  mask = np.zeros(seq_len, np.int32)
  mask[len(p):len(seq)] = 1
  return tokens, mask


def _too_long(n: int, seq_len: int):
  if n:
    raise ConfigError(f"config.seq_len={seq_len}: {n} traces are longer (prompt + response + EOS); raise it")


def positive_records(lines: list[dict], tok, seq_len: int) -> list[dict]:
  """SFT records (``tokens[T]``, ``loss_mask[T]``) of every positive trace (stage 1)."""
  out = [_encode(tok, t, seq_len) for t in lines if t["label"]]
  _too_long(sum(o is None for o in out), seq_len)
  return [{"tokens": a, "loss_mask": m} for a, m in out]


def pair_records(lines: list[dict], tok, seq_len: int, pairs_per_prompt: int = 1) -> list[dict]:
  """Pair records ``tokens[2, T]``, ``loss_mask[2, T]`` (0 = positive, 1 = negative): up to
  ``pairs_per_prompt`` per prompt that has both labels, its i-th positive with its i-th negative,
  in sampling order (each trace in one pair at most); prompts with one label only give no pair
  (:func:`statistics` counts them)."""
  out, long = [], 0
  for p, n in _by_prompt(lines).values():
    for pos, neg in list(zip(p, n))[:pairs_per_prompt]:
      a, b = _encode(tok, pos, seq_len), _encode(tok, neg, seq_len)
      if a is None or b is None:
        long += 1
        continue
      out.append({"tokens": np.stack([a[0], b[0]]), "loss_mask": np.stack([a[1], b[1]])})
  _too_long(long, seq_len)
  return out
