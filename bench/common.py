"""Helpers shared by the benchmarks: the contention check (how many CPUs other
processes used while a benchmark ran: the machine is shared, so timings taken
under load are flagged, not trusted), the single-device config and compiled
train step the step benchmarks share, timing (a function; a donated train
step; several donated steps interleaved), XLA's FLOP count and the machine's
float32 matmul peak; the tiny mode the tests run the scripts in."""

import os
import time

# JAXOPD_BENCH=tiny: every script runs at tiny sizes, one timed step (tests/test_bench.py keeps them running).
TINY = os.environ.get("JAXOPD_BENCH") == "tiny"


def pick(real, tiny):
  """``real``, or ``tiny`` when the scripts run in their tiny mode (``JAXOPD_BENCH=tiny``)."""
  return tiny if TINY else real


def cpu_snapshot():
  """(busy CPU seconds of the whole machine, this process's CPU seconds, wall time), or None."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  tick = os.sysconf("SC_CLK_TCK")
  busy = (sum(v[:8]) - v[3] - v[4]) / tick    # all but idle and iowait
  t = os.times()
  return busy, t.user + t.system, time.perf_counter()


def other_load(start):
  """Average number of CPUs used by other processes since ``start`` (a :func:`cpu_snapshot`)."""
  end = cpu_snapshot()
  if start is None or end is None:
    return None
  return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def time_donated_step(compiled, state, frozen, batch, warmup: int, repeats: int):
  """Runs a compiled train step (state donated, so it is threaded through) ``warmup``
  times, then times ``repeats`` calls with ``block_until_ready``.
  Returns (median seconds, all times, final state, last metrics)."""
  import statistics

  import jax
  for _ in range(warmup):
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts, state, metrics


def time_interleaved(steps: dict, rounds: int, warmup: int, repeats: int) -> dict:
  """Times several compiled train steps in turn: every step called ``warmup`` times untimed, then
  ``rounds`` rounds, each calling every step ``repeats`` times timed (``block_until_ready``; the
  state is donated, so it is threaded through), so that load changes on a shared machine reach
  them all alike. ``steps``: name -> ``dict(fn, state, frozen, batch)``. Returns name ->
  ``{"median": s, "ts": every timed call, "losses": the losses of the warm-up and first round's
  calls, in order}``."""
  import statistics

  import jax
  out = {n: {"ts": [], "losses": []} for n in steps}
  for rnd in range(rounds):
    for n, s in steps.items():
      for i in range(warmup * (rnd == 0) + repeats):
        t0 = time.perf_counter()
        s["state"], metrics = s["fn"](s["state"], s["frozen"], s["batch"])
        jax.block_until_ready((s["state"], metrics))
        if rnd > 0 or i >= warmup:
          out[n]["ts"].append(time.perf_counter() - t0)
        if rnd == 0:
          out[n]["losses"].append(float(metrics["loss"]))
  for r in out.values():
    r["median"] = statistics.median(r["ts"])
  return out


def single_device_config(model_cfg, batch_size: int, seq_len: int, lr: float, roles=None):
  """A base config for one device running ``model_cfg`` (a jaxopd ModelConfig) in each of
  ``roles`` (``name -> trainable``; default a trainable policy), random-initialised."""
  import ml_collections
  from jaxopd import config as config_lib
  from jaxopd.models import table
  c = config_lib.base_config()
  c.batch_size, c.seq_len, c.grad_accum, c.total_steps = batch_size, seq_len, 1, 1_000_000
  c.model = table.arch_block(model_cfg)
  c.models = ml_collections.ConfigDict({
      n: table.role(trainable=t, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
      for n, t in (roles or {"policy": True}).items()})
  c.optim.lr = lr
  c.mesh.shape = (1, 1, 1)
  c.mesh.num_devices = 1
  c.progress = False
  return c


def compile_train_step(config, experiment, local_batch):
  """The trainer's jitted step for ``config``'s mesh, compiled ahead of time:
  ``(compiled, state, frozen, global batch, compile seconds, facts)``."""
  import jax
  from jaxopd import config as config_lib
  from jaxopd import mesh as mesh_lib
  from jaxopd.train import Trainer
  facts = config_lib.validate(config, len(jax.devices()), jax.process_count())
  mesh = mesh_lib.make_mesh(facts["mesh_shape"], facts["num_devices"])
  trainer = Trainer(config, experiment, mesh, facts["rules"])
  with jax.set_mesh(mesh), mesh_lib.use_rules(facts["rules"]):
    batch = trainer.to_global(local_batch, config.batch_size)
    state, frozen = trainer.init()
    t0 = time.perf_counter()
    compiled = trainer.compiled_train_step(batch).lower(state, frozen, batch).compile()
  return compiled, state, frozen, batch, time.perf_counter() - t0, facts


def trainer_step(config, method: str) -> dict:
  """The real trainer's step for ``config`` (one CPU device) with the experiment ``method`` builds,
  compiled ahead of time (:func:`compile_train_step`) on that experiment's first batch:
  ``dict(fn, state, frozen, batch, compile_s, model_cfg)`` (``fn(state, frozen, batch) -> (state,
  metrics)``, the state donated)."""
  from jaxopd import methods
  from jaxopd.experiment import DataShard
  from jaxopd.models import table
  exp = methods.get(method).build(config)
  local = next(exp.train_data(DataShard(seed=0, process_index=0, process_count=1, local_batch=config.batch_size)))
  fn, state, frozen, batch, compile_s, _ = compile_train_step(config, exp, local)
  return dict(fn=fn, state=state, frozen=frozen, batch=batch, compile_s=compile_s,
              model_cfg=table.arch(config, "policy"))


def timed(fn, *args, warmup: int, repeats: int) -> float:
  """Median seconds of ``fn(*args)`` (outputs blocked on) after ``warmup`` calls."""
  import statistics

  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def xla_flops(compiled):
  """FLOPs of a compiled computation by XLA's cost analysis, or None."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend/version has it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def matmul_peak(rows: int, dims: tuple = (256, 704)) -> dict:
  """The machine's practical float32 peak: median GFLOP/s of jitted matmuls, the
  model-shaped ones (``rows`` tokens, ``dims`` = (d_model, d_ff)) and two large square ones."""
  import jax
  import jax.numpy as jnp
  d, f = dims
  sizes = [(rows, d, f), (rows, f, d), (rows, d, 4 * d)] + pick([(1024, 1024, 1024), (2048, 2048, 2048)], [])
  mm = jax.jit(jnp.matmul)
  out = {}
  key = jax.random.PRNGKey(0)
  for m, k, n in sizes:
    ka, kb, key = jax.random.split(key, 3)
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (k, n), jnp.float32)
    t = timed(mm, a, b, warmup=3, repeats=10 if m * k * n >= 2048**3 else 30)
    out[f"{m}x{k}@{k}x{n}"] = 2 * m * k * n / t / 1e9
  return out


def trl_step_timer():
  """A ``transformers.TrainerCallback`` whose ``ts`` lists each optimizer step's wall time: from
  ``on_step_begin`` to ``on_step_end``, which bracket one step of the HF training loop (TRL's
  generation and scoring included; data loading and logging outside)."""
  from transformers import TrainerCallback

  class Timer(TrainerCallback):
    def __init__(self):
      self.ts, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      self.ts.append(time.perf_counter() - self.t0)
  return Timer()


def trl_settings(args, model) -> dict:
  """The fields of a TRL config ``args`` that differ from their defaults (bookkeeping ones left
  out), and whether ``model`` really runs with gradient checkpointing."""
  import dataclasses
  skip = {"output_dir", "logging_dir", "run_name", "report_to", "logging_steps", "max_steps", "disable_tqdm",
          "eval_strategy", "save_strategy"}
  settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
              if f.name not in skip and getattr(args, f.name) != f.default}
  settings["gradient_checkpointing (effective)"] = bool(getattr(model, "is_gradient_checkpointing", False))
  return settings
