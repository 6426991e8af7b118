"""The model table: ``config.models.<role>``, the models a run builds, owned by the trainer.

Each role a method needs (``policy``, ``reference``, ``base``, ``draft``, ``target`` ...) is one
entry, made by :func:`role` (its fields there and in experiments/design.md, "Models: the table of
roles"); ``init`` says where its parameters come from (:func:`parse_init`): ``random``, ``hf:DIR``,
``run:WORKDIR[:MODEL][@STEP]``, ``stage:NAME`` (replaced by ``run:...`` once the experiment's
``prepare`` has trained the stage), ``base:ROLE`` or ``none`` (not built).
:func:`resolve` turns the table into :class:`Role` s (architecture + pinned source) and is the one
place that reads sources' metadata; the trainer records the resolved table in ``WORKDIR/models.json``
(:func:`record`: init as written, the source with its step pinned, a fingerprint of its files) and,
on resume, reloads frozen roles from the recorded step and refuses to go on when a source changed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from typing import Mapping

import jax
import ml_collections

from jaxopd import paths
from jaxopd.errors import ConfigError
from jaxopd.models import lora
from jaxopd.models import hf
from jaxopd.models.transformer import ATTENTION, REMAT, ModelConfig, compare_arch

DTYPES = ("float32", "bfloat16")
ROLE_FIELDS = ("init", "trainable", "arch", "param_dtype", "dtype", "matmul_dtype", "attention", "attention_chunk",
               "remat", "scan_layers", "lora")
LORA_FIELDS = ("rank", "alpha", "targets", "init")
RECORD = "models.json"
NONE = "none"                                           # init of a role that is not built
_NOT_ARCH = ("dtype", "param_dtype", "matmul_dtype", "attention", "attention_chunk", "remat", "scan_layers", "lora_rank",
             "lora_alpha", "lora_targets", "lora_init")   # per role


def role(init: str = "random", trainable: bool = True, arch: str = "auto", param_dtype: str = "float32",
         dtype: str = "float32", attention: str = "einsum", remat: str = "none",
         scan_layers: bool = False, attention_chunk: int = 512, lora_rank: int = 0) -> ml_collections.ConfigDict:
  """One entry of ``config.models``:

  * ``init``: ``random`` (from the seed), ``hf:DIR`` (a Hugging Face directory, or a model id
    ``org/name`` resolved offline to its snapshot in the local HF cache), ``run:WORKDIR[:MODEL][@STEP]``
    (model ``MODEL``, default ``policy``, of a jaxopd run's checkpoint at ``STEP``, default its
    latest), ``stage:NAME`` (the experiment's pipeline stage ``NAME``; give the role another init
    and the stage is not run), ``base:ROLE`` (the LoRA role ``ROLE`` with its adapters off,
    computed from its base arrays) or ``none`` (not built: an optional role, e.g. f-DPG's
    ``reward`` with ``config.method.reward=model``);
  * ``trainable``: an optimizer group (its key names the group in ``config.optim.groups``) or
    frozen (no gradient, not checkpointed, reloaded from its source on resume);
  * ``arch``: ``auto`` (the source's architecture; ``config.model`` for ``random``) or the name of
    a ModelConfig block of this config, then checked field by field against an ``hf:`` / ``run:``
    source;
  * ``param_dtype`` (storage), ``dtype`` (compute), ``matmul_dtype`` (the projections' and LM
    head's operands, empty: ``dtype``; ``bfloat16`` with float32 compute: on the CPU a decode
    step's dots run 2x faster, bench/real_model.py), ``attention`` / ``attention_chunk``, ``remat``
    and ``scan_layers``, as :class:`~jaxopd.models.transformer.ModelConfig`'s (a resume may switch
    the last three: :func:`_resume_arch`); ``lora``: adapters (:mod:`jaxopd.models.lora`), then
    only they are trained and the base is frozen like a frozen role.
  """
  return ml_collections.ConfigDict(dict(init=init, trainable=trainable, arch=arch, param_dtype=param_dtype,
                                        dtype=dtype, matmul_dtype="", attention=attention, attention_chunk=attention_chunk,
                                        remat=remat, scan_layers=scan_layers,
                                        lora=dict(rank=lora_rank, alpha=16.0, targets="all", init="kaiming")))


def lora_fields(name: str, r) -> dict:
  """The ModelConfig adapter fields of role ``r``'s ``lora`` block (none: rank 0)."""
  lo = r.get("lora") or {}
  extra = sorted(set(lo.keys()) - set(LORA_FIELDS))
  if extra:
    _bad(name, f"lora.{extra[0]}", lo[extra[0]], f"unknown field (lora has {', '.join(LORA_FIELDS)})")
  rank = lo.get("rank", 0)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    _bad(name, "lora.rank", rank, "must be an integer >= 0 (0 = no adapters)")
  if not rank:
    return {}
  targets = lo.get("targets", "all")
  names = () if targets == "all" else tuple(t.strip() for t in str(targets).split(",") if t.strip())
  if targets != "all" and (not names or any(t not in lora.TARGETS for t in names)):
    _bad(name, "lora.targets", targets, f"must be all or a comma-separated list of {', '.join(lora.TARGETS)}")
  if not isinstance(lo.get("alpha", 16.0), (int, float)) or lo.get("alpha", 16.0) <= 0:
    _bad(name, "lora.alpha", lo.get("alpha"), "must be a positive number")
  if lo.get("init", "kaiming") not in lora.INITS:
    _bad(name, "lora.init", lo.get("init"), f"must be one of {lora.INITS}")
  if not r.trainable:
    _bad(name, "lora.rank", rank, "adapters are trained: this role is frozen (trainable=False)")
  return dict(lora_rank=rank, lora_alpha=float(lo.get("alpha", 16.0)), lora_targets=names,
              lora_init=lo.get("init", "kaiming"))


def arch_block(cfg: ModelConfig | None = None) -> ml_collections.ConfigDict:
  """A ModelConfig block for a config (``config.model``): the architecture fields only."""
  d = dataclasses.asdict(cfg or ModelConfig())
  return ml_collections.ConfigDict({k: v for k, v in d.items() if k not in _NOT_ARCH})


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str                  # random | hf | run | base
  path: str = ""             # absolute
  model: str = ""            # run: the model of that run; base: the LoRA role whose base this is
  step: int | None = None    # run: the checkpoint step (None until resolved)

  def spec(self) -> str:
    if self.kind == "random":
      return "random"
    if self.kind == "hf":
      return f"hf:{self.path}"
    if self.kind == "base":
      return f"base:{self.model}"
    return f"run:{self.path}:{self.model}" + ("" if self.step is None else f"@{self.step}")


@dataclasses.dataclass(frozen=True)
class Role:
  name: str
  arch: ModelConfig          # with the role's dtype and param_dtype
  trainable: bool
  source: Source


def _bad(name: str, field: str, value, why: str):
  raise ConfigError(f"config.models.{name}.{field}={value!r}: {why}")


def parse_init(name: str, value: str) -> Source:
  """The :class:`Source` an ``init`` string names (step None = latest); syntax only."""
  if not isinstance(value, str) or not value:
    _bad(name, "init", value, "must be random, hf:DIR, run:WORKDIR[:MODEL][@STEP], base:ROLE, stage:NAME or none")
  if value == "random":
    return Source("random")
  kind, _, rest = value.partition(":")
  if kind == "stage":
    _bad(name, "init", value, "a pipeline stage not filled in: run through jaxopd.main (the experiment's prepare "
                              "trains the stage), or give hf:DIR / run:WORKDIR")
  if kind == "hf" and rest:
    return Source("hf", hf_dir(name, value, rest))
  if kind == "base" and rest:
    return Source("base", model=rest)
  if kind == "run" and rest:
    step = None
    if "@" in rest:
      rest, s = rest.rsplit("@", 1)
      if not s.isdigit():
        _bad(name, "init", value, f"the step after @ must be an integer, got {s!r}")
      step = int(s)
    path, model = rest, "policy"
    if ":" in rest and "/" not in rest.rsplit(":", 1)[1]:   # run:gs://bucket/run has no model part
      path, model = rest.rsplit(":", 1)
    return Source("run", paths.resolve(path), model, step)
  _bad(name, "init", value, "must be random, hf:DIR, run:WORKDIR[:MODEL][@STEP], base:ROLE, stage:NAME or none")


def hf_dir(name: str, value: str, rest: str) -> str:
  """The directory of ``hf:rest``: a path as given, or a model id (``org/name``) that is not a
  path, resolved offline to its snapshot in the local Hugging Face cache (``HF_HUB_CACHE``)."""
  is_id = (not os.path.exists(rest) and rest.count("/") == 1 and not rest.startswith((".", "/", "~"))
           and all(rest.split("/")))
  if not is_id:
    return os.path.abspath(rest)
  from huggingface_hub import constants, snapshot_download
  try:
    return snapshot_download(rest, local_files_only=True)
  except Exception:   # not in the cache (huggingface_hub's LocalEntryNotFoundError and kin)
    _bad(name, "init", value, f"no directory {rest!r}, and the model id has no snapshot in the local Hugging "
                              f"Face cache {constants.HF_HUB_CACHE} (download it there first, e.g. "
                              f"`hf download {rest}`, or give a directory)")


def check_fields(config) -> None:
  """Syntax of every ``config.models`` entry (no files read); ConfigError naming the field."""
  if "models" not in config or not len(config.models):
    raise ConfigError("config.models is empty: the experiment's get_config declares its model roles")
  for name, r in config.models.items():
    if not isinstance(r, ml_collections.ConfigDict):
      raise ConfigError(f"config.models.{name}: must be a role (jaxopd.models.table.role(...)), got {r!r}")
    extra = sorted(set(r.keys()) - set(ROLE_FIELDS))
    if extra:
      _bad(name, extra[0], r[extra[0]], f"unknown field (a role has {', '.join(ROLE_FIELDS)})")
    for f in ("param_dtype", "dtype"):
      if r[f] not in DTYPES:
        _bad(name, f, r[f], f"must be one of {DTYPES}")
    if r.get("matmul_dtype", "") not in ("",) + DTYPES:
      _bad(name, "matmul_dtype", r.matmul_dtype, f"must be empty (the compute dtype) or one of {DTYPES}")
    if r.get("attention", "einsum") not in ATTENTION:
      _bad(name, "attention", r.attention, f"must be one of {ATTENTION}")
    if r.get("remat", "none") not in REMAT:
      _bad(name, "remat", r.remat, f"must be one of {REMAT}")
    if not isinstance(r.get("scan_layers", False), bool):
      _bad(name, "scan_layers", r.scan_layers, "must be True or False")
    if r.arch != "auto" and (r.arch not in config or not isinstance(config[r.arch], ml_collections.ConfigDict)):
      _bad(name, "arch", r.arch, "must be auto or the name of a ModelConfig block of this config (e.g. model)")
    lora_fields(name, r)
    if isinstance(r.init, str) and (r.init.startswith("stage:") or r.init == NONE):
      continue
    parse_init(name, r.init)


def _block(config, name: str, block: str) -> ModelConfig:
  try:
    d = {k: v for k, v in dict(config[block]).items() if k not in _NOT_ARCH}
    unknown = set(d) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
      raise ConfigError(f"config.{block}: unknown fields {sorted(unknown)}")
    return ModelConfig(**d).validate(prefix=f"config.{block}")
  except TypeError as e:
    raise ConfigError(f"config.{block} (arch of config.models.{name}): {e}") from None


def run_record(workdir: str) -> dict:
  """``WORKDIR/models.json`` of a jaxopd run ({} when absent)."""
  path = paths.join(workdir, RECORD)
  return paths.read_json(path) if paths.isfile(path) else {}


def _resolve_role(config, name: str, pinned: Mapping[str, dict] | None = None) -> Role:
  """Role ``name`` of ``config.models`` with its architecture read and a ``run:`` step pinned
  (see :func:`resolve`)."""
  from jaxopd import checkpoint as ckpt_lib
  r = config.models[name]
  src = parse_init(name, r.init)
  note = f" (arch of config.models.{name})"
  if src.kind == "base":
    return _base_role(config, name, src, pinned)
  if src.kind == "random":
    arch = _block(config, name, "model" if r.arch == "auto" else r.arch)
  elif src.kind == "hf":
    if not hf.is_hf_dir(src.path):
      missing = [what for what, ok in (("config.json", os.path.isfile(os.path.join(src.path, "config.json"))),
                                       ("*.safetensors", glob.glob(os.path.join(src.path, "*.safetensors"))))
                 if not ok]
      why = (f"{src.path}: no such directory" if not os.path.isdir(src.path) else
             f"{src.path} is not a Hugging Face model directory: no {' and no '.join(missing)} in it" if missing else
             f"{src.path} is a jaxopd run (it has checkpoints/): use run:{src.path}")
      _bad(name, "init", r.init, why)
    arch = hf.config_from_hf(src.path)
    if r.arch != "auto":
      compare_arch(_block(config, name, r.arch), arch, f"config.{r.arch}", os.path.join(src.path, "config.json"), note)
  else:
    rec = run_record(src.path)
    if not paths.isdir(paths.join(src.path, "checkpoints")):
      _bad(name, "init", r.init, f"{src.path} has no checkpoints/ (not a jaxopd run, or not trained yet)")
    if src.model not in rec:
      _bad(name, "init", r.init, f"{os.path.join(src.path, RECORD)} has no model {src.model!r}"
                                 + (f" (it has {sorted(rec)})" if rec else " (no such file: not a jaxopd run "
                                                                            "of this version)"))
    step = src.step
    if step is None and pinned and name in pinned and pinned[name].get("init") == r.init:
      step = pinned[name]["step"]
    if step is None:
      step = ckpt_lib.latest_step(src.path)
    if step is None or not paths.isdir(paths.join(src.path, "checkpoints", str(step))):
      _bad(name, "init", r.init, f"{src.path} has no checkpoint at step {step}")
    src = dataclasses.replace(src, step=int(step))
    arch = ModelConfig(**{k: v for k, v in rec[src.model]["arch"].items() if k not in _NOT_ARCH})
    if r.arch != "auto":
      compare_arch(_block(config, name, r.arch), arch, f"config.{r.arch}", f"{src.spec()} ({RECORD})", note)
  arch = dataclasses.replace(_per_role(arch, r), **lora_fields(name, r))
  return Role(name, arch.validate(prefix=f"config.models.{name} architecture"), bool(r.trainable), src)


def _per_role(arch: ModelConfig, r) -> ModelConfig:
  """``arch`` with role ``r``'s dtypes, attention, remat and layer scan."""
  return dataclasses.replace(arch, dtype=r.dtype, param_dtype=r.param_dtype, matmul_dtype=r.get("matmul_dtype", ""),
                             attention=r.get("attention", "einsum"),
                             attention_chunk=int(r.get("attention_chunk", 512)), remat=r.get("remat", "none"),
                             scan_layers=bool(r.get("scan_layers", False)))


def _base_role(config, name: str, src: Source, pinned) -> Role:
  """Role ``name`` declared ``init=base:OWNER``: OWNER's model with its adapters off, computed from
  OWNER's base arrays (no copy, no load of its own)."""
  r = config.models[name]
  owner = src.model
  if owner not in config.models or config.models[owner].init in (NONE,) or owner == name:
    _bad(name, "init", r.init, f"names no other built role of config.models (it has {sorted(config.models)})")
  if r.trainable:
    _bad(name, "trainable", r.trainable, f"a base:{owner} role is the frozen base of {owner}")
  if (r.get("lora") or {}).get("rank", 0):
    _bad(name, "lora.rank", r.lora.rank, f"a base:{owner} role has no adapters of its own")
  o = config.models[owner]
  if str(o.init).startswith("base:"):
    _bad(name, "init", r.init, f"config.models.{owner} is itself a base: role")
  if not (o.get("lora") or {}).get("rank", 0):
    _bad(name, "init", r.init, f"config.models.{owner} has no adapters (lora.rank=0), so its base is the "
                               f"model itself, still being trained; give {name} its own init (e.g. {owner}'s)")
  if r.param_dtype != o.param_dtype:
    _bad(name, "param_dtype", r.param_dtype, f"{name} computes with config.models.{owner}'s base arrays, "
                                             f"stored in {o.param_dtype}: set both alike")
  base = _resolve_role(config, owner, pinned).arch.without_lora()
  return Role(name, _per_role(base, r).validate(prefix=f"config.models.{name} architecture"), False, src)


def resolve(config, pinned: Mapping[str, dict] | None = None) -> dict[str, Role]:
  """``config.models`` -> ``{role: Role}``: architectures read, ``run:`` steps pinned.

  ``pinned``: a run's recorded table (:func:`record`); a role whose ``init``
  is unchanged keeps the recorded step instead of the source's latest.
  """
  check_fields(config)
  return {name: _resolve_role(config, name, pinned) for name in config.models if config.models[name].init != NONE}


def weights_init(config, name: str) -> str:
  """The init of the weights role ``name`` computes with: for a ``base:OWNER`` role, OWNER's."""
  init = config.models[name].init
  return config.models[init[5:]].init if isinstance(init, str) and init.startswith("base:") else init


def built(config, name: str) -> bool:
  """Whether role ``name`` is in the table and built (its init is not ``none``)."""
  return name in config.models and config.models[name].init != NONE


def check_roles(roles: Mapping[str, Role], declared: Mapping[str, bool], method: str = "this experiment"):
  """The table against the roles a method declares (``name -> trainable``): a missing or
  extra role, or one whose trainability the method cannot use, is a ConfigError."""
  missing = [n for n in declared if n not in roles]
  if missing:
    raise ConfigError(f"config.models.{missing[0]}: {method} needs the roles {sorted(declared)}; "
                      f"config.models has {sorted(roles)}")
  extra = [n for n in roles if n not in declared]
  if extra:
    raise ConfigError(f"config.models.{extra[0]}: {method} uses no role {extra[0]!r} (its roles: "
                      f"{sorted(declared)}); remove it")
  for n, trainable in declared.items():
    if roles[n].trainable != trainable:
      raise ConfigError(f"config.models.{n}.trainable={roles[n].trainable}: {method}'s {n} is "
                        f"{'trained' if trainable else 'frozen'}")


# --- records --------------------------------------------------------------------------------
def _files(src: Source) -> list[str]:
  if src.kind == "hf":
    names = [n for n in sorted(os.listdir(src.path)) if n.endswith((".safetensors", ".json"))
             and not n.startswith(("tokenizer", "special_tokens", "generation_config"))]
    return [os.path.join(src.path, n) for n in names]
  if src.kind == "run":
    return paths.files_under(paths.join(src.path, "checkpoints", str(src.step), "params"))
  return []


def fingerprint(src: Source, window: int = 1 << 16) -> str:
  """A hash of a source's weight files: each file's name, size and three 64 KiB windows
  (start, middle, end); cheap at any size, and any rewrite of the weights changes it."""
  h = hashlib.sha256()
  for path in _files(src):
    size = paths.getsize(path)
    h.update(f"{path[len(src.path):].lstrip('/')}:{size}".encode())
    with paths.open(path, "rb") as f:
      for at in sorted({0, max(size // 2 - window // 2, 0), max(size - window, 0)}):
        f.seek(at)
        h.update(f.read(window))
  return h.hexdigest()[:16]


def record(config, roles: Mapping[str, Role]) -> dict:
  """The table as ``models.json`` holds it."""
  out = {}
  for name, r in roles.items():
    out[name] = {"init": config.models[name].init, "source": r.source.spec(), "step": r.source.step,
                 "fingerprint": fingerprint(r.source), "trainable": r.trainable,
                 "arch": dataclasses.asdict(r.arch)}
  return out


def add_heads(rec: dict, heads: Mapping[str, object]) -> dict:
  """Trainable modules that are not LMs (a mask head) are listed too, without an architecture."""
  return {**rec, **{n: {"init": "random", "source": "random", "step": None, "fingerprint": fingerprint(Source("random")),
                        "trainable": True, "arch": None} for n in heads}}


def _resume_arch(arch: dict | None) -> dict | None:
  """The architecture as a resume compares it: the attention implementation (and its chunk),
  the rematerialisation and the layer scan may change (the same function, the same parameters)."""
  if arch is None:
    return None
  arch = {**dataclasses.asdict(ModelConfig()), **arch}     # a field added since the run started: its default
  return {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()
          if k not in ("attention", "attention_chunk", "remat", "scan_layers")}


def check_resume(recorded: Mapping[str, dict], now: Mapping[str, dict], workdir: str):
  """Refuses a resume whose model sources differ from the recorded ones (one line naming the role)."""
  for name in sorted(set(recorded) | set(now)):
    if name not in now or name not in recorded:
      raise ConfigError(f"config.models.{name}: this run ({workdir}) was started with the roles "
                        f"{sorted(recorded)}; the config now has {sorted(now)}")
    a, b = (dict(x, arch=_resume_arch(x.get("arch"))) for x in (recorded[name], now[name]))
    for field in ("source", "fingerprint", "arch", "trainable"):
      if a.get(field) != b.get(field):
        what = {"fingerprint": "its weight files changed since this run started",
                "arch": "its architecture differs from the one this run started with",
                "trainable": "its trainability differs from the one this run started with",
                "source": "its source differs from the one this run started with"}[field]
        was, now_ = a.get(field), b.get(field)
        if field == "arch" and was and now_:   # name the fields, not the whole architecture
          keys = [k for k in sorted(set(was) | set(now_)) if was.get(k) != now_.get(k)]
          was, now_ = ({k: x.get(k) for k in keys} for x in (was, now_))
        raise ConfigError(f"config.models.{name}: cannot resume {workdir}: {what} (recorded {was!r}, "
                          f"now {now_!r}); use a new workdir")


def write_record(workdir: str, rec: dict) -> None:
  paths.write_json(paths.join(workdir, RECORD), rec, indent=2)


def describe(roles: Mapping[str, Role]) -> str:
  parts = []
  for n, r in roles.items():
    a = r.arch
    adapters = f", LoRA rank {a.lora_rank}" if a.lora_rank else ""
    parts.append(f"{n} ({'trained' if r.trainable else 'frozen'}, {a.family} d{a.d_model} L{a.n_layers} "
                 f"V{a.vocab_size}, params {a.param_dtype}{adapters}) <- {r.source.spec()}")
  return "models: " + "; ".join(parts)


# --- loading ----------------------------------------------------------------------------------
def load(r: Role, abstract_params):
  """Role ``r``'s parameters from its source, into the shardings and dtypes of
  ``abstract_params`` (each device reads its own slices)."""
  from jaxopd import checkpoint as ckpt_lib
  if r.source.kind == "hf":
    return hf.load_params(r.source.path, abstract_params, r.arch, where=f"config.models.{r.name}")
  if r.source.kind == "run":
    rec = run_record(r.source.path).get(r.source.model) or {}
    if (rec.get("arch") or {}).get("lora_rank"):
      return _load_merged(r, rec, abstract_params)
    params, _ = ckpt_lib.load_params(r.source.path, r.source.model, r.name, abstract_params, r.source.step)
    return params
  raise ValueError(f"config.models.{r.name}: a {r.source.kind} role has no source to load")


def _load_merged(r: Role, rec: dict, abstract_params):
  """A LoRA-trained model of a run, its adapters folded into its base: the base from the source
  that run recorded for it, the adapters from its checkpoint at ``r.source.step``."""
  from jaxopd import checkpoint as ckpt_lib
  arch = ModelConfig(**rec["arch"])
  base_src = parse_init(r.name, rec["source"])
  if base_src.kind not in ("hf", "run"):
    raise ConfigError(f"config.models.{r.name}.init={r.source.spec()!r}: that model was trained with adapters on "
                      f"a {base_src.kind} base, which cannot be re-read; start its run from hf:DIR or run:WORKDIR")
  base = load(Role(r.name, arch.without_lora(), False, base_src), abstract_params)
  flat, treedef = ckpt_lib.flatten(base)
  merged = lora.merge({**flat, **run_adapters(r.source, r.name, arch)}, arch.lora_scale)
  return ckpt_lib.unflatten(treedef, merged, list(flat))


def run_adapters(src: Source, name: str, arch: ModelConfig, mesh=None) -> dict:
  """The adapters (flattened, replicated on ``mesh``, default the first device) of model
  ``src.model`` of run ``src.path`` at checkpoint ``src.step``; ``arch``: its recorded architecture."""
  from flax import nnx

  from jaxopd import checkpoint as ckpt_lib
  from jaxopd.models.transformer import Transformer
  from jaxopd import mesh as mesh_lib
  mesh = mesh_lib.make_mesh((1, 1, 1), 1) if mesh is None else mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = nnx.state(nnx.eval_shape(lambda: Transformer(arch, nnx.Rngs(0))), lora.LoRAParam)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
  adapters, _ = ckpt_lib.load_params(src.path, src.model, name, abstract, src.step)
  return ckpt_lib.flatten(adapters)[0]


def load_model(init: str, name: str = "model", dtype: str = "float32", param_dtype: str = "float32", mesh=None,
               rules=None):
  """A Transformer from an ``init`` string (``hf:DIR`` or ``run:WORKDIR[:MODEL][@STEP]``), on
  ``mesh`` (default: the first device); for host-side work outside a run (preference
  construction, reports). Returns ``(model, Role)``."""
  from flax import nnx

  from jaxopd import mesh as mesh_lib
  c = ml_collections.ConfigDict({"models": {name: role(init, False, "auto", param_dtype, dtype)}})
  r = resolve(c)[name]
  mesh = mesh_lib.make_mesh((1, 1, 1), 1) if mesh is None else mesh
  rules = mesh_lib.rules_from_config(mesh_lib.DEFAULT_RULES if rules is None else rules)
  graphdef, abstract = hf.abstract_model(r.arch, mesh, rules)
  return nnx.merge(graphdef, load(r, abstract)), r


def arch(config, name: str) -> ModelConfig:
  """The resolved architecture of role ``name`` (for an experiment's build: vocabulary checks,
  sampler sizes)."""
  return resolve_one(config, name).arch


def resolve_one(config, name: str) -> Role:
  """Role ``name`` of ``config.models`` resolved (:func:`resolve`), alone."""
  if name not in config.models:
    raise ConfigError(f"config.models.{name}: missing (this experiment uses it); config.models has "
                      f"{sorted(config.models)}")
  if config.models[name].init == NONE:
    raise ConfigError(f"config.models.{name}.init='none': this experiment uses it; give it a source "
                      f"(hf:DIR, run:WORKDIR)")
  check_fields(config)
  return _resolve_role(config, name)


def source_dir(config, name: str) -> str:
  """Role ``name``'s ``hf:`` directory, else "" (``run:``, ``random``, ``none``)."""
  r = config.models.get(name)
  if r is None or not isinstance(r.init, str) or not r.init.startswith("hf:"):
    return ""
  return parse_init(name, r.init).path


def tokenizer_dir(config, name: str = "policy") -> str:
  """Role ``name``'s ``hf:`` directory when it holds a tokenizer, else ""."""
  path = source_dir(config, name)
  return path if path and hf.has_tokenizer(path) else ""
