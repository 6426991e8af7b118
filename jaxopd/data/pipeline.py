"""grain pipelines: per-host shard, seeded shuffle, fixed-shape batches.

The iterator is a ``grain.DatasetIterator``: ``get_state()``/``set_state()``
let the trainer checkpoint exactly how far each host has read.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from jaxopd.experiment import DataShard


class SmallDatasetError(ValueError):
  """A finite (``repeat=False``) dataset with fewer records than one global batch: nothing to read."""


def batched_iterator(records: Sequence, shard: DataShard, *, shuffle: bool = True,
                     repeat: bool = True, drop_remainder: bool = True, rows: np.ndarray | None = None):
  """Batches of ``shard.local_batch`` records (dicts of equal-shape numpy arrays).

  ``rows``: each batch is re-indexed by it (row ``r`` of the output is record ``rows[r]`` of the
  batch read), e.g. to repeat each record of a smaller batch (see :func:`group_rows`).

  The records are shuffled as one dataset (reseeded every epoch from
  ``shard.seed``) and cut into local batches; process ``i`` of ``n`` reads
  local batches ``i, i+n, ...``. So the global batch of every step (the ``n``
  local batches together) is the same whatever the process count, and every
  process's iterator state is the same step count.
  """
  n, i = shard.process_count, shard.process_index
  ds = grain.MapDataset.source(records)
  if not repeat and drop_remainder and len(ds) < shard.local_batch * n:
    raise SmallDatasetError(f"dataset of {len(ds)} records is smaller than one batch ({n} x {shard.local_batch})")
  if shuffle:
    ds = ds.shuffle(seed=shard.seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.batch(shard.local_batch, drop_remainder=drop_remainder)
  if rows is not None:
    ds = ds.map(lambda b: {k: v[rows] for k, v in b.items()})
  if not repeat:
    ds = ds[:len(ds) - len(ds) % n]     # every process gets the same number of batches
  ds = ds[i::n]
  return iter(ds.to_iter_dataset())


def group_rows(local_batch: int, group: int, accum: int) -> np.ndarray:
  """Row ``r`` of a local batch of ``local_batch`` rows -> the index of its record among
  ``local_batch / group`` records read, such that each record fills ``group`` rows of one
  microbatch: the train step's microbatch ``i`` of ``accum`` takes rows ``i, i + accum, ...``
  (:meth:`jaxopd.train.Trainer.train_step`), so a record's copies must all sit in one of them."""
  if local_batch % (group * accum):
    raise ValueError(f"a local batch of {local_batch} rows does not split into {accum} microbatches of "
                     f"groups of {group}")
  r = np.arange(local_batch)
  return ((r % accum) * (local_batch // (accum * group)) + (r // accum) // group).astype(np.int32)


def pack(records: Sequence[dict], seq_len: int, pad_id: int = 0) -> tuple[list[dict], dict]:
  """Packs SFT records (``tokens[T]``, ``loss_mask[T]``, right-padded) into rows of
  ``seq_len``: first-fit in order, each example whole. Rows carry
  ``segment_ids`` (0 = padding, 1.. per example) and per-example ``positions``
  so the model attends within an example only.

  An example's length is up to its last loss-mask token or its last non-pad token, whichever
  is later: with pad == eos (Qwen2, Llama-3) the trailing EOS is a pad id but in the mask.
  (:func:`jaxopd.losses.sft_loss` with ``segment_ids`` never scores a token from the segment
  before it, so an example without BOS keeps its first token out of the loss.)

  Returns (rows, stats) with ``stats = {"examples", "rows", "fill"}``.
  """
  def length(r):
    last = [int(nz[-1]) + 1 for nz in (np.nonzero(np.asarray(r["tokens"]) != pad_id)[0],
                                       np.nonzero(np.asarray(r["loss_mask"]))[0]) if len(nz)]
    return max(last, default=0)

  rows: list[dict] = []
  free: list[int] = []
  used = 0
  for r in records:
    n = length(r)
    if n == 0:
      continue
    if n > seq_len:
      raise ValueError(f"pack: an example of {n} tokens exceeds seq_len={seq_len}; truncate or drop first")
    slot = next((i for i, f in enumerate(free) if f >= n), None)
    if slot is None:
      rows.append({"tokens": np.full(seq_len, pad_id, np.int32), "loss_mask": np.zeros(seq_len, np.int32),
                   "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32)})
      free.append(seq_len)
      slot = len(rows) - 1
    row, start = rows[slot], seq_len - free[slot]
    row["tokens"][start:start + n] = np.asarray(r["tokens"])[:n]
    row["loss_mask"][start:start + n] = np.asarray(r["loss_mask"])[:n]
    row["segment_ids"][start:start + n] = row["segment_ids"].max() + 1
    row["positions"][start:start + n] = np.arange(n)
    free[slot] -= n
    used += n
  stats = {"examples": len(records), "rows": len(rows), "fill": used / max(len(rows) * seq_len, 1)}
  return rows, stats


def share_prompt(splits: Sequence[Sequence[dict]], pad_id: int = 0, multiple: int = 16):
  """Preference records ``tokens[K, T], loss_mask[K, T]`` (K responses to one prompt, e.g.
  chosen and rejected) -> shared-prefix rows: the prompt once, then each response, so a pair
  costs ``P + L_1 + L_2 + 1`` tokens instead of ``2 (P + L)`` padded ones.

  Row layout ``[prompt[:-1] | prompt[-1], response 1 | prompt[-1], response 2 | ... | pad]``:
  each response is preceded by its own copy of the prompt's last token (whose hidden state
  predicts the response's first token), at the positions it has in its own row. Fields:
  ``tokens``, ``loss_mask`` (1 on the responses), ``positions``, ``branch_ids`` (0 = the
  shared prefix and padding, j = response j with its copy of the prompt's last token). The
  model, given ``branch_ids``, lets a token attend to the prefix and its own branch only, so
  every response token sees exactly what it sees in its own row (equal logits).
  A record without a prompt (``allow_no_prompt``) is its responses one after another.

  ``splits``: lists of records (train, test, ...) cut to one row length (fixed shapes across
  them): the longest row, rounded up to ``multiple``; nothing is dropped. Returns
  ``(splits of rows, stats)``: ``stats = {"pairs", "row_len", "tokens", "unshared_tokens"}``
  (``tokens``: the rows' non-pad tokens; ``unshared_tokens``: those of the two-row layout,
  each response with its prompt)."""
  def parts(i, r):
    tokens, mask = np.asarray(r["tokens"]), np.asarray(r["loss_mask"])
    prompt, responses = None, []
    for j in range(tokens.shape[0]):
      on = np.nonzero(mask[j])[0]
      if len(on) == 0 or on[-1] - on[0] + 1 != len(on):
        raise ValueError(f"share_prompt: record {i}, response {j}: its loss mask is not one non-empty run")
      p = tokens[j, :on[0]]
      if prompt is None:
        prompt = p
      elif not np.array_equal(p, prompt):
        raise ValueError(f"share_prompt: record {i}: response {j} follows another prompt than response 0")
      responses.append(tokens[j, on[0]:on[-1] + 1])
    return prompt, responses

  split_parts = [[parts(i, r) for i, r in enumerate(s)] for s in splits]
  lengths = [len(p) + sum(len(x) + (len(p) > 0) for x in rs) - (len(p) > 0)
             for s in split_parts for p, rs in s]
  row_len = -(-max(lengths, default=1) // multiple) * multiple
  out, unshared = [], 0
  for s in split_parts:
    rows = []
    for prompt, responses in s:
      tokens = np.full(row_len, pad_id, np.int32)
      mask, positions, branch = (np.zeros(row_len, np.int32) for _ in range(3))
      head = len(prompt) - 1 if len(prompt) else 0
      tokens[:head], positions[:head] = prompt[:head], np.arange(head)
      at = head
      for j, resp in enumerate(responses):
        seg = np.concatenate([prompt[head:], resp])            # the prompt's last token, then the response
        n = len(seg)
        tokens[at:at + n], positions[at:at + n] = seg, head + np.arange(n)
        mask[at + n - len(resp):at + n], branch[at:at + n] = 1, j + 1
        at += n
        unshared += len(prompt) + len(resp)
      rows.append({"tokens": tokens, "loss_mask": mask, "positions": positions, "branch_ids": branch})
    out.append(rows)
  stats = {"pairs": sum(len(s) for s in out), "row_len": row_len, "tokens": int(sum(lengths)),
           "unshared_tokens": int(unshared)}
  return out, stats
