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


def _declared(tmp_path, task="reviews"):
  """A config declaring a pipeline of three toy stages: ``base`` (a model), ``prefs`` (data, after
  ``base``) and ``extra`` (a model no role uses unless a test points one at it)."""
  c = load_config("tdpo.py:smoke")
  c.data.task = task
  c.pipeline = ("base", "prefs", "extra")
  for name, kind in (("base", "model"), ("prefs", "data"), ("extra", "model")):
    c[name] = {"kind": kind, "workdir": str(tmp_path / name)}
  c.models.policy.init = c.models.reference.init = "stage:base"
  return c


@pytest.fixture
def toy_kinds(monkeypatch):
  calls = []

  def model(config, name, filled):
    calls.append(name)
    return f"run:{config[name].workdir}:policy@1"

  def data(config, name, filled):
    calls.append(name)
    assert filled.models.policy.init.startswith("run:")   # the earlier stage is filled in by now

  monkeypatch.setattr(stages, "KINDS", {"model": stages.Kind(model, lambda c, n: ()),
                                         "data": stages.Kind(data, lambda c, n: ("base",), data=True)})
  monkeypatch.setattr(stages.tasks, "ensure", lambda config: None)
  return calls


def test_the_declared_pipeline_runs_in_order_what_the_run_uses(tmp_path, toy_kinds):
  """The stages of ``config.pipeline`` run in order: a data stage always, a model stage when a role
  (or a later stage) uses it; the result is a copy with the roles' ``stage:`` inits filled and the
  given config unchanged."""
  c = _declared(tmp_path)
  out = stages.prepare(c)
  assert toy_kinds == ["base", "prefs"]                       # extra: no role uses it
  assert out.models.policy.init == out.models.reference.init == f"run:{tmp_path / 'base'}:policy@1"
  assert c.models.policy.init == "stage:base"                 # the caller's config is not mutated

  toy_kinds.clear()
  c.models.reference.init = "stage:extra"
  out = stages.prepare(c)
  assert toy_kinds == ["base", "prefs", "extra"] and out.models.reference.init.startswith(f"run:{tmp_path / 'extra'}")


def test_pipeline_mistakes_are_one_line(tmp_path, toy_kinds):
  c = _declared(tmp_path)
  c.models.reference.init = "stage:teacher"
  with pytest.raises(stages.ConfigError, match=r"config\.models\.reference\.init='stage:teacher': no stage "
                                               r"'teacher' in config\.pipeline=\('base', 'prefs', 'extra'\)"):
    stages.prepare(c)
  c = _declared(tmp_path)
  c.prefs.kind = "pairz"
  with pytest.raises(stages.ConfigError, match=r"config\.prefs\.kind='pairz': must be one of \('model', 'data'\)"):
    stages.prepare(c)
  c = _declared(tmp_path, task="files")       # your own data: no built-in stage runs
  with pytest.raises(stages.ConfigError, match=r"config\.models\.policy\.init='stage:base': with task=files no SFT "
                                               r"stage is trained here"):
    stages.prepare(c)
  assert toy_kinds == []
  c.models.policy.init = c.models.reference.init = "hf:/somewhere"
  assert stages.prepare(c).models.policy.init == "hf:/somewhere" and toy_kinds == []


def test_a_kinds_check_runs_before_any_stage(tmp_path, toy_kinds, monkeypatch):
  """Each needed stage's block is checked before the first stage runs, so a mistake in a late
  block costs no training."""
  def check(config, name):
    if config[name].get("bad"):
      raise stages.ConfigError(f"config.{name}.bad: refused")
  kinds = dict(stages.KINDS)
  kinds["data"] = kinds["data"]._replace(check=check)
  monkeypatch.setattr(stages, "KINDS", kinds)
  c = _declared(tmp_path)
  c.prefs.bad = True
  with pytest.raises(stages.ConfigError, match=r"config\.prefs\.bad: refused"):
    stages.prepare(c)
  assert toy_kinds == []


@pytest.mark.parametrize("field,value,match", [
    ("traces.samples", 1, r"config\.traces\.samples=1: a pair needs at least 2 samples per prompt"),
    ("traces.pairs_per_prompt", 0, r"config\.traces\.pairs_per_prompt=0: must be >= 1"),
    ("prefs.max_new_tokens", 4096, r"config\.prefs\.max_new_tokens=4096: prompt_len \+ max_new_tokens exceeds "
                                   r"config\.model\.max_len")])
def test_the_real_kinds_check_their_blocks(field, value, match):
  c = load_config("redi.py:digits" if field.startswith("traces") else "tdpo.py")
  block, key = field.split(".")
  c[block][key] = value
  with pytest.raises(stages.ConfigError, match=match):
    stages.KINDS[c[block].kind].check(c, block)


def test_the_pairs_dataset_is_named_by_the_sft_stage_key_not_its_directory(tmp_path):
  """Two checkouts (two stage roots) of the same SFT stage name the same pair dataset; a changed
  SFT input names another."""
  a, b = load_config("tdpo.py:smoke"), load_config("tdpo.py:smoke")
  a.sft.workdir, b.sft.workdir = str(tmp_path / "one" / "sft"), str(tmp_path / "two" / "sft")
  pa, pb = stages.prefs_config(a), stages.prefs_config(b)
  assert pa.policy_workdir != pb.policy_workdir and pa.name == pb.name
  b.sft.total_steps += 1
  assert stages.prefs_config(b).name != pa.name
