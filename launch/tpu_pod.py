"""Runs ``python -m jaxopd.main ...`` on every worker of a Cloud TPU VM slice, with gcloud.

  python launch/tpu_pod.py --name jaxopd-v4 --zone us-central2-b --accelerator v4-32 [--spot] \\
      [--code copy|git --repo URL --ref main] [--delete] [--dry-run] -- \\
      --config experiments/tdpo.py --workdir gs://BUCKET/runs/tdpo --config.mesh.shape='(-1,1,1)'

Steps, each one printed (``+ command``) before it runs; ``--dry-run`` prints
them all and runs nothing:

1. reuse the slice if ``gcloud compute tpus tpu-vm describe`` finds it, else create it;
2. code: ``copy`` packs this checkout's tracked and untracked-but-not-ignored
   files and copies them to every worker (``scp --worker=all``); ``git``
   clones ``--repo`` at ``--ref`` on every worker;
3. install: a venv in ``~/jaxopd-venv`` with jaxopd (its ``gcs`` extra, for ``gs://`` workdirs)
   and ``jax[tpu]`` (skip with ``--skip-install`` once done);
4. run the same command on every worker (``ssh --worker=all``), each output
   line prefixed by the worker's hostname, with
   ``--config.distributed.enabled=true`` (jax finds the slice's workers itself);
   ``--detach`` leaves it running under ``nohup`` with its log in ``~/jaxopd-run.log``;
5. ``--delete``: delete the slice afterwards (also when the run failed).

The ``--workdir`` is storage every worker sees: a bucket, ``gs://BUCKET/runs/x`` (no mount:
checkpoints through orbax/tensorstore, logs and records through :mod:`jaxopd.paths`), or a
path every worker has mounted (Filestore/NFS). Every process writes its shards of each
checkpoint there, and process 0 the logs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR, VENV, ARCHIVE, LOG = "~/jaxopd", "~/jaxopd-venv", "jaxopd-src.tgz", "~/jaxopd-run.log"
JAX_TPU = "jax[tpu]>=0.10.2,<0.11"     # the range setup.cfg pins


def runtime_version(accelerator: str) -> str:
  """The TPU software version Google lists for JAX on this accelerator type."""
  if accelerator.startswith("v6e"):
    return "v2-alpha-tpuv6e"
  if accelerator.startswith("v5p"):
    return "v2-alpha-tpuv5"
  if accelerator.startswith(("v5litepod", "v5e")):
    return "v2-alpha-tpuv5-lite"
  return "tpu-ubuntu2204-base"          # v4 and older


class Pod:
  """The gcloud commands for one slice."""

  def __init__(self, a):
    self.a = a

  def gcloud(self, verb: str, *args: str) -> list[str]:
    a = self.a
    return (["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={a.zone}"]
            + ([f"--project={a.project}"] if a.project else []))

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return self.gcloud("ssh", self.a.name, f"--worker={worker}", f"--command={command}")

  def describe(self) -> list[str]:
    return self.gcloud("describe", self.a.name, "--format=value(state)")

  def create(self) -> list[str]:
    a = self.a
    return self.gcloud("create", a.name, f"--accelerator-type={a.accelerator}",
                       f"--version={a.version or runtime_version(a.accelerator)}",
                       *(["--spot"] if a.spot else []))

  def code(self, archive: str) -> list[list[str]]:
    a = self.a
    if a.code == "git":
      clone = (f"rm -rf {REMOTE_DIR} && git clone --quiet {shlex.quote(a.repo)} {REMOTE_DIR} && "
               f"git -C {REMOTE_DIR} checkout --quiet {shlex.quote(a.ref)}")
      return [self.ssh(clone)]
    pack = f"cd {shlex.quote(REPO)} && git ls-files -co --exclude-standard | tar czf {shlex.quote(archive)} -T -"
    unpack = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar xzf ~/{ARCHIVE} -C {REMOTE_DIR}"
    return [["bash", "-c", pack],
            self.gcloud("scp", archive, f"{a.name}:{ARCHIVE}", "--worker=all"),
            self.ssh(unpack)]

  def install(self) -> list[str]:
    return self.ssh(f"python3 -m venv {VENV} && {VENV}/bin/pip install -q -U pip && "
                    f"{VENV}/bin/pip install -q -e {REMOTE_DIR}'[gcs]' {shlex.quote(JAX_TPU)}")

  def run(self, main_args: list[str], detach: bool = False) -> list[str]:
    main = shlex.join(["-m", "jaxopd.main", *main_args, "--config.distributed.enabled=true"])
    if detach:
      return self.ssh(f"cd {REMOTE_DIR} && setsid nohup {VENV}/bin/python {main} > {LOG} 2>&1 < /dev/null &")
    return self.ssh(f"set -o pipefail; cd {REMOTE_DIR} && {VENV}/bin/python {main} 2>&1 "
                    f"| sed -u \"s/^/[$(hostname)] /\"")

  def follow(self) -> list[str]:
    return self.ssh(f"tail -n 100 -f {LOG}")

  def delete(self) -> list[str]:
    return self.gcloud("delete", self.a.name, "--quiet")


class Shell:
  """Prints each command; runs it unless ``dry_run``."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def __call__(self, cmd: list[str], check: bool = True, quiet: bool = False) -> int:
    print("+ " + shlex.join(cmd), file=self.out, flush=True)
    if self.dry_run:
      return 0
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None,
                        stderr=subprocess.DEVNULL if quiet else None).returncode
    if check and rc:
      raise subprocess.CalledProcessError(rc, cmd)
    return rc

  def note(self, text: str):
    print(f"# {text}", file=self.out, flush=True)


