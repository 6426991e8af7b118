"""The one sharded train loop every experiment plugs into.

``run(config, workdir, experiment)``:
config -> validate -> mesh -> sharded state (eval_shape, then jit with
out_shardings) -> resume (or load the model table's sources) -> grain iterator -> jitted train step
(explicit in/out shardings, donated state, gradient accumulation by scan) ->
metrics / eval / checkpoints (periodic, final, SIGTERM).

Non-finite loss or gradient: the step keeps the previous parameters and the
run stops with a :class:`TrainingError` naming the step; no checkpoint is
written after it, so the last good one stays the latest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from jaxopd import checkpoint as ckpt_lib
from jaxopd import config as config_lib
from jaxopd import logs
from jaxopd import mesh as mesh_lib
from jaxopd import optim
from jaxopd import paths
from jaxopd import runtime
from jaxopd.data.pipeline import SmallDatasetError
from jaxopd.errors import TrainingError
from jaxopd.experiment import DataShard, Experiment, LossOutput
from jaxopd.models import Transformer, lora, table


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _split_models(models: dict, what: str, lora_roles=()):
  """``(graphdef, trained params, frozen bases)`` of a dict of modules: the roles in
  ``lora_roles`` train their adapters only, their other parameters are the bases."""
  lora_roles = set(lora_roles)
  trained = nnx.All(nnx.Param, lambda path, x: path[0] not in lora_roles or isinstance(x, lora.LoRAParam))
  graphdef, params, bases, rest = nnx.split(models, trained, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise TypeError(f"{what} models hold non-Param state ({rest}); only nnx.Param is supported")
  return graphdef, params, bases


def _metric_parts(metrics, count) -> dict:
  """Every metric as (numerator, denominator) sums (see LossOutput)."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, (tuple, list)):
      out[k] = (jnp.asarray(v[0], jnp.float32), jnp.asarray(v[1], jnp.float32))
    else:
      out[k] = (jnp.asarray(v, jnp.float32), jnp.asarray(count, jnp.float32))
  return out


def _sum_microbatches(fn, batch, accum: int, carry):
  """``fn(microbatch, i, carry) -> (sums, carry)`` over the ``accum`` microbatches of ``batch``
  in a scan, the sums added up and ``carry`` threaded in order; returns ``(sums, carry)``.
  Microbatch i is rows i, i+A, ... (keeps shards local)."""
  micro = jax.tree.map(lambda x: _split_rows(x, accum), batch)
  take = lambda i: jax.tree.map(lambda x: x[i], micro)

  def body(acc, i):
    total, carry = acc
    sums, carry = fn(take(i), i, carry)
    return (jax.tree.map(jnp.add, total, sums), carry), None
  shapes = jax.eval_shape(fn, take(0), 0, carry)[0]
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.lax.scan(body, (zero, carry), jnp.arange(accum))[0]


def _split_rows(x, n: int):
  """``[B, ...] -> [n, B/n, ...]``: part i holds rows i, i + n, ... (keeps shards local)."""
  x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
  return mesh_lib.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def _ratio(num, den):
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


