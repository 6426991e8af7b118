"""grain pipelines: per-host shard, seeded shuffle, fixed-shape batches.

The iterator is a ``grain.DatasetIterator``: ``get_state()``/``set_state()``
let the trainer checkpoint exactly how far each host has read.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from jaxopd.experiment import DataShard


def batched_iterator(records: Sequence, shard: DataShard, *, shuffle: bool = True,
                     repeat: bool = True, drop_remainder: bool = True):
  """Batches of ``shard.local_batch`` records (dicts of equal-shape numpy arrays).

  Process ``i`` of ``n`` reads records ``i, i+n, ...``; shuffling is reseeded
  every epoch from ``shard.seed``, so the order is a function of the seed only.
  """
  if len(records) < shard.process_count:
    raise ValueError(f"dataset of {len(records)} records cannot be split over {shard.process_count} processes")
  ds = grain.MapDataset.source(records)[shard.process_index::shard.process_count]
  if not repeat and drop_remainder and len(ds) < shard.local_batch:
    raise ValueError(f"dataset shard of {len(ds)} records is smaller than one batch of {shard.local_batch}")
  if shuffle:
    ds = ds.shuffle(seed=shard.seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.batch(shard.local_batch, drop_remainder=drop_remainder)
  return iter(ds.to_iter_dataset())


def pack(records: Sequence[dict], seq_len: int, pad_id: int = 0) -> tuple[list[dict], dict]:
  """Packs SFT records (``tokens[T]``, ``loss_mask[T]``, right-padded) into rows of
  ``seq_len``: first-fit in order, each example whole. Rows carry
  ``segment_ids`` (0 = padding, 1.. per example) and per-example ``positions``
  so the model attends within an example only.

  Returns (rows, stats) with ``stats = {"examples", "rows", "fill"}``.
  """
  def length(r):
    nz = np.nonzero(np.asarray(r["tokens"]) != pad_id)[0]
    return int(nz[-1]) + 1 if len(nz) else 0

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
