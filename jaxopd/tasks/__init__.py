"""The tasks behind one protocol. A :class:`Task` gives what a method asks of its data, each a
function of the config (None where the task has none): SFT records (``sft``), preference pairs
(``pairs``), prompts for rollouts (``prompts``), each with the task's evaluation, and the data
the pipeline's stages build on (``ensure``). ``config.data.task`` names the task; :func:`get`
gives a method the piece it needs, or a one-line error naming the tasks that have it. A new task
is one module here and one entry of :func:`_tasks`."""

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
  report: Callable | None = None   # report(config, out, sources): the before/after table of an RL run


def _tasks() -> dict[str, Task]:
  from jaxopd.data import digits as digits_data, suite
  from jaxopd.tasks import digits, files, reviews, sort
  return {"reviews": Task(sft=reviews.sft_data, pairs=reviews.pair_data, prompts=reviews.prompts,
                          ensure=lambda c: suite.ensure(c.data), report=reviews.report),
          "digits": Task(sft=digits.sft_data, pairs=digits.pair_data, prompts=digits.prompts,
                         ensure=lambda c: digits_data.ensure(c.data), report=digits.report),
          "files": Task(sft=files.sft_data, pairs=files.pair_data, prompts=files.prompts),
          "sort": Task(sft=sort.sft_data)}


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


def evaluate_sources(config, run, sources: dict, out: dict, keys: list) -> dict:
  """Adds to ``out`` (which holds ``"after"``) ``run({"policy": model}, 0)`` for the model of each
  ``sources`` entry (name -> a role block of ``config.models`` or an init string; ``none`` and
  ``random`` skipped), prints the table of ``keys`` and returns ``out``."""
  from jaxopd.models import table
  for name, r in sources.items():
    r = table.role(init=r) if isinstance(r, str) else r
    if r.init != table.NONE and table.parse_init(name, r.init).kind != "random":
      out[name] = run({"policy": table.load_model(r.init, name, dtype=r.dtype, param_dtype=r.param_dtype)[0]}, 0)
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
