"""The cached stages of the pipelines: an SFT base, a teacher, DPO models, the reviews task's
preference pairs. A stage is a run directory trained by the one trainer unless its run is already
finished; its product is the pinned ``run:`` init of its policy, which
:func:`jaxopd.models.table.fill_stage` gives the roles declared ``stage:<name>``. A stage's recipe is
a config module of experiments/ (``"sft.py"``, ``"tdpo.py:dpo"``); the model, data, seed and mesh
come from the pipeline's config. Methods declare which stages they use (their ``prepare``) and run
no other method's code: the experiments a stage trains are looked up by name
(:func:`jaxopd.methods.get`)."""

from __future__ import annotations

import copy
import os

import ml_collections

from jaxopd import checkpoint as ckpt_lib
from jaxopd import paths, runtime
from jaxopd.data import preferences, suite as suite_lib
from jaxopd.errors import ConfigError
from jaxopd.experiment import load_config
from jaxopd.models import table


def _build(method: str):
  from jaxopd import methods     # the registry (a stage trains a method's experiment by its name)
  return methods.get(method).build


def train(s, workdir: str, build_fn, what: str):
  """Trains stage config ``s`` (experiment ``build_fn(s)``) in ``workdir`` unless that run is
  finished; a preempted stage is :class:`jaxopd.runtime.Interrupted` (re-running resumes it)."""
  from jaxopd import train as train_lib
  if ckpt_lib.finished(workdir, s.total_steps):
    return
  print(f"[stage] {what} -> {workdir} ({s.total_steps} steps)", flush=True)
  out = train_lib.run(s, workdir, build_fn(s))
  if out["preempted"]:
    raise runtime.Interrupted(out["preempted"], f"the {what} stage stopped at step {out['step']} "
                              f"({out['preempted']}, checkpointed); re-run the command to resume it")


def init_of(node) -> str:
  """The ``run:`` init of stage ``node``'s policy, pinned at its final step."""
  return f"run:{paths.resolve(node.workdir)}:policy@{node.total_steps}"


def _shorten(s, total_steps: int):
  s.total_steps = total_steps
  s.optim.warmup_steps = min(s.optim.warmup_steps, s.total_steps)
  s.checkpoint.every = min(s.checkpoint.every, s.total_steps)


# --- SFT stages ---------------------------------------------------------------------------------

def sft_stage(workdir: str, total_steps: int, config: str = "sft.py") -> ml_collections.ConfigDict:
  """The config block of an SFT stage: its run directory, its length, and the config module
  whose recipe it follows (``"sft.py[:preset]"``, looked up in experiments/)."""
  b = ml_collections.ConfigDict()
  b.workdir = workdir            # the stage's run (trained here if unfinished, reused otherwise)
  b.total_steps = total_steps    # its length
  b.config = config              # its recipe: a config module of experiments/ ("sft.py[:preset]")
  return b


def sft_config(config, node, model):
  """The SFT config of stage ``node`` of pipeline ``config``, for architecture ``model``."""
  s = load_config(node.config)
  if s.method.name != "sft":
    raise ConfigError(f"{node.config!r}: an SFT stage needs an SFT config (its method is {s.method.name!r})")
  s.model = model
  s.data = config.data
  s.seed = config.seed
  s.mesh = config.mesh
  s.progress = config.progress
  _shorten(s, node.total_steps)
  return s


def run_sft(config, node, model, what: str = "SFT base") -> str:
  """Trains SFT stage ``node`` unless its run is finished; returns its pinned ``run:`` init."""
  train(sft_config(config, node, model), node.workdir, _build("sft"), what)
  return init_of(node)


def run_base(config, name: str) -> str:
  """SFT stage ``config[name]``: ``sft`` the SFT base (on the digits task its easy levels),
  ``teacher`` the same recipe on every level; returns its pinned ``run:`` init."""
  node = config[name]
  is_digits = config.data.task == "digits"
  s = sft_config(config, node, config.model)
  if name == "teacher" and is_digits:
    s.data = copy.deepcopy(s.data)
    s.data.sft_max_level = s.data.max_level
  what = "SFT base" + (" (easy levels)" if is_digits else "") if name == "sft" else "teacher (SFT, longer)"
  train(s, node.workdir, _build("sft"), what)
  return init_of(node)