@dataclasses.dataclass
class Trainer:
  """Builds the sharded state and the jitted step for one config and experiment.

  The models are the config's table (``config.models``, :mod:`jaxopd.models.table`),
  resolved once (``roles``; pass the run's pinned resolution on resume) and
  checked against the roles the experiment declares; trainable roles and the
  experiment's heads form ``state["params"]``, frozen roles ``frozen``.
  """
  config: Any
  experiment: Experiment
  mesh: Any
  rules: tuple
  roles: dict | None = None

  def __post_init__(self):
    c = self.config
    if self.roles is None:
      self.roles = table.resolve(c)
    table.check_roles(self.roles, self.experiment.roles)
    for name, r in self.roles.items():
      if c.seq_len > r.arch.max_len:
        raise config_lib.ConfigError(f"config.seq_len={c.seq_len}: exceeds the max_len={r.arch.max_len} of "
                                     f"config.models.{name} ({r.source.spec()})")
    key = jax.random.PRNGKey(c.seed)
    self.model_key, self.step_key = jax.random.split(key)
    # LoRA roles train their adapters; their bases are frozen, and serve the base:ROLE aliases.
    self.lora_roles = [n for n, r in self.roles.items() if r.trainable and r.arch.lora_rank]
    self.aliases = {n: r.source.model for n, r in self.roles.items() if r.source.kind == "base"}
    trainable, frozen = nnx.eval_shape(lambda: self.make_models(self.model_key))
    self.heads = sorted(set(trainable) - set(self.roles))
    self.gd_params = _split_models(trainable, "trainable", self.lora_roles)[0]
    self.gd_frozen = _split_models(frozen, "frozen")[0]
    self.frozen_roles = list(frozen)
    self.gd_alias = {n: nnx.split(nnx.eval_shape(lambda r=r: Transformer(r.arch, nnx.Rngs(0))))[0]
                     for n, r in self.roles.items() if n in self.aliases}
    self.snapshots = dict(self.experiment.snapshots)
    self.snap_lora = {n: s for n, s in self.snapshots.items() if s in self.lora_roles}
    self.gd_snap = _split_models({n: trainable[s] for n, s in self.snapshots.items()}, "snapshot", self.snap_lora)[0]
    self.mu = int(self.experiment.updates_per_rollout)
    self.tx, self.schedules = optim.make_optimizer(c.optim, c.total_steps * self.mu, list(trainable))
    abstract_state, abstract_frozen = jax.eval_shape(self._init)
    self.replicated_fallbacks: list = []
    self.state_shardings = mesh_lib.tree_shardings(abstract_state, self.mesh, self.rules, self.replicated_fallbacks)
    self.frozen_shardings = mesh_lib.tree_shardings(abstract_frozen, self.mesh, self.rules, self.replicated_fallbacks)
    self.abstract_state = _with_shardings(abstract_state, self.state_shardings)
    self.abstract_frozen = _with_shardings(abstract_frozen, self.frozen_shardings)
    self._train_step = None
    self._eval_step = None

  def make_models(self, rng):
    """``(trainable, frozen)`` dicts of modules: each role a Transformer of its architecture
    (random weights; sources are loaded afterwards), plus the experiment's heads.

    One role and no heads: the role is initialised with ``rng`` itself; otherwise
    ``split(rng, n_roles + 1)``: role i (the experiment's order) gets key i, the heads
    the last one."""
    names = list(self.experiment.roles)
    single = len(names) == 1 and self.experiment.init_heads is None
    keys = [rng] if single else list(jax.random.split(rng, len(names) + 1))
    models = {n: Transformer(self.roles[n].arch, nnx.Rngs(params=k)) for n, k in zip(names, keys)
              if n not in self.aliases}
    trainable = {n: m for n, m in models.items() if self.roles[n].trainable}
    frozen = {n: m for n, m in models.items() if not self.roles[n].trainable}
    if self.experiment.init_heads is not None:
      heads = self.experiment.init_heads(keys[-1])
      clash = sorted(set(heads) & set(models))
      if clash:
        raise TypeError(f"init_heads: {clash[0]!r} is also a model role")
      trainable.update(heads)
    return trainable, frozen

  # --- state -----------------------------------------------------------------
  def _init(self):
    trainable, frozen = self.make_models(self.model_key)
    _, params, bases = _split_models(trainable, "trainable", self.lora_roles)
    frozen_state = nnx.merge_state(_split_models(frozen, "frozen")[1], bases)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": self.tx.init(params), "rng": self.step_key}
    if self.experiment.init_state is not None:
      state["method"] = self.experiment.init_state()
    if self.snapshots:
      state["snapshots"] = {n: params[src] for n, src in self.snapshots.items()}
      state["resets"] = jnp.zeros((), jnp.int32)
    return state, frozen_state

  def init(self):
    """Sharded state created in place: no full copy on one device first."""
    with jax.set_mesh(self.mesh), mesh_lib.use_rules(self.rules):
      return jax.jit(self._init, out_shardings=(self.state_shardings, self.frozen_shardings))()

  def init_frozen(self):
    """The frozen models alone (a resume: the trainable state comes from the checkpoint, so it is
    not built; XLA drops the unused part of the init)."""
    with jax.set_mesh(self.mesh), mesh_lib.use_rules(self.rules):
      return jax.jit(lambda: self._init()[1], out_shardings=self.frozen_shardings)()

  def batch_sharding(self, batch):
    def f(x):
      spec = mesh_lib.logical_to_spec(("batch",) + (None,) * (np.ndim(x) - 1), self.rules)
      return NamedSharding(self.mesh, spec)
    return jax.tree.map(f, batch)

  def to_global(self, local_batch: dict, global_batch_size: int):
    """Per-process numpy batch -> global arrays sharded over the batch axes."""
    shardings = self.batch_sharding(local_batch)
    def f(x, s):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(s, x, (global_batch_size,) + x.shape[1:])
    return jax.tree.map(f, dict(local_batch), shardings)

  # --- the step ----------------------------------------------------------------
  def _merge(self, params, frozen, snapshots=None) -> dict:
    """One dict of modules, every role, head and snapshot by name, from their arrays (``frozen``:
    the frozen roles' and the LoRA roles' base parameters)."""
    part = lambda names: nnx.State({n: frozen[n] for n in names})
    out = {**nnx.merge(self.gd_params, params, part(self.lora_roles)),
           **nnx.merge(self.gd_frozen, part(self.frozen_roles))}
    out.update({n: nnx.merge(self.gd_alias[n], frozen[owner]) for n, owner in self.aliases.items()})
    if self.snapshots:
      bases = nnx.State({n: frozen[s] for n, s in self.snap_lora.items()})
      out.update(nnx.merge(self.gd_snap, jax.lax.stop_gradient(snapshots), bases))
    return out

  def _rollout(self, params, frozen, snaps, batch, rng, method_state):
    models = self._merge(jax.lax.stop_gradient(params), frozen, snaps)
    if self.experiment.init_state is not None:
      return self.experiment.rollout(models, batch, rng, method_state)
    return self.experiment.rollout(models, batch, rng), method_state

  def _microbatch_sums(self, params, frozen, snaps, batch, rng, method_state=None, rollout=True):
    """Gradient and metric *sums* over one microbatch (and the method state after it);
    ``rollout``: run the experiment's rollout on it first (when it has one)."""
    if rollout and self.experiment.rollout is not None:
      rng, r_rng = jax.random.split(rng)
      batch, method_state = self._rollout(params, frozen, snaps, batch, r_rng, method_state)

    def loss_of(p):
      out = self.experiment.loss_fn(self._merge(p, frozen, snaps), batch, rng)
      if not isinstance(out, LossOutput):
        out = LossOutput(*out)
      return out.loss, out

    (_, out), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    parts = _metric_parts(out.metrics, out.count)
    return grads, jnp.asarray(out.loss, jnp.float32), jnp.asarray(out.count, jnp.float32), parts, method_state

  def _update(self, params, opt_state, frozen, snaps, batch, rng, method_state, rollout):
    """One optimizer update on ``batch`` (``grad_accum`` microbatches): ``(params, opt_state,
    method_state, parts, loss, grad_norm, count, finite)``."""
    accum = self.config.grad_accum
    if accum == 1:
      grads, loss, count, parts, method_state = self._microbatch_sums(params, frozen, snaps, batch, rng,
                                                                      method_state, rollout)
    else:
      def one(mb, i, method_state):      # the method state passes through the microbatches in order
        *out, method_state = self._microbatch_sums(params, frozen, snaps, mb, jax.random.fold_in(rng, i),
                                                   method_state, rollout)
        return tuple(out), method_state
      (grads, loss, count, parts), method_state = _sum_microbatches(one, batch, accum, method_state)
    # count 0: nothing to learn from (GRPO's dynamic sampling dropped every group): no update.
    empty = count == 0
    safe = jnp.where(empty, 1.0, count)
    grads = jax.tree.map(lambda g: g / safe, grads)
    loss = loss / safe
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = self.tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(empty, a, b), old, new)
    return (keep(params, new_params), keep(opt_state, new_opt), method_state, parts, loss, grad_norm, count,
            finite)

  def train_step(self, state, frozen, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    if self.experiment.rollout is not None:   # the rollout sees the step (per row, so microbatches split it)
      b = jax.tree.leaves(batch)[0].shape[0]
      batch = {**batch, "step": jnp.full((b,), state["step"], jnp.int32)}
    snaps = state.get("snapshots")
    method_state = state.get("method")
    if self.mu == 1:
      params, opt_state, method_state, parts, loss, grad_norm, count, finite = self._update(
          state["params"], state["opt_state"], frozen, snaps, batch, rng, method_state, rollout=True)
    else:   # one rollout over the whole batch, then mu updates on its minibatches (rows i, i + mu, ...)
      rng, r_rng = jax.random.split(rng)
      rolled, method_state = self._rollout(state["params"], frozen, snaps, batch, r_rng, method_state)

      def one(carry, i):
        params, opt_state, method_state = carry
        mb = jax.tree.map(lambda x: x[i], minibatches)
        params, opt_state, method_state, *out = self._update(params, opt_state, frozen, snaps, mb,
                                                             jax.random.fold_in(rng, i), method_state, False)
        return (params, opt_state, method_state), tuple(out)
      minibatches = jax.tree.map(lambda x: _split_rows(x, self.mu), rolled)
      (params, opt_state, method_state), (parts, losses, norms, counts, finites) = jax.lax.scan(
          one, (state["params"], state["opt_state"], method_state), jnp.arange(self.mu))
      parts = jax.tree.map(lambda x: jnp.sum(x, axis=0), parts)
      loss, grad_norm, count, finite = jnp.mean(losses), jnp.mean(norms), jnp.sum(counts), jnp.all(finites)
    metrics = {k: _ratio(n, d) for k, (n, d) in parts.items()}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
    if "method" in state:
      new_state["method"] = method_state
    if self.snapshots:
      new_state["snapshots"], new_state["resets"] = snaps, state["resets"]
      if self.experiment.reset is not None:
        new_state = self._maybe_reset(new_state, metrics)
      metrics["resets"] = new_state["resets"]
    new_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
    metrics.update(loss=loss, grad_norm=grad_norm, count=count, finite=finite)
    return new_state, metrics

  def _maybe_reset(self, state, metrics):
    """ProRL's reset: snapshots <- their roles' parameters, the optimizer state re-initialised."""
    do = jnp.asarray(self.experiment.reset(state["step"], metrics), bool)
    params = state["params"]

    def reset(snaps, opt_state):     # only on a reset step: no per-step select over the state
      del snaps, opt_state
      return {n: params[src] for n, src in self.snapshots.items()}, self.tx.init(params)
    snaps, opt_state = jax.lax.cond(do, reset, lambda a, b: (a, b), state["snapshots"], state["opt_state"])
    return {**state, "snapshots": snaps, "opt_state": opt_state, "resets": state["resets"] + do.astype(jnp.int32)}

  def eval_sums(self, state, frozen, batch):
    """Metric ``(sum, count)`` parts of a global eval batch, in the training microbatches
    (``grad_accum`` of them, summed), so evaluation needs no more activation memory than a step."""
    models = self._merge(state["params"], frozen, state.get("snapshots"))
    rng = jax.random.fold_in(state["rng"], 2**31 - 1)   # a key no train step uses

    def sums(mb):
      out = self.experiment.loss_fn(models, mb, rng)
      if not isinstance(out, LossOutput):
        out = LossOutput(*out)
      parts = _metric_parts(out.metrics, out.count)
      parts["loss"] = (jnp.asarray(out.loss, jnp.float32), jnp.asarray(out.count, jnp.float32))
      return parts
    accum = self.config.grad_accum
    if accum == 1:
      return sums(batch)
    return _sum_microbatches(lambda mb, i, carry: (sums(mb), carry), batch, accum, None)[0]

  def compiled_train_step(self, example_batch):
    if self._train_step is None:
      self._train_step = jax.jit(
          self.train_step,
          in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding(example_batch)),
          out_shardings=(self.state_shardings, None),
          donate_argnums=(0,))
    return self._train_step

  def compiled_eval_step(self, example_batch):
    if self._eval_step is None:
      self._eval_step = jax.jit(
          self.eval_sums,
          in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding(example_batch)))
    return self._eval_step

  def models(self, state, frozen) -> dict:
    """The modules of a state, every role, head and snapshot by name (for host-side evaluation)."""
    return self._merge(state["params"], frozen, state.get("snapshots"))

  def load_sources(self, state, frozen, frozen_only: bool = False):
    """Loads every role whose source is ``hf:`` or ``run:`` into the state, each device
    reading its own slices; ``frozen_only`` (on resume): just the frozen roles, which are
    not checkpointed. Returns ``(state, frozen)``."""
    for name, r in self.roles.items():
      whole = r.trainable and name not in self.lora_roles     # else frozen: a frozen role or a LoRA base
      if r.source.kind in ("random", "base") or (frozen_only and whole):
        continue
      tree = state["params"] if whole else frozen
      abstract = (self.abstract_state["params"] if whole else self.abstract_frozen)[name]
      tree[name] = table.load(r, abstract)
    if not frozen_only:    # a snapshot starts as its role's loaded parameters (on resume: the checkpoint's)
      for name, src in self.snapshots.items():
        state["snapshots"][name] = jax.tree.map(lambda x: x.copy(), state["params"][src])
    return state, frozen


