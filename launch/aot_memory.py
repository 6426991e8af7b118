"""Ahead-of-time memory check: does a config's train step fit a mesh, before renting it?

  python launch/aot_memory.py --config experiments/sft.py:smoke --devices 8 --config.mesh.shape='(1,8,1)'
  python launch/aot_memory.py --config experiments/sft.py --devices 64 --config.mesh.shape='(8,8,1)' \\
      --config.model.d_model=2048 --config.model.n_layers=24 --hbm_gib 16

Builds the trainer's abstract state (shapes and ``NamedSharding``s, nothing
allocated), lowers and compiles the jitted train step for the mesh with
``jax.jit(...).lower(abstract sharded inputs).compile()``, and prints per-device
bytes: parameters, optimizer state and other train state (exact, from the
shardings), frozen models and the batch, XLA's temporaries (activations,
gradients, collective buffers) and the total XLA reports (arguments + outputs
- donated + temporaries). ``--devices N`` simulates N CPU devices; the sharding
arithmetic is exact, the temporaries are the CPU compiler's (the TPU/GPU
compilers fuse and rematerialise differently, so treat them as an estimate;
run without ``--devices`` on one host of the target to use its compiler).
``--json`` prints one JSON object instead of the table.

The experiment's ``build(config)`` runs (its first batch gives the batch
shapes), but not ``prepare``: a pipeline stage's outputs must already exist.

For a TPU you do not have:

  python launch/aot_memory.py --config experiments/tdpo.py --topology v5e:2x2 --preset qwen2-0.5b ...

``--topology NAME`` compiles for the abstract devices of a TPU topology
(``jax.experimental.topologies``; needs libtpu: ``pip install -e '.[aot]'``), so
the temporaries are the TPU compiler's own, on this CPU machine, and the HBM
verdict uses the chip's capacity (:data:`CHIPS`). The report also gives XLA's
cost analysis (FLOPs, bytes accessed), in which a loop body counts once;
``launch/fit_table.py`` counts a step's FLOPs for its roofline. ``--preset NAME``
gives every model role the shapes of a real model (:mod:`jaxopd.models.presets`,
random weights): roles with a ``stage:`` init become ``random``.
``launch/fit_table.py`` runs this over methods x models x topologies.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)


def override(config, key: str, value: str):
  """``config.<key> = value`` parsed to the field's type (as ``--config.<key>=<value>`` in jaxopd.main)."""
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  old = node[leaf]
  if isinstance(old, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"--config.{key}={value}: expected true or false")
    v = value.lower() in ("true", "1")
  elif isinstance(old, (int, float)):
    v = type(old)(ast.literal_eval(value))
  elif isinstance(old, (tuple, list)):
    v = type(old)(ast.literal_eval(value))
  elif isinstance(old, str):
    v = value
  else:
    v = ast.literal_eval(value)
  node[leaf] = v


# Per-chip figures used for the HBM verdict and launch/fit_table.py's roofline (Google Cloud TPU documentation,
# "TPU versions"): HBM capacity, peak bf16 dense FLOP/s, HBM bandwidth. Keyed by device_kind.
CHIPS = {
    "TPU v4": dict(name="v4", hbm_gib=32, bf16_flops=275e12, hbm_bw=1228e9),
    "TPU v5 lite": dict(name="v5e", hbm_gib=16, bf16_flops=197e12, hbm_bw=819e9),
    "TPU v5": dict(name="v5p", hbm_gib=95, bf16_flops=459e12, hbm_bw=2765e9),
    "TPU v6 lite": dict(name="v6e", hbm_gib=32, bf16_flops=918e12, hbm_bw=1640e9),
}


def topology_devices(name: str):
  """The abstract devices of TPU topology ``name`` (``v5e:2x2``, ``v5p:2x2x2``, ``v4:2x2x4``)."""
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--topology {name}: needs libtpu (pip install -e '.[aot]', jax[tpu] at the jax "
                     f"version in use)")
  # libtpu otherwise takes a machine-wide lock file: a second process (a parallel test, a second
  # report) would fail; these processes only compile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  except Exception as e:    # libtpu's own error types; the message names the problem
    raise ValueError(f"--topology {name}: {str(e).splitlines()[0]}") from None


def random_inits(config):
  """Every built role of ``config.models`` initialised at random (``stage:`` / ``hf:`` / ``run:``
  inits replaced; a ``base:ROLE`` role stays the base of its LoRA role): a compile needs the shapes only."""
  from jaxopd.models import table
  for r in config.models.values():
    if r.init != table.NONE and not str(r.init).startswith("base:"):
      r.init = "random"


def apply_preset(config, name: str):
  """Every built role of ``config.models`` gets the shapes of preset ``name`` (random weights):
  its ModelConfig block (``config.model`` for ``arch=auto``) is set to the preset."""
  from jaxopd.models import presets, table
  fields = dict(table.arch_block(presets.get(name)))
  random_inits(config)
  for r in config.models.values():
    if r.init == table.NONE:
      continue
    block = "model" if r.arch == "auto" else r.arch
    for k, v in fields.items():
      config[block][k] = v


