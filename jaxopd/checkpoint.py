"""Checkpoints with orbax: train state, step, PRNG key and data-iterator state.

Layout of ``WORKDIR/checkpoints/<step>/``:

* ``params``: the trainable parameters as a flat dict ``"<model>.<path>" -> array``
  (``policy.blocks.0.attn.wq``), readable on its own by a ``run:`` model source (jaxopd.models.table);
* ``train``: step, optimizer state and PRNG key, flat the same way;
* ``data``: each process's grain iterator state (``process_<i>-of-<n>.json``).

Arrays are restored straight into the shardings of the target abstract state,
so no host ever holds a full copy of a sharded parameter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from jaxopd import paths
from jaxopd.errors import EnvironmentFault


def _key_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, DictKey):
      parts.append(str(k.key))
    elif isinstance(k, SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  if parts and parts[-1] == "value":     # an nnx.Variable's payload
    parts.pop()
  return ".".join(parts)


def flatten(tree) -> tuple[dict[str, Any], Any]:
  """``tree -> ({"a.b.0": leaf}, treedef)``; keys are unique paths."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {}
  for path, leaf in leaves:
    k = _key_str(path) or "_"
    if k in flat:
      raise ValueError(f"checkpoint: two leaves share the key {k!r}")
    flat[k] = leaf
  return flat, treedef


def unflatten(treedef, flat: dict[str, Any], order: list[str]):
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in order])


def _restore_args(flat_abstract: dict) -> dict:
  return {k: ocp.ArrayRestoreArgs(sharding=v.sharding, global_shape=v.shape, dtype=v.dtype)
          for k, v in flat_abstract.items()}


@contextlib.contextmanager
def _quiet_reading():
  """Reading another run's checkpoint, orbax warns at each step of it ("read_only=True, setting
  save_interval_steps=0", "Item 'train' was found in the checkpoint, but could not be restored"...):
  all say what a read-only, parameters-only read is. Only its errors pass."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _reader(directory: str, **kwargs) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), **kwargs)


def latest_complete(directory: str) -> int | None:
  """The newest step under a checkpoints ``directory`` that was written whole, by its directory
  name (orbax renames a step's directory to its number once written): readable whatever state
  orbax is in (interrupted, or on a full disk); None when there is none."""
  steps = [int(n) for n in paths.listdir(directory) if n.isdigit()] if paths.exists(directory) else []
  return max(steps, default=None)


def latest_step(workdir: str) -> int | None:
  """The latest checkpoint step of run ``workdir``; None, creating nothing, when it has none."""
  directory = os.path.join(workdir, "checkpoints")
  if not paths.isdir(directory):
    return None
  with _quiet_reading():
    mngr = _reader(directory)
    step = mngr.latest_step()
    mngr.close()
  return step


def finished(workdir: str, steps: int) -> bool:
  """Whether run ``workdir`` has a checkpoint at step ``steps`` or later (a
  cached pipeline stage is done)."""
  step = latest_step(workdir)
  return step is not None and step >= steps


class Checkpointer:
  """Periodic / final / preemption checkpoints of one run directory."""

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = paths.resolve(directory)
    self._bytes = None     # this process's checkpoint size, once known
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_handlers={"params": ocp.PyTreeCheckpointHandler(),
                       "train": ocp.PyTreeCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _check_space(self, state: dict, step: int) -> None:
    """Refuses, before writing anything, a checkpoint that the disk has no room for (a local
    directory): it would fail half-written, with pages of orbax's tracebacks. The size is this
    process's shards of the state (one copy of each) plus 5% and 256 KiB for metadata."""
    if paths.is_remote(self.directory):
      return
    self.manager.wait_until_finished()   # the previous save's bytes are on disk (orbax waits for it anyway)
    if self._bytes is None:
      self._bytes = sum(sh.data.nbytes for x in jax.tree.leaves(state) if isinstance(x, jax.Array)
                        for sh in x.addressable_shards if sh.replica_id == 0)
    need = int(self._bytes * 1.05) + (256 << 10)
    free = shutil.disk_usage(self.directory).free
    if free < need:
      last = self.latest_step()
      raise EnvironmentFault(
          f"{self.directory}: no space left for checkpoint step {step} (needs about {need / 2**20:.1f} MiB, "
          f"{free / 2**20:.1f} MiB free); nothing was written. The latest complete checkpoint is "
          + (f"step {last}: free space and re-run the command to resume" if last is not None else
             "none: free space and re-run the command"))

  def save(self, state: dict, data_iter, force: bool = False) -> bool:
    step = int(jax.device_get(state["step"]))
    self._check_space(state, step)
    params, _ = flatten(state["params"])
    train, _ = flatten({k: v for k, v in state.items() if k != "params"})
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.PyTreeSave(params), train=ocp.args.PyTreeSave(train),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=force)

  def restore(self, step: int, abstract_state: dict, data_iter) -> dict:
    """Restores ``step`` into the shardings of ``abstract_state``; advances ``data_iter`` in place.

    A checkpoint written by another number of processes restores too (arrays
    are resharded by orbax) when every process saved the same iterator state,
    as ``jaxopd.data.batched_iterator``'s step counts are.
    """
    params_abs, p_def = flatten(abstract_state["params"])
    train_abs, t_def = flatten({k: v for k, v in abstract_state.items() if k != "params"})
    data_dir = os.path.join(self.directory, str(step), "data")
    mine = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    for item in ("params", "train", "data"):
      if not paths.isdir(os.path.join(self.directory, str(step), item)):
        raise DamagedCheckpoint(f"its {item}/ is missing")
    saved = [n for n in paths.listdir(data_dir) if n.startswith("process_") and n.endswith(".json")]
    if not saved:
      raise DamagedCheckpoint("data/ holds no data-iterator state")
    same_topology = paths.exists(mine)
    items = dict(params=ocp.args.PyTreeRestore(params_abs, restore_args=_restore_args(params_abs)),
                 train=ocp.args.PyTreeRestore(train_abs, restore_args=_restore_args(train_abs)))
    if same_topology:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    else:
      data_iter.set_state(_shared_data_state(data_dir))
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:   # orbax / tensorstore / grain: a file missing, cut short or unparsable
      raise DamagedCheckpoint(_first_line(e)) from e
    state = unflatten(t_def, out["train"], list(train_abs))
    state["params"] = unflatten(p_def, out["params"], list(params_abs))
    return state

  def move_aside(self, step: int) -> str:
    """Moves checkpoint ``step`` to ``<directory>.damaged/<step>[.N]``; returns the new path."""
    aside = self.directory + ".damaged"
    paths.makedirs(aside)
    dest = os.path.join(aside, str(step))
    n = 1
    while paths.exists(dest):
      dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
    paths.rename(os.path.join(self.directory, str(step)), dest)
    self.manager.reload()
    return dest

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class DamagedCheckpoint(Exception):
  """A checkpoint step that cannot be read back; the message says why, in one line."""


