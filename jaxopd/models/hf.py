"""Hugging Face checkpoints: config and safetensors import/export for :class:`Transformer`.

Supported ``model_type``: ``gpt2``, ``llama`` and ``qwen2`` (Llama with q/k/v
bias). HF is the weight format only; the model is always jaxopd's.

* :func:`config_from_hf`: ``config.json`` -> :class:`ModelConfig`; a feature
  the model cannot represent (rope scaling, a sliding window in use, biases it
  lacks ...) is a ``ConfigError`` naming the field and the file.
* :func:`load_params` / :func:`load`: ``model.safetensors`` or the sharded
  ``model.safetensors.index.json`` + shards straight into each parameter's
  ``NamedSharding``: ``jax.make_array_from_callback`` reads, per device, only
  that device's slice from the file (``safe_open(...).get_slice``).
* :func:`export`: ``config.json`` + ``model.safetensors`` that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

A reward model (``architectures``: ``GPT2/Llama/Qwen2ForSequenceClassification``
with one label) loads as a Transformer with ``head="score"``: HF's bias-free
``score`` layer in place of the LM head.

CLI: ``python -m jaxopd.models.hf export --workdir runs/X --model policy --out DIR``
(the latest checkpoint of a run). A run starts a model from an HF directory with
``--config.models.<role>.init=hf:DIR`` (:mod:`jaxopd.models.table`), its
architecture read from ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxopd import checkpoint as ckpt_lib
from jaxopd import paths
from jaxopd import mesh as mesh_lib
from jaxopd.errors import ConfigError
from jaxopd.models import safetensors_io as st_io
from jaxopd.models.transformer import ModelConfig, Transformer

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": st_io.DTYPES["BF16"], "float16": np.float16}


# --- config -------------------------------------------------------------------
def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def config_from_hf(hf_dir: str, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
  """The :class:`ModelConfig` of ``hf_dir/config.json`` (``dtype``: compute dtype,
  ``param_dtype``: the dtype parameters are kept in, whatever the file's)."""
  path = os.path.join(hf_dir, "config.json")
  hc = _read_json(path)

  def bad(field, why):
    raise ConfigError(f"{path}: {field}={hc.get(field)!r}: {why}")

  def need(field, ok, why):
    if hc.get(field) is not None and not ok(hc[field]):
      bad(field, why)

  mt = hc.get("model_type")
  archs = hc.get("architectures") or []
  head = "score" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"
  if head == "score":
    labels = len(hc.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})   # transformers' default is 2
    if labels != 1:
      raise ConfigError(f"{path}: id2label has {labels} labels: a reward model ({archs[0]}) has one output "
                        f"(num_labels=1)")
  if mt == "gpt2":
    need("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "only the tanh GELU is supported")
    need("scale_attn_weights", lambda v: v, "unscaled attention is not supported")
    need("scale_attn_by_inverse_layer_idx", lambda v: not v, "is not supported")
    need("add_cross_attention", lambda v: not v, "cross-attention is not supported")
    cfg = ModelConfig(family="gpt2", vocab_size=hc.get("vocab_size", 50257), d_model=hc.get("n_embd", 768),
                      n_layers=hc.get("n_layer", 12), n_heads=hc.get("n_head", 12), d_ff=hc.get("n_inner") or 0,
                      max_len=hc.get("n_positions", 1024), norm_eps=hc.get("layer_norm_epsilon", 1e-5),
                      tie_embeddings=hc.get("tie_word_embeddings", True), dtype=dtype,
                      param_dtype=param_dtype, head=head)
  elif mt in ("llama", "qwen2"):
    need("hidden_act", lambda v: v == "silu", "only silu (SwiGLU) is supported")
    need("attention_bias", lambda v: not v, "an o_proj bias is not supported (q/k/v bias only: qwen2)")
    need("mlp_bias", lambda v: not v, "MLP biases are not supported")
    d, h = hc["hidden_size"], hc["num_attention_heads"]
    need("head_dim", lambda v: v == d // h, f"must be hidden_size/num_attention_heads={d // h}")
    theta = hc.get("rope_theta", 10000.0)
    for field in ("rope_parameters", "rope_scaling"):
      rp = hc.get(field) or {}
      if rp.get("rope_type", rp.get("type", "default")) != "default":
        bad(field, "only the default rotary embedding is supported (no scaling)")
      if rp.get("partial_rotary_factor", 1.0) != 1.0:
        bad(field, "partial rotary embeddings are not supported")
      theta = rp.get("rope_theta", theta)
    if mt == "qwen2":
      n = hc.get("num_hidden_layers", 0)
      need("use_sliding_window", lambda v: not v or hc.get("max_window_layers", 0) >= n,
           "sliding-window attention is not supported")
    need("layer_types", lambda v: all(t == "full_attention" for t in v), "only full attention is supported")
    cfg = ModelConfig(family="llama", vocab_size=hc["vocab_size"], d_model=d, n_layers=hc["num_hidden_layers"],
                      n_heads=h, n_kv_heads=hc.get("num_key_value_heads") or h, d_ff=hc["intermediate_size"],
                      max_len=hc.get("max_position_embeddings", 2048), qkv_bias=mt == "qwen2",
                      rope_theta=float(theta), norm_eps=hc.get("rms_norm_eps", 1e-6),
                      tie_embeddings=hc.get("tie_word_embeddings", False), dtype=dtype,
                      param_dtype=param_dtype, head=head)
  else:
    bad("model_type", "supported: gpt2, llama, qwen2")
  return cfg.validate(prefix=f"{path} (as jaxopd ModelConfig)")


def check_compatible(hf_dir: str, cfg: ModelConfig, where: str = "config.model") -> ModelConfig:
  """The checkpoint's config; ConfigError ``"{where}.{field}=..."`` where it differs from ``cfg``
  (:func:`jaxopd.models.table.compare`)."""
  from jaxopd.models import table
  theirs = config_from_hf(hf_dir)
  table.compare(cfg, theirs, where, os.path.join(hf_dir, "config.json"))
  return theirs


def is_hf_dir(path: str) -> bool:
  """``config.json`` and safetensors weights, and no ``checkpoints/`` (a jaxopd run)."""
  return (bool(path) and os.path.isfile(os.path.join(path, "config.json"))
          and bool(glob.glob(os.path.join(path, "*.safetensors")))
          and not os.path.isdir(os.path.join(path, "checkpoints")))


# --- tensor layout ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Src:
  """Where one jaxopd parameter lives in an HF tensor: ``param = window.reshape(split dims)
  .transpose(perm)``, ``window`` the tensor or, with ``width``, its last-dim columns
  ``[offset, offset + width)`` (GPT-2's fused c_attn)."""
  name: str
  shape: tuple[int, ...]                 # the HF tensor's shape
  split: tuple[tuple[int, ...], ...]     # each window dim as the param dims it holds (row-major)
  perm: tuple[int, ...]                  # param dim i is split dim perm[i]
  offset: int = 0

  @property
  def param_shape(self) -> tuple[int, ...]:
    dims = [f for fs in self.split for f in fs]
    return tuple(dims[p] for p in self.perm)


def _layout(cfg: ModelConfig) -> tuple[dict[str, _Src], set[str]]:
  """jaxopd parameter path -> :class:`_Src`, and the HF names that may be present unused."""
  d, h, kv, dh, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
  out = {}
  ignore = set()

  def same(name, *dims):                    # stored as is
    return _Src(name, dims, tuple((x,) for x in dims), tuple(range(len(dims))))

  def linear(name, n_out, n_in):            # torch Linear [out, in] -> [in, out]
    return _Src(name, (n_out, n_in), ((n_out,), (n_in,)), (1, 0))

  if cfg.family == "gpt2":
    p = "transformer."
    out["embed"] = same(p + "wte.weight", v, d)
    out["pos_embed"] = same(p + "wpe.weight", cfg.max_len, d)
    for i in range(cfg.n_layers):
      b, k = f"{p}h.{i}.", f"blocks.{i}."
      for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
        out[k + ours + ".scale"] = same(b + theirs + ".weight", d)
        out[k + ours + ".bias"] = same(b + theirs + ".bias", d)
      for j, w in enumerate("qkv"):           # Conv1D [in, out]: c_attn = [q | k | v] columns
        out[f"{k}attn.w{w}"] = _Src(b + "attn.c_attn.weight", (d, 3 * d), ((d,), (h, dh)), (0, 1, 2), j * d)
        out[f"{k}attn.b{w}"] = _Src(b + "attn.c_attn.bias", (3 * d,), ((h, dh),), (0, 1), j * d)
      out[k + "attn.wo"] = _Src(b + "attn.c_proj.weight", (d, d), ((h, dh), (d,)), (0, 1, 2))
      out[k + "attn.bo"] = same(b + "attn.c_proj.bias", d)
      out[k + "mlp.w_in"] = same(b + "mlp.c_fc.weight", d, f)
      out[k + "mlp.b_in"] = same(b + "mlp.c_fc.bias", f)
      out[k + "mlp.w_out"] = same(b + "mlp.c_proj.weight", f, d)
      out[k + "mlp.b_out"] = same(b + "mlp.c_proj.bias", d)
      ignore |= {b + "attn.bias", b + "attn.masked_bias"}   # causal-mask buffers of old checkpoints
    out["ln_f.scale"] = same(p + "ln_f.weight", d)
    out["ln_f.bias"] = same(p + "ln_f.bias", d)
  else:
    p = "model."
    out["embed"] = same(p + "embed_tokens.weight", v, d)
    for i in range(cfg.n_layers):
      b, k = f"{p}layers.{i}.", f"blocks.{i}."
      out[k + "ln1.scale"] = same(b + "input_layernorm.weight", d)
      out[k + "ln2.scale"] = same(b + "post_attention_layernorm.weight", d)
      for w, n in (("q", h), ("k", kv), ("v", kv)):   # [n*dh, d] -> [d, n, dh]
        out[f"{k}attn.w{w}"] = _Src(f"{b}self_attn.{w}_proj.weight", (n * dh, d), ((n, dh), (d,)), (2, 0, 1))
        if cfg.qkv_bias:
          out[f"{k}attn.b{w}"] = _Src(f"{b}self_attn.{w}_proj.bias", (n * dh,), ((n, dh),), (0, 1))
      out[k + "attn.wo"] = _Src(b + "self_attn.o_proj.weight", (d, h * dh), ((d,), (h, dh)), (1, 2, 0))
      out[k + "mlp.w_gate"] = linear(b + "mlp.gate_proj.weight", f, d)
      out[k + "mlp.w_up"] = linear(b + "mlp.up_proj.weight", f, d)
      out[k + "mlp.w_down"] = linear(b + "mlp.down_proj.weight", d, f)
      ignore.add(b + "self_attn.rotary_emb.inv_freq")
    out["ln_f.scale"] = same(p + "norm.weight", d)
  if cfg.head == "score":                      # *ForSequenceClassification: a bias-free [1, d] score layer
    out["score"] = linear("score.weight", 1, d)
  elif cfg.tie_embeddings:
    ignore.add("lm_head.weight")               # HF ties it to the embedding when present
  else:
    out["lm_head"] = linear("lm_head.weight", v, d)
  return out, ignore


def _tensor_files(hf_dir: str) -> tuple[dict[str, str], str]:
  """HF tensor name -> safetensors file, and the file that lists them (for messages)."""
  index = os.path.join(hf_dir, INDEX)
  if os.path.isfile(index):
    wm = _read_json(index)["weight_map"]
    return {k: os.path.join(hf_dir, fn) for k, fn in wm.items()}, index
  single = os.path.join(hf_dir, SINGLE)
  if not os.path.isfile(single):
    raise FileNotFoundError(f"{hf_dir}: neither {SINGLE} nor {INDEX}")
  return {k: single for k in st_io.read_header(single)[0]}, single


def _resolve(layout: dict[str, _Src], ignore: set[str], files: dict[str, str], listing: str) -> dict[str, _Src]:
  """Maps layout names onto the file's (``transformer.`` / ``model.`` prefixes optional);
  ValueError naming the tensor and ``listing`` for a missing or unexpected one."""
  out = {}
  for key, src in layout.items():
    name = src.name
    if name not in files:
      bare = name.split(".", 1)[1] if name.startswith(("transformer.", "model.")) else None
      if bare is None or bare not in files:
        raise ValueError(f"{listing}: tensor {name!r} is missing (needed for jaxopd parameter {key})")
      name = bare
    out[key] = dataclasses.replace(src, name=name)
  used = {s.name for s in out.values()}
  known = used | ignore | {n.split(".", 1)[1] for n in ignore if "." in n}
  extra = sorted(set(files) - known)
  if extra:
    raise ValueError(f"{listing}: unexpected tensor {extra[0]!r}" +
                     (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + " for this config")
  return out


def _read_block(sl, src: _Src, idx: tuple) -> np.ndarray:
  """The block ``idx`` (slices of the param) of ``src``, read from the safetensors slice ``sl``:
  only the rows/columns that cover it."""
  dims = [f for fs in src.split for f in fs]
  want = [None] * len(dims)
  for t, p in enumerate(src.perm):
    start, stop, _ = (idx[t] if t < len(idx) else slice(None)).indices(dims[p])
    want[p] = (start, stop)
  sel, shape, post, k = [], [], [], 0
  for j, fs in enumerate(src.split):
    inner = math.prod(fs[1:])
    (a, b), off = want[k], src.offset if j == len(src.split) - 1 else 0
    sel.append(slice(off + a * inner, off + b * inner))
    shape += [b - a, *fs[1:]]
    post += [slice(None)] + [slice(*w) for w in want[k + 1:k + len(fs)]]
    k += len(fs)
  block = np.asarray(sl[tuple(sel)]).reshape(shape)[tuple(post)]
  return block.transpose(src.perm)


def load_params(hf_dir: str, abstract_params, model_cfg: ModelConfig | None = None,
                where: str = "config.model") -> Any:
  """The checkpoint in ``hf_dir`` as ``abstract_params`` (one Transformer's ``nnx.Param`` state
  of ``ShapeDtypeStruct``s with shardings), each device reading only its own slice.

  With ``model_cfg``, a differing architecture field is a ConfigError (see
  :func:`check_compatible`). A missing, unexpected or mis-shaped tensor is a
  ValueError naming the tensor and the file.
  """
  cfg = check_compatible(hf_dir, model_cfg, where) if model_cfg is not None else config_from_hf(hf_dir)
  files, listing = _tensor_files(hf_dir)
  srcs = _resolve(*_layout(cfg), files, listing)
  flat, treedef = ckpt_lib.flatten(abstract_params)
  out = {}
  handles = {}
  for key, sds in flat.items():
    if key not in srcs:
      raise ValueError(f"{listing}: no HF tensor for jaxopd parameter {key!r} (is the target a {cfg.family} "
                       f"Transformer?)")
    src = srcs[key]
    path = files[src.name]
    if path not in handles:
      handles[path] = st_io.open_tensors(path)
    if src.name not in handles[path].keys():
      raise ValueError(f"{listing}: tensor {src.name!r} is listed in {path}, which does not hold it")
    sl = handles[path][src.name]
    shape = tuple(sl.shape)
    if shape != src.shape:
      raise ValueError(f"{path}: tensor {src.name!r} has shape {shape}, the config expects {src.shape} "
                       f"(jaxopd parameter {key} {src.param_shape})")
    if tuple(sds.shape) != src.param_shape:
      raise ValueError(f"{path}: tensor {src.name!r} gives {key} the shape {src.param_shape}, "
                       f"the target model has {tuple(sds.shape)}")
    cache = {}

    def read(idx, sl=sl, src=src, dtype=sds.dtype, cache=cache):
      k = tuple(s.indices(n)[:2] for s, n in zip(idx, src.param_shape))
      if k not in cache:   # replicas of one block are read once
        cache[k] = _read_block(sl, src, idx).astype(dtype)
      return cache[k]

    out[key] = jax.make_array_from_callback(tuple(sds.shape), sds.sharding, read)
  return ckpt_lib.unflatten(treedef, out, list(flat))


def abstract_model(cfg: ModelConfig, mesh, rules) -> tuple[Any, Any]:
  """``(graphdef, abstract params)`` of a Transformer, each parameter a ShapeDtypeStruct in
  the NamedSharding its ``logical_axes`` get from ``rules`` (as the trainer shards it)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  shardings = mesh_lib.tree_shardings(state, mesh, rules)
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def load_tokenizer(hf_dir: str):
  """The tokenizer of ``hf_dir`` (:func:`jaxopd.data.tokenizer.load_tokenizer`) when tokenizer
  files are there, else None."""
  if not any(os.path.isfile(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
    return None
  from jaxopd.data.tokenizer import load_tokenizer as load_tok
  return load_tok(hf_dir)


def load(hf_dir: str, mesh=None, rules=None, dtype: str = "float32",
         param_dtype: str = "float32") -> tuple[Transformer, Any]:
  """``(Transformer, tokenizer or None)`` from ``hf_dir``; parameters (in ``param_dtype``)
  created in their shardings on ``mesh`` (default: the first device) under ``rules``
  (default: :data:`jaxopd.mesh.DEFAULT_RULES`); ``dtype`` is the compute dtype."""
  cfg = config_from_hf(hf_dir, dtype, param_dtype)
  mesh = mesh_lib.make_mesh((1, 1, 1), 1) if mesh is None else mesh
  rules = mesh_lib.rules_from_config(mesh_lib.DEFAULT_RULES if rules is None else rules)
  graphdef, abstract = abstract_model(cfg, mesh, rules)
  return nnx.merge(graphdef, load_params(hf_dir, abstract)), load_tokenizer(hf_dir)


# --- export -------------------------------------------------------------------
def hf_config(cfg: ModelConfig, tokenizer=None):
  """The transformers config (GPT2Config, LlamaConfig, or Qwen2Config when ``qkv_bias``) of ``cfg``."""
  import transformers
  ids = {}
  if tokenizer is not None:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
  if cfg.family == "gpt2":
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ff_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
        **{"bos_token_id": None, "eos_token_id": None, **ids})
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                tie_word_embeddings=cfg.tie_embeddings, **{"bos_token_id": None, "eos_token_id": None, **ids})
  if cfg.qkv_bias:
    return transformers.Qwen2Config(**common)
  return transformers.LlamaConfig(head_dim=cfg.head_dim, **common)


def export(model_or_params, model_config: ModelConfig, out_dir: str, tokenizer=None,
           dtype: str | None = None) -> str:
  """Writes ``out_dir/config.json`` and ``out_dir/model.safetensors``, and the tokenizer if
  given. ``model_or_params``: a Transformer, its ``nnx.Param`` state, or the pure dict of
  that state. ``dtype``: ``float32``, ``bfloat16`` or ``float16`` for every tensor; None
  keeps the parameters' dtype (``model_config.param_dtype``). Returns ``out_dir``.

  The token ids in ``config.json`` are the tokenizer's; for a reward model
  (``head="score"``) the pad id decides which token transformers scores (the last
  that is not pad), so give the tokenizer as saved with it."""
  params = nnx.state(model_or_params, nnx.Param) if isinstance(model_or_params, nnx.Module) else model_or_params
  flat, _ = ckpt_lib.flatten(params)
  layout, _ = _layout(model_config)
  if set(flat) != set(layout):
    diff = sorted(set(flat) ^ set(layout))
    raise ValueError(f"export: parameter {diff[0]!r} is in only one of the model and the {model_config.family} "
                     f"layout of model_config")
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ValueError(f"export: dtype={dtype!r}: must be one of {sorted(EXPORT_DTYPES)}")
  tensors = {}
  for key, src in layout.items():
    x = np.asarray(jax.device_get(flat[key]))
    out_dtype = EXPORT_DTYPES[dtype] if dtype is not None else x.dtype
    if x.shape != src.param_shape:
      raise ValueError(f"export: parameter {key} has shape {x.shape}, model_config gives {src.param_shape}")
    window = x.transpose(np.argsort(src.perm)).reshape([math.prod(fs) for fs in src.split])
    full = tensors.setdefault(src.name, np.zeros(src.shape, out_dtype))
    full[..., src.offset:src.offset + window.shape[-1]] = window.astype(out_dtype)
  os.makedirs(out_dir, exist_ok=True)
  hcfg = hf_config(model_config, tokenizer)
  if model_config.head == "score":
    hcfg.num_labels = 1
    hcfg.architectures = [{"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2"}[hcfg.model_type]
                          + "ForSequenceClassification"]
  else:
    hcfg.architectures = [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[hcfg.model_type]]
  hcfg.dtype = {np.dtype(v): k for k, v in EXPORT_DTYPES.items()}[next(iter(tensors.values())).dtype]
  hcfg.save_pretrained(out_dir)
  st_io.save(tensors, os.path.join(out_dir, SINGLE), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir


# --- CLI ----------------------------------------------------------------------
def export_run(workdir: str, model: str, out_dir: str, tokenizer_dir: str = "", dtype: str | None = None) -> int:
  """Exports model ``model`` of the latest checkpoint of run ``workdir`` (its architecture
  from the run's ``models.json``); returns the checkpoint step."""
  from jaxopd.models import table
  params, r = table.load_model(f"run:{paths.resolve(workdir)}:{model}", model)
  export(params, r.arch, out_dir, load_tokenizer(tokenizer_dir) if tokenizer_dir else None, dtype)
  return r.source.step


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jaxopd.models.hf", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  ex = sub.add_parser("export", help="a run's latest checkpoint -> an HF directory")
  ex.add_argument("--workdir", required=True, help="the run directory (models.json, checkpoints/)")
  ex.add_argument("--model", default="policy", help="which model (role) of the run")
  ex.add_argument("--out", required=True, help="output directory")
  ex.add_argument("--tokenizer", default="", help="a tokenizer directory to save alongside (optional)")
  ex.add_argument("--dtype", default=None, choices=sorted(EXPORT_DTYPES),
                  help="dtype of the written tensors (default: the parameters')")
  args = ap.parse_args(argv)
  try:
    step = export_run(args.workdir, args.model, args.out, args.tokenizer, args.dtype)
    print(f"exported {args.model} of {args.workdir} (step {step}) to {args.out}")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
