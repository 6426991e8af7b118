"""A run killed mid-way (SIGTERM, SIGINT or SIGKILL) and re-run with the same command
produces the same loss curve as an uninterrupted run (exactly: same devices,
same data order from the checkpointed grain iterator, same per-step PRNG), in
metrics.jsonl and in TensorBoard; after a SIGKILL whose latest checkpoint is then
damaged, the re-run falls back to the one before it."""

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


def _tb_steps(workdir, tag="train/loss"):
  """The steps of ``tag`` in every TensorBoard event file of the run, in file order."""
  from tensorboardX.proto import event_pb2
  from jaxopd.logs import _event_files, _read_records
  tb = os.path.join(workdir, "tb")
  steps = []
  for name in _event_files(tb):
    for r in _read_records(os.path.join(tb, name)):
      e = event_pb2.Event.FromString(r)
      steps += [e.step for v in e.summary.value if v.tag == tag]
  return steps


def _damage_latest(workdir):
  """Cuts the latest checkpoint's parameter data file short, as a crash or a full disk would; returns its step."""
  ckpts = os.path.join(workdir, "checkpoints")
  step = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
  data = os.path.join(ckpts, str(step), "params", "d")
  for name in os.listdir(data):
    path = os.path.join(data, name)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return step


def _last_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return max([json.loads(l)["step"] for l in f if l.strip()] or [0])
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The uninterrupted run. One run per workdir: while it trains, the same command on its workdir is
  refused in one line naming the holder and writes nothing (each step is logged once, the curve is
  this run's alone)."""
  w = tmp_path_factory.mktemp("full")
  first = subprocess.Popen(_cmd(w), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while _last_step(w) < 5 and first.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert first.poll() is None, "the first run finished too early"
  p = subprocess.run(_cmd(w), cwd=REPO, capture_output=True, text=True, timeout=120)
  busy_at = _last_step(w)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert busy_at < STEPS, "the first run finished before the second reached the lock"
  assert p.returncode == 2, p.stderr[-2000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and f"{w} is in use by another run" in errors[0] and f'"pid": {first.pid}' in errors[0]
  assert "Traceback" not in p.stderr
  train, evals = _curve(w)
  assert [s for s, _ in train] == list(range(1, STEPS + 1))
  return train, evals


# SIGTERM takes the same path as SIGINT (jaxopd.runtime.Preemption) and is sent to two processes
# in tests/test_multihost.py; here SIGINT (Ctrl-C) and SIGKILL.
@pytest.mark.pipeline
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_and_resumed_run_matches_uninterrupted(sig, uninterrupted, tmp_path):
  w = tmp_path / "run"
  proc = subprocess.Popen(_cmd(w), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  ckpts = w / "checkpoints"
  complete = lambda: len([n for n in os.listdir(ckpts) if n.isdigit()]) if ckpts.is_dir() else 0
  # SIGKILL then damages the latest checkpoint, so two must be complete (an async save can lag).
  while ((_last_step(w) < 25 or (sig == signal.SIGKILL and complete() < 2)) and proc.poll() is None
         and time.time() < deadline):
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
    damaged = _damage_latest(w)
  p = subprocess.run(_cmd(w), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  if sig == signal.SIGKILL:   # the damaged one is reported, kept aside, and the one before it resumes
    assert (f"checkpoint step {damaged} is damaged" in p.stdout
            and f"falling back to step {damaged - 10}" in p.stdout), p.stdout[-3000:]
    assert f"resumed from step {damaged - 10} " in p.stdout
    assert os.path.isdir(os.path.join(w, "checkpoints.damaged", str(damaged)))
  else:
    assert "resumed from step" in p.stdout and "damaged" not in p.stdout
  # A killed run's lock is freed by the kernel; its lock file is reported and taken over.
  assert ("did not exit cleanly" in p.stdout) == (sig == signal.SIGKILL), p.stdout[-2000:]
  train, evals = _curve(w)
  ref_train, ref_evals = uninterrupted
  assert [s for s, _ in train] == list(range(1, STEPS + 1))   # no duplicated or missing steps
  assert sorted(_tb_steps(w)) == list(range(1, STEPS + 1))    # nor in TensorBoard (the lost steps purged)
  np.testing.assert_allclose([l for _, l in train], [l for _, l in ref_train], rtol=1e-6)
  assert [s for s, _ in evals] == [s for s, _ in ref_evals]
  np.testing.assert_allclose([l for _, l in evals], [l for _, l in ref_evals], rtol=1e-6)
