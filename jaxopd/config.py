"""The trainer's base config and its validation.

Every experiment's ``get_config`` starts from :func:`base_config` and adds its
own fields under ``config.method``. :func:`validate` runs before anything is
compiled; each problem stops the run with one line naming the field.
"""

from __future__ import annotations

import ml_collections

from jaxopd import mesh as mesh_lib
from jaxopd import optim
from jaxopd.data.formats import OVER_LENGTH_POLICIES
from jaxopd.errors import ConfigError
from jaxopd.models import ModelConfig, table



def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                     # one seed: init, data order, per-step PRNG
  c.total_steps = 100            # optimizer steps to run
  c.batch_size = 16              # global batch (examples) per optimizer step, over all hosts
  c.grad_accum = 1               # microbatches per step; batch_size must divide into them
  c.seq_len = 64                 # padded sequence length of every batch

  # The method (jaxopd/methods/<name>.py) and its fields; each experiment names its method.
  c.method = ml_collections.ConfigDict()
  c.method.name = ""             # sft | tdpo | sparsepo | fdpg | distillspec

  # The default architecture (jaxopd.models.ModelConfig fields; dtypes are per role): the
  # architecture of every random-init role with arch "auto".
  c.model = table.arch_block()
  # The model table: role -> table.role(init, trainable, arch, param_dtype, dtype, attention, remat,
  # scan_layers); each experiment declares its roles (jaxopd/models/table.py).
  c.models = ml_collections.ConfigDict()
  c.models.policy = table.role()

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"         # adamw | rmsprop
  c.optim.lr = 3e-4              # peak learning rate
  c.optim.schedule = "constant"  # constant | cosine (after warm-up)
  c.optim.warmup_steps = 0       # linear warm-up from 0 to lr
  c.optim.min_lr_ratio = 0.0     # cosine floor as a fraction of lr
  c.optim.b1 = 0.9               # adamw beta1; rmsprop momentum (0 = none)
  c.optim.b2 = 0.95              # adamw beta2; rmsprop decay
  c.optim.eps = 1e-8             # adamw / rmsprop epsilon
  c.optim.weight_decay = 0.0     # decoupled weight decay on matrices (ndim >= 2)
  c.optim.clip_norm = 1.0        # global grad-norm clipping; 0 disables
  c.optim.mu_dtype = "float32"   # first-moment storage: float32 | bfloat16 (the second moment stays float32)
  # Per-group overrides, keyed by the name of a trainable model (e.g. "mask"):
  # config.optim.groups.mask = ConfigDict(dict(lr=1e-3, weight_decay=0.01)).
  c.optim.groups = ml_collections.ConfigDict()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)      # (data, fsdp, tensor); one -1 takes the remaining devices
  c.mesh.num_devices = 0         # 0 = all visible devices; else the first N
  c.mesh.rules = [list(r) for r in mesh_lib.DEFAULT_RULES]  # logical axis -> mesh axes

  c.distributed = ml_collections.ConfigDict()
  # jax.distributed.initialize, called by jaxopd.main before any device is used (jaxopd.mesh.distributed_args):
  c.distributed.enabled = "auto"           # auto (when config/env name several processes) | true | false
  c.distributed.coordinator_address = ""   # host:port of process 0; "" = $JAX_COORDINATOR_ADDRESS or auto-detect
  c.distributed.num_processes = 0          # 0 = $JAX_NUM_PROCESSES or auto-detect (TPU pod, SLURM)
  c.distributed.process_id = -1            # -1 = $JAX_PROCESS_ID or auto-detect

  c.eval_every = 50              # steps between evaluations; 0 = only at the end
  c.eval_batches = 4             # batches of the eval split per evaluation
  c.log_every = 10               # steps between metric lines in metrics.jsonl / TensorBoard
  c.progress = True              # progress bar on stderr (process 0)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100       # steps between checkpoints; 0 = only final / on SIGTERM
  c.checkpoint.max_to_keep = 3   # checkpoints kept
  c.checkpoint.async_save = True # write in the background while training goes on
  # Fields (or prefixes) that may differ from the run's config.json when it resumes, beyond the
  # always-allowed ones (jaxopd.logs.RESUMABLE: length, cadence, evaluation, mesh...); "*" = any.
  c.resume_changes = ()
  return c


