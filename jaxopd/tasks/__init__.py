"""The tasks behind one protocol. A :class:`Task` gives what a method asks of its data, each a
function of the config (None where the task has none): SFT records (``sft``), preference
pairs (``pairs``) and prompts for rollouts (``prompts``), each with the task's evaluation. ``config.data.task`` names the task;
:func:`get` gives a method the piece it needs, or a one-line error naming the tasks that have it.
A new task is one module here and one entry of :data:`TASKS`."""

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


def _tasks() -> dict[str, Task]:
  from jaxopd.tasks import digits, files, reviews, sort
  return {"reviews": Task(sft=reviews.sft_data, pairs=reviews.pair_data, prompts=reviews.prompts),
          "digits": Task(sft=digits.sft_data, prompts=digits.prompts),
          "files": Task(sft=files.sft_data, pairs=files.pair_data, prompts=files.prompts),
          "sort": Task(sft=sort.sft_data)}



def get(config, piece: str) -> Callable:
  """Task ``config.data.task``'s ``piece`` (``"sft"``, ``"pairs"``)."""
  tasks = _tasks()
  have = tuple(n for n, t in tasks.items() if getattr(t, piece) is not None)
  name = config.data.task
  if name not in have:
    raise ConfigError(f"config.data.task={name!r}: must be one of {have}" +
                      (f" ({name} has no {piece} data)" if name in tasks else ""))
  return getattr(tasks[name], piece)