def _first_line(e: Exception, limit: int = 240) -> str:
  text = str(e).strip().splitlines()
  line = f"{type(e).__name__}: {text[0] if text else ''}"
  return line if len(line) <= limit else line[:limit] + "..."


def _shared_data_state(data_dir: str):
  """The one iterator state that every process of another topology saved in ``data_dir``."""
  states = {}
  for name in paths.listdir(data_dir):
    if name.startswith("process_") and name.endswith(".json"):
      states[name] = paths.read_json(os.path.join(data_dir, name))
  if not states or any(s != next(iter(states.values())) for s in states.values()):
    raise ValueError(f"{data_dir}: the data iterator states of {sorted(states)} differ, so this checkpoint "
                     f"cannot resume with {jax.process_count()} process(es); resume with the process count it "
                     f"was written with, or start from its parameters with config.models.<role>.init=run:WORKDIR")
  return next(iter(states.values()))


def load_params(workdir: str, source: str, target: str, abstract_params, step: int | None = None) -> Any:
  """Reads model ``source`` from checkpoint ``step`` (default: the latest) of run ``workdir``
  into the structure, shardings and dtypes of ``abstract_params`` (one model's state);
  returns ``(params, step)``.

  Raises a ValueError naming the tensor when a name or shape does not match.
  """
  with _quiet_reading():
    return _load_params(workdir, source, target, abstract_params, step)


def _load_params(workdir, source, target, abstract_params, step):
  directory = os.path.join(paths.resolve(workdir), "checkpoints")
  mngr = _reader(directory, item_handlers={"params": ocp.PyTreeCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"run {workdir}: no checkpoint under {directory}")
  flat_abs, treedef = flatten(abstract_params)
  meta = mngr.item_metadata(step)["params"]
  saved = {k: v for k, v in (meta.tree if hasattr(meta, "tree") else meta).items()}
  src = {f"{source}.{k}": k for k in flat_abs}
  for sk, k in src.items():
    if sk not in saved:
      raise ValueError(f"{directory}/{step}: tensor {sk!r} is missing "
                       f"(needed for {target}.{k}); the models differ")
    shape = tuple(saved[sk].shape)
    if shape != tuple(flat_abs[k].shape):
      raise ValueError(f"{directory}/{step}: tensor {sk!r} has shape {shape}, "
                       f"{target}.{k} needs {tuple(flat_abs[k].shape)}")
  target_tree = {sk: flat_abs[k] for sk, k in src.items()}
  out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
      target_tree, restore_args=_restore_args(target_tree), partial_restore=True)))["params"]
  mngr.close()
  return unflatten(treedef, {k: out[sk] for sk, k in src.items()}, list(flat_abs)), step
