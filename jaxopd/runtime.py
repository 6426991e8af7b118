"""The host side of a run: one run per workdir (its lock), signals (checkpoint and stop), and the
restore that falls back past a damaged checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time

import jax

from jaxopd import checkpoint as ckpt_lib
from jaxopd.errors import TrainingError


class Preemption:
  """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop checkpoints and stops at the next step
  boundary (a second Ctrl-C interrupts at once). ``signal`` names the one received.

  With several processes they must stop at the same step (the checkpoint is a
  collective), so jax's preemption sync point decides: jax.distributed catches
  SIGTERM on any host and names the first step every host can stop after
  (SIGINT keeps Python's default there).
  """

  def __init__(self):
    self.requested = False
    self.signal = ""
    self._old = {}
    self._multi = jax.process_count() > 1 and jax.distributed.is_initialized()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and not self._multi:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def check(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step``; called once per step on every process."""
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils
      self.requested = multihost_utils.reached_preemption_sync_point(step)
      self.signal = self.signal or ("SIGTERM" if self.requested else "")
    return self.requested

  def _handle(self, signum, frame):
    self.requested = True
    self.signal = signal.Signals(signum).name
    if signum == signal.SIGINT:     # the next Ctrl-C is Python's KeyboardInterrupt again
      signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class Interrupted(RuntimeError):
  """A pipeline stage stopped by a signal after checkpointing; ``signal``: its name."""

  def __init__(self, signal_name: str, message: str):
    super().__init__(message)
    self.signal = signal_name


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on ``workdir/.lock`` (``fcntl.flock``, so the kernel frees it when its
  process dies): a second run on the same workdir is refused in one line naming the holder
  (pid, host, start time, command); a lock file left by a dead run is reported and taken
  over. On a file system without ``flock`` (some NFS) the lock is advisory only."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    os.makedirs(workdir, exist_ok=True)
    self._f = open(self.path, "a+")
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._f.seek(0)
      holder = self._f.read().strip()
      self._f.close()
      raise WorkdirBusy(f"{workdir} is in use by another run ({holder or 'holder unknown'}); wait for it to "
                        f"finish or use another --workdir") from None
    self._f.seek(0)
    stale = self._f.read().strip()
    if stale:
      print(f"note: {self.path} was left by a run that did not exit cleanly ({stale}); taking it over",
            flush=True)
    self._f.seek(0)
    self._f.truncate()
    self._f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "command": " ".join(sys.argv)[:200]}))
    self._f.flush()

  def release(self):
    """Empties the lock file (a clean exit) and frees the lock."""
    if self._f.closed:
      return
    self._f.seek(0)
    self._f.truncate()
    self._f.flush()
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()


def restore_intact(ckpt, step, abstract_state, data_iter, main):
  """Restores the newest intact checkpoint, from ``step`` down; a damaged one (a file missing or cut
  short) is reported, moved aside to ``WORKDIR/checkpoints.damaged/`` (kept, not deleted) and the next
  older one tried. Returns ``(state, step)``; raises :class:`TrainingError` when none is intact."""
  while True:
    try:
      return ckpt.restore(step, abstract_state, data_iter), step
    except ckpt_lib.DamagedCheckpoint as e:
      moved = ckpt.move_aside(step)
      older = ckpt.latest_step()
      if main:
        print(f"checkpoint step {step} is damaged ({e}); moved aside to {moved}; "
              + (f"falling back to step {older}" if older is not None else "no older checkpoint"), flush=True)
      if older is None:
        raise TrainingError(f"no intact checkpoint left in {ckpt.directory} (the damaged ones are in "
                            f"{os.path.dirname(moved)}); re-running the command starts this run afresh")
      step = older
