"""Run directories on local disk or in cloud storage (``gs://bucket/run``), through one path
abstraction: :mod:`etils.epath` (the one orbax, grain and tfds use), with plain strings at the
call sites.

Everything a run writes goes through here or through a library that speaks the same URLs:
checkpoints (orbax / tensorstore), ``metrics.jsonl``, TensorBoard events (tensorboardX's
``gs://`` writer, which needs ``google-cloud-storage``), ``config.json``, ``models.json``,
``summary.json`` and the report's plots; pipeline stages and ``run:WORKDIR`` sources are read
the same way. Local paths are made absolute (:func:`resolve`); URLs are kept as they are.
Cloud storage has no append and no locks (:class:`jaxopd.logs.MetricLogger` rewrites
``metrics.jsonl`` whole; experiments/design.md, "A run directory may be a URL").
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_remote(path: str) -> bool:
  """Whether ``path`` is a URL (``gs://``, ``s3://`` ...), not a local path."""
  return "://" in os.fspath(path)


def resolve(path: str) -> str:
  """A local path made absolute; a URL unchanged (``os.path.abspath`` would mangle it)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return os.fspath(epath.Path(path).joinpath(*parts))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  p = epath.Path(path)
  return p.exists() and not p.is_dir()


def listdir(path: str) -> list[str]:
  """The names in directory ``path``, sorted ([] when it does not exist)."""
  p = epath.Path(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def files_under(path: str) -> list[str]:
  """Every file below directory ``path`` (recursively), sorted ([] when it does not exist)."""
  p = epath.Path(path)
  if not p.is_dir():
    return []
  return sorted(os.path.join(os.fspath(root), f) for root, _, files in p.walk() for f in files)


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def open(path: str, mode: str = "r"):   # noqa: A001 - the file-like of ``path``
  return epath.Path(path).open(mode)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` (creating its directory): locally through a temporary file and a
  rename, so a reader never sees half a file; in cloud storage an object write is already whole."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    p.write_text(text)
    return
  tmp = p.parent / (p.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, p)


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def write_json(path: str, obj: Any, **kw) -> None:
  write_text(path, json.dumps(obj, **kw))


def remove(path: str) -> None:
  epath.Path(path).unlink()


def rename(src: str, dst: str) -> None:
  """Moves file or directory ``src`` to ``dst``, replacing a file there (in cloud storage: copy,
  then delete)."""
  epath.Path(src).replace(dst)


def getsize(path: str) -> int:
  return epath.Path(path).stat().length


def savefig(fig, path: str, **kw) -> None:
  """``fig.savefig`` to a local path or a URL (format from the suffix)."""
  with open(path, "wb") as f:
    fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", **kw)
