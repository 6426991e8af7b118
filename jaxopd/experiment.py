"""The experiment-module contract: the seam every method plugs into.

A method is a library module ``jaxopd/methods/<name>.py`` defining ``build(config) ->``
:class:`Experiment` (optionally also ``prepare(config, workdir) -> config``, cached earlier stages,
and ``report(config, workdir, summary)``); an experiment is a config module ``experiments/<name>.py``
defining ``get_config(arg)`` (``arg``: a comma-separated preset list, :func:`parse_arg`).
The trainer (:mod:`jaxopd.train`) owns everything else: mesh, sharding, jit, optimizer, gradient
accumulation, checkpoints, logging and eval cadence. A method never calls ``jax.jit``, never touches
a mesh and never writes a file; host-side evaluation compiles through :func:`jaxopd.evaluation.compiled`.
The full contract: experiments/design.md, "Adding a method".
"""

from __future__ import annotations

import difflib

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax

Batch = Mapping[str, Any]            # name -> array with a leading batch axis


class LossOutput(NamedTuple):
  """What ``loss_fn`` returns.

  ``loss`` is a *sum* over the examples of the batch it was given and
  ``count`` the matching count (tokens for SFT, pairs for DPO); the trainer
  adds both over microbatches and devices and optimises ``sum(loss) /
  sum(count)``, which is the exact global-batch mean however the batch is
  split. Each metric is either a sum over the same count as the loss, or a
  pair ``(sum, count)`` normalised by its own count.
  """
  loss: jax.Array
  count: jax.Array
  metrics: Mapping[str, Any]