def _host(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class RunResult:
  """What :func:`run` returns: the final ``step``; the step it ``resumed_from`` (None: a fresh
  run); the last ``train`` and ``eval`` metrics; ``preempted`` ("SIGTERM" or "SIGINT" when a
  signal stopped it after checkpointing, else ""); the final ``state``, the frozen models'
  arrays ``frozen`` and the ``trainer`` (``trainer.models(state, frozen)``: the modules by role)."""
  step: int
  resumed_from: int | None
  train: dict = dataclasses.field(default_factory=dict)
  eval: dict = dataclasses.field(default_factory=dict)
  preempted: str = ""
  state: Any = None
  frozen: Any = None
  trainer: Any = None


def run(config, workdir: str, experiment: Experiment) -> RunResult:
  """Trains ``experiment`` under ``config`` in ``workdir`` (a local path or a URL such as
  ``gs://bucket/run``: :mod:`jaxopd.paths`); resumes if a checkpoint is there. One run per
  workdir: a second is refused (:class:`jaxopd.runtime.WorkdirBusy`)."""
  c = config
  mesh_lib.maybe_initialize_distributed(c.distributed)
  facts = config_lib.validate(c, len(jax.devices()), jax.process_count())
  mesh = mesh_lib.make_mesh(facts["mesh_shape"], facts["num_devices"])
  rules = facts["rules"]
  main = logs.is_main_process()
  workdir = paths.resolve(workdir)
  # One run per workdir (process 0 holds the lock; cloud storage has no locks: not taken there).
  # An existing workdir is locked before it is read (a live run may be rotating its checkpoints);
  # a new one only after the checks, so a refused config creates nothing.
  local = main and not paths.is_remote(workdir)
  lock = runtime.WorkdirLock(workdir) if local and paths.isdir(workdir) else None
  try:
    resumed_from = ckpt_lib.latest_step(workdir)
    recorded = table.run_record(workdir) if resumed_from is not None else {}
    roles = table.resolve(c, pinned=recorded)
    trainer = Trainer(c, experiment, mesh, rules, roles)
    rec = table.add_heads(table.record(c, roles), trainer.heads)
    changed = []
    if resumed_from is not None:
      table.check_resume(recorded, rec, workdir)     # before anything is written
      changed = logs.check_resume_config(workdir, c)
    if main:
      print(table.describe(roles), flush=True)
    if local and lock is None:
      lock = runtime.WorkdirLock(workdir)
    if main and paths.is_remote(workdir):
      print(f"note: {workdir} is in cloud storage, which has no locks: nothing stops a second run on it",
            flush=True)
    return _train(c, experiment, workdir, trainer, rec, resumed_from, changed, mesh, rules, facts, main)
  finally:
    if lock is not None:
      lock.release()


def _train(c, experiment, workdir, trainer, rec, resumed_from, changed, mesh, rules, facts, main) -> RunResult:
  """The body of :func:`run` once the checks passed and the workdir is locked."""
  params_fallbacks = [f for f in trainer.replicated_fallbacks if "opt_state" not in f[0]]
  if params_fallbacks and main:
    print(f"sharding: {len(params_fallbacks)} parameter(s) have a dimension the mesh does not divide and "
          f"are replicated on it: " + ", ".join(f"{p} {s}" for p, s, _ in params_fallbacks[:4])
          + (" ..." if len(params_fallbacks) > 4 else ""))

  shard = DataShard(seed=c.seed, process_index=jax.process_index(), process_count=jax.process_count(),
                    local_batch=facts["local_batch"])
  data_iter = experiment.train_data(shard)
  eval_shard = shard._replace(seed=c.seed + 1)
  _check_eval_data(c, experiment, eval_shard)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), c.checkpoint.max_to_keep,
                               c.checkpoint.async_save)
  logs.write_config(workdir, c, main)
  if resumed_from is not None:
    if changed and main:
      print(f"resuming in {workdir}: config fields changed since the checkpoint: {', '.join(changed)}")
    state, resumed_from = runtime.restore_intact(ckpt, resumed_from, trainer.abstract_state, data_iter, main)
    frozen = trainer.init_frozen()   # frozen models are not checkpointed: re-loaded from their pinned sources
    state, frozen = trainer.load_sources(state, frozen, frozen_only=True)
  else:
    if main:
      table.write_record(workdir, rec)
    state, frozen = trainer.init()
    state, frozen = trainer.load_sources(state, frozen)
  logger = logs.MetricLogger(workdir, main, resume_step=resumed_from)
  if main and resumed_from is not None:
    dropped = [f"{n} {what}" for n, what in ((logger.dropped, "metric records"), (logger.dropped_tb, "TensorBoard events"))
               if n]
    print(f"resumed from step {resumed_from} in {workdir}"
          + (f" ({' and '.join(dropped)} after it dropped)" if dropped else ""))

  start = int(jax.device_get(state["step"]))
  step = start
  summary = RunResult(step=start, resumed_from=resumed_from)
  step_fn = None
  pending = None          # (step, device metrics, tokens, t_dispatch) of the last dispatched step
  last_log = (time.perf_counter(), 0)
  tokens_since = 0
  rate_name = "tokens_per_s"
  bar = _progress(c, start, main)

  def flush():
    nonlocal pending, last_log, tokens_since
    if pending is None:
      return
    step, dev_metrics, ntok = pending
    pending = None
    m = _host(dev_metrics)
    fault = experiment.host_fault() if experiment.host_fault is not None else None
    if fault or not m.pop("finite"):
      ckpt.wait()
      last = ckpt.latest_step()
      why = (f"{fault}; this step is not saved" if fault else
             f"non-finite loss={m['loss']} or grad_norm={m['grad_norm']}; the update was not applied")
      raise TrainingError(
          f"step {step}: {why} and the run stops. " + (f"Last good checkpoint: step {last} in {ckpt.directory}"
                                                      if last is not None else "No checkpoint was written before it"))
    tokens_since += ntok
    summary.train = m
    if step % c.log_every == 0 or step == c.total_steps:
      now = time.perf_counter()
      dt = now - last_log[0]
      m[rate_name] = tokens_since / dt if dt > 0 else float("nan")
      for name, sched in trainer.schedules.items():
        m[f"lr/{name}" if len(trainer.schedules) > 1 else "lr"] = float(sched((step - 1) * trainer.mu))
      logger.write(step, "train", m)
      last_log, tokens_since = (now, step), 0
      if bar is not None:
        bar.set_postfix({"loss": f"{m['loss']:.4f}", rate_name: f"{m[rate_name]:.1f}"})

  try:
    with jax.set_mesh(mesh), mesh_lib.use_rules(rules), runtime.Preemption() as preempt:
      for step in range(start + 1, c.total_steps + 1):
        local = next(data_iter)
        batch = trainer.to_global(local, c.batch_size)
        if step_fn is None:
          step_fn = trainer.compiled_train_step(batch)
        state, dev_metrics = step_fn(state, frozen, batch)
        flush()                               # the previous step's metrics, while this one runs
        # Throughput in input tokens; a rollout method's host batch holds prompts, so examples/s.
        if "tokens" in local and experiment.rollout is None:
          rate_name, count = "tokens_per_s", int(np.prod(batch["tokens"].shape))
        else:
          rate_name, count = "examples_per_s", c.batch_size
        pending = (step, dev_metrics, count)
        if bar is not None:
          bar.update(1)
        do_eval = (c.eval_every and step % c.eval_every == 0) or step == c.total_steps
        do_ckpt = (c.checkpoint.every and step % c.checkpoint.every == 0) or step == c.total_steps
        stop = preempt.check(step)
        if do_eval or do_ckpt or stop:
          flush()
        if do_eval:
          summary.eval = _evaluate(trainer, experiment, state, frozen, eval_shard, c, step, logger)
        if do_ckpt or stop:
          ckpt.save(state, data_iter, force=True)
          logger.flush()
        if stop:
          summary.preempted = preempt.signal
          if main:
            print(f"{preempt.signal}: checkpoint saved at step {step}; stopping (re-run the command to resume)",
                  flush=True)
          break
      flush()
  except BaseException as e:   # a fault or signal mid-run: finish the checkpoint being written (the last one whole)
    for close in (ckpt.close, logger.close):
      try:
        close()
      except BaseException:    # (a second Ctrl-C may land in orbax's wait too)
        pass
    if isinstance(e, KeyboardInterrupt):   # a second Ctrl-C in the loop: say what was saved
      last = ckpt_lib.latest_complete(ckpt.directory)
      raise runtime.Interrupted("SIGINT", f"interrupted (a second Ctrl-C) at step {step}; " + (
          f"the latest complete checkpoint is step {last} in {ckpt.directory}: re-run the command to resume"
          if last is not None else "no checkpoint of this run was complete: re-running starts afresh")) from None
    raise
  summary.step = int(jax.device_get(state["step"]))
  if start == c.total_steps:
    if main:
      print(f"{workdir}: already trained to total_steps={c.total_steps}; evaluating the final state")
    with jax.set_mesh(mesh), mesh_lib.use_rules(rules):
      summary.eval = _evaluate(trainer, experiment, state, frozen, eval_shard, c, start, None)
  ckpt.close()
  logger.close()
  if bar is not None:
    bar.close()
  summary.state, summary.frozen, summary.trainer = state, frozen, trainer
  return summary


