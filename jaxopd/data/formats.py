"""Real data: JSONL / Parquet files in the TRL formats, encoded into the trainer's fixed-shape records.

Formats (one record per line / row; TRL names; :func:`load`, :func:`encode`, :func:`load_tfds`):

* ``preference``: ``{"prompt": str, "chosen": str, "rejected": str}``, or conversational: ``"chosen"`` /
  ``"rejected"`` (and the optional ``"prompt"``) are message lists ``[{"role": ..., "content": ...}]``,
  rendered with the tokenizer's chat template;
* ``prompt``: ``{"prompt": str}`` or a message list, for on-policy methods;
* ``lm``: ``{"text": str}`` or ``{"prompt": str, "completion": str}`` or ``{"messages": [...]}`` for SFT.

Records are strict (a bad one stops with ``file:line: field ...``) and whatever is dropped or truncated
is counted in :class:`EncodeStats`; the rules: experiments/design.md, "Bring your own model and data".
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Iterator

import numpy as np

OVER_LENGTH_POLICIES = ("truncate", "drop")   # examples longer than seq_len (config.data.over_length)

FORMATS = ("preference", "prompt", "lm")
POLICIES = ("truncate", "drop")
KEYS = {"preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",),
        "lm": ("text", "prompt", "completion", "messages")}
IGNORE_HINT = "config.data.files.ignore_keys"


class DataFormatError(ValueError):
  """A record that does not match its format; the message names file, line and field."""


@dataclasses.dataclass
class EncodeStats:
  seen: int = 0
  kept: int = 0
  truncated: int = 0
  dropped: int = 0        # over-long, with policy "drop"
  empty: int = 0          # an empty response (or prompt, for the prompt format): dropped
  same: int = 0           # a pair whose chosen and rejected are the same tokens: dropped
  ignored: dict = dataclasses.field(default_factory=dict)   # key of ignore_keys -> records that had it

  def __str__(self):
    extra = "".join(f", {n} dropped ({why})" for n, why in ((self.empty, "empty"), (self.same, "chosen == rejected"))
                    if n)
    if self.ignored:
      extra += "; keys skipped: " + ", ".join(f"{k} ({n} records)" for k, n in self.ignored.items())
    return (f"{self.seen} records: {self.kept} kept, {self.truncated} truncated, {self.dropped} dropped (over-long)"
            + extra)


def iter_records(path: str) -> Iterator[tuple[int, dict]]:
  """``(line_number, record)`` from a ``.jsonl`` / ``.json`` (one object per line) or ``.parquet`` file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    for i, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
      yield i, rec
    return
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line.rstrip("\r\n"))   # the column of an error is then within the line
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(rec, dict):
        raise DataFormatError(f"{path}:{i}: a record must be a JSON object, got {type(rec).__name__}")
      yield i, rec


def _is_messages(x) -> bool:
  return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _check_messages(x, where, field):
  if not isinstance(x, list) or not x:
    raise DataFormatError(f"{where}: field {field!r} must be a non-empty list of messages")
  for j, m in enumerate(x):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise DataFormatError(f"{where}: field {field!r}[{j}] must be {{'role': str, 'content': str}}")


def _text(rec, field, where, allow_messages=False, required=True):
  if field in rec and rec[field] is None and required:
    raise DataFormatError(f"{where}: field {field!r} is null")
  if field not in rec or rec[field] is None:
    if required:
      raise DataFormatError(f"{where}: missing field {field!r} (has {sorted(rec)})")
    return None
  v = rec[field]
  if isinstance(v, str):
    return v
  if allow_messages and _is_messages(v):
    _check_messages(v, where, field)
    return v
  raise DataFormatError(f"{where}: field {field!r} must be a string"
                        + (" or a list of messages" if allow_messages else "") + f", got {type(v).__name__}")


def _check_keys(rec, where, fmt, ignore_keys, stats):
  for k in rec:
    if k not in KEYS[fmt] and k in ignore_keys:
      stats.ignored[k] = stats.ignored.get(k, 0) + 1
    elif k not in KEYS[fmt]:
      near = difflib.get_close_matches(k, KEYS[fmt], n=1)
      raise DataFormatError(f"{where}: unknown key {k!r}" + (f" - did you mean {near[0]!r}?" if near else "")
                            + f"; {fmt} records have {list(KEYS[fmt])} (list keys to skip in {IGNORE_HINT})")


def _lm_shape(rec, where, allow_no_prompt):
  keys = {k for k in KEYS["lm"] if k in rec}
  if keys == {"completion"} and allow_no_prompt:
    return "completion"
  for shape in ({"messages"}, {"prompt", "completion"}, {"text"}):
    if keys == shape:
      return "+".join(sorted(shape))
  if keys == {"completion"}:
    raise DataFormatError(f"{where}: missing field 'prompt' for 'completion' (set config.data.files.allow_no_prompt "
                          f"to train on completions alone)")
  raise DataFormatError(f"{where}: an lm record has 'text', 'prompt' and 'completion', or 'messages'; this one has "
                        f"{sorted(keys) or sorted(rec)}")


