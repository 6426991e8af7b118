"""The in-code sort task (:func:`jaxopd.data.toy.sort_task`): SFT records made from the seed, no
files and no tokenizer; for smoke runs."""

from __future__ import annotations

from jaxopd.data import toy
from jaxopd.data.tokenizer import check_tokenizer
from jaxopd.tasks import SftData


def sft_data(config, arch) -> SftData:
  check_tokenizer(config, None, "the sort task")
  s = config.data.sort
  make = lambda num, seed: toy.sort_task(num, config.seq_len, arch.vocab_size, seed, min_len=s.min_symbols,
                                         max_len=s.max_symbols)
  return SftData(make(s.num_train, config.seed), make(s.num_eval, config.seed + 10_000), toy.PAD)
