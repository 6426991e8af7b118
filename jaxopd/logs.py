"""Run outputs: ``metrics.jsonl``, TensorBoard events, ``config.json`` and a
progress bar. Only process 0 writes; other processes get no-op writers. The
workdir may be a local path or a URL (``gs://...``: :mod:`jaxopd.paths`)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax

from jaxopd import paths


def _clean(v: Any):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class MetricLogger:
  """``metrics.jsonl`` and TensorBoard events of a run. Locally each record is appended as it
  comes; in cloud storage (no append) the run's lines are kept and the file rewritten whole at
  every :meth:`flush` (with each checkpoint) and at :meth:`close`, so a killed run's metrics
  reach at least its last checkpoint either way, as its TensorBoard events do."""

  def __init__(self, workdir: str, enabled: bool, resume_step: int | None = None):
    self.enabled = enabled
    self.path = paths.join(workdir, "metrics.jsonl")
    self._remote = paths.is_remote(workdir)
    self._lines: list[str] = []   # remote: every line of the file
    self._tb = None
    self.dropped = 0       # metrics.jsonl records after the resumed step, dropped
    self.dropped_tb = 0    # TensorBoard events after it, dropped
    if not enabled:
      return
    paths.makedirs(workdir)
    tb_dir = paths.join(workdir, "tb")
    if resume_step is not None:   # the steps after the checkpoint are re-run: drop them from both logs
      self.dropped = truncate_after(self.path, resume_step)
      self.dropped_tb = truncate_tb(tb_dir, resume_step)
      if self._remote and paths.exists(self.path):
        self._lines = [l for l in paths.read_text(self.path).splitlines(keepends=True) if l.strip()]
    else:                         # a fresh run in a used workdir starts fresh logs
      if paths.exists(self.path):
        paths.remove(self.path)
      for name in _event_files(tb_dir):
        paths.remove(paths.join(tb_dir, name))
    self._tb = _Events(tb_dir)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
    line = json.dumps(rec) + "\n"
    if self._remote:
      self._lines.append(line)
    else:
      _append(self.path, line)
    for k, v in metrics.items():
      if isinstance(rec[k], float):
        self._tb.scalar(f"{split}/{k}", rec[k], step)

  def flush(self):
    """Writes buffered TensorBoard events (and, in cloud storage, metrics.jsonl): called with
    every checkpoint, so that a killed run's logs reach at least its last checkpoint."""
    if self.enabled and self._remote:
      paths.write_text(self.path, "".join(self._lines))
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.close()