def _check_eval_data(c, experiment, shard) -> None:
  """An evaluation set too small for one batch is a ConfigError before anything compiles (it
  would otherwise surface at the first evaluation, after training)."""
  if experiment.eval_data is None or not c.eval_batches:
    return
  try:
    experiment.eval_data(shard)
  except SmallDatasetError as e:
    d = c.get("data") or {}
    files = d.get("files") or {}
    source = (f"config.data.files.eval={files.get('eval')!r}" if d.get("task") == "files" and files.get("eval")
              else "the evaluation set")
    raise config_lib.ConfigError(
        f"{source}: {e}, config.batch_size={c.batch_size}: give it more records (the count of those kept is "
        f"printed above), lower config.batch_size, or set config.eval_batches=0") from None


def _evaluate(trainer, experiment, state, frozen, shard, c, step, logger) -> dict:
  out: dict[str, float] = {}
  if experiment.eval_data is not None and c.eval_batches:
    sums = None
    n = 0
    for local in experiment.eval_data(shard):
      if n == c.eval_batches:
        break
      batch = trainer.to_global(local, c.batch_size)
      parts = trainer.compiled_eval_step(batch)(state, frozen, batch)
      sums = parts if sums is None else jax.tree.map(jnp.add, sums, parts)
      n += 1
    if sums is not None:
      out.update({k: float(_ratio(*v)) for k, v in jax.device_get(sums).items()})
  if experiment.evaluate is not None:
    out.update(experiment.evaluate(trainer.models(state, frozen), step))
  if out and logger is not None:
    logger.write(step, "eval", out)
  return out


def _progress(c, start, main):
  if not (c.progress and main):
    return None
  from tqdm import tqdm
  return tqdm(total=c.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