def _shared_prefix(chosen: list, rejected: list) -> int:
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  return n


def _blank(x) -> bool:
  if isinstance(x, list):
    return all(not m["content"].strip() for m in x)
  return not x.strip()


def render(tokenizer, prompt, response) -> tuple[list[int], list[int]]:
  """Token ids of (prompt, response). Plain strings are tokenized as they are
  (the prompt gets the tokenizer's BOS if it has one; the response ends with
  EOS); message lists go through ``apply_chat_template`` and the response is
  the rendered conversation minus the rendered prompt."""
  if isinstance(response, list):
    if tokenizer.chat_template is None:
      raise DataFormatError("conversational records need a tokenizer with a chat template")
    prompt_msgs = prompt or []
    full = tokenizer.apply_chat_template(prompt_msgs + response, tokenize=False)
    head = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True) if prompt_msgs else ""
    if not full.startswith(head):
      raise DataFormatError("the chat template does not render the prompt as a prefix of the conversation")
    p_ids = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
    r_ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    return p_ids, r_ids
  if isinstance(prompt, list):
    raise DataFormatError("a message-list prompt needs message-list responses")
  bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
  p_ids = bos + (tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
  r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
  if tokenizer.eos_token_id is not None:
    r_ids = r_ids + [tokenizer.eos_token_id]
  return p_ids, r_ids


def _fit(p_ids, r_ids, seq_len, policy, stats, max_prompt_len):
  """Applies the over-length policy; returns (prompt, response) or None when dropped."""
  if len(p_ids) + len(r_ids) <= seq_len and len(p_ids) <= max_prompt_len:
    return p_ids, r_ids, False
  if policy == "drop":
    return None
  p_keep = min(len(p_ids), max_prompt_len)
  p_ids = p_ids[len(p_ids) - p_keep:]            # keep the prompt's end (nearest the response)
  r_ids = r_ids[:max(seq_len - len(p_ids), 1)]
  return p_ids, r_ids, True


def _row(p_ids, r_ids, seq_len, pad_id):
  tokens = np.full(seq_len, pad_id, np.int32)
  mask = np.zeros(seq_len, np.int32)
  ids = p_ids + r_ids
  tokens[:len(ids)] = ids
  mask[len(p_ids):len(ids)] = 1
  return tokens, mask


def load(path: str, fmt: str, tokenizer, seq_len: int, policy: str = "drop",
         max_prompt_len: int | None = None, **schema) -> tuple[list[dict], EncodeStats]:
  """Reads and encodes a file into records for the trainer (see :func:`encode`)."""
  return encode(((f"{path}:{line}", rec) for line, rec in iter_records(path)), fmt, tokenizer, seq_len,
                policy, max_prompt_len, **schema)


def encode(records, fmt: str, tokenizer, seq_len: int, policy: str = "drop",
           max_prompt_len: int | None = None, ignore_keys: tuple = (),
           allow_no_prompt: bool = False) -> tuple[list[dict], EncodeStats]:
  """Encodes ``(where, record)`` pairs (``where`` names file and line, or dataset
  and index, for errors) into records for the trainer:

  ``preference`` -> ``tokens[2, T], loss_mask[2, T]`` (chosen, rejected);
  ``prompt`` -> ``prompt[T], prompt_len`` (right-padded, for the sampler);
  ``lm`` -> ``tokens[T], loss_mask[T]``.

  ``ignore_keys``: keys of the records that are not the format's and are skipped
  (any other unknown key is an error); ``allow_no_prompt``: a preference pair of
  strings, or an lm ``completion``, may come without a prompt. Every record must have
  the first's shape (strings or message lists; ``text`` or ``prompt``/``completion``).
  ``policy`` for examples longer than ``seq_len``: ``"truncate"`` (keep the prompt's end
  and the response's start) or ``"drop"``.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}: must be one of {FORMATS}")
  if policy not in POLICIES:
    raise ValueError(f"over-length policy={policy!r}: must be one of {POLICIES}")
  max_prompt_len = seq_len - 1 if max_prompt_len is None else max_prompt_len
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  stats = EncodeStats(ignored={k: 0 for k in ignore_keys})   # a listed key no record has shows as 0
  out = []
  first = None     # (where, shape) of the first record: every record has its shape
  for where, rec in records:
    stats.seen += 1
    try:
      _check_keys(rec, where, fmt, ignore_keys, stats)
      if fmt == "preference":
        prompt = _text(rec, "prompt", where, allow_messages=True, required=False)
        chosen = _text(rec, "chosen", where, allow_messages=True)
        rejected = _text(rec, "rejected", where, allow_messages=True)
        if isinstance(chosen, list) != isinstance(rejected, list):
          raise DataFormatError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
        if prompt is None and isinstance(chosen, list):     # TRL's implicit prompt: the messages both sides share
          n = _shared_prefix(chosen, rejected)
          if n:
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if prompt is None and not allow_no_prompt:
          raise DataFormatError(f"{where}: missing field 'prompt'" + (
              " (and chosen and rejected share no first message to take as the prompt)" if isinstance(chosen, list)
              else "") + "; set config.data.files.allow_no_prompt to train on pairs without prompts")
        shape = ("message lists" if isinstance(chosen, list) else "strings") + (
            " with a prompt" if "prompt" in rec else " without a prompt")
        first = _same_shape(first, where, shape)
        if _blank(chosen) or _blank(rejected):
          stats.empty += 1
          continue
        sides = [render(tokenizer, prompt, chosen), render(tokenizer, prompt, rejected)]
        if sides[0] == sides[1]:
          stats.same += 1
          continue
        fitted = [_fit(p, r, seq_len, policy, stats, max_prompt_len) for p, r in sides]
        if any(f is None for f in fitted):
          stats.dropped += 1
          continue
        rows = [_row(p, r, seq_len, pad) for p, r, _ in fitted]
        out.append({"tokens": np.stack([r[0] for r in rows]), "loss_mask": np.stack([r[1] for r in rows])})
        stats.truncated += any(t for _, _, t in fitted)
      elif fmt == "prompt":
        prompt = _text(rec, "prompt", where, allow_messages=True)
        first = _same_shape(first, where, "a message list" if isinstance(prompt, list) else "a string")
        if _blank(prompt):
          stats.empty += 1
          continue
        if isinstance(prompt, list):
          if tokenizer.chat_template is None:
            raise DataFormatError(f"{where}: conversational prompts need a tokenizer with a chat template")
          text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
          ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
          ids = render(tokenizer, prompt, "")[0]
        if len(ids) > max_prompt_len:
          if policy == "drop":
            stats.dropped += 1
            continue
          ids = ids[len(ids) - max_prompt_len:]
          stats.truncated += 1
        row = np.full(max_prompt_len, pad, np.int32)
        row[:len(ids)] = ids
        out.append({"prompt": row, "prompt_len": np.int32(len(ids))})
      else:
        shape = _lm_shape(rec, where, allow_no_prompt)
        if shape == "messages":
          _check_messages(rec["messages"], where, "messages")
          prompt, response = None, rec["messages"]
        elif shape == "text":
          prompt, response = "", _text(rec, "text", where)
        else:
          prompt = _text(rec, "prompt", where) if "prompt" in rec else ""
          response = _text(rec, "completion", where)
        first = _same_shape(first, where, shape)
        if _blank(response):
          stats.empty += 1
          continue
        p_ids, r_ids = render(tokenizer, prompt, response)
        fitted = _fit(p_ids, r_ids, seq_len, policy, stats, max_prompt_len)
        if fitted is None:
          stats.dropped += 1
          continue
        tokens, mask = _row(fitted[0], fitted[1], seq_len, pad)
        out.append({"tokens": tokens, "loss_mask": mask})
        stats.truncated += fitted[2]
    except DataFormatError as e:
      msg = str(e)
      raise DataFormatError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    stats.kept += 1
  return out, stats


def _same_shape(first, where, shape):
  """``first`` (the first record's ``(where, shape)``) after checking that this record has its shape."""
  if first is None:
    return (where, shape)
  if first[1] != shape:
    raise DataFormatError(f"{where}: this record is {shape}, but the first record ({first[0]}) is {first[1]}: "
                          f"one file holds records of one shape")
  return first


def load_tfds(name: str, split: str, data_dir: str, fmt: str, tokenizer, seq_len: int, policy: str = "drop",
              max_prompt_len: int | None = None, **schema) -> tuple[list[dict], EncodeStats]:
  """A TFDS dataset by name from a local ``data_dir`` (``name`` may carry a
  config, ``"my_prefs/default:1.0.0"``), read with ``tfds.data_source`` (no
  TensorFlow), with the fields of ``fmt`` as for JSONL files."""
  import tensorflow_datasets as tfds
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:   # tfds raises several types for "not found"
    raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} not found under {data_dir}: {e}") from None

  def rec(i):
    ex = src[i]
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()}
  return encode(((f"tfds:{name}/{split}[{i}]", rec(i)) for i in range(len(src))), fmt, tokenizer, seq_len,
                policy, max_prompt_len, **schema)
