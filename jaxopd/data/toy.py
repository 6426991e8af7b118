"""A tiny sequence task made in code: sort the prompt's symbols.

A stand-in until the controlled "reviews" suite lands; it exercises the same
record format every pipeline uses: ``tokens[T]`` int32 and ``loss_mask[T]``
(1 on response tokens, aligned with ``tokens``), right-padded with ``PAD``.

  [BOS] s_1 .. s_k [SEP] sorted(s) [EOS] [PAD] ...
"""

from __future__ import annotations

import numpy as np

PAD, BOS, EOS, SEP = 0, 1, 2, 3
NUM_SPECIAL = 4


def sort_task(num: int, seq_len: int, vocab_size: int, seed: int, min_len: int = 2,
              max_len: int | None = None) -> list[dict]:
  """``num`` records; ``k`` symbols drawn uniformly, ``k`` in ``[min_len, max_len]``."""
  if vocab_size <= NUM_SPECIAL + 1:
    raise ValueError(f"vocab_size={vocab_size}: the sort task needs more than {NUM_SPECIAL + 1} tokens")
  longest = (seq_len - 3) // 2
  max_len = longest if max_len is None else max_len
  if not 1 <= min_len <= max_len <= longest:
    raise ValueError(f"sort task lengths [{min_len}, {max_len}] do not fit seq_len={seq_len} "
                     f"(at most {longest} symbols)")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    k = int(rng.integers(min_len, max_len + 1))
    sym = rng.integers(NUM_SPECIAL, vocab_size, size=k)
    seq = np.concatenate([[BOS], sym, [SEP], np.sort(sym), [EOS]])
    tokens = np.full(seq_len, PAD, np.int32)
    tokens[:len(seq)] = seq
    mask = np.zeros(seq_len, np.int32)
    mask[k + 2:len(seq)] = 1
    out.append({"tokens": tokens, "loss_mask": mask})
  return out
