"""A run killed mid-way (SIGTERM or SIGKILL) and re-run with the same command
produces the same loss curve as an uninterrupted run (exactly: same devices,
same data order from the checkpointed grain iterator, same per-step PRNG)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO

STEPS = 120
ARGS = ["--config", "experiments/sft.py:smoke,sort", f"--config.total_steps={STEPS}", "--config.log_every=1",
        "--config.eval_every=40", "--config.checkpoint.every=10", "--config.progress=False"]


def _cmd(workdir):
  return [sys.executable, "-m", "jaxopd.main", *ARGS, "--workdir", str(workdir)]


def _curve(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(l) for l in f]
  train = [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]
  evals = [(r["step"], r["loss"]) for r in recs if r["split"] == "eval"]
  return train, evals


def _last_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return max([json.loads(l)["step"] for l in f if l.strip()] or [0])
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  w = tmp_path_factory.mktemp("full")
  p = subprocess.run(_cmd(w), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  return _curve(w)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_killed_and_resumed_run_matches_uninterrupted(sig, uninterrupted, tmp_path):
  w = tmp_path / "run"
  proc = subprocess.Popen(_cmd(w), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while _last_step(w) < 25 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, "run finished before it could be interrupted"
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  killed_at = _last_step(w)
  assert killed_at < STEPS
  if sig in (signal.SIGTERM, signal.SIGINT):   # Ctrl-C is handled like a preemption: checkpoint, one line
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err[-3000:]
    assert f"{sig.name}: checkpoint saved at step" in out and "Traceback" not in err
  else:
    assert proc.returncode == -signal.SIGKILL
  p = subprocess.run(_cmd(w), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed from step" in p.stdout
  # A killed run's lock is freed by the kernel; its lock file is reported and taken over.
  assert ("did not exit cleanly" in p.stdout) == (sig == signal.SIGKILL), p.stdout[-2000:]
  train, evals = _curve(w)
  ref_train, ref_evals = uninterrupted
  assert [s for s, _ in train] == list(range(1, STEPS + 1))   # no duplicated or missing steps
  np.testing.assert_allclose([l for _, l in train], [l for _, l in ref_train], rtol=1e-6)
  assert [s for s, _ in evals] == [s for s, _ in ref_evals]
  np.testing.assert_allclose([l for _, l in evals], [l for _, l in ref_evals], rtol=1e-6)


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
  """One run per workdir: while a run trains, the same command on its workdir is refused in one line
  naming the holder, and writes nothing (metrics.jsonl keeps each step once)."""
  w = tmp_path / "run"
  first = subprocess.Popen(_cmd(w), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while _last_step(w) < 5 and first.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    assert first.poll() is None, "the first run finished too early"
    p = subprocess.run(_cmd(w), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and f"{w} is in use by another run" in errors[0] and f'"pid": {first.pid}' in errors[0]
    assert "Traceback" not in p.stderr
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
  train, _ = _curve(w)
  steps = [s for s, _ in train]
  assert steps == sorted(set(steps))          # no step logged twice
