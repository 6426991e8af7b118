"""Errors users see in one line."""

from __future__ import annotations

import errno
import logging
import os
import re


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def one_of(block, where: str, field: str, choices) -> None:
  """A ConfigError unless ``block[field]`` is one of ``choices`` (``where``: the block's name, e.g.
  ``config.method``)."""
  if block[field] not in choices:
    raise ConfigError(f"{where}.{field}={block[field]!r}: must be one of {tuple(choices)}")


def positive(block, where: str, *fields: str) -> None:
  """A ConfigError for the first of ``fields`` of ``block`` that is not > 0."""
  for f in fields:
    if not block[f] > 0:
      raise ConfigError(f"{where}.{f}={block[f]}: must be positive")


class WeightFileError(ValueError):
  """A weight file that is not what it claims (cut short, not safetensors, a tensor missing or of
  another shape); the message names the file and the tensor."""


class TrainingError(RuntimeError):
  """The run cannot go on (a non-finite loss or gradient, no intact checkpoint left)."""


class EnvironmentFault(Exception):
  """The machine, not the config: a full disk, a read-only or unwritable workdir, a path that is a file."""


# The errors of the machine a user can fix (space, permissions, paths), not bugs.
FAULT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR}
_OS_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")   # tensorstore's form (orbax's checkpoint writes)
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def environment_fault(exc: BaseException) -> str | None:
  """``"PATH: No space left on device"`` when an OS error of :data:`FAULT_ERRNOS` is anywhere
  in ``exc``'s chain (directly, or inside an orbax / tensorstore message), else None."""
  seen = set()
  e = exc
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in FAULT_ERRNOS:
      return f"{e.filename or '?'}: {os.strerror(e.errno)}"
    fault = _fault_in_text(str(e))
    if fault:
      return fault
    e = e.__cause__ or e.__context__
  return None


def _fault_in_text(text: str) -> str | None:
  m = _OS_CODE.search(text)
  if m and int(m.group(1)) in FAULT_ERRNOS:
    paths = _QUOTED_PATH.findall(text)
    return f"{paths[0] if paths else '?'}: {os.strerror(int(m.group(1)))}"
  return None


class FaultLogFilter(logging.Filter):
  """Drops the log records of an environment fault (orbax's background threads log each failed
  write with its traceback, and, once one failed, the "event loop is closed" errors of the
  threads still running): the CLI reports the fault in one line instead. Other records pass."""

  def __init__(self):
    super().__init__()
    self.seen = False

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    exc = record.exc_info[1] if record.exc_info else None
    if _fault_in_text(text) or (exc is not None and environment_fault(exc)):
      self.seen = True
      return False
    return not (self.seen and "Event loop is closed" in text + str(exc or ""))


def check_workdir(workdir: str) -> None:
  """Checks, before anything is built or trained and creating nothing, that ``workdir`` is (or can
  be made) a writable directory; raises :class:`EnvironmentFault` in one line naming the path.
  A URL (``gs://...``) is not checked here: its bucket's permissions show at the first write."""
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise EnvironmentFault(f"--workdir {path} is a file, not a directory")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise EnvironmentFault(f"--workdir {path}: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):   # a read-only file system, or no permission
    why = "read-only file system" if _read_only(existing) else "permission denied"
    raise EnvironmentFault(f"--workdir {path}: cannot write in {existing} ({why})")


def _read_only(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False