def add_pod_args(p, name_flag: str = "--name", required: bool = True, dry_run: bool = True):
  """The slice and code options (also in launch/sweep.py, there as ``--tpu NAME``)."""
  p.add_argument(name_flag, dest="name", required=required, default="",
                 help="TPU VM name (created if missing, else reused)")
  p.add_argument("--zone", required=required, default="", help="e.g. us-central2-b")
  p.add_argument("--accelerator", default="v4-8", help="accelerator type, e.g. v4-32, v5litepod-16, v6e-16")
  p.add_argument("--version", default="", help="TPU software version (default: Google's for the accelerator)")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  p.add_argument("--spot", action="store_true", help="create a Spot slice")
  p.add_argument("--code", choices=("copy", "git"), default="copy", help="copy this checkout, or git clone")
  p.add_argument("--repo", default="", help="git URL for --code git")
  p.add_argument("--ref", default="main", help="branch, tag or commit for --code git")
  p.add_argument("--archive", default=f"/tmp/{ARCHIVE}", help="local path of the packed code for --code copy")
  p.add_argument("--skip-install", action="store_true", help="the slice already has code and venv")
  p.add_argument("--delete", action="store_true", help="delete the slice at the end")
  if dry_run:
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")


def setup(pod: Pod, sh: Shell):
  """Creates or reuses the slice, ships the code, installs."""
  a = pod.a
  if a.code == "git" and not a.repo:
    raise SystemExit("--code git needs --repo URL")
  if a.dry_run:
    sh(pod.describe())
    sh.note("if describe finds no slice:")
    sh(pod.create())
  elif sh(pod.describe(), check=False, quiet=True) == 0:
    sh.note(f"reusing {a.name}")
  else:
    sh(pod.create())
  if a.skip_install:
    return
  for cmd in pod.code(a.archive):
    sh(cmd)
  sh(pod.install())


def run_all(pod: Pod, sh: Shell, runs: list[list[str]], detach: bool = False) -> int:
  """Setup, then each run's ``jaxopd.main`` arguments in turn on every worker; optional delete."""
  failed = 0
  try:
    setup(pod, sh)
    for i, main_args in enumerate(runs):
      if len(runs) > 1:
        sh.note(f"run {i + 1} of {len(runs)}")
      failed += sh(pod.run(main_args, detach), check=False) != 0
    if detach:
      sh.note("follow the log with:")
      print("  " + shlex.join(pod.follow()), file=sh.out)
  finally:
    if pod.a.delete:
      sh(pod.delete(), check=False)
  return 1 if failed else 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  own, main_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s [options] -- JAXOPD_MAIN_ARGS")
  add_pod_args(p)
  p.add_argument("--detach", action="store_true", help="leave the run going under nohup; print how to follow it")
  a = p.parse_args(own)
  if not main_args:
    p.error("no jaxopd.main arguments: ... -- --config experiments/X.py --workdir SHARED_DIR")
  if a.detach and a.delete:
    p.error("--detach with --delete would delete the slice under the running job")
  try:
    return run_all(Pod(a), Shell(a.dry_run), [main_args], a.detach)
  except subprocess.CalledProcessError as e:
    print(f"error: exit {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
    return e.returncode


if __name__ == "__main__":
  sys.exit(main())