def _check(cond: bool, field: str, value, why: str):
  if not cond:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> dict:
  """Checks the trainer fields; returns resolved facts (mesh shape, dp size, local batch)."""
  _check(isinstance(c.seed, int), "seed", c.seed, "must be an int")
  _check(c.total_steps > 0, "total_steps", c.total_steps, "must be positive")
  _check(c.batch_size > 0, "batch_size", c.batch_size, "must be positive")
  _check(c.grad_accum > 0, "grad_accum", c.grad_accum, "must be positive")
  _check(c.batch_size % c.grad_accum == 0, "grad_accum", c.grad_accum,
         f"must divide batch_size={c.batch_size}")
  _check(c.seq_len > 1, "seq_len", c.seq_len, "must be at least 2")
  try:
    for f in ("dtype", "param_dtype", "matmul_dtype", "attention", "attention_chunk", "remat", "scan_layers"):
      _check(f not in c.model, f"model.{f}", c.model.get(f), f"per role: config.models.<role>.{f}")
    model = ModelConfig.from_config(c.model)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from None
  table.check_fields(c)
  if "data" in c and "over_length" in c.data:
    _check(c.data.over_length in OVER_LENGTH_POLICIES, "data.over_length", c.data.over_length,
           f"must be one of {OVER_LENGTH_POLICIES}")

  o = c.optim
  _check(o.name in ("adamw", "rmsprop"), "optim.name", o.name, "must be adamw or rmsprop")
  _check(o.lr > 0, "optim.lr", o.lr, "must be positive")
  _check(o.schedule in ("constant", "cosine"), "optim.schedule", o.schedule, "must be constant or cosine")
  _check(0 <= o.warmup_steps <= c.total_steps, "optim.warmup_steps", o.warmup_steps,
         f"must be in [0, total_steps={c.total_steps}]")
  _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
  _check(0.0 <= o.b1 < 1.0, "optim.b1", o.b1, "must be in [0, 1)")
  _check(0.0 <= o.b2 < 1.0, "optim.b2", o.b2, "must be in [0, 1)")
  _check(o.eps > 0, "optim.eps", o.eps, "must be positive")
  _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
  _check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 disables)")
  mu = o.get("mu_dtype", "float32")
  _check(mu in optim.MU_DTYPES, "optim.mu_dtype", mu, f"must be one of {optim.MU_DTYPES}")
  for name, g in o.groups.items():
    extra = set(g.keys()) - {"lr", "weight_decay"}
    _check(not extra, f"optim.groups.{name}", dict(g), f"unknown keys {sorted(extra)} (lr, weight_decay)")
    if "lr" in g:
      _check(g.lr > 0, f"optim.groups.{name}.lr", g.lr, "must be positive")
    if "weight_decay" in g:
      _check(g.weight_decay >= 0, f"optim.groups.{name}.weight_decay", g.weight_decay, "must be >= 0")

  try:
    rules = mesh_lib.rules_from_config(c.mesh.rules)
    n = num_devices if c.mesh.num_devices in (0, -1) else c.mesh.num_devices
    _check(0 < n <= num_devices, "mesh.num_devices", c.mesh.num_devices,
           f"must be in [1, {num_devices}] (visible devices) or 0 for all")
    shape = mesh_lib.resolve_mesh_shape(c.mesh.shape, n)
  except mesh_lib.MeshError as e:
    raise ConfigError(str(e)) from None
  rule_table = dict(rules)
  batch_axes = rule_table.get("batch")
  batch_axes = () if batch_axes is None else (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))
  dp = 1
  for a in batch_axes:
    dp *= shape[mesh_lib.MESH_AXES.index(a)]
  micro = c.batch_size // c.grad_accum
  _check(micro % dp == 0, "batch_size", c.batch_size,
         f"the microbatch batch_size/grad_accum={micro} is not divisible by the data-parallel size {dp} "
         f"(mesh {dict(zip(mesh_lib.MESH_AXES, shape))}, batch over {batch_axes})")
  _check(c.batch_size % process_count == 0, "batch_size", c.batch_size,
         f"must divide over {process_count} processes")
  _check(dp % process_count == 0, "mesh.shape", tuple(c.mesh.shape),
         f"the data-parallel size {dp} must be a multiple of the {process_count} processes "
         f"(each process feeds its own rows of the batch)")

  _check(c.eval_every >= 0, "eval_every", c.eval_every, "must be >= 0")
  _check(c.eval_batches >= 0, "eval_batches", c.eval_batches, "must be >= 0")
  _check(c.log_every > 0, "log_every", c.log_every, "must be positive")
  _check(c.checkpoint.every >= 0, "checkpoint.every", c.checkpoint.every, "must be >= 0")
  _check(c.checkpoint.max_to_keep > 0, "checkpoint.max_to_keep", c.checkpoint.max_to_keep, "must be positive")
  return dict(model=model, rules=rules, mesh_shape=shape, num_devices=n, dp=dp,
              local_batch=c.batch_size // process_count)
