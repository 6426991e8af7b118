"""launch/: the TPU pod launcher's dry run, the SLURM array script, the local
multi-process launcher, and the ahead-of-time memory report under FSDP."""

import io
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from helpers import REPO, SFT, tiny_config

sys.path.insert(0, os.path.join(REPO, "launch"))
import aot_memory  # noqa: E402
import local  # noqa: E402
import sweep  # noqa: E402
import tpu_pod  # noqa: E402


def _no_subprocess(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError(f"a dry run ran {a}")
  monkeypatch.setattr(subprocess, "run", refuse)
  monkeypatch.setattr(subprocess, "Popen", refuse)


def test_tpu_pod_dry_run_prints_every_gcloud_command(monkeypatch, capsys):
  _no_subprocess(monkeypatch)
  rc = tpu_pod.main(["--name", "jx", "--zone", "us-central2-b", "--accelerator", "v4-32", "--spot", "--delete",
                     "--dry-run", "--", "--config", "experiments/sft.py", "--workdir", "/mnt/runs/sft",
                     "--config.mesh.shape=(-1,1,1)"])
  assert rc == 0
  cmds = [shlex.split(l[2:]) for l in capsys.readouterr().out.splitlines() if l.startswith("+ ")]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert [c[4] if c[0] == "gcloud" else c[0] for c in cmds] == [
      "describe", "create", "bash", "scp", "ssh", "ssh", "ssh", "delete"]
  describe, create, pack, scp, unpack, install, run, delete = cmds
  assert describe[:6] == tpu + ["describe", "jx"] and "--zone=us-central2-b" in describe
  assert create[:6] == tpu + ["create", "jx"]
  assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(create)
  assert pack[:2] == ["bash", "-c"] and "git ls-files -co --exclude-standard | tar czf" in pack[2]
  assert scp[:5] == tpu + ["scp"] and "jx:jaxopd-src.tgz" in scp and "--worker=all" in scp
  for c in (unpack, install, run):
    assert c[:6] == tpu + ["ssh", "jx"] and "--worker=all" in c
  assert "tar xzf ~/jaxopd-src.tgz -C ~/jaxopd" in unpack[7]
  assert "pip install -q -e ~/jaxopd'[gcs]' 'jax[tpu]>=0.10.2,<0.11'" in install[7]
  remote = run[7][len("--command="):]
  assert ("~/jaxopd-venv/bin/python -m jaxopd.main --config experiments/sft.py --workdir /mnt/runs/sft "
          "'--config.mesh.shape=(-1,1,1)' --config.distributed.enabled=true") in remote
  assert "sed -u" in remote and "pipefail" in remote          # host-prefixed lines, the run's exit status
  assert delete[:7] == tpu + ["delete", "jx", "--quiet"]


def test_tpu_pod_git_clone_and_detach(monkeypatch, capsys):
  _no_subprocess(monkeypatch)
  tpu_pod.main(["--name", "jx", "--zone", "z", "--accelerator", "v5litepod-16", "--code", "git", "--repo",
                "https://example.org/jaxopd.git", "--ref", "v1", "--detach", "--dry-run", "--", "--config", "c.py"])
  out = capsys.readouterr().out
  assert "--version=v2-alpha-tpuv5-lite" in out
  assert "git clone --quiet https://example.org/jaxopd.git ~/jaxopd && git -C ~/jaxopd checkout --quiet v1" in out
  assert "setsid nohup ~/jaxopd-venv/bin/python -m jaxopd.main --config c.py" in out
  assert "tail -n 100 -f ~/jaxopd-run.log" in out


def test_sweep_slurm_array_script(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  path = tmp_path / "sweep.sbatch"
  out = tmp_path / "out"
  rc = sweep.main(["--config", "experiments/sft.py:smoke,sort", "--out", str(out), "--grid", "optim.lr=1e-3,1e-2",
                   "--seeds", "0,1", "--set", "total_steps=6", "--slurm", str(path), "--slurm_nodes", "2",
                   "--sbatch_arg=--account=abc"])
  assert rc == 0 and out.is_dir()
  text = path.read_text()
  assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
  for line in ("#SBATCH --array=0-3", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
               "#SBATCH --gpus-per-node=8", "#SBATCH --account=abc", f"#SBATCH --output={out}/slurm-%A_%a.out"):
    assert line + "\n" in text
  # Each array task runs its own grid point through srun (a stand-in srun prints what it was given).
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text('#!/bin/sh\nshift\necho "$@"\n')
  (bin_dir / "srun").chmod(0o755)
  todo = list(sweep.runs(sweep.parse_grid(["optim.lr=1e-3,1e-2"]), [0, 1]))
  for i in (0, 3):
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(i), JAXOPD_PYTHON="py")
    got = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, check=True).stdout
    assert shlex.split(got) == sweep.command("experiments/sft.py:smoke,sort", str(out), *todo[i],
                                             ["total_steps=6"], python="py")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="4")
  assert subprocess.run(["bash", str(path)], env=env, capture_output=True).returncode == 2
  # After the array: --gather builds the table from whatever runs finished.
  done = out / sweep.run_name(*todo[1])
  done.mkdir()
  (done / "metrics.jsonl").write_text('{"step": 6, "split": "eval", "loss": 1.5}\n')
  assert sweep.main(["--config", "experiments/sft.py:smoke,sort", "--out", str(out), "--grid",
                     "optim.lr=1e-3,1e-2", "--seeds", "0,1", "--gather"]) == 1     # 3 of 4 missing
  res = [json.loads(l) for l in open(out / "results.jsonl")]
  assert len(res) == 4 and res[1]["loss"] == 1.5 and res[1]["seed"] == 1 and "loss" not in res[0]


