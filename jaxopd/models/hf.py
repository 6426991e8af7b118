"""Hugging Face checkpoints: config and safetensors import/export for :class:`Transformer`.

Supported ``model_type``: ``gpt2``, ``llama`` (Llama 2/3.x), ``qwen2``, ``qwen3``,
``mistral``, ``gemma2``, ``gemma3_text`` and ``olmo2``. HF is the weight format
only; the model is always jaxopd's. :func:`config_from_hf` reads ``config.json`` (a feature the
model cannot represent is a ``ConfigError`` naming the field and the file); :func:`load_params` /
:func:`load` read single or sharded safetensors straight into each parameter's ``NamedSharding``,
each device reading only its slice; :func:`export` writes what ``transformers`` loads (a run's
model: :mod:`jaxopd.models.export`). A reward model (``*ForSequenceClassification`` with one label)
loads with ``head="score"``: HF's bias-free ``score`` layer in place of the LM head. A run starts a
model from an HF directory with ``--config.models.<role>.init=hf:DIR`` (:mod:`jaxopd.models.table`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxopd import checkpoint as ckpt_lib
from jaxopd import mesh as mesh_lib
from jaxopd.errors import ConfigError, WeightFileError
from jaxopd.models import safetensors_io as st_io
from jaxopd.models.transformer import ModelConfig, Transformer, compare_arch

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": st_io.DTYPES["BF16"], "float16": np.float16}


# --- config -------------------------------------------------------------------
# HF model_type -> (causal LM class, sequence-classification class) that export writes.
ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
                 "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
                 "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
                 "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
                 "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
                 "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
                 "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
                 "olmo2": ("Olmo2ForCausalLM", None)}
GEMMA = ("gemma2", "gemma3_text")
LAYER_KINDS = {"full_attention": "full", "sliding_attention": "sliding"}


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
  except UnicodeDecodeError:
    raise ConfigError(f"{path}: not a UTF-8 text file") from None


def config_from_hf(hf_dir: str, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
  """The :class:`ModelConfig` of ``hf_dir/config.json`` (``dtype``: compute dtype,
  ``param_dtype``: the dtype parameters are kept in, whatever the file's)."""
  path = os.path.join(hf_dir, "config.json")
  raw = _read_json(path)
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: must hold a JSON object")
  return config_from_dict(raw, path, dtype, param_dtype)


def config_from_dict(raw: dict, path: str, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
  """:func:`config_from_hf` of a ``config.json``'s contents ``raw`` (``path`` names it in errors).
  transformers' own config class reads it first, so older spellings (``rope_theta``,
  ``rope_scaling``, ``sliding_window_pattern``) mean what they mean to transformers. A feature
  the model cannot represent (yarn rotary scaling, output or MLP biases ...) is a ConfigError."""
  import transformers
  mt = raw.get("model_type")
  if mt not in ARCHITECTURES:
    hint = " (a Gemma 3 text model's config.json has gemma3_text)" if mt == "gemma3" else ""
    raise ConfigError(f"{path}: model_type={mt!r}: supported: {', '.join(ARCHITECTURES)}{hint}")
  try:
    hc = transformers.AutoConfig.for_model(mt, **{k: v for k, v in raw.items() if k != "model_type"}).to_dict()
  except Exception as e:   # transformers' strict config classes raise their own error types
    raise ConfigError(f"{path}: transformers cannot read it as {mt}: {str(e).splitlines()[0]}") from None

  def bad(field, why):
    raise ConfigError(f"{path}: {field}={hc.get(field, raw.get(field))!r}: {why}")

  def need(field, ok, why):
    if hc.get(field) is not None and not ok(hc[field]):
      bad(field, why)

  archs = hc.get("architectures") or []
  head = "score" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"
  if head == "score":
    labels = len(hc.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})   # transformers' default is 2
    if labels != 1:
      raise ConfigError(f"{path}: id2label has {labels} labels: a reward model ({archs[0]}) has one output "
                        f"(num_labels=1)")
  common = dict(dtype=dtype, param_dtype=param_dtype, head=head, tie_embeddings=bool(hc.get("tie_word_embeddings")))
  if mt == "gpt2":
    need("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "only the tanh GELU is supported")
    need("scale_attn_weights", lambda v: v, "unscaled attention is not supported")
    need("scale_attn_by_inverse_layer_idx", lambda v: not v, "is not supported")
    need("add_cross_attention", lambda v: not v, "cross-attention is not supported")
    cfg = ModelConfig(family="gpt2", vocab_size=hc["vocab_size"], d_model=hc["n_embd"], n_layers=hc["n_layer"],
                      n_heads=hc["n_head"], d_ff=hc.get("n_inner") or 0, max_len=hc["n_positions"],
                      norm_eps=hc["layer_norm_epsilon"], **common)
    return cfg.validate(prefix=f"{path} (as jaxopd ModelConfig)")
  act_field = "hidden_activation" if mt in GEMMA else "hidden_act"
  acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
  need(act_field, lambda v: v in acts, f"supported: {', '.join(acts)}")
  need("attention_bias", lambda v: not v, "attention output biases are not supported (q/k/v bias: qwen2 only)")
  need("mlp_bias", lambda v: not v, "MLP biases are not supported")
  need("use_bidirectional_attention", lambda v: not v, "only causal attention is supported")
  d, h = hc["hidden_size"], hc["num_attention_heads"]
  head_dim = hc.get("head_dim") or d // h
  rope = _rope_fields(hc.get("rope_parameters") or {}, bad)
  window = hc.get("sliding_window") or 0
  types = tuple(LAYER_KINDS.get(t, t) for t in hc.get("layer_types") or ())
  need("layer_types", lambda v: all(t in LAYER_KINDS for t in v), f"supported: {', '.join(LAYER_KINDS)}")
  if not window:
    if "sliding" in types:
      bad("layer_types", "has sliding_attention layers but sliding_window is not set")
    types = ()
  elif len(set(types)) <= 1:
    types, window = (), (0 if types and types[0] == "full" else window)
  if rope.get("rope_local_theta") and "sliding" not in (types or (("sliding",) if window else ())):
    rope.pop("rope_local_theta")
  gemma = mt in GEMMA
  cfg = ModelConfig(family="llama", vocab_size=hc["vocab_size"], d_model=d, n_layers=hc["num_hidden_layers"],
                    n_heads=h, n_kv_heads=hc.get("num_key_value_heads") or h, d_ff=hc["intermediate_size"],
                    max_len=hc.get("max_position_embeddings") or 2048, qkv_bias=mt == "qwen2",
                    norm_eps=hc.get("rms_norm_eps") or 1e-6, d_head=0 if head_dim == d // h else head_dim,
                    qk_norm={"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}.get(mt, "none"),
                    norm_layout="sandwich" if gemma else "post" if mt == "olmo2" else "pre",
                    norm_plus_one=gemma, mlp_act=acts[hc.get(act_field) or "silu"], embed_scale=gemma,
                    query_scalar=float(hc["query_pre_attn_scalar"]) if gemma else 0.0,
                    attn_softcap=float(hc.get("attn_logit_softcapping") or 0.0),
                    logit_softcap=float(hc.get("final_logit_softcapping") or 0.0),
                    sliding_window=window, layer_types=types, hf_type=mt, **rope, **common)
  return cfg.validate(prefix=f"{path} (as jaxopd ModelConfig)")


def _rope_fields(rp: dict, bad) -> dict:
  """ModelConfig's rotary fields of transformers' ``rope_parameters`` (one dict, or one per layer
  type: Gemma 3)."""
  full, local = (rp.get("full_attention", {}), rp.get("sliding_attention")) if "full_attention" in rp else (rp, None)
  kind = full.get("rope_type", full.get("type", "default"))
  out = dict(rope_theta=float(full.get("rope_theta", 10000.0)), rope_type=kind)
  if kind not in ("default", "linear", "llama3"):
    bad("rope_parameters", "supported rotary types: default, linear, llama3")
  for part in (full, local or {}):
    if part.get("partial_rotary_factor", 1.0) != 1.0:
      bad("rope_parameters", "partial rotary embeddings are not supported")
  if kind != "default":
    out["rope_factor"] = float(full["factor"])
  if kind == "llama3":
    out.update(rope_low_freq=float(full["low_freq_factor"]), rope_high_freq=float(full["high_freq_factor"]),
               rope_original_len=int(full["original_max_position_embeddings"]))
  if local is not None:
    if local.get("rope_type", "default") != "default":
      bad("rope_parameters", "sliding layers' rotary embedding must be the default type")
    theta = float(local.get("rope_theta", 10000.0))
    if theta != out["rope_theta"] or kind != "default":
      out["rope_local_theta"] = theta
  return out


def check_compatible(hf_dir: str, cfg: ModelConfig, where: str = "config.model") -> ModelConfig:
  """The checkpoint's config; ConfigError ``"{where}.{field}=..."`` where it differs from ``cfg``
  (:func:`jaxopd.models.transformer.compare_arch`)."""
  theirs = config_from_hf(hf_dir)
  compare_arch(cfg, theirs, where, os.path.join(hf_dir, "config.json"))
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
    norms = {"pre": (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")),
             "sandwich": (("ln1", "input_layernorm"), ("ln1_post", "post_attention_layernorm"),
                          ("ln2", "pre_feedforward_layernorm"), ("ln2_post", "post_feedforward_layernorm")),
             "post": (("ln1_post", "post_attention_layernorm"), ("ln2_post", "post_feedforward_layernorm"))}
    qk_width = {"head": dh, "full": None}.get(cfg.qk_norm, 0)
    for i in range(cfg.n_layers):
      b, k = f"{p}layers.{i}.", f"blocks.{i}."
      for ours, theirs in norms[cfg.norm_layout]:
        out[f"{k}{ours}.scale"] = same(f"{b}{theirs}.weight", d)
      if qk_width is not None and qk_width:
        out[k + "attn.q_norm.scale"] = same(b + "self_attn.q_norm.weight", dh)
        out[k + "attn.k_norm.scale"] = same(b + "self_attn.k_norm.weight", dh)
      elif qk_width is None:
        out[k + "attn.q_norm.scale"] = same(b + "self_attn.q_norm.weight", h * dh)
        out[k + "attn.k_norm.scale"] = same(b + "self_attn.k_norm.weight", kv * dh)
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
        raise WeightFileError(f"{listing}: tensor {name!r} is missing (needed for jaxopd parameter {key})")
      name = bare
    out[key] = dataclasses.replace(src, name=name)
  used = {s.name for s in out.values()}
  known = used | ignore | {n.split(".", 1)[1] for n in ignore if "." in n}
  extra = sorted(set(files) - known)
  if extra:
    raise WeightFileError(f"{listing}: unexpected tensor {extra[0]!r}" +
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
  of ``ShapeDtypeStruct``s with shardings), each device reading only its own slice
  (``jax.make_array_from_callback`` over ``safe_open(...).get_slice``), from ``model.safetensors``
  or the sharded ``model.safetensors.index.json`` + shards.

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
      raise WeightFileError(f"{listing}: no HF tensor for jaxopd parameter {key!r} (is the target a {cfg.family} "
                       f"Transformer?)")
    src = srcs[key]
    path = files[src.name]
    if path not in handles:
      handles[path] = st_io.open_tensors(path)
    if src.name not in handles[path].keys():
      raise WeightFileError(f"{listing}: tensor {src.name!r} is listed in {path}, which does not hold it")
    sl = handles[path][src.name]
    shape = tuple(sl.shape)
    if shape != src.shape:
      raise WeightFileError(f"{path}: tensor {src.name!r} has shape {shape}, the config expects {src.shape} "
                       f"(jaxopd parameter {key} {src.param_shape})")
    if tuple(sds.shape) != src.param_shape:
      raise WeightFileError(f"{path}: tensor {src.name!r} gives {key} the shape {src.param_shape}, "
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


def has_tokenizer(hf_dir: str) -> bool:
  """Whether model directory ``hf_dir`` holds tokenizer files."""
  return any(os.path.isfile(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES)


def load(hf_dir: str, mesh=None, rules=None, dtype: str = "float32",
         param_dtype: str = "float32") -> Transformer:
  """The Transformer of ``hf_dir``; parameters (in ``param_dtype``)
  created in their shardings on ``mesh`` (default: the first device) under ``rules``
  (default: :data:`jaxopd.mesh.DEFAULT_RULES`); ``dtype`` is the compute dtype."""
  cfg = config_from_hf(hf_dir, dtype, param_dtype)
  mesh = mesh_lib.make_mesh((1, 1, 1), 1) if mesh is None else mesh
  rules = mesh_lib.rules_from_config(mesh_lib.DEFAULT_RULES if rules is None else rules)
  graphdef, abstract = abstract_model(cfg, mesh, rules)
  return nnx.merge(graphdef, load_params(hf_dir, abstract))


# --- export -------------------------------------------------------------------
def hf_config(cfg: ModelConfig, tokenizer=None):
  """The transformers config of ``cfg`` for its :attr:`~ModelConfig.export_type`; a ValueError
  naming the field where that HF family cannot hold ``cfg`` (read back, it would differ)."""
  import transformers
  ids = {"bos_token_id": None, "eos_token_id": None}
  if tokenizer is not None:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
  mt = cfg.export_type
  if cfg.family == "gpt2":
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ff_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings, **ids)
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq, high_freq_factor=cfg.rope_high_freq,
                original_max_position_embeddings=cfg.rope_original_len)
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, **ids)
  kw["hidden_activation" if mt in GEMMA else "hidden_act"] = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[
      cfg.mlp_act]
  types = [{"full": "full_attention", "sliding": "sliding_attention"}[t]
           for t in (cfg.layer_types or ["sliding" if cfg.sliding_window else "full"] * cfg.n_layers)]
  if mt in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
    kw.update(layer_types=types, sliding_window=cfg.sliding_window or None)
    if mt.startswith("qwen"):
      kw.update(use_sliding_window=bool(cfg.sliding_window), max_window_layers=types.index("sliding_attention")
                if "sliding_attention" in types else cfg.n_layers)
  if mt == "mistral":
    kw["sliding_window"] = cfg.sliding_window or None
  if mt in GEMMA:
    scalar = cfg.query_scalar or cfg.head_dim
    kw.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=cfg.attn_softcap or None,
              final_logit_softcapping=cfg.logit_softcap or None)
  if mt == "gemma3_text":
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    kw["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
  hcfg = transformers.AutoConfig.for_model(mt, **kw)
  ours, back = (_arch(c) for c in (cfg, config_from_dict(hcfg.to_dict(), f"export as {mt}")))
  for f in ours:
    if ours[f] != back[f]:
      raise ValueError(f"export: {f}={ours[f]!r} cannot be written as HF model_type {mt!r} (it reads back as "
                       f"{back[f]!r}); set config.model.hf_type to a family that has it")
  return hcfg


def _arch(cfg: ModelConfig) -> dict:
  """The fields of ``cfg`` an HF config.json holds (widths as used, not as defaulted)."""
  skip = {"hf_type", "head", "max_len", "dtype", "param_dtype", "matmul_dtype", "attention", "attention_chunk", "remat",
          "scan_layers", "init_std", "lora_rank", "lora_alpha", "lora_targets", "lora_init"}
  out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in skip}
  out.update(d_ff=cfg.ff_dim, d_head=cfg.head_dim, n_kv_heads=cfg.kv_heads)
  return out


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
  lm, score = ARCHITECTURES[hcfg.model_type]
  if model_config.head == "score":
    if score is None:
      raise ValueError(f"export: transformers has no sequence-classification model for {hcfg.model_type}")
    hcfg.num_labels = 1
    hcfg.architectures = [score]
  else:
    hcfg.architectures = [lm]
  hcfg.dtype = {np.dtype(v): k for k, v in EXPORT_DTYPES.items()}[next(iter(tensors.values())).dtype]
  hcfg.save_pretrained(out_dir)
  st_io.save(tensors, os.path.join(out_dir, SINGLE), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
