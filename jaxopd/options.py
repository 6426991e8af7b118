"""Typed method options. A method declares its ``config.method`` fields once, as a frozen dataclass
deriving :class:`Options` whose fields carry their checks (:func:`option`); :meth:`Options.of`
validates the config block on construction (a one-line :class:`ConfigError` naming the field),
refuses a field the method does not declare (no option silently ignored), and leaves the
cross-field checks to the dataclass's ``__post_init__``. The common checks are written once here."""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxopd.errors import ConfigError


def option(*checks: Callable) -> dataclasses.Field:
  """A field checked by ``checks``, each ``check(value) -> None`` or the reason it is refused."""
  return dataclasses.field(metadata={"checks": checks})


def one_of(*choices):
  return lambda v: None if v in choices else f"must be one of {tuple(choices)}"


def positive(v):
  return None if v > 0 else "must be positive"


def at_least(lo):
  return lambda v: None if v >= lo else f"must be >= {lo}"


def within(lo, hi):
  return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}]"


@dataclasses.dataclass(frozen=True)
class Options:
  """Base of a method's options (``name``: the method)."""
  name: str

  @classmethod
  def of(cls, block, where: str = "config.method"):
    """The options of config block ``block``, checked."""
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    extra = sorted(set(block.keys()) - known)
    if extra:
      raise ConfigError(f"{where}.{extra[0]}: not an option of method {block['name']!r} "
                        f"(its options: {', '.join(sorted(known - {'name'}))})")
    values = {}
    for f in fields:
      if f.name not in block:
        raise ConfigError(f"{where}.{f.name}: missing (method {block['name']!r} needs it)")
      v = block[f.name]
      for check in f.metadata.get("checks", ()):
        why = check(v)
        if why:
          raise ConfigError(f"{where}.{f.name}={v!r}: {why}")
      values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)

  def refuse(self, field: str, why: str, where: str = "config.method"):
    """The one-line error of a cross-field check on ``field``."""
    raise ConfigError(f"{where}.{field}={getattr(self, field)!r}: {why}")
