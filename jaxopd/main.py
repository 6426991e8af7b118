"""CLI: python -m jaxopd.main --config experiments/<name>.py[:preset] --workdir DIR [--config.x=y ...]

The config module gives the config; its ``method.name`` the method (jaxopd/methods/<name>.py).
Without --config it runs the main job, experiments/tdpo.py (the whole TDPO pipeline), in runs/default.
Config errors are reported in one line naming the field, before any compile. Exit status:
0 done, 2 a mistake in the command, config or data, 3 training stopped (non-finite, dead mask,
no intact checkpoint), 4 the machine (a full disk, a read-only or unwritable workdir), 130 / 143
interrupted (SIGINT / SIGTERM) after a checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxopd import paths
from jaxopd.experiment import experiments_dir

DEFAULT_CONFIG = os.path.join(experiments_dir(), "tdpo.py")

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "experiment module and preset: path.py[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "run directory: checkpoints, metrics.jsonl, config.json, tb/; "
                    "a local path or a URL (gs://bucket/run)")


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax / jax INFO lines drown the progress bar
  import logging as std_logging
  from jaxopd.errors import FaultLogFilter
  fault_filter = FaultLogFilter()          # a full disk is one line below, not orbax's tracebacks
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(fault_filter)
  from jaxopd import config as config_lib
  from jaxopd import errors, runtime, train
  from jaxopd import methods
  from jaxopd.data.formats import DataFormatError
  from jaxopd.errors import EnvironmentFault, WeightFileError, check_workdir, environment_fault

  config = flags.FLAGS.config
  try:
    method = methods.get(config.method.name)
    workdir = flags.FLAGS.workdir
    import jax
    from jaxopd import mesh as mesh_lib
    if mesh_lib.maybe_initialize_distributed(config.distributed) and jax.process_index() == 0:   # first device use
      print(f"distributed: {jax.process_count()} processes, {len(jax.devices())} devices "
            f"({jax.local_device_count()} per process)", flush=True)
    config_lib.validate(config, len(jax.devices()), jax.process_count())   # before any stage compiles
    check_workdir(workdir)
    config = method.prepare(config, workdir)     # earlier pipeline stages (data, base model), reused if done
    experiment = method.build(config)
    summary = train.run(config, workdir, experiment)
    if not summary.preempted:
      method.report(config, workdir, summary)
  except (config_lib.ConfigError, config_lib.mesh_lib.MeshError, DataFormatError, FileNotFoundError,
          WeightFileError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except runtime.Interrupted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(130 if e.signal == "SIGINT" else 143)
  except runtime.WorkdirBusy as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except errors.TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except EnvironmentFault as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(4)
  except KeyboardInterrupt:   # Ctrl-C before the training loop (data, stages, compile); in it, it checkpoints
    print("interrupted (Ctrl-C) before the training loop; nothing of this run was saved", file=sys.stderr)
    # Leave without the interpreter's teardown: interrupted mid-compile, XLA's threads are still
    # running, and tearing the runtime down under them segfaulted (exit 139 after this line).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  except Exception as e:   # a full disk or a permission mid-run: one line, and what is left to resume from
    fault = environment_fault(e)
    if fault is None:
      raise
    from jaxopd import checkpoint as ckpt_lib
    workdir = paths.resolve(flags.FLAGS.workdir)
    last = ckpt_lib.latest_complete(os.path.join(workdir, "checkpoints"))
    if fault.startswith("?: "):
      fault = f"writing in {workdir}: {fault[3:]}"
    print(f"error: {fault}. The latest complete checkpoint is "
          + (f"step {last}: re-run the command to resume once fixed" if last is not None else
             "none: re-running starts afresh") + " (a checkpoint being written is never taken as the latest)",
          file=sys.stderr)
    sys.exit(4)
  if summary.preempted:
    sys.exit(130 if summary.preempted == "SIGINT" else 143)
  ev = summary.eval
  tr = summary.train
  shown = [k for k in ("loss", "accuracy", "rewards/accuracies", "sample/reward", "sample/kl_ref") if k in ev]
  print(f"done: step {summary.step}" + (f" | train loss {tr['loss']:.4f}" if "loss" in tr else "")
        + "".join(f" | eval {k} {ev[k]:.4f}" for k in shown) + f" | {paths.resolve(flags.FLAGS.workdir)}")


def _one_line(msg: str) -> str:
  """ml_collections wraps an error of a config module's ``get_config`` (a misspelled preset) with its
  traceback: keep the flag it names and the error's own last line."""
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  if any(l.startswith("Traceback (most recent call last)") for l in lines):
    head = lines[0].removesuffix(":").replace("Error whilst parsing config file", "").rstrip(": ")
    last = lines[-1].split(": ", 1)[-1] if lines[-1].startswith(("ValueError", "ConfigError")) else lines[-1]
    return f"{head}: {last}"
  return " ".join(lines)


def _parse_flags(argv):
  """absl flag parsing, with config overrides' errors on one line (no traceback)."""
  try:
    rest = flags.FLAGS(argv)
    getattr(flags.FLAGS.config, "method", None)   # loaded lazily: here, so a missing module is one line
    return rest
  except OSError as e:   # ml_collections' "Failed loading config file ...", the OS's reason last
    reason = str(e).strip().splitlines()[-1].strip()
    known = sorted(n for n in os.listdir(experiments_dir()) if n.endswith(".py") and not n.startswith("_"))
    print(f"error: --config: {reason} (the config modules: {', '.join(known)} in {experiments_dir()})",
          file=sys.stderr)
  except flags.Error as e:
    print(f"error: {_one_line(str(e))}", file=sys.stderr)
  except (AttributeError, KeyError) as e:
    old = [a for a in argv[1:] if a.startswith("--config.init_from")]
    if old:
      print(f"error: {old[0].split('=')[0]}: config.init_from was replaced by the model table: start a role from "
            f"a checkpoint with --config.models.<role>.init=hf:DIR or run:WORKDIR[:MODEL][@STEP] "
            f"(jaxopd/models/table.py)", file=sys.stderr)
      sys.exit(2)
    msg = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'").strip("'").replace("' Did", " - did")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config field in {' '.join(bad)}: {msg}", file=sys.stderr)
  except (TypeError, ValueError) as e:
    print(f"error: bad config override: {e}", file=sys.stderr)
  sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
