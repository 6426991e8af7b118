"""grain pipelines: seeded order, per-host shards, checkpointable iterator state."""

import numpy as np
import pytest

from jaxopd.data import batched_iterator
from jaxopd.experiment import DataShard

RECORDS = [{"tokens": np.full(4, i, np.int32), "loss_mask": np.ones(4, np.int32)} for i in range(37)]


def ids(batch):
  return batch["tokens"][:, 0].tolist()


def test_same_seed_same_order_and_reshuffled_epochs():
  a = batched_iterator(RECORDS, DataShard(3, 0, 1, 8))
  b = batched_iterator(RECORDS, DataShard(3, 0, 1, 8))
  c = batched_iterator(RECORDS, DataShard(4, 0, 1, 8))
  first = [ids(next(a)) for _ in range(10)]
  assert first == [ids(next(b)) for _ in range(10)]
  assert first != [ids(next(c)) for _ in range(10)]
  flat = sum(first, [])
  assert sorted(flat[:37]) == list(range(37))        # an epoch visits every record once
  assert flat[:37] != flat[37:74]                     # and the next epoch is reshuffled


def test_resumed_iterator_yields_exactly_the_uninterrupted_batches():
  it = batched_iterator(RECORDS, DataShard(0, 0, 1, 5))
  for _ in range(9):
    next(it)
  state = it.get_state()
  expected = [ids(next(it)) for _ in range(12)]
  fresh = batched_iterator(RECORDS, DataShard(0, 0, 1, 5))
  fresh.set_state(state)
  assert [ids(next(fresh)) for _ in range(12)] == expected


def test_hosts_read_disjoint_shards():
  seen = []
  for p in range(3):
    it = batched_iterator(RECORDS, DataShard(0, p, 3, 4), shuffle=False, repeat=False)
    seen.append(sum((ids(b) for b in it), []))
  assert all(set(seen[i]).isdisjoint(seen[j]) for i in range(3) for j in range(i))
  assert seen[1][:5] == [4, 5, 6, 7, 16]     # local batches 1, 4, 7 of the one sequence
  assert sorted(sum(seen, [])) == list(range(36))   # 9 batches of 4: none left to one process only


def test_global_batches_do_not_depend_on_the_process_count():
  one = batched_iterator(RECORDS, DataShard(5, 0, 1, 12))
  two = [batched_iterator(RECORDS, DataShard(5, p, 2, 6)) for p in range(2)]
  for _ in range(7):
    assert ids(next(one)) == ids(next(two[0])) + ids(next(two[1]))
  assert two[0].get_state() == two[1].get_state() == one.get_state()


def test_too_small_shard_is_an_error():
  with pytest.raises(ValueError, match="smaller than one batch"):
    batched_iterator(RECORDS[:3], DataShard(0, 0, 1, 4), repeat=False)


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_grouped_rows_keep_each_records_copies_in_one_microbatch_and_read_nothing_unused(accum):
  """f-DPG's samples_per_context = k: a local batch of 16 rows holds 16 / k records read, each k
  times, all k copies in the same microbatch (rows i, i + accum, ...); the records read are
  consecutive in the epoch order (none read and thrown away), and the iterator resumes exactly."""
  from jaxopd.data import group_rows
  k, local = 4, 16
  rows = group_rows(local, k, accum)
  it = batched_iterator(RECORDS, DataShard(0, 0, 1, local // k), rows=rows)
  plain = batched_iterator(RECORDS, DataShard(0, 0, 1, local // k))
  for _ in range(5):
    got, read = ids(next(it)), ids(next(plain))
    assert sorted(got) == sorted(read * k)
    for i in range(accum):
      micro = got[i::accum]
      assert all(micro.count(x) == k for x in micro)     # each record's k copies in this microbatch
  state = it.get_state()
  after = [ids(next(it)) for _ in range(3)]
  it2 = batched_iterator(RECORDS, DataShard(0, 0, 1, local // k), rows=rows)
  it2.set_state(state)
  assert [ids(next(it2)) for _ in range(3)] == after
  with pytest.raises(ValueError, match="does not split into 4 microbatches of groups of 3"):
    group_rows(16, 3, 4)
