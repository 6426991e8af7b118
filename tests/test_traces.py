"""REDI's teacher traces on the digits task (jaxopd/data/traces.py) and its two-stage
pipeline (experiments/redi.py:digits). Expected values are written out by hand or come from
Python's own ``sorted``, never from the code under test."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxopd.data import digits, traces
from jaxopd.errors import ConfigError
from jaxopd.experiment import load_config

V = {w: i for i, w in enumerate(digits.VOCABULARY)}   # the tokenizer's ids, by its definition
EOS = V[digits.EOT]


def ids(text):
  return [V[w] for w in text.split()]


def line(i, completion, label, truncated=False, prompt="sort 3 1 ="):
  return {"prompt": prompt, "completion": completion, "label": label, "truncated": truncated, "level": 2,
          "prompt_index": i}


LINES = [line(0, "1 3", True), line(0, "3 1", False), line(0, "1 3", True), line(0, "1 1 1 1", False, truncated=True),
         line(1, "1 3", True), line(1, "1 3", True),
         line(2, "3", False), line(2, "", False)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return digits.build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_pairs_take_the_ith_positive_with_the_ith_negative_of_prompts_that_have_both(tok):
  one = traces.pair_records(LINES, tok, 12, pairs_per_prompt=1)
  two = traces.pair_records(LINES, tok, 12, pairs_per_prompt=2)
  three = traces.pair_records(LINES, tok, 12, pairs_per_prompt=3)
  assert len(one) == 1 and len(two) == 2 and len(three) == 2    # prompt 0 has 2 of each; 1 and 2 have one label
  p = ids("sort 3 1 =")
  want_pos = p + ids("1 3") + [EOS]
  want_neg = p + ids("3 1") + [EOS]
  want_cut = p + ids("1 1 1 1")                                 # cut at the budget: no EOS appended
  for rec, (a, b) in zip(two, [(want_pos, want_neg), (want_pos, want_cut)]):
    for row, want in zip(range(2), (a, b)):
      np.testing.assert_array_equal(rec["tokens"][row], np.pad(want, (0, 12 - len(want)), constant_values=EOS))
      np.testing.assert_array_equal(rec["loss_mask"][row], [0] * len(p) + [1] * (len(want) - len(p)) +
                                    [0] * (12 - len(want)))


def test_positive_records_are_every_positive_trace_with_its_eos(tok):
  recs = traces.positive_records(LINES, tok, 8)
  assert len(recs) == 4
  want = ids("sort 3 1 = 1 3") + [EOS]
  for r in recs:
    np.testing.assert_array_equal(r["tokens"], want + [EOS])
    np.testing.assert_array_equal(r["loss_mask"], [0, 0, 0, 0, 1, 1, 1, 0])


def test_statistics_count_what_each_prompt_gave(tok):
  st = traces.statistics(LINES, pairs_per_prompt=1)
  assert (st["traces"], st["positives"], st["negatives"], st["prompts"]) == (8, 4, 4, 3)
  assert (st["prompts_both"], st["prompts_only_positive"], st["prompts_only_negative"]) == (1, 1, 1)
  assert st["pairs"] == 1 and st["negatives_truncated"] == 1
  assert st["positive_rate_per_level"] == {"2": 0.5}
  assert traces.statistics(LINES, pairs_per_prompt=5)["pairs"] == 2


def test_traces_longer_than_seq_len_are_a_one_line_error(tok):
  with pytest.raises(ConfigError, match=r"config\.seq_len=6: 4 traces are longer"):
    traces.positive_records(LINES, tok, 6)


def _smoke_config(tmp_path):
  c = load_config("redi.py:digits,smoke")
  c.progress = False
  c.traces.workdir = str(tmp_path / "traces")
  c.positives.workdir = str(tmp_path / "positives")
  return c


@pytest.mark.pipeline
def test_redi_on_teacher_traces_two_stages_train_by_gradient_and_report(tmp_path):
  """The smoke pipeline on 8 devices: the traces' labels are the rule (the response is the
  prompt's digits sorted, then EOS), stage 1 trains on the positives, stage 2 (REDI) moves its
  loss by gradient from the stage-1 model, and the report evaluates all four models; stage 1's
  record names the traces it trained on, and other trace settings address another directory."""
  from helpers import DIGITS_STAGES, shared_smoke_stages
  from jaxopd import checkpoint as ckpt_lib, logs, stages, train
  from jaxopd.methods import redi
  from jaxopd.models import table
  c = _smoke_config(tmp_path)
  with shared_smoke_stages(c, stages=DIGITS_STAGES):
    c = redi.prepare(c, str(tmp_path / "run"))
  policy = table.parse_init("policy", c.models.policy.init)
  where = stages.record(policy.path)["inputs"]["records"]      # stage 1's record names the traces it read
  assert os.path.dirname(where) == os.path.abspath(c.traces.workdir) and stages.record(where)["done"]
  lines = traces.load(where)
  assert len(lines) == c.traces.num_prompts * c.traces.samples
  for t in lines:
    words = t["prompt"].split()
    assert words[0] == "sort" and words[-1] == "="
    right = t["completion"].split() == sorted(words[1:-1]) and not t["truncated"]
    assert t["label"] == right, t
  n_pos = sum(t["label"] for t in lines)
  both = {t["prompt_index"] for t in lines if t["label"]} & {t["prompt_index"] for t in lines if not t["label"]}
  with open(os.path.join(where, "statistics.json")) as f:
    st = json.load(f)
  assert (st["positives"], st["prompts_both"], st["pairs"]) == (n_pos, len(both), len(both))
  assert n_pos >= 8 and len(both) >= c.batch_size, st
  assert ckpt_lib.finished(policy.path, c.positives.total_steps)
  assert c.models.policy.init == c.models.reference.init == f"run:{policy.path}:policy@{c.positives.total_steps}"
  assert os.path.dirname(policy.path) == os.path.abspath(c.positives.workdir)

  s = train.run(c, str(tmp_path / "run"), redi.build(c))
  recs = logs.read_metrics(str(tmp_path / "run"), "train")
  assert abs(recs[0]["logps/chosen_change"]) < 0.05, recs[0]   # policy == reference at the start
  assert recs[-1]["loss"] < recs[0]["loss"] - 0.01, [r["loss"] for r in recs]
  redi.report(c, str(tmp_path / "run"), s)
  with open(tmp_path / "run" / "summary.json") as f:
    summary = json.load(f)
  for name in ("sft base", "teacher", "before", "after"):
    assert "sample/pass@1" in summary[name] and "heldout/nll_easy" in summary[name], name
  assert summary["traces"]["pairs"] == len(both)

  # Other trace settings are another traces stage (not the finished one reused).
  c2 = _smoke_config(tmp_path)
  c2.traces.temperature = 0.9
  with shared_smoke_stages(c2, stages=DIGITS_STAGES):
    other = stages.traces_dir(c2)
  assert other != where and os.path.dirname(other) == os.path.dirname(where) and stages.record(other) is None


@pytest.mark.parametrize("field,value,match", [
    ("samples", 1, r"config\.traces\.samples=1: a pair needs at least 2"),
    ("num_prompts", 0, r"config\.traces\.num_prompts=0: must be >= 1"),
])
def test_trace_settings_are_checked_before_anything_runs(tmp_path, field, value, match):
  from jaxopd.methods import redi
  c = _smoke_config(tmp_path)
  c.traces[field] = value
  with pytest.raises(ConfigError, match=match):
    redi.prepare(c, str(tmp_path / "run"))
