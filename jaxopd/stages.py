"""The pipelines' stages: an SFT base, a teacher, DPO models, teacher traces, f-DPG's target fit.

A stage is a kind, the inputs that define it, and a function that fills a directory; the
directory is ``ROOT/KIND-HASH``, HASH a digest of the inputs (:func:`run`). Re-running a
finished stage does nothing, a changed input makes a new directory, and ``stage.json`` records
the inputs a product was made from. A stage that trains uses the one trainer on a config module
of experiments/ (``"sft.py"``, ``"tdpo.py:dpo"``) with the pipeline's model, data, seed and mesh;
an upstream stage's directory is among its inputs, so a change re-runs what follows it only.
A config declares its pipeline (``config.pipeline``: stage blocks, each of a kind in
:data:`KINDS`); :func:`prepare` runs it. A stage's experiment is looked up by name in the
registry (:func:`jaxopd.methods.get`), so no method imports another.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from typing import Callable, NamedTuple

import ml_collections

from jaxopd import paths, runtime, tasks
from jaxopd.data import digits, preferences, suite as suite_lib, traces
from jaxopd.errors import ConfigError
from jaxopd.experiment import load_config
from jaxopd.models import table
from jaxopd.sampling import rollout_config

RECORD = "stage.json"
# Fields of a stage's training config that do not change its product (its weights).
RUN_ONLY = ("progress", "mesh", "distributed", "checkpoint", "log_every", "resume_changes", "eval_every",
            "eval_batches")


def key(inputs: dict) -> str:
  """The digest that addresses a stage's directory: 12 hex digits of the inputs' canonical JSON."""
  return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def directory(root: str, kind: str, inputs: dict) -> str:
  """Where the stage of ``kind`` with ``inputs`` lives (or will): ``ROOT/KIND-HASH``."""
  return paths.join(paths.resolve(root), f"{kind}-{key(inputs)}")


def record(where: str) -> dict | None:
  """A stage directory's record (``kind``, ``key``, ``inputs``, ``done``, ``finished``), or None."""
  path = paths.join(where, RECORD)
  return paths.read_json(path) if paths.isfile(path) else None