def _bytes_per_device(tree) -> int:
  """Bytes of the largest shard of every leaf (``ShapeDtypeStruct`` with a sharding)."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def report(config, experiment, devices=None) -> dict:
  """Per-device bytes (and XLA's cost analysis) of one compiled train step of ``experiment`` under ``config``; ``devices``: e.g. :func:`topology_devices`."""
  import time
  import jax
  from jaxopd import config as config_lib, mesh as mesh_lib
  from jaxopd.experiment import DataShard
  from jaxopd.train import Trainer

  devices = list(jax.devices() if devices is None else devices)
  facts = config_lib.validate(config, len(devices), 1)
  mesh = mesh_lib.make_mesh(facts["mesh_shape"], facts["num_devices"], devices=devices)
  trainer = Trainer(config, experiment, mesh, facts["rules"])
  shard = DataShard(seed=config.seed, process_index=0, process_count=1, local_batch=config.batch_size)
  first = next(iter(experiment.train_data(shard)))
  batch_shardings = trainer.batch_sharding(first)
  batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), dict(first),
                       dict(batch_shardings))
  state, frozen = trainer.abstract_state, trainer.abstract_frozen
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), mesh_lib.use_rules(facts["rules"]):
    compiled = trainer.compiled_train_step(batch).lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  xla = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
             aliased=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
             code=mem.generated_code_size_in_bytes)
  other = {k: v for k, v in state.items() if k not in ("params", "opt_state")}
  out = dict(
      mesh=dict(zip(mesh_lib.MESH_AXES, facts["mesh_shape"])), devices=facts["num_devices"],
      platform=devices[0].platform, device_kind=devices[0].device_kind, compile_s=round(compile_s, 1),
      params=_bytes_per_device(state["params"]), opt_state=_bytes_per_device(state["opt_state"]),
      other_state=_bytes_per_device(other), frozen=_bytes_per_device(frozen), batch=_bytes_per_device(batch),
      temp=xla["temp"], xla=xla)
  out["total"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temp"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  # XLA's counts for one device (the partitioned module). A loop body counts once: the layer
  # scan, the position chunks, the microbatches and a sampler's decode steps are not
  # multiplied by their trip counts (launch/fit_table.py counts the step's FLOPs itself).
  out["xla_flops"] = float(cost.get("flops", 0.0))
  out["xla_bytes"] = float(cost.get("bytes accessed", 0.0))
  # Pallas (Mosaic) kernels in the compiled step, e.g. model.attention=splash's forward and backward.
  out["pallas_kernels"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  chip = CHIPS.get(out["device_kind"])
  if chip:
    out["chip"] = chip
  return out


def _fmt(n: int) -> str:
  return f"{n:>15,d} B {n / 2**20:>11.2f} MiB"


def format_report(r: dict, hbm_bytes: int | None = None) -> str:
  mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"mesh ({mesh}) over {r['devices']} {r['device_kind']} devices; per device:",
           f"  parameters          {_fmt(r['params'])}",
           f"  optimizer state     {_fmt(r['opt_state'])}",
           f"  other train state   {_fmt(r['other_state'])}",
           f"  frozen models       {_fmt(r['frozen'])}",
           f"  batch               {_fmt(r['batch'])}",
           f"  activations/temp    {_fmt(r['temp'])}   (XLA temporaries: activations, gradients, buffers)",
           f"  total               {_fmt(r['total'])}   (XLA: arguments + outputs - donated + temp)"]
  lines.append(f"  XLA cost analysis   {r['xla_flops']:.3e} FLOP, {r['xla_bytes'] / 2**30:.2f} GiB accessed "
               f"(a loop body counts once: layer scan, chunks, microbatches, decode steps)")
  if r.get("pallas_kernels"):
    lines.append(f"  Pallas kernels      {r['pallas_kernels']} custom calls (not in XLA's FLOP count)")
  if hbm_bytes:
    verdict = "fits" if r["total"] <= hbm_bytes else "does NOT fit"
    lines.append(f"  {verdict} in {hbm_bytes / 2**30:.1f} GiB per device ({100 * r['total'] / hbm_bytes:.1f}% used)")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="--config.<field>=<value> overrides any config field")
  p.add_argument("--config", required=True, help="experiment module[:preset], e.g. experiments/sft.py:smoke")
  p.add_argument("--devices", type=int, default=0, help="simulate N CPU devices (0: the devices present)")
  p.add_argument("--hbm_gib", type=float, default=0, help="device memory to compare with (0: the device's own)")
  p.add_argument("--topology", default="", help="compile for the abstract devices of a TPU topology (libtpu), "
                 "e.g. v5e:2x2, v5e:4x4, v5p:2x2x2, v4:2x2x4")
  p.add_argument("--preset", default="", help="the shapes of a real model for every role: gpt2-124m, qwen2-0.5b, "
                 "qwen2-1.5b, llama3-8b")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  a = p.parse_args([x for x in argv if not x.startswith("--config.")])
  import jax
  if a.devices and a.topology:
    print("error: --devices and --topology are exclusive", file=sys.stderr)
    return 2
  if a.devices or a.topology:
    jax.config.update("jax_platforms", "cpu")
  if a.devices:
    jax.config.update("jax_num_cpu_devices", a.devices)
  from jaxopd.errors import ConfigError
  from jaxopd import methods
  from jaxopd.experiment import load_config
  from jaxopd.mesh import MeshError
  try:
    devices = topology_devices(a.topology) if a.topology else None
    config = load_config(a.config)
    module = methods.get(config.method.name)
    if a.preset:
      apply_preset(config, a.preset)
    for o in overrides:
      key, _, value = o[len("--config."):].partition("=")
      override(config, key, value)
    config.checkpoint.async_save = False
    r = report(config, module.build(config), devices)
  except (ConfigError, MeshError, FileNotFoundError, KeyError, AttributeError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  hbm = int(a.hbm_gib * 2**30) or (int(r["chip"]["hbm_gib"] * 2**30) if r.get("chip") else None) or \
      (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  r["hbm_limit"] = hbm
  print(json.dumps(r) if a.json else format_report(r, hbm))
  return 0


if __name__ == "__main__":
  sys.exit(main())