class DataShard(NamedTuple):
  """Which slice of the data this process reads."""
  seed: int
  process_index: int
  process_count: int
  local_batch: int                   # examples per step on this process


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A method, as the trainer sees it.

  roles: the model roles the method uses, ``name -> trainable`` (``{"policy":
    True, "reference": False}``). The trainer builds them from ``config.models``
    (:mod:`jaxopd.models.table`: architecture, source, dtypes) and refuses a
    table with a missing or extra role. Each trainable model is one optimizer
    group, named by its key (``config.optim.groups``).
  init_heads(rng) -> dict name -> ``nnx.Module``: trainable modules that are not
    language models (SparsePO's mask head); optional. Called under
    ``jax.eval_shape`` and inside a jit with sharded outputs, so it must be a
    pure function of ``rng``.
  loss_fn(models, batch, rng) -> LossOutput: pure and jittable; ``models`` is
    one dict of modules, every role and head by name (rebuilt from arrays inside
    the step; gradients flow only into the trainable ones).
  train_data(shard) -> iterator of local batches (dicts of numpy arrays with
    leading size ``shard.local_batch``), with ``get_state``/``set_state``
    (a grain ``DatasetIterator``) so checkpoints can resume it.
  eval_data(shard) -> a fresh finite iterable of local batches, or None.
  evaluate(models, step) -> dict of floats: extra host-side metrics
    (sampling-based ones), run at eval time; optional.
  rollout(models, batch, rng) -> batch: on-policy methods turn a prompt batch
    into a training batch inside the jitted step (no gradient flows through
    it); optional.
  init_state() -> pytree: method state that persists across steps (f-DPG's
    running log Z, baseline, offline proposal); optional. It lives in the
    train state as ``state["method"]`` (checkpointed; ``nnx.Variable`` leaves
    are sharded by their ``logical_axes``, the rest replicated) and is
    threaded through the rollout, whose signature becomes
    ``rollout(models, batch, rng, method_state) -> (batch, method_state)``;
    with gradient accumulation the microbatches see it in order. A step whose
    loss or gradient is non-finite keeps the old state, the method's included.
  updates_per_rollout: ``mu``; with ``mu > 1`` (PPO-style epochs on one rollout) the
    rollout runs once over the step's whole batch and its rows are split into ``mu``
    minibatches (rows i, i + mu, ...), each one optimizer update (with ``grad_accum``
    microbatches inside); a step is one rollout, so the optimizer schedule counts
    ``total_steps * mu`` updates. Needs a rollout.
  snapshots: ``name -> trainable role``: frozen models that are copies of a trained one
    (GRPO's reference, ``{"reference": "policy"}``), held in the train state (so
    checkpointed, and resumed exactly), taken when the role's source is loaded; they
    are in ``models`` by name and are not roles of the table.
  reset(step, metrics) -> bool array: after the step (``step`` counted after it,
    ``metrics`` the step's, ratios), when true every snapshot is set to its role's new
    parameters and the optimizer state is re-initialised (ProRL's reference reset; the
    schedule's count restarts with it); the train state counts the resets
    (``metrics["resets"]``). Needs snapshots.
  host_fault() -> str or None: why a host function the step called (a ``module:function``
    reward) failed in the last step, or None; the trainer stops with it in one line before that
    step's state is saved (the function itself returns finite values, so no collective hangs).
  """
  roles: Mapping[str, bool]
  loss_fn: Callable[[dict, Batch, jax.Array], LossOutput]
  train_data: Callable[[DataShard], Any]
  init_heads: Callable[[jax.Array], dict] | None = None
  eval_data: Callable[[DataShard], Iterable[Batch]] | None = None
  evaluate: Callable[[dict, int], dict] | None = None
  rollout: Callable[..., Any] | None = None
  init_state: Callable[[], Any] | None = None
  updates_per_rollout: int = 1
  snapshots: Mapping[str, str] = dataclasses.field(default_factory=dict)
  reset: Callable[[jax.Array, dict], jax.Array] | None = None
  host_fault: Callable[[], str | None] | None = None

  def __post_init__(self):
    if not self.roles or not any(self.roles.values()) and self.init_heads is None:
      raise TypeError("Experiment.roles must name at least one model, and something must be trainable")
    if self.init_state is not None and self.rollout is None:
      raise TypeError("Experiment.init_state needs a rollout: the rollout is where the method state is updated")
    if self.updates_per_rollout < 1 or self.updates_per_rollout > 1 and self.rollout is None:
      raise TypeError("Experiment.updates_per_rollout must be >= 1, and > 1 needs a rollout")
    for name, src in self.snapshots.items():
      if name in self.roles or not self.roles.get(src):
        raise TypeError(f"Experiment.snapshots[{name!r}] = {src!r}: must name a trainable role, and {name!r} "
                        f"must not be a role")
    if self.reset is not None and not self.snapshots:
      raise TypeError("Experiment.reset needs snapshots (what a reset copies)")


def parse_arg(arg: str | None, presets: Iterable[str] = ()) -> dict:
  """``"smoke,tdpo1"`` -> ``{"smoke": True, "tdpo1": True}``; an unknown word raises, and so does
  ``key=value`` (set fields with ``--config.key=value``: one way to override, never ignored)."""
  out: dict[str, Any] = {}
  presets = set(presets)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      raise ValueError(f"config preset {part!r}: presets are names only; set the field with "
                       f"--config.{k.strip()}={v.strip()}")
    if part not in presets:
      near = difflib.get_close_matches(part, sorted(presets), n=1)
      raise ValueError(f"config preset {part!r} is unknown" + (f" - did you mean {near[0]!r}?" if near else "")
                       + f"; known presets: {sorted(presets)}")
    out[part] = True
  return out


def experiments_dir() -> str:
  """The repository's ``experiments/`` (editable install or checkout), else the working directory's."""
  repo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  return repo if os.path.isdir(repo) else os.path.join(os.getcwd(), "experiments")


def config_path(spec: str) -> tuple[str, str | None]:
  """``"tdpo.py:smoke"`` -> (the file's path, ``"smoke"``): a path that does not exist as given is
  looked up in :func:`experiments_dir` (so stages name ``"sft.py"``)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(experiments_dir(), path)):
    path = os.path.join(experiments_dir(), path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config module {spec!r}: {path} does not exist")
  return os.path.abspath(path), (arg or None)


def load_config(spec: str):
  """The config of an experiment config module, ``"path.py[:preset,...]"`` (``get_config(preset)``).

  The CLI loads ``--config`` the same way (ml_collections' config flag); pipeline
  stages use this to build the config of an earlier stage (``sft.py``).
  """
  path, arg = config_path(spec)
  name = "jaxopd_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise AttributeError(f"{path}: a config module must define get_config(arg)")
  return module.get_config(arg)
