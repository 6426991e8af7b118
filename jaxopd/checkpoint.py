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

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.tree_util import DictKey, GetAttrKey, SequenceKey


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


def latest_step(workdir: str) -> int | None:
  """The latest checkpoint step of run ``workdir``; None, creating nothing, when it has none."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
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
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_handlers={"params": ocp.PyTreeCheckpointHandler(),
                       "train": ocp.PyTreeCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: dict, data_iter, force: bool = False) -> bool:
    step = int(jax.device_get(state["step"]))
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
    same_topology = os.path.exists(mine) or not os.path.isdir(data_dir)
    items = dict(params=ocp.args.PyTreeRestore(params_abs, restore_args=_restore_args(params_abs)),
                 train=ocp.args.PyTreeRestore(train_abs, restore_args=_restore_args(train_abs)))
    if same_topology:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    else:
      data_iter.set_state(_shared_data_state(data_dir))
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = unflatten(t_def, out["train"], list(train_abs))
    state["params"] = unflatten(p_def, out["params"], list(params_abs))
    return state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _shared_data_state(data_dir: str):
  """The one iterator state that every process of another topology saved in ``data_dir``."""
  states = {}
  for name in sorted(os.listdir(data_dir)):
    if name.startswith("process_") and name.endswith(".json"):
      with open(os.path.join(data_dir, name)) as f:
        states[name] = json.load(f)
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
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"params": ocp.PyTreeCheckpointHandler()})
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
