"""grain pipelines: per-host shard, seeded shuffle, fixed-shape batches.

The iterator is a ``grain.DatasetIterator``: ``get_state()``/``set_state()``
let the trainer checkpoint exactly how far each host has read.
"""

from __future__ import annotations

from typing import Sequence

import grain

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
