"""Multi-host: two processes on 127.0.0.1 (launch/local.py, 4 simulated CPU
devices each, gloo collectives) against one process on 8 devices; preemption
and resume across process counts; the distributed settings."""

import io
import os
import shutil
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest

from helpers import REPO, SFT, tiny_config
from jaxopd import checkpoint as ckpt_lib
from jaxopd import logs, train
from jaxopd.experiment import load_config
from jaxopd.mesh import distributed_args

sys.path.insert(0, os.path.join(REPO, "launch"))
import local  # noqa: E402

OVERRIDES = {"optim.schedule": "constant", "mesh.shape": (2, 2, 2)}   # constant: total_steps changes nothing


def _flags(config, base, prefix="--config."):
  """``--config.k=v`` for every leaf of ``config`` that differs from ``base``."""
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += _flags(v, base[k], f"{prefix}{k}.")
    elif v != base[k]:
      out.append(f"{prefix}{k}={v}")
  return out


def _losses(workdir):
  recs = logs.read_metrics(str(workdir), "train")
  return [r["step"] for r in recs], np.array([r["loss"] for r in recs])


@pytest.mark.pipeline
def test_two_processes_match_one_stop_together_and_resume_in_one(tmp_path, monkeypatch):
  """Two processes x 4 devices, mesh (2, 2, 2): the losses of one process on 8
  devices. SIGTERM to process 1 alone stops both at one step with one
  checkpoint (exit 143), and one process resumes it to the uninterrupted curve."""
  monkeypatch.chdir(REPO)
  flags = _flags(tiny_config(total_steps=500, **OVERRIDES), load_config("sft.py:smoke,sort"))
  cmd = [sys.executable, "-m", "jaxopd.main", "--config", "experiments/sft.py:smoke,sort",
         "--workdir", str(tmp_path / "two")] + flags
  metrics = tmp_path / "two" / "metrics.jsonl"

  def preempt_process_1(procs):   # once training is under way
    def watch():
      while procs[1].poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
          procs[1].terminate()
          return
        time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()

  out = io.StringIO()
  rc = local.launch(cmd, num_processes=2, cpu_devices=4, out=out, timeout=240, on_start=preempt_process_1)
  log = out.getvalue()
  assert rc == 143, log[-3000:]
  assert "[0] distributed: 2 processes, 8 devices (4 per process)" in log
  assert "exited with [0] 143, [1] 143" in log
  stopped = ckpt_lib.Checkpointer(str(tmp_path / "two" / "checkpoints")).latest_step()
  assert f"[0] SIGTERM: checkpoint saved at step {stopped}; stopping" in log
  steps, two = _losses(tmp_path / "two")
  assert 3 <= stopped < 500 and steps == list(range(1, stopped + 1))   # written once, by process 0

  cfg = tiny_config(total_steps=stopped + 2, **OVERRIDES)
  train.run(cfg, tmp_path / "one", SFT.build(cfg))            # one process, 8 devices, uninterrupted
  _, one = _losses(tmp_path / "one")
  np.testing.assert_allclose(two, one[:stopped], rtol=1e-5)

  # The two-process checkpoint (arrays and both data-iterator states) resumes in one process.
  shutil.copytree(tmp_path / "two", tmp_path / "resumed")
  res = train.run(cfg, tmp_path / "resumed", SFT.build(cfg))
  assert res.resumed_from == stopped
  steps, resumed = _losses(tmp_path / "resumed")
  assert steps == list(range(1, stopped + 3))
  np.testing.assert_allclose(resumed, one, rtol=1e-5)


def _cfg(**kw):
  return ml_collections.ConfigDict({**dict(enabled="auto", coordinator_address="", num_processes=0,
                                            process_id=-1), **kw})


def test_distributed_args_from_config_and_environment():
  assert distributed_args(_cfg(), {}) is None                                    # a laptop
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed_args(_cfg(), env) == dict(coordinator_address="127.0.0.1:1234", num_processes=2,
                                               process_id=1)                      # launch/local.py
  assert distributed_args(_cfg(enabled="false"), env) is None
  assert distributed_args(_cfg(coordinator_address="h:1", num_processes=4, process_id=3), {}) == dict(
      coordinator_address="h:1", num_processes=4, process_id=3)                   # the config
  assert distributed_args(_cfg(), {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}) == {}   # jax reads SLURM
  assert distributed_args(_cfg(), {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}) is None
  assert distributed_args(_cfg(), {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
  assert distributed_args(_cfg(enabled=True), {}) == {}                            # TPU pod: jax detects it
  with pytest.raises(ValueError, match="config.distributed.enabled='yes'"):
    distributed_args(_cfg(enabled="yes"), {})