def test_local_launcher_env_and_failure(tmp_path):
  env = local.process_env(1, 2, 1234, cpu_devices=4, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x"})
  assert env["XLA_FLAGS"] == "--x --xla_force_host_platform_device_count=4"
  assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("127.0.0.1:1234",
                                                                                              "2", "1")
  # Process 1 fails at once; process 0 (which would wait for it forever) is stopped.
  code = "import os, time; print('hi', flush=True); i = int(os.environ['JAX_PROCESS_ID']); time.sleep(60 * (1 - i)); exit(3)"
  out = io.StringIO()
  t = time.monotonic()
  assert local.launch([sys.executable, "-c", code], 2, out=out) == 3
  assert time.monotonic() - t < 30
  log = out.getvalue()
  assert "[0] hi" in log and "[1] hi" in log and "[1] 3" in log


def test_aot_memory_parameters_and_optimizer_fall_as_one_over_fsdp():
  """Per-device parameter + optimizer bytes with FSDP over N = 1, 2, 4, 8 devices."""
  reports = {}
  for n in (1, 2, 4, 8):
    cfg = tiny_config(**{"mesh.shape": (1, n, 1), "mesh.num_devices": n})
    reports[n] = aot_memory.report(cfg, SFT.build(cfg))
  print({n: (r["params"], r["opt_state"], r["temp"], r["total"]) for n, r in reports.items()})
  one = reports[1]["params"] + reports[1]["opt_state"]
  for n, r in reports.items():
    assert r["mesh"] == {"data": 1, "fsdp": n, "tensor": 1}
    assert (r["params"] + r["opt_state"]) * n == pytest.approx(one, rel=0.02)
    assert r["batch"] * n == reports[1]["batch"]
    assert r["total"] >= r["params"] + r["opt_state"] + r["temp"]
  assert reports[8]["total"] < reports[1]["total"]
  text = aot_memory.format_report(reports[8], hbm_bytes=2**30)
  assert "parameters" in text and "optimizer state" in text and "fits in 1.0 GiB" in text


def test_aot_memory_cli(monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  rc = aot_memory.main(["--config", "experiments/sft.py:smoke,sort", "--config.mesh.shape=(2,4,1)",
                        "--config.model.d_model=64", "--json"])
  assert rc == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and r["params"] > 0
  assert aot_memory.main(["--config", "experiments/sft.py:smoke,sort", "--config.mesh.shape=(3,1,1)"]) == 2
  assert "error: config.mesh.shape" in capsys.readouterr().err
