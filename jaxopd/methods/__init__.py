"""The methods' registry: ``jaxopd/methods/<name>.py`` defines ``build(config) -> Experiment``
and may define ``prepare`` and ``report``; :func:`get` gives a :class:`Method` with all three
(the contract is in :mod:`jaxopd.experiment`). ``config.method.name`` says which one a config runs.

Adding a method is one file here (its loss from :mod:`jaxopd.losses`, its data and evaluation,
its ``build``), its name in :data:`NAMES`, and one config module ``experiments/<name>.py``.
"""

from __future__ import annotations

import importlib
import types
from typing import Callable, NamedTuple

from jaxopd import stages
from jaxopd.errors import ConfigError

NAMES = ("sft", "tdpo", "sparsepo", "fdpg", "distillspec", "aligndistil", "redi", "grpo")


class Method(NamedTuple):
  """A method's hooks. ``build(config) -> Experiment``; ``prepare(config, workdir) -> config`` checks
  it and runs the config's pipeline (none: :func:`jaxopd.stages.prepare` alone, which gives the
  config back when it declares no stage); ``report(config, workdir, summary)`` writes its
  tables and plots (none: nothing); ``module``: the method's module."""
  name: str
  module: types.ModuleType
  build: Callable
  prepare: Callable
  report: Callable


def _pipeline(config, workdir):
  del workdir
  return stages.prepare(config)


def _no_report(config, workdir, summary):
  del config, workdir, summary


def get(name: str) -> Method:
  """The method ``name``; an unknown name is a :class:`ConfigError`."""
  if name not in NAMES:
    raise ConfigError(f"config.method.name={name!r}: must be one of {NAMES}")
  m = importlib.import_module(f"jaxopd.methods.{name}")
  return Method(name, m, m.build, getattr(m, "prepare", _pipeline), getattr(m, "report", _no_report))
