"""Methods as library code: ``jaxopd/methods/<name>.py`` defines ``build(config) ->
Experiment`` and optionally ``prepare`` / ``report`` (the contract is in
:mod:`jaxopd.experiment`); ``config.method.name`` says which one a config runs.

Adding a method is one file here (its loss from :mod:`jaxopd.losses`, its data
and evaluation, its ``build``), its name in :data:`NAMES`, and one config
module ``experiments/<name>.py``.
"""

from __future__ import annotations

import importlib

from jaxopd.errors import ConfigError

NAMES = ("sft", "tdpo", "sparsepo", "fdpg", "distillspec", "aligndistil", "redi", "grpo")


def get(name: str):
  """The method module ``jaxopd.methods.<name>``; an unknown name is a :class:`ConfigError`."""
  if name not in NAMES:
    raise ConfigError(f"config.method.name={name!r}: must be one of {NAMES}")
  return importlib.import_module(f"jaxopd.methods.{name}")