def _append(path: str, line: str) -> None:
  """Appends ``line`` whole or not at all: a write the disk refuses is cut back off (no torn
  record) and raised as an OSError naming ``path``."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  start = os.fstat(fd).st_size
  try:
    data = line.encode()
    while data:
      data = data[os.write(fd, data):]
  except OSError as e:
    os.ftruncate(fd, start)
    raise OSError(e.errno, e.strerror, path) from None
  finally:
    os.close(fd)


class _Events:
  """TensorBoard scalars in an event file, written in this thread with tensorboardX's record
  framing: a full disk fails the write that met it, naming the file (tensorboardX's writer thread
  died on it with a traceback and left the run blocked on its full queue)."""

  def __init__(self, tb_dir: str):
    import socket
    from tensorboardX.proto import event_pb2, summary_pb2
    from tensorboardX.record_writer import RecordWriter
    self._pb = event_pb2, summary_pb2
    paths.makedirs(tb_dir)
    self.path = paths.join(tb_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
    self._writer = self._guard(RecordWriter, self.path)
    self._record(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _guard(self, fn, *args):
    try:
      return fn(*args)
    except OSError as e:
      raise OSError(e.errno, e.strerror, self.path) from None

  def _record(self, event):
    self._guard(self._writer.write, event.SerializeToString())

  def scalar(self, tag: str, value: float, step: int):
    event_pb2, summary_pb2 = self._pb
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    self._record(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self):
    self._guard(self._writer.flush)

  def close(self):
    self._guard(self._writer.close)


def truncate_after(path: str, step: int) -> int:
  """Drops records with ``step > step`` (re-run after a resume); returns how many."""
  if not paths.exists(path):
    return 0
  lines = [l for l in paths.read_text(path).splitlines(keepends=True) if l.strip()]
  keep = [l for l in lines if json.loads(l)["step"] <= step]
  paths.write_text(path, "".join(keep))
  return len(lines) - len(keep)


def _event_files(tb_dir: str) -> list[str]:
  return [n for n in paths.listdir(tb_dir) if n.startswith("events.out.tfevents.")]


def _read_records(path: str) -> list[bytes]:
  """The records of a TFRecord file (TensorBoard's event format: length, its CRC, data, its CRC);
  a record cut short by a kill ends the list."""
  import struct
  out = []
  with paths.open(path, "rb") as f:
    data = f.read()
  i = 0
  while i + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    if i + 12 + n + 4 > len(data):
      break
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def truncate_tb(tb_dir: str, step: int) -> int:
  """Drops TensorBoard events with ``step > step`` from every event file of ``tb_dir``
  (rewritten in place), as :func:`truncate_after` does for metrics.jsonl; returns how many."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import RecordWriter
  dropped = 0
  for name in _event_files(tb_dir):
    path = paths.join(tb_dir, name)
    records = _read_records(path)
    keep = [r for r in records if event_pb2.Event.FromString(r).step <= step]
    if len(keep) == len(records) and paths.getsize(path) == sum(len(r) + 16 for r in records):
      continue
    dropped += len(records) - len(keep)
    tmp = path + ".tmp"
    writer = RecordWriter(tmp)    # tensorboardX's own framing (length, CRCs; its gs:// writer for URLs)
    for r in keep:
      writer.write(r)
    writer.close()
    paths.rename(tmp, path)
  return dropped


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  recs = [json.loads(l) for l in paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines() if l.strip()]
  return [r for r in recs if split is None or r["split"] == split]


def write_config(workdir: str, config, enabled: bool) -> None:
  """Writes ``config.json`` (on resume, after :func:`check_resume_config`)."""
  if not enabled:
    return
  paths.write_json(paths.join(workdir, "config.json"), json.loads(config.to_json_best_effort()), indent=2,
                   sort_keys=True)


# Fields that may change when a run resumes: length, cadence, logging, checkpointing,
# the sampled evaluation, the device layout (the checkpoint is resharded), the model
# table (checked on its own: jaxopd.models.table.check_resume), the report's extras.
RESUMABLE = ("total_steps", "eval_every", "eval_batches", "log_every", "progress", "checkpoint", "distributed",
             "mesh", "grad_accum", "eval", "models", "compare_with", "heatmap_examples", "resume_changes")


def check_resume_config(workdir: str, config) -> list[str]:
  """Refuses, before anything is written, to resume a run whose ``config.json`` differs from
  ``config`` in a field that changes what is trained (a field in both; one the recorded config
  lacks was added by newer code), unless :data:`RESUMABLE` or ``config.resume_changes``
  (field names or prefixes; ``"*"`` = any) allows it. One line naming the fields. Returns
  every field that differs (added and removed ones too), for the resume message."""
  from jaxopd.errors import ConfigError
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    return []
  old = paths.read_json(path)
  new = json.loads(config.to_json_best_effort())
  was, now = _value(old, "method.name"), _value(new, "method.name")
  if was is not None and was != now:
    raise ConfigError(f"cannot resume {workdir}: it is a {was} run and config.method.name={now!r}; a run resumes "
                      f"only with its own method (no resume_changes allows this): use a new --workdir")
  extra = tuple(config.get("resume_changes", ()))
  ok = lambda k: "*" in extra or any(k == p or k.startswith(p + ".") for p in RESUMABLE + extra)
  refused = [k for k in sorted(_diff(old, new, both=True)) if not ok(k)]
  if refused:
    shown = ", ".join(f"{k} ({_value(old, k)!r} -> {_value(new, k)!r})" for k in refused[:4])
    raise ConfigError(f"cannot resume {workdir}: fields that change what is trained differ from its config.json: "
                      f"{shown}{' ...' if len(refused) > 4 else ''}; use a new --workdir, or allow them with "
                      f"--config.resume_changes=\"{tuple(refused)}\"")
  return sorted(_diff(old, new))


def _value(d, key):
  for part in key.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return d


def _diff(a, b, prefix="", both=False):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in (set(a) & set(b)) if both else (set(a) | set(b)):
      yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.", both)
  elif a != b:
    yield prefix[:-1]


def is_main_process() -> bool:
  return jax.process_index() == 0
