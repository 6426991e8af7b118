"""Starts N processes of one command on this machine, as one multi-process JAX run.

  python launch/local.py --num_processes 2 --cpu_devices 4 -- \\
      python -m jaxopd.main --config experiments/sft.py:smoke,sort --workdir runs/sft_2proc

Process ``i`` gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``,
``JAX_NUM_PROCESSES=N`` and ``JAX_PROCESS_ID=i``, which
``jaxopd.mesh.distributed_args`` turns into ``jax.distributed.initialize``.
``--cpu_devices K`` simulates K CPU devices per process
(``--xla_force_host_platform_device_count``) with the gloo cross-process
collectives; without it each process sees the machine's devices (on a GPU box
give each its own with ``--gpus_per_process``). Every output line is prefixed
with ``[i]`` (gloo's per-peer connection lines are dropped). If a process
fails (exit status other than 0 or 143) the others are stopped and this exits
with its status. Ctrl-C sends SIGTERM to all: they checkpoint at one step and
exit 143.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, port: int, cpu_devices: int = 0, gpus_per_process: int = 0,
                base: dict | None = None) -> dict:
  """The environment of process ``i`` of ``n``."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
             PYTHONUNBUFFERED="1")
  if cpu_devices:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  if gpus_per_process:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * gpus_per_process + g) for g in range(gpus_per_process))
  return env


def _pump(i: int, stream, out, lock):
  for line in iter(stream.readline, ""):
    if line.startswith("[Gloo] Rank "):    # one connection line per peer and collective group
      continue
    with lock:
      out.write(f"[{i}] {line}")
      out.flush()
  stream.close()


def _stop(procs):
  """SIGTERM (a checkpoint at the next step boundary), then SIGKILL after 10 s, to those still running."""
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  for p in procs:
    try:
      p.wait(timeout=10)
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def launch(cmd: list[str], num_processes: int, cpu_devices: int = 0, gpus_per_process: int = 0,
           port: int = 0, out=None, timeout: float | None = None, on_start=None) -> int:
  """Runs ``cmd`` as ``num_processes`` processes; returns 0 or the first failure's status.

  ``on_start(popens)`` is called once all are started (e.g. to signal one).
  Exit status 143 (checkpointed after SIGTERM) is not a failure that stops
  the others: they stop at the same step.
  """
  out = out or sys.stdout
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    p = subprocess.Popen(cmd, env=process_env(i, num_processes, port, cpu_devices, gpus_per_process),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True))
    pumps[-1].start()
  if on_start is not None:
    on_start(procs)
  deadline = None if timeout is None else time.monotonic() + timeout
  rc = 0
  try:
    while any([p.poll() is None for p in procs]):    # a list: poll() every process
      failed = [p.returncode for p in procs if p.returncode not in (None, 0, 143)]
      if failed or (deadline is not None and time.monotonic() > deadline):
        rc = failed[0] if failed else 124   # the others would wait on the failed one in a collective
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    rc = 130
  finally:
    _stop(procs)
  for t in pumps:
    t.join(timeout=5)
  if rc == 0:
    rc = next((p.returncode for p in procs if p.returncode != 0), 0)
  with lock:
    codes = ", ".join(f"[{i}] {p.returncode}" for i, p in enumerate(procs))
    out.write(f"local launch: {num_processes} processes exited with {codes}\n")
  return rc


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num_processes", "-n", type=int, default=2, help="processes to start")
  p.add_argument("--cpu_devices", type=int, default=0, help="simulated CPU devices per process (0: real devices)")
  p.add_argument("--gpus_per_process", type=int, default=0, help="CUDA_VISIBLE_DEVICES slice per process")
  p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
  p.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
  p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
  a = p.parse_args(argv)
  cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
  if not cmd:
    p.error("no command: launch/local.py [options] -- python -m jaxopd.main ...")
  if a.num_processes < 1:
    p.error("--num_processes must be positive")
  return launch(cmd, a.num_processes, a.cpu_devices, a.gpus_per_process, a.port, timeout=a.timeout)


if __name__ == "__main__":
  sys.exit(main())
