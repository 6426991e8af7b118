"""The stage layer (jaxopd/stages.py): a stage's directory is addressed by its inputs, a finished
stage is reused, a changed input re-runs that stage and the stages after it only, a stage stopped
part-way resumes in its own directory, and its record says what it was made from."""

from __future__ import annotations

import os

import pytest

from jaxopd import stages
from jaxopd.experiment import load_config


def _pipeline(root, calls, a: int, b: int, c: int):
  """Three chained stages; each product is a file, each downstream stage reads its upstream's
  directory (an input), as a DPO stage reads the SFT stage's run."""
  def step(name, inputs):
    def produce(where):
      calls.append(name)
      with open(os.path.join(where, "out"), "w") as f:
        f.write(repr(inputs))
    return stages.run(str(root), name, inputs, produce)
  first = step("first", {"a": a})
  second = step("second", {"b": b, "first": first})
  third = step("third", {"c": c, "second": second})
  return first, second, third


def test_rerun_reuses_and_a_changed_input_reruns_that_stage_and_those_after_only(tmp_path):
  calls = []
  dirs = _pipeline(tmp_path, calls, 1, 2, 3)
  assert calls == ["first", "second", "third"]
  recs = [stages.record(d) for d in dirs]
  assert [r["done"] for r in recs] == [True] * 3 and recs[1]["inputs"] == {"b": 2, "first": dirs[0]}
  assert [os.path.basename(d) for d in dirs] == [f"first-{recs[0]['key']}", f"second-{recs[1]['key']}",
                                                 f"third-{recs[2]['key']}"]

  calls.clear()
  assert _pipeline(tmp_path, calls, 1, 2, 3) == dirs and calls == []          # nothing re-runs
  assert [stages.record(d) for d in dirs] == recs                              # nor is rewritten

  again = _pipeline(tmp_path, calls, 1, 5, 3)                                   # the middle stage's input
  assert calls == ["second", "third"] and again[0] == dirs[0]
  assert again[1] != dirs[1] and again[2] != dirs[2]
  assert [stages.record(d) for d in dirs] == recs                              # the old products are kept

  calls.clear()
  _pipeline(tmp_path, calls, 7, 2, 3)                                           # the first: all three
  assert calls == ["first", "second", "third"]


def test_a_stage_stopped_part_way_resumes_in_its_directory(tmp_path):
  seen = []

  def fails(where):
    seen.append(where)
    open(os.path.join(where, "partial"), "w").close()
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    stages.run(str(tmp_path), "s", {"x": 1}, fails)
  assert stages.record(seen[0])["done"] is False

  def finishes(where):
    seen.append(where)
    assert os.path.exists(os.path.join(where, "partial"))      # what the first try left is there

  assert stages.run(str(tmp_path), "s", {"x": 1}, finishes) == seen[0] == seen[1]
  assert stages.record(seen[0])["done"] is True


def test_the_key_is_of_the_inputs_alone():
  assert stages.key({"a": 1, "b": [1, 2]}) == stages.key({"b": [1, 2], "a": 1})
  assert stages.key({"a": 1}) != stages.key({"a": 2}) != stages.key({"a": 1, "b": 0})


def test_training_stage_inputs_leave_out_what_does_not_change_the_product():
  """The progress bar, mesh, checkpoint and evaluation cadence and logging do not move an SFT stage; its
  length and recipe do. The teacher on digits trains on every level, the base on the easy ones."""
  c = load_config("grpo.py:smoke")
  base = stages.sft_dir(c, "sft")
  c.progress, c.mesh.shape, c.eval_every = not c.progress, (1, 2, 4), c.eval_every + 1
  assert stages.sft_dir(c, "sft") == base
  c.sft.total_steps += 1
  assert stages.sft_dir(c, "sft") != base
  t = stages.train_inputs(stages.sft_config(c, "teacher"))
  assert t["data"]["sft_max_level"] == c.data.max_level != stages.train_inputs(stages.sft_config(c, "sft"))[
      "data"]["sft_max_level"]
  assert set(stages.RUN_ONLY).isdisjoint(t)
