"""Device mesh, logical-axis sharding rules and multi-host initialisation.

Every parameter and activation carries *logical* axis names (``embed``,
``mlp``, ``heads``, ``vocab``, ``batch`` ...). A rule table from the config maps
each logical name to a mesh axis (``data``, ``fsdp``, ``tensor``), a tuple of
mesh axes, or ``None`` (replicated) (:func:`logical_to_spec`). A mesh axis of size 1
shards nothing, so one rule table serves every layout and the parallelism is the
mesh shape alone (:func:`make_mesh`):

  mesh.shape = (8, 1, 1)   pure data parallel
  mesh.shape = (1, 8, 1)   FSDP: parameters sharded over ``fsdp`` on ``embed``
  mesh.shape = (2, 2, 2)   all three
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default logical -> mesh rules (MaxText-style). Batch is split over every
# data-like axis; weights are split over fsdp on their embed dimension and over
# tensor on their "wide" dimension (mlp, heads, vocab).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("positions", None),
)

_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("jaxopd_rules", default=None)


class MeshError(ValueError):
  """A mesh setting that cannot work with the devices at hand."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, field: str = "config.mesh.shape") -> tuple[int, ...]:
  """Replaces one ``-1`` entry by the remaining device count; checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise MeshError(f"{field}={shape}: needs {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise MeshError(f"{field}={shape}: at most one entry may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"{field}={shape}: entries must be positive (or one -1)")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if num_devices % known:
      raise MeshError(f"{field}={shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise MeshError(
        f"{field}={shape}: product {int(np.prod(shape))} does not match the {num_devices} devices "
        f"in use (set config.mesh.num_devices or use -1 for one axis)")
  return shape


def make_mesh(shape: Sequence[int], num_devices: int | None = None, devices: Sequence | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over the first ``num_devices`` devices.

  ``num_devices=None`` uses every device. Axis types are ``Auto`` so XLA's
  sharding propagation fills in what the explicit constraints leave open.
  ``devices``: these devices instead of ``jax.devices()`` (the abstract TPU devices of a
  topology, for an ahead-of-time compile on a machine without them).
  """
  given = devices is not None
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices in (None, 0, -1) else int(num_devices)
  if n > len(devices):
    raise MeshError(f"config.mesh.num_devices={n}: only {len(devices)} devices are visible")
  shape = resolve_mesh_shape(shape, n)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if n == len(devices):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices if given else None)
  return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES, axis_types=axis_types)


def rules_from_config(rules: Any) -> tuple:
  """Normalises a rule table (list of [logical, mesh axes]) into a tuple of pairs."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise MeshError(f"config.mesh.rules[{i}]={rule!r}: expected a pair (logical_name, mesh_axes)")
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise MeshError(f"config.mesh.rules[{i}]: unknown mesh axis {a!r} (known: {MESH_AXES})")
    out.append((str(name), axes))
  return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: tuple) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
  if not logical_axes:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    axes = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise MeshError(f"logical axis {name!r} has no rule in config.mesh.rules")
    axes_t = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None and a not in used)
    used.update(axes_t)
    spec.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
  return PartitionSpec(*spec)


def sharding_for(mesh: Mesh, logical_axes: Sequence[str | None] | None, rules: tuple) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


@contextlib.contextmanager
def use_rules(rules: tuple):
  """Makes ``rules`` the table that :func:`constrain` applies (with ``jax.set_mesh``)."""
  token = _RULES.set(rules)
  try:
    yield
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation from logical names; a no-op outside a mesh."""
  rules = active_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def active_rules() -> tuple | None:
  """The rule table set by :func:`use_rules` (None outside it)."""
  return _RULES.get()


def mesh_axes(logical: str, rules: tuple) -> tuple[str, ...]:
  """The mesh axes a logical axis is split over under ``rules`` (``()``: not split)."""
  spec = logical_to_spec((logical,), rules)[0]
  return () if spec is None else (spec if isinstance(spec, tuple) else (spec,))


def data_parallel_size(mesh: Mesh, rules: tuple) -> int:
  """How many ways the ``batch`` logical axis is split on this mesh."""
  axes = mesh_axes("batch", rules)
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


# Set by launch/local.py (and usable by any launcher): one process of a multi-process run.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def distributed_args(cfg: Any, environ=None) -> dict | None:
  """The ``jax.distributed.initialize`` arguments for ``config.distributed``, or None (one process).

  ``cfg.enabled``: ``"auto"`` initialises when the config or the environment
  names a multi-process run: a coordinator address (config or
  ``JAX_COORDINATOR_ADDRESS``, with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``),
  a SLURM step with more than one task, or a TPU VM slice whose
  ``TPU_WORKER_HOSTNAMES`` lists several workers; ``"true"`` always
  initialises (jax auto-detects what is unset: TPU pods, SLURM, Open MPI);
  ``"false"`` never. Unset fields (``""``, ``0``, ``-1``) are left to jax.
  """
  env = os.environ if environ is None else environ
  mode = str(cfg.enabled).lower()
  if mode not in ("auto", "true", "false"):
    raise MeshError(f"config.distributed.enabled={cfg.enabled!r}: must be auto, true or false")
  if mode == "false":
    return None
  args = {}
  address = cfg.coordinator_address or env.get(ENV_COORDINATOR, "")
  num = int(cfg.num_processes) or int(env.get(ENV_NUM_PROCESSES, 0))
  pid = int(cfg.process_id) if int(cfg.process_id) >= 0 else int(env.get(ENV_PROCESS_ID, -1))
  if address:
    args["coordinator_address"] = address
  if num > 0:
    args["num_processes"] = num
  if pid >= 0:
    args["process_id"] = pid
  if mode == "true":
    return args
  slurm = "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1
  tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if (address and num != 1) or slurm or tpu:
    return args
  return None


def maybe_initialize_distributed(cfg: Any) -> bool:
  """Calls ``jax.distributed.initialize`` as :func:`distributed_args` says, once,
  before any device is used; returns whether the run is multi-process."""
  if jax.distributed.is_initialized():
    return True
  args = distributed_args(cfg)
  if args is None:
    return False
  jax.distributed.initialize(**args)
  return True


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh, rules, fallbacks: list | None = None):
  """NamedShardings for a tree whose ``nnx.Variable`` nodes carry ``logical_axes``;
  every other leaf (step, counts, PRNG key) is replicated.

  A dimension that its mesh axes do not divide (a vocabulary of 50257 over
  tensor=2) is replicated instead; ``fallbacks`` collects ``(path, shape, spec)``
  for each such parameter so the caller can report them.
  """
  def f(path, x):
    if is_variable(x) and not jax.tree.leaves(x):   # e.g. optax's MaskedNode for another group
      return x
    if is_variable(x):
      spec = logical_to_spec(x.get_metadata().get("logical_axes"), rules)
      fixed = []
      for dim, axes in zip(x.shape, tuple(spec) + (None,) * (len(x.shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fixed.append(axes if dim % ways == 0 else None)
      fixed = PartitionSpec(*fixed)
      if fixed != spec and fallbacks is not None:
        fallbacks.append((jax.tree_util.keystr(path), tuple(x.shape), spec))
      return x.replace(NamedSharding(mesh, fixed))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=is_variable)
