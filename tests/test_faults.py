"""Faults of the machine and of the workdir (#19 items 5 and 7): a workdir path that is a file, a
read-only workdir and a full disk are one line each, naming the path (exit 4), and leave no
half-written checkpoint as the latest; a damaged checkpoint is detected and named."""

import errno
import os
import re
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import pytest

from helpers import REPO
from jaxopd import checkpoint as ckpt_lib
from jaxopd.errors import EnvironmentFault, environment_fault

ARGS = ["--config", "experiments/sft.py:smoke,sort", "--config.total_steps=60", "--config.checkpoint.every=10",
        "--config.eval_every=0", "--config.progress=False"]


def _cli(workdir, prefix=(), **kw):
  cmd = [*prefix, sys.executable, "-m", "jaxopd.main", *ARGS, "--workdir", str(workdir)]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def _errors(p):
  return [l for l in p.stderr.splitlines() if l.startswith("error:")]


def _can_mount() -> bool:
  """Whether this machine lets a test mount a private tmpfs (root in a mount namespace)."""
  if shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True)
  return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs a private tmpfs mount (unshare -m, as root)")


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  a_file = tmp_path / "afile"
  a_file.write_text("x")
  for workdir, said in ((a_file, f"--workdir {a_file} is a file, not a directory"),
                        (a_file / "run", f"--workdir {a_file / 'run'}: {a_file} is a file, not a directory")):
    p = _cli(workdir)
    assert p.returncode == 4 and _errors(p) == [f"error: {said}"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
  assert a_file.read_text() == "x"


@needs_mount
def test_read_only_workdir_is_one_line(tmp_path):
  mnt = tmp_path / "ro"
  mnt.mkdir()
  script = f"mount -t tmpfs -o size=1m,ro tmpfs {mnt} && exec \"$@\""
  p = _cli(mnt / "run", prefix=("unshare", "-m", "sh", "-c", script, "sh"))
  assert p.returncode == 4, p.stderr[-2000:]
  assert _errors(p) == [f"error: --workdir {mnt / 'run'}: cannot write in {mnt} (read-only file system)"]
  assert "Traceback" not in p.stderr


def _fill_the_disk(tmp_path, free_kb: int, full_run: tuple, keep: str):
  """On a private 8 MiB tmpfs: a 20-step run (checkpoints 10, 20); the disk filled to ``free_kb`` free;
  the run continued as ``full_run = (steps, extra flags)``; ``keep`` (a shell command, ``{mnt}``
  filled in) saves what the test reads; the filler removed and the run continued to 60 steps. Asserts
  the first run ends 0 and the full one 4; returns ``(mnt, read(name, ext))`` of the runs' output."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  cmd = lambda steps, extra=(): " ".join([sys.executable, "-m", "jaxopd.main", *ARGS, f"--config.total_steps={steps}",
                                          *extra, "--workdir", str(mnt / "run")])
  out = lambda name: f"> {tmp_path}/{name}.out 2> {tmp_path}/{name}.err; echo $? > {tmp_path}/{name}.rc"
  script = "; ".join([
      f"mount -t tmpfs -o size=8m tmpfs {mnt} || exit 99", f"{cmd(20)} {out('first')}",
      f"avail=$(df -k --output=avail {mnt} | tail -1)",
      f"dd if=/dev/zero of={mnt}/filler bs=1k count=$((avail - {free_kb})) 2>/dev/null",
      f"timeout 240 {cmd(*full_run)} {out('full')}", keep.format(mnt=mnt), f"rm {mnt}/filler",
      f"{cmd(60)} {out('freed')}"])
  p = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  read = lambda name, ext: (tmp_path / f"{name}.{ext}").read_text()
  assert read("first", "rc").strip() == "0", read("first", "err")[-2000:]
  assert read("full", "rc").strip() == "4", read("full", "err")[-3000:]
  return mnt, read


@needs_mount
def test_full_disk_stops_before_writing_and_the_run_resumes(tmp_path):
  """On a private tmpfs: a 20-step run writes checkpoints 10 and 20; the disk is then filled to 300 KiB
  free and the run continued to 60 steps: it resumes from 20 and refuses checkpoint 30 before writing
  a byte (the check asks for the state's bytes + 5% + 256 KiB, about 0.6 MiB), in one line naming it
  and the latest complete one (exit 4). With the filler removed, the same command resumes from 20 and
  finishes."""
  mnt, read = _fill_the_disk(tmp_path, free_kb=300, full_run=(60, []),
                             keep=f"ls {{mnt}}/run/checkpoints > {tmp_path}/ckpts.txt")
  errors = [l for l in read("full", "err").splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and re.fullmatch(
      rf"error: {mnt}/run/checkpoints: no space left for checkpoint step 30 \(needs about .* MiB, .* MiB free\); "
      rf"nothing was written\. The latest complete checkpoint is step 20: free space and re-run the command to "
      rf"resume", errors[0]), read("full", "err")[-3000:]
  assert "Traceback" not in read("full", "err")
  assert (tmp_path / "ckpts.txt").read_text().split() == ["10", "20"]    # nothing half-written as the latest
  assert read("freed", "rc").strip() == "0", read("freed", "err")[-3000:]
  assert "resumed from step 20 " in read("freed", "out") and "done: step 60" in read("freed", "out")


@needs_mount
def test_full_disk_while_logging_is_one_line_naming_the_file(tmp_path):
  """The disk fills between checkpoints, while metrics.jsonl and the TensorBoard events are written
  at every step: one line naming the log file and the latest checkpoint (exit 4), no writer-thread
  traceback and no hang on its queue, metrics.jsonl whole records only; freed, the run resumes."""
  import json
  logging = ["--config.checkpoint.every=0", "--config.log_every=1"]
  mnt, read = _fill_the_disk(tmp_path, free_kb=12, full_run=(600, logging),
                             keep=f"cp {{mnt}}/run/metrics.jsonl {tmp_path}/metrics.jsonl")
  errors = [l for l in read("full", "err").splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and re.fullmatch(
      rf"error: {mnt}/run/(tb/events\.out\.tfevents\.\S+|metrics\.jsonl): No space left on device\. The latest "
      rf"complete checkpoint is step 20: re-run the command to resume once fixed .*", errors[0]), errors
  assert "Traceback" not in read("full", "err")
  lines = read("metrics", "jsonl").splitlines()
  assert len(lines) > 20 and all(json.loads(l)["step"] > 0 for l in lines)   # every record whole
  assert read("freed", "rc").strip() == "0", read("freed", "err")[-3000:]
  assert "resumed from step 20 " in read("freed", "out") and "done: step 60" in read("freed", "out")


def test_fault_found_in_orbax_and_os_errors():
  ts = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/10.orbax-checkpoint-tmp/_sharding": '
                  "Failed to write 12281 bytes to file 8: No space left on device [os_error_code='28']")
  assert environment_fault(ts) == "/w/checkpoints/10.orbax-checkpoint-tmp/_sharding: No space left on device"
  try:
    try:
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/w/metrics.jsonl")
    except OSError as e:
      raise RuntimeError("while logging") from e
  except RuntimeError as wrapped:
    assert environment_fault(wrapped) == "/w/metrics.jsonl: Read-only file system"
  assert environment_fault(ValueError("shapes differ")) is None
  assert environment_fault(ValueError("[os_error_code='2']")) is None   # a missing file is not the machine's fault


def _tiny(tmp_path):
  state = {"step": jnp.asarray(3, jnp.int32), "params": {"policy": {"w": jnp.arange(6.0).reshape(2, 3)}}}
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  next(it)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  return state, it, ck


def test_checkpoint_without_room_writes_nothing(tmp_path, monkeypatch):
  state, it, ck = _tiny(tmp_path)
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
  with pytest.raises(EnvironmentFault, match=r"no space left for checkpoint step 3 .* 0\.0 MiB free\); nothing was "
                                             r"written\. The latest complete checkpoint is none"):
    ck.save(state, it, force=True)
  ck.close()
  assert [n for n in os.listdir(tmp_path / "checkpoints")] == []


def test_missing_iterator_state_is_damage_not_a_process_count(tmp_path):
  """A checkpoint whose data/ lost its iterator file is damaged (it used to be blamed on the process count)."""
  state, it, ck = _tiny(tmp_path)
  ck.save(state, it, force=True)
  ck.wait()
  os.remove(tmp_path / "checkpoints" / "3" / "data" / f"process_0-of-{jax.process_count()}.json")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with pytest.raises(ckpt_lib.DamagedCheckpoint, match="data/ holds no data-iterator state"):
    ck.restore(3, abstract, it)
  assert ck.move_aside(3) == str(tmp_path / "checkpoints.damaged" / "3")
  assert ck.latest_step() is None
  ck.close()


def test_reading_another_runs_parameters_logs_no_orbax_warnings(tmp_path, caplog):
  """A run: source reads parameters only; orbax's warnings about it (read-only manager, items not
  restored) said nothing to a user and are kept out of the log."""
  import logging
  state, it, ck = _tiny(tmp_path)
  ck.save(state, it, force=True)
  ck.close()
  w = state["params"]["policy"]["w"]
  abstract = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w.sharding)}
  with caplog.at_level(logging.WARNING):
    params, step = ckpt_lib.load_params(str(tmp_path), "policy", "reference", abstract)
    assert ckpt_lib.latest_step(str(tmp_path)) == 3
  assert step == 3 and (params["w"] == w).all()
  assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.pipeline
def test_ctrl_c_during_init_and_compile_is_one_line_without_a_crash(tmp_path):
  """Ctrl-C half a second after the model table is printed (building the state, compiling; the
  persistent compilation cache off, so the compile takes seconds): one line, exit 130; the
  interpreter's teardown under XLA's running threads segfaulted here (exit 139). Should a loaded
  machine reach the loop first, the loop's own Ctrl-C path must be as clean."""
  import signal
  import time
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
  # Steps enough that the run cannot end before the signal lands.
  # SIGINT at its default, as from a terminal: a child inherits an ignored SIGINT (as a worker of this
  # suite may have it), and Python then installs no KeyboardInterrupt handler.
  p = subprocess.Popen([sys.executable, "-m", "jaxopd.main", *ARGS, "--config.total_steps=100000",
                        "--workdir", str(tmp_path / "w")], cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  for line in p.stdout:
    if line.startswith("models:"):
      break
  time.sleep(0.5)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130, err[-2000:]
  assert "Fatal Python error" not in err and "Traceback" not in err, err[-2000:]
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[-1:] == ["interrupted (Ctrl-C) before the training loop; nothing of this run was saved"] or (
      not lines and "SIGINT: checkpoint saved at step" in out), (out[-1000:], err[-1000:])
