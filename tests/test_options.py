"""Typed method options (jaxopd/options.py): checked on construction with one line naming the field,
frozen, and no field of ``config.method`` left undeclared by its method."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from jaxopd import methods
from jaxopd.errors import ConfigError
from jaxopd.experiment import load_config
from jaxopd.options import Options, at_least, one_of, option, positive, within


@dataclasses.dataclass(frozen=True)
class Toy(Options):
  loss: str = option(one_of("a", "b"))
  beta: float = option(positive)
  k: int = option(at_least(2))
  mix: float = option(within(0.0, 1.0))
  flag: bool = option()

  def __post_init__(self):
    if self.loss == "b" and self.flag:
      self.refuse("flag", "loss b takes no flag")


def _block(**kw):
  return ml_collections.ConfigDict({"name": "toy", "loss": "a", "beta": 0.1, "k": 2, "mix": 0.5, "flag": True, **kw})


def test_options_are_built_frozen_from_the_block():
  o = Toy.of(_block())
  assert (o.name, o.loss, o.beta, o.k, o.mix, o.flag) == ("toy", "a", 0.1, 2, 0.5, True)
  with pytest.raises(dataclasses.FrozenInstanceError):
    o.beta = 1.0


@pytest.mark.parametrize("kw,match", [
    ({"loss": "c"}, r"^config\.method\.loss='c': must be one of \('a', 'b'\)$"),
    ({"beta": 0.0}, r"^config\.method\.beta=0\.0: must be positive$"),
    ({"k": 1}, r"^config\.method\.k=1: must be >= 2$"),
    ({"mix": 1.5}, r"^config\.method\.mix=1\.5: must be in \[0\.0, 1\.0\]$"),
    ({"loss": "b"}, r"^config\.method\.flag=True: loss b takes no flag$"),
    ({"extra": 3}, r"^config\.method\.extra: not an option of method 'toy' \(its options: beta, flag, k, loss, mix\)$"),
])
def test_a_bad_option_is_one_line_naming_the_field(kw, match):
  with pytest.raises(ConfigError, match=match):
    Toy.of(_block(**kw))


def test_a_missing_option_is_one_line():
  b = _block()
  del b["k"]
  with pytest.raises(ConfigError, match=r"^config\.method\.k: missing \(method 'toy' needs it\)$"):
    Toy.of(b)


@pytest.mark.parametrize("name", methods.NAMES)
def test_every_method_declares_every_field_of_its_config(name):
  """Each method's default config builds its options (so no config.method field goes unread)."""
  c = load_config(f"{name}.py")
  o = methods.get(name).module.Options.of(c.method)
  assert {f.name for f in dataclasses.fields(o)} == set(c.method.keys())


@pytest.mark.parametrize("name", methods.NAMES)
def test_chunk_zero_is_accepted_and_a_negative_chunk_refused(name):
  """``method.chunk = 0``: every position at once (:func:`jaxopd.losses.common.map_chunks`)."""
  c = load_config(f"{name}.py")
  Options = methods.get(name).module.Options
  c.method.chunk = 0
  assert Options.of(c.method).chunk == 0
  c.method.chunk = -1
  with pytest.raises(ConfigError, match=r"^config\.method\.chunk=-1: must be >= 0$"):
    Options.of(c.method)