def run(root: str, kind: str, inputs: dict, produce) -> str:
  """The stage ``kind`` with ``inputs``: its directory, filled by ``produce(directory)`` unless its
  record says it is done. A stage stopped part-way (``produce`` raised) keeps its directory, so the
  next run resumes it there."""
  where = directory(root, kind, inputs)
  rec = record(where)
  if rec and rec["done"]:
    print(f"[stage] {kind}: reused {where}", flush=True)
    return where
  rec = {"kind": kind, "key": key(inputs), "inputs": json.loads(json.dumps(inputs, default=str)), "done": False}
  paths.write_json(paths.join(where, RECORD), rec, indent=2)
  produce(where)
  rec.update(done=True, finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  paths.write_json(paths.join(where, RECORD), rec, indent=2)
  return where


def _build(method: str):
  from jaxopd import methods     # the registry (a stage trains a method's experiment by its name)
  return methods.get(method).build


def train_inputs(s, **extra) -> dict:
  """A training stage's inputs: its config less :data:`RUN_ONLY`, plus ``extra``."""
  return {**{k: v for k, v in s.to_dict().items() if k not in RUN_ONLY}, **extra}


def train(s, root: str, kind: str, build_fn, what: str, **extra) -> str:
  """Trains stage config ``s`` (experiment ``build_fn(s)``) as stage ``kind`` under ``root`` unless
  it is done; returns the pinned ``run:`` init of its policy. A preempted stage is
  :class:`jaxopd.runtime.Interrupted` (re-running resumes it)."""
  from jaxopd import train as train_lib

  def produce(where):
    print(f"[stage] {what} -> {where} ({s.total_steps} steps)", flush=True)
    out = train_lib.run(s, where, build_fn(s))
    if out.preempted:
      raise runtime.Interrupted(out.preempted, f"the {what} stage stopped at step {out.step} "
                                f"({out.preempted}, checkpointed); re-run the command to resume it")
  return init_of(run(root, kind, train_inputs(s, **extra), produce), s.total_steps)


def init_of(where: str, total_steps: int) -> str:
  """The ``run:`` init of a training stage's policy, pinned at its final step."""
  return f"run:{where}:policy@{total_steps}"


def _shorten(s, total_steps: int):
  s.total_steps = total_steps
  s.optim.warmup_steps = min(s.optim.warmup_steps, s.total_steps)
  s.checkpoint.every = min(s.checkpoint.every, s.total_steps)


# --- SFT stages ---------------------------------------------------------------------------------

def sft_stage(workdir: str, total_steps: int, config: str = "sft.py", what: str = "SFT",
              all_levels: bool = False) -> ml_collections.ConfigDict:
  """The config block of an SFT stage: the root its runs live under, its length, the config
  module whose recipe it follows (``"sft.py[:preset]"``, looked up in experiments/), and on the
  digits task whether it trains on every level (a teacher) or the easy ones."""
  b = ml_collections.ConfigDict()
  b.kind = "sft"
  b.workdir = workdir            # the root of the stage's runs (ROOT/sft-HASH, one per set of inputs)
  b.total_steps = total_steps    # its length
  b.config = config              # its recipe: a config module of experiments/ ("sft.py[:preset]")
  b.what = what                  # its name in the log
  b.all_levels = all_levels      # digits: every level (else up to config.data.sft_max_level)
  return b


def sft_config(config, name: str, model=None):
  """The SFT config of stage ``config[name]`` of pipeline ``config``, for architecture ``model``
  (default ``config.model``); on the digits task ``teacher`` trains on every level."""
  node = config[name]
  s = load_config(node.config)
  if s.method.name != "sft":
    raise ConfigError(f"{node.config!r}: an SFT stage needs an SFT config (its method is {s.method.name!r})")
  s.model = config.model if model is None else model
  s.data = copy.deepcopy(config.data)
  if node.get("all_levels") and "sft_max_level" in s.data:
    s.data.sft_max_level = s.data.max_level
  s.seed = config.seed
  s.mesh = config.mesh
  s.progress = config.progress
  _shorten(s, node.total_steps)
  return s


def sft_dir(config, name: str, model=None) -> str:
  """The directory of SFT stage ``config[name]`` (trained or not)."""
  return directory(config[name].workdir, "sft", train_inputs(sft_config(config, name, model)))


def sft_init(config, name: str, model=None) -> str:
  """The pinned ``run:`` init of SFT stage ``config[name]`` (trained or not)."""
  return init_of(sft_dir(config, name, model), config[name].total_steps)


def run_sft(config, name: str, model=None) -> str:
  """Trains SFT stage ``config[name]`` unless it is done; returns its pinned ``run:`` init."""
  return train(sft_config(config, name, model), config[name].workdir, "sft", _build("sft"), config[name].what)


def run_sft_on(s, node, train_records, eval_records, what: str, source: str) -> str:
  """Trains SFT config ``s`` on ``{"tokens", "loss_mask"}`` records drawn from directory ``source``
  (an input of the stage) under ``node.workdir`` (REDI's stage 1 on the teacher's positive
  traces); returns its pinned ``run:`` init."""
  from jaxopd import methods
  sft = methods.get("sft").module
  return train(s, node.workdir, "sft", lambda s: sft.experiment(train_records, eval_records), what,
               records=paths.resolve(source))


# --- DPO stages (AlignDistil's DPO and reverse-DPO models) -------------------------------------

def dpo_stage(workdir: str, total_steps: int, reverse: bool = False, config: str = "tdpo.py:dpo"):
  """The config block of a DPO stage: the root its runs live under, its length, whether it is the
  reverse model (chosen and rejected swapped), and the recipe it follows (a TDPO config module of
  experiments/); model, data, pairs, SFT base, seed and mesh come from the pipeline's config."""
  b = ml_collections.ConfigDict()
  b.kind = "dpo"
  b.workdir = workdir            # the root of the stage's runs (ROOT/dpo-HASH, one per set of inputs)
  b.total_steps = total_steps    # its length
  b.reverse = reverse            # train on rejected over chosen
  b.config = config              # its recipe: "tdpo.py:dpo" (DPO) or another loss of experiments/tdpo.py
  return b


def dpo_config(config, name: str):
  """The TDPO config of DPO stage ``config[name]``: policy and reference from the SFT stage, on
  pipeline ``config``'s pairs."""
  node = config[name]
  s = load_config(node.config)
  if s.method.name != "tdpo":
    raise ConfigError(f"{node.config!r}: a DPO stage needs a TDPO config (its method is {s.method.name!r})")
  for k in ("model", "data", "prefs", "sft", "eval", "seed", "mesh", "progress"):
    s[k] = copy.deepcopy(config[k])
  s.models.policy.init = s.models.reference.init = sft_init(config, "sft")
  s.method.swap = bool(node.reverse)
  s.compare_with = ""
  _shorten(s, node.total_steps)
  s.eval_every = 0
  return s


def run_dpo(config, name: str, what: str = "DPO") -> str:
  """Trains DPO stage ``config[name]`` unless it is done; returns its pinned ``run:`` init."""
  return train(dpo_config(config, name), config[name].workdir, "dpo", _build("tdpo"), what)


# --- the preference pipeline (TDPO, DPO, SparsePO, REDI and AlignDistil on the reviews task) -------

def preference_pipeline(c, smoke: bool = False):
  """Adds the preference pipeline's fields to config ``c``: the controlled task's model and data,
  the SFT stage, preference construction, sampled evaluation, and policy and reference starting
  from the SFT stage."""
  c.model = suite_lib.default_model(smoke)   # the SFT base's architecture
  c.data = suite_lib.data_config(smoke)      # the reviews suite
  # Both start from the SFT stage (trained in config.sft.workdir); give both an
  # hf:DIR or run:WORKDIR init to start from your own model instead (no SFT stage).
  c.models.policy = table.role(init="stage:sft")
  c.models.reference = table.role(init="stage:sft", trainable=False)
  # The smoke model is not the default architecture: its own SFT run (experiments/sft.py's recipe).
  c.sft = sft_stage("runs/sft_smoke" if smoke else "runs/sft_base", 20 if smoke else 1500, what="SFT base")

  c.pipeline = ("sft", "prefs")  # the stages, in order (jaxopd.stages.prepare)
  c.prefs = ml_collections.ConfigDict()
  c.prefs.kind = "pairs"         # a data stage: pairs sampled from the SFT stage, labelled by the gold reward
  c.prefs.num_train = 2000       # prompts -> train pairs
  c.prefs.num_test = 200         # held-out prompts -> eval pairs
  c.prefs.k = 4                  # samples per prompt
  c.prefs.mode = "best_worst"    # best_worst | bradley_terry
  c.prefs.bt_temperature = 0.1   # bradley_terry label noise
  c.prefs.temperature = 1.0      # sampling temperature
  c.prefs.max_new_tokens = 48    # response budget
  c.prefs.prompt_len = 16        # padded prompt tokens

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 256       # held-out prompts sampled at each eval
  c.eval.max_new_tokens = 48     # response budget
  c.eval.temperature = 1.0       # sampling temperature
  c.eval.prompt_len = 16         # padded prompt tokens
  if smoke:
    c.prefs.num_train, c.prefs.num_test, c.prefs.k = 32, 16, 2   # 16: a batch after identical pairs are dropped
    c.prefs.max_new_tokens = 12
    c.eval.num_prompts = 8
    c.eval.max_new_tokens = 12
  return c


def prefs_config(c):
  """The preference-pair dataset's config (:mod:`jaxopd.data.preferences`) of pipeline ``c``: pairs
  sampled from its SFT stage (whose key, a digest of its inputs, names the dataset)."""
  d, p = c.data, c.prefs
  where = sft_dir(c, "sft")
  return preferences.make_config(
      policy_key=os.path.basename(where), policy_workdir=where, policy_step=int(c.sft.total_steps),
      world_seed=d.world_seed,
      prompts_num_train=d.num_prompts_train, prompts_num_test=d.num_prompts_test,
      prompt_min_words=d.prompt_min_words, prompt_max_words=d.prompt_max_words, num_train=p.num_train,
      num_test=p.num_test, k=p.k, mode=p.mode, bt_temperature=p.bt_temperature, temperature=p.temperature,
      max_new_tokens=p.max_new_tokens, prompt_len=p.prompt_len, seed=c.seed)


def _pairs(config, name, filled) -> None:
  """Kind ``pairs``: the preference pairs sampled from stage ``sft`` (a TFDS dataset in
  ``config.data.data_dir`` named by a digest of its inputs)."""
  del name, filled
  if config.data.task != "reviews":
    raise ConfigError(f"config.data.task={config.data.task!r}: the sampled preference pairs are of the reviews "
                      f"task (or give pair files: task=files)")
  pc = prefs_config(config)
  print(f"[stage] preferences {pc.name} (k={pc.k}, {pc.mode}) in {config.data.data_dir}", flush=True)
  preferences.prepare(pc, config.data.data_dir)
  for split in ("train", "test"):
    st = preferences.statistics(pc, split, config.data.data_dir)
    print(f"  {split}: {st['pairs']} pairs, chosen reward {st['chosen_reward']:.3f}, "
          f"rejected {st['rejected_reward']:.3f}, label accuracy {st['label_accuracy']:.3f}")


# --- the digits traces and REDI's stage 1 -------------------------------------------------------

def source(config, init: str) -> str:
  """``init``, or for ``stage:NAME`` the pinned ``run:`` init of SFT stage ``NAME`` (trained or not)."""
  return sft_init(config, init[len("stage:"):]) if init.startswith("stage:") else init


def _traces_stage(config):
  """``(teacher, suite, sampling, inputs)`` of traces stage ``config.traces``: its teacher, sampling
  and prompts are its inputs."""
  t = config.traces
  teacher = source(config, t.teacher)
  suite = digits.ensure(config.data, verbose=False)
  scfg = rollout_config(config, suite.tokenizer, t.temperature)
  return teacher, suite, scfg, traces.settings(teacher, t, scfg, int(t.seed), suite.builder_config.name)


def traces_dir(config) -> str:
  """The directory of traces stage ``config.traces`` (made or not)."""
  return directory(config.traces.workdir, "traces", _traces_stage(config)[3])


def _traces(config, name, filled) -> None:
  """Kind ``traces``: ``config.traces.samples`` answers of the teacher to each of the first
  ``num_prompts`` digits train prompts, labelled by the task's checker."""
  t = config[name]
  teacher, suite, scfg, inputs = _traces_stage(filled)
  table.parse_init("teacher", teacher)
  prompts = digits.prompt_records(suite, "train", config.rollout.prompt_len, config.rollout.max_new_tokens - 1)
  where = run(t.workdir, "traces", inputs,
              lambda where: traces.write(where, t, lambda: table.load_model(teacher, "teacher")[0], teacher, suite,
                                         prompts, scfg, int(t.seed)))
  st = traces.statistics(traces.load(where), t.pairs_per_prompt)
  rates = " ".join(f"L{k} {v:.2f}" for k, v in st["positive_rate_per_level"].items())
  print(f"traces: {st['traces']} ({st['positives']} positive, {st['negatives']} negative, "
        f"{st['negatives_truncated']} of them cut at the budget); {st['prompts_both']} of {st['prompts']} prompts "
        f"have both -> {st['pairs']} pairs ({st['prompts_only_positive']} prompts only positive, "
        f"{st['prompts_only_negative']} only negative: no pair); positive rate per level: {rates}")


def _positives(config, name, filled) -> str:
  """Kind ``positives`` (REDI's stage 1): SFT stage ``config[name]`` from stage ``sft`` on every
  positive trace of stage ``traces`` (held out: the gold answers of every level)."""
  where = traces_dir(filled)
  s = sft_config(config, name)
  s.models.policy.init = sft_init(config, "sft")
  suite = digits.ensure(config.data, verbose=False)
  train_recs = traces.positive_records(traces.load(where), suite.tokenizer, s.seq_len)
  eval_recs, _ = digits.sft_records(suite, "test", s.seq_len, verbose=False)
  return run_sft_on(s, config[name], train_recs, eval_recs,
                    f"stage 1: SFT on the {len(train_recs)} positive traces", where)


# --- a pipeline: the stages a config declares -------------------------------------------------

class Kind(NamedTuple):
  """A kind of stage: ``run(config, name, filled)`` makes stage ``config[name]`` (``filled``: the
  config with the earlier stages' inits) and returns its ``run:`` init, or None for data;
  ``after(config, name)``: the stages it builds on; a ``data`` stage always runs (the method
  reads its product), a model stage only when a role or a later stage uses it; ``check(config,
  name)``: one-line errors for its block, before any stage runs."""
  run: Callable
  after: Callable
  data: bool = False
  check: Callable = lambda c, n: None


def _check_pairs(config, name) -> None:
  p = config[name]
  if p.prompt_len + p.max_new_tokens > config.model.max_len:
    raise ConfigError(f"config.{name}.max_new_tokens={p.max_new_tokens}: prompt_len + max_new_tokens "
                      f"exceeds config.model.max_len={config.model.max_len}")


def _check_traces(config, name) -> None:
  t = config[name]
  for f in ("num_prompts", "samples", "pairs_per_prompt"):
    if t[f] < 1:
      raise ConfigError(f"config.{name}.{f}={t[f]}: must be >= 1")
  if t.samples < 2:
    raise ConfigError(f"config.{name}.samples={t.samples}: a pair needs at least 2 samples per prompt")


KINDS = {
    "sft": Kind(lambda c, n, f: run_sft(c, n, c[n].get("model")), lambda c, n: ()),
    "pairs": Kind(_pairs, lambda c, n: ("sft",), data=True, check=_check_pairs),
    "dpo": Kind(lambda c, n, f: run_dpo(c, n, "reverse DPO (chosen and rejected swapped)" if c[n].reverse else "DPO"),
                lambda c, n: ("sft", "prefs")),
    "traces": Kind(_traces, lambda c, n: (c[n].teacher[len("stage:"):],) if c[n].teacher.startswith("stage:") else (),
                   data=True, check=_check_traces),
    "positives": Kind(_positives, lambda c, n: ("sft", "traces")),
}


def _sources(config):
  """``(field name, block, key)`` of every field that may name a stage: the roles' inits and the
  traces' teacher."""
  out = [(f"config.models.{n}.init", r, "init") for n, r in config.models.items()]
  return out + ([("config.traces.teacher", config.traces, "teacher")] if "traces" in config else [])


def staged(config) -> dict[str, str]:
  """``{stage: the first field naming it}``."""
  out = {}
  for field, block, key in _sources(config):
    v = block[key]
    if isinstance(v, str) and v.startswith("stage:"):
      out.setdefault(v[len("stage:"):], field)
  return out


def fill(config, name: str, init: str) -> None:
  """Replaces ``stage:NAME`` by ``init`` in every field that names it."""
  for _, block, key in _sources(config):
    if block[key] == f"stage:{name}":
      block[key] = init


def prepare(config):
  """Runs the stages ``config.pipeline`` names, in order, that the run needs (a stage a role or
  a later stage uses; data stages always), each reused when done; returns a copy of ``config``
  whose ``stage:NAME`` inits are the stages' pinned ``run:`` inits. Your own data (a task
  without built-in stages, e.g. ``files``) runs none: every role needs a source."""
  pipeline = tuple(config.get("pipeline", ()))
  staged_ = staged(config)
  for name, field in staged_.items():
    if name not in pipeline:
      raise ConfigError(f"{field}='stage:{name}': no stage {name!r} in config.pipeline={pipeline}")
  if staged_ and not tasks.has_stages(config):
    name, field = next(iter(staged_.items()))
    raise ConfigError(f"{field}='stage:{name}': with task={config.data.task} no SFT stage is "
                      f"trained here; start it from your model (hf:DIR) or a run (run:WORKDIR)")
  filled = copy.deepcopy(config)
  if not tasks.has_stages(config):
    return filled
  need = set(staged_)
  for name in reversed(pipeline):
    kind = config[name].get("kind")
    if kind not in KINDS:
      raise ConfigError(f"config.{name}.kind={kind!r}: must be one of {tuple(KINDS)}")
    if name in need or KINDS[kind].data:
      need.add(name)
      need.update(KINDS[kind].after(config, name))
  for name in pipeline:
    if name in need:
      KINDS[config[name].kind].check(config, name)
  if need:
    tasks.ensure(config)
  for name in pipeline:
    if name in need:
      init = KINDS[config[name].kind].run(config, name, filled)
      if init:
        fill(filled, name, init)
  return filled