def run_sft_on(s, node, train_records, eval_records, what: str) -> str:
  """Trains SFT config ``s`` on ``{"tokens", "loss_mask"}`` records in stage ``node`` (REDI's stage 1
  on the teacher's positive traces); returns its pinned ``run:`` init."""
  from jaxopd import methods
  sft = methods.get("sft")
  train(s, node.workdir, lambda s: sft.experiment(train_records, eval_records), what)
  return init_of(node)


# --- DPO stages (AlignDistil's DPO and reverse-DPO models) -------------------------------------

def dpo_stage(workdir: str, total_steps: int, reverse: bool = False, config: str = "tdpo.py:dpo"):
  """The config block of a DPO stage: its run directory, length, whether it is the reverse
  model (chosen and rejected swapped), and the recipe it follows (a TDPO config module of
  experiments/); model, data, pairs, SFT base, seed and mesh come from the pipeline's config."""
  b = ml_collections.ConfigDict()
  b.workdir = workdir            # the stage's run (trained here if unfinished, reused otherwise)
  b.total_steps = total_steps    # its length
  b.reverse = reverse            # train on rejected over chosen
  b.config = config              # its recipe: "tdpo.py:dpo" (DPO) or another loss of experiments/tdpo.py
  return b


def run_dpo(config, node, sft_init: str, what: str = "DPO") -> str:
  """Trains DPO stage ``node`` (policy and reference from ``sft_init``, on pipeline ``config``'s
  pairs) unless its run is finished; returns its pinned ``run:`` init. A finished run trained
  with the other pair order is a ConfigError (the two stages need two directories)."""
  s = load_config(node.config)
  if s.method.name != "tdpo":
    raise ConfigError(f"{node.config!r}: a DPO stage needs a TDPO config (its method is {s.method.name!r})")
  for k in ("model", "data", "prefs", "sft", "eval", "seed", "mesh", "progress"):
    s[k] = config[k]
  s.models.policy.init = s.models.reference.init = sft_init
  s.method.swap = bool(node.reverse)
  s.compare_with = ""
  _shorten(s, node.total_steps)
  s.eval_every = 0
  recorded = os.path.join(node.workdir, "config.json")
  if paths.isfile(recorded):
    was = bool(paths.read_json(recorded).get("method", {}).get("swap", False))
    if was != s.method.swap:
      raise ConfigError(f"{node.workdir}: this DPO run was trained with method.swap={was}, the {what} stage needs "
                        f"swap={s.method.swap}; give the stage its own workdir")
  train(s, node.workdir, _build("tdpo"), what)
  return init_of(node)


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
  c.sft = sft_stage("runs/sft_smoke" if smoke else "runs/sft_base", 20 if smoke else 1500)

  c.prefs = ml_collections.ConfigDict()
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
  """The preference-pair dataset's config (:mod:`jaxopd.data.preferences`) of pipeline ``c``."""
  d, p = c.data, c.prefs
  steps = paths.read_json(os.path.join(c.sft.workdir, "config.json"))["total_steps"]
  return preferences.make_config(
      policy_workdir=paths.resolve(c.sft.workdir), policy_step=int(steps), world_seed=d.world_seed,
      prompts_num_train=d.num_prompts_train, prompts_num_test=d.num_prompts_test,
      prompt_min_words=d.prompt_min_words, prompt_max_words=d.prompt_max_words, num_train=p.num_train,
      num_test=p.num_test, k=p.k, mode=p.mode, bt_temperature=p.bt_temperature, temperature=p.temperature,
      max_new_tokens=p.max_new_tokens, prompt_len=p.prompt_len, seed=c.seed)


def prepare_pairs(config):
  """The preference pipeline's stages (data, SFT base, pairs), or nothing with ``task=files``;
  the ``stage:sft`` roles get the SFT base."""
  if config.data.task == "files":
    table.refuse_stages(config, "sft")
    return config
  if config.data.task != "reviews":
    raise ConfigError(f"config.data.task={config.data.task!r}: must be reviews or files")
  suite_lib.ensure(config.data)
  sft_init = run_sft(config, config.sft, config.model)
  pc = prefs_config(config)
  print(f"[stage] preferences {pc.name} (k={pc.k}, {pc.mode}) in {config.data.data_dir}", flush=True)
  preferences.prepare(pc, config.data.data_dir)
  for split in ("train", "test"):
    st = preferences.statistics(pc, split, config.data.data_dir)
    print(f"  {split}: {st['pairs']} pairs, chosen reward {st['chosen_reward']:.3f}, "
          f"rejected {st['rejected_reward']:.3f}, label accuracy {st['label_accuracy']:.3f}")
  table.fill_stage(config, "sft", sft_init)
  return config
