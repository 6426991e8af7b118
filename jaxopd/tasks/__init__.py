"""The tasks behind one protocol. A :class:`Task` gives what a method asks of its data, each a
function of the config (None where the task has none): SFT records (``sft``), preference pairs
(``pairs``), prompts for rollouts (``prompts``), each with the task's evaluation; the data the
pipeline's stages build on (``ensure``), the before/after table (``report``), the built-in
reward's name (``reward``) and the reward-bearing tokens (``gold_tokens``). ``config.data.task``
names the task; :func:`get` gives a method the piece it needs, or a one-line error naming the
tasks that have it. A new task is one module here and one entry of :func:`_tasks`."""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from jaxopd.errors import ConfigError


class SftData(NamedTuple):
  """A task's SFT data: ``{"tokens", "loss_mask"}`` records, the pad id, and the task's evaluation
  (``evaluate(models, step) -> metrics``, or None)."""
  train: list
  eval: list
  pad_id: int
  evaluate: Callable | None = None


class Prompts(NamedTuple):
  """A task's prompts for rollouts (``config.rollout``): the tokenizer, ``{"prompt", "prompt_len"}``
  train records (digits: with their answers), the held-out ones (or None), the task's evaluation
  (or None) and its built-in reward as a host function of the texts (reviews: the gold reward)."""
  tokenizer: object
  train: list
  test: list | None
  evaluate: Callable | None = None
  gold: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Task:
  """``sft(config, arch) -> SftData``; ``pairs(config) -> (train_records, test_records, evaluate)``;
  ``prompts(config) -> Prompts``."""
  sft: Callable | None = None
  pairs: Callable | None = None
  prompts: Callable | None = None
  ensure: Callable | None = None   # builds the task's data for the pipeline's stages (None: it has none)
  report: Callable | None = None   # report(config, out, sources, base=None): the before/after table of a run
  reward: tuple | None = None      # (name, description): the built-in reward ``config.method.reward`` names
  gold_tokens: Callable | None = None   # gold_tokens(config) -> fn(tokens) -> 1.0 on the reward-bearing tokens


def _tasks() -> dict[str, Task]:
  from jaxopd.data import digits as digits_data, suite
  from jaxopd.tasks import digits, files, reviews, sort
  return {"reviews": Task(sft=reviews.sft_data, pairs=reviews.pair_data, prompts=reviews.prompts,
                          ensure=lambda c: suite.ensure(c.data), report=reviews.report,
                          gold_tokens=reviews.gold_tokens, reward=("gold", "the reviews task's gold reward")),
          "digits": Task(sft=digits.sft_data, pairs=digits.pair_data, prompts=digits.prompts,
                         ensure=lambda c: digits_data.ensure(c.data), report=digits.report,
                         reward=("check", "the digits task's checker")),
          "files": Task(sft=files.sft_data, pairs=files.pair_data, prompts=files.prompts),
          "sort": Task(sft=sort.sft_data)}


def check_reward(config) -> None:
  """One-line errors unless ``config.method.reward`` is the task's built-in reward (not another
  task's), ``module:function`` or ``model`` (:func:`jaxopd.rewards.check_config`)."""
  from jaxopd import rewards
  own = piece(config, "reward")
  for t in _tasks().values():
    if t.reward and config.method.reward == t.reward[0] and t.reward != own:
      raise ConfigError(f"config.method.reward={t.reward[0]!r} is {t.reward[1]} (config.data.task="
                        f"{config.data.task!r}): use module:function or model")
  rewards.check_config(config, *(own or (None, None)))


def has_stages(config) -> bool:
  """Whether task ``config.data.task`` has built-in pipeline stages (your files have none)."""
  t = _tasks().get(config.data.task)
  return t is not None and t.ensure is not None


def ensure(config) -> None:
  """Builds task ``config.data.task``'s data (if missing) for the pipeline's stages."""
  _tasks()[config.data.task].ensure(config)


def piece(config, name: str) -> Callable | None:
  """Task ``config.data.task``'s ``name`` piece, or None where it has none."""
  t = _tasks().get(config.data.task)
  return getattr(t, name) if t is not None else None


def evaluate_sources(config, run, sources: dict, out: dict, keys: list, base: dict | None = None) -> dict:
  """Adds to ``out`` (which holds ``"after"``) ``run({**base, "policy": model}, 0)`` for the model
  of each ``sources`` entry (name -> a role block of ``config.models`` or an init string; ``none``
  and ``random`` skipped; ``base``: other roles the evaluation reads, e.g. the reference of its KL,
  given the same way; a model named twice is loaded once), prints the table of ``keys`` and
  returns ``out``."""
  from jaxopd.models import table
  loaded = {}

  def load(name, r):
    r = table.role(init=r) if isinstance(r, str) else r
    if r.init != table.NONE and table.parse_init(name, r.init).kind != "random":
      key = (r.init, r.dtype, r.param_dtype)
      if key not in loaded:
        loaded[key] = table.load_model(r.init, name, dtype=r.dtype, param_dtype=r.param_dtype)[0]
      return loaded[key]
  base = {n: load(n, r) for n, r in (base or {}).items()}
  for name, r in sources.items():
    model = load(name, r)
    if model is not None:
      out[name] = run({**base, "policy": model}, 0)
  width = max(14, *(len(n) + 2 for n in out))
  print("\n" + " " * width + "".join(f"{k.split('/')[-1]:>12}" for k in keys))
  for name in [*sources, "after"]:
    if name in out:
      print(f"{name:<{width}}" + "".join(f"{out[name].get(k, float('nan')):>12.4f}" for k in keys))
  return out


def require(config, names: tuple) -> None:
  """A one-line error unless ``config.data.task`` is one of ``names`` (a method's ``TASKS``)."""
  if config.data.task not in names:
    raise ConfigError(f"config.data.task={config.data.task!r}: must be one of {names}")


def get(config, piece: str) -> Callable:
  """Task ``config.data.task``'s ``piece`` (``"sft"``, ``"pairs"``, ``"prompts"``)."""
  tasks = _tasks()
  have = tuple(n for n, t in tasks.items() if getattr(t, piece) is not None)
  name = config.data.task
  if name not in have:
    raise ConfigError(f"config.data.task={name!r}: must be one of {have}" +
                      (f" ({name} has no {piece} data)" if name in tasks else ""))
  return getattr(tasks[name], piece)
