"""LoRA adapters (config.models.<role>.lora): the base exactly while B = 0, gradients on the
adapters only, a LoRA DPO step equal to full DPO on the merged weights, the adapters-off
reference (init=base:policy), PEFT and merged exports, an exact resume, one-line errors."""

import dataclasses
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures
from helpers import REPO, quiet
from jaxopd import checkpoint as ckpt_lib
from jaxopd import config as config_lib
from jaxopd import mesh as mesh_lib
from jaxopd import methods, train
from jaxopd.errors import ConfigError
from jaxopd.experiment import DataShard, load_config
from jaxopd.models import export, hf, lora

RANK = 4
sys.path.insert(0, os.path.join(REPO, "launch"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tiny Llama checkpoint saved in bfloat16, with its tokenizer."""
  return hf_fixtures.make_family_dir(str(tmp_path_factory.mktemp("hf") / "llama"), "llama", seed=3)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
  return hf_fixtures.write_jsonl(str(path), hf_fixtures.preference_records(16, seed=1))


def _dpo(llama, pairs, steps=3, rank=RANK, **overrides):
  c = quiet(load_config("tdpo.py:dpo"), steps, **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1, **overrides})
  c.batch_size, c.seq_len = 4, 48
  c.data.task = "files"
  c.data.files.train = pairs
  c.models.policy.init = f"hf:{llama}"
  c.models.policy.lora.rank = rank
  c.models.reference.init = "base:policy" if rank else f"hf:{llama}"
  return c


def _trainer(c):
  m = methods.get("tdpo")
  exp = m.build(c)
  mesh = mesh_lib.make_mesh((1, 1, 1), 1)
  facts = config_lib.validate(c, 1, 1)
  tr = train.Trainer(c, exp, mesh, facts["rules"])
  state, frozen = tr.init()
  state, frozen = tr.load_sources(state, frozen)
  batch = next(exp.train_data(DataShard(seed=c.seed, process_index=0, process_count=1, local_batch=c.batch_size)))
  return tr, exp, state, frozen, {k: jnp.asarray(v) for k, v in batch.items()}


def _logits(model, tokens):
  return np.asarray(jax.jit(lambda t: model(t).logits)(tokens))


def _flat(tree):
  return {k: np.asarray(v) for k, v in ckpt_lib.flatten(tree)[0].items()}


def test_zero_b_is_the_base_and_the_reference_is_the_base(llama, pairs):
  """At init (B = 0, A random) the LoRA policy's logits equal the separately loaded base's bit for
  bit, and so do the base:policy reference's; the trainable state is the adapters alone."""
  tr, _, state, frozen, _ = _trainer(_dpo(llama, pairs))
  models = tr.models(state, frozen)
  base = hf.load(llama)
  tokens = np.random.RandomState(0).randint(0, 320, (2, 12))
  want = _logits(base, tokens)
  adapters = _flat(state["params"]["policy"])
  assert adapters and all(lora.is_adapter(k) for k in adapters)
  assert len(adapters) == 2 * 7 * 2                               # A and B of 7 projections, 2 layers
  assert all(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("_lora_a"))
  assert np.array_equal(_logits(models["policy"], tokens), want)
  assert np.array_equal(_logits(models["reference"], tokens), want)
  assert "reference" not in frozen                                 # no second copy: the policy's base serves it
  assert {x.dtype for x in jax.tree.leaves(frozen["policy"])} == {np.dtype("float32")}


def test_lora_dpo_equals_full_dpo_on_merged_weights(llama, pairs):
  """With B random, the LoRA DPO loss equals the full-model DPO loss whose policy holds
  W + (alpha/r) A B, and the adapters' gradients are the chain rule of the full gradient:
  dA = s dW B^T, dB = s A^T dW (float32)."""
  c = _dpo(llama, pairs)
  tr, exp, state, frozen, batch = _trainer(c)
  rng = jax.random.PRNGKey(0)
  keys = jax.random.split(jax.random.PRNGKey(1), 64)
  params = jax.tree.map(lambda x: x, state["params"])
  flat, treedef = ckpt_lib.flatten(params)
  flat = {k: (0.05 * jax.random.normal(keys[i], v.shape) if k.endswith("_lora_b") else v)
          for i, (k, v) in enumerate(flat.items())}
  params = ckpt_lib.unflatten(treedef, flat, list(flat))
  loss_lora, g_lora = jax.value_and_grad(lambda p: exp.loss_fn(tr._merge(p, frozen), batch, rng).loss)(params)

  full_c = _dpo(llama, pairs, rank=0)
  full, full_exp, fstate, ffrozen, fbatch = _trainer(full_c)
  np.testing.assert_array_equal(np.asarray(fbatch["tokens"]), np.asarray(batch["tokens"]))
  scale = c.models.policy.lora.alpha / RANK
  base = _flat(frozen["policy"])
  ad = _flat(params["policy"])
  merged = dict(base)
  for k, (a, b) in lora.pairs(ad).items():
    merged[k] = base[k] + scale * np.asarray(lora.product(a, b))
  fflat, ftree = ckpt_lib.flatten(fstate["params"])
  fparams = ckpt_lib.unflatten(ftree, {k: jnp.asarray(merged[k.split(".", 1)[1]]) for k in fflat}, list(fflat))
  loss_full, g_full = jax.value_and_grad(lambda p: full_exp.loss_fn(full._merge(p, ffrozen), fbatch, rng).loss)(
      fparams)
  print(f"LoRA DPO loss {float(loss_lora):.6f}, full DPO on merged weights {float(loss_full):.6f}")
  assert float(loss_full) != pytest.approx(np.log(2), abs=1e-3)        # the adapters moved the policy
  np.testing.assert_allclose(float(loss_lora), float(loss_full), rtol=1e-5)
  gw = {k.split(".", 1)[1]: np.asarray(v) for k, v in ckpt_lib.flatten(g_full)[0].items()}
  gl = _flat(g_lora["policy"])
  worst = 0.0
  for k, (a, b) in lora.pairs(ad).items():
    r = a.shape[-1]
    g = gw[k].reshape(a.size // r, -1)
    da = scale * g @ b.reshape(r, -1).T
    db = scale * a.reshape(-1, r).T @ g
    for got, want in ((gl[k + "_lora_a"].reshape(da.shape), da), (gl[k + "_lora_b"].reshape(db.shape), db)):
      worst = max(worst, np.abs(got - want).max() / (np.abs(want).max() + 1e-12))
  print(f"adapter gradients vs the chain rule of the full gradient: max relative error {worst:.2e}")
  assert worst < 1e-4


@pytest.mark.pipeline
def test_lora_dpo_trains_adapters_only_exports_and_resumes(llama, pairs, tmp_path):
  """By flags: a LoRA DPO run moves the adapters and leaves every base weight bit-identical;
  the PEFT export loads onto the transformers base with PEFT and gives jaxopd's logits; the
  merged export does too; a later stage starts from the run (adapters folded in); a run resumed
  from its middle checkpoint ends with the same adapters as the uninterrupted one."""
  c = _dpo(llama, pairs, steps=4, **{"optim.lr": 1e-2, "checkpoint.every": 2})
  w = tmp_path / "dpo"
  m = methods.get("tdpo")
  out = train.run(c, str(w), m.build(c))
  tr = out.trainer
  models = tr.models(out.state, out.frozen)
  base = _flat(nnx.state(hf.load(llama), nnx.Param))
  assert {k: v.tobytes() for k, v in _flat(out.frozen["policy"]).items()} == {k: v.tobytes()
                                                                                  for k, v in base.items()}
  moved = [k for k, v in _flat(out.state["params"]["policy"]).items() if k.endswith("_lora_b") and np.abs(v).max()]
  assert len(moved) == 14, moved
  tokens = np.random.RandomState(1).randint(0, 320, (2, 12))
  ours = _logits(models["policy"], tokens)
  assert np.abs(ours - _logits(models["reference"], tokens)).max() > 1e-3

  # PEFT: adapters alone, onto the transformers base.
  import peft
  import torch
  import transformers
  assert export.main(["--workdir", str(w), "--adapters", "--out", str(tmp_path / "peft")]) == 0
  assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  print(f"PEFT adapters on the transformers base: max |logits diff| {np.abs(theirs - ours).max():.2e}")
  assert np.abs(theirs - ours).max() < 1e-4
  # Merged: a full HF directory.
  assert export.main(["--workdir", str(w), "--out", str(tmp_path / "merged")]) == 0
  diff = np.abs(hf_fixtures.torch_logits(str(tmp_path / "merged"), tokens) - ours).max()
  print(f"merged export: max |logits diff| {diff:.2e}")
  assert diff < 1e-4

  # Exact resume: a copy of the run without its last checkpoint resumes from step 2.
  cut = tmp_path / "cut"
  shutil.copytree(w, cut, ignore=lambda d, names: ["4"] if d.endswith("checkpoints") else [])
  again = train.run(c, str(cut), m.build(c))
  assert again.resumed_from == 2 and again.step == 4
  for k, v in _flat(out.state["params"]).items():
    np.testing.assert_array_equal(_flat(again.state["params"])[k], v, err_msg=k)


def test_lora_errors_are_one_line(llama, pairs):
  c = _dpo(llama, pairs)
  c.models.reference.init = "base:policy"
  c.models.policy.lora.rank = 0
  with pytest.raises(ConfigError, match=r"config\.models\.reference\.init='base:policy': config\.models\.policy "
                                        r"has no adapters"):
    _trainer(c)
  c = _dpo(llama, pairs)
  c.models.policy.lora.targets = "q,x"
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.lora\.targets='q,x': must be all or"):
    _trainer(c)
  c = _dpo(llama, pairs)
  c.models.reference.param_dtype = "bfloat16"
  with pytest.raises(ConfigError, match=r"config\.models\.reference\.param_dtype='bfloat16': reference computes "
                                        r"with config\.models\.policy's base arrays"):
    _trainer(c)


@pytest.mark.parametrize("attention", ["dot_product", "chunked", "splash"])
def test_adapters_under_scan_remat_and_every_attention(llama, attention):
  """With B random, the LoRA model's logits and adapter gradients under scan_layers + remat and
  another attention implementation equal the plain einsum forward's."""
  from jaxopd.models.transformer import Transformer
  base = hf.config_from_hf(llama)
  cfg = dataclasses.replace(base, lora_rank=RANK, lora_targets=("q", "v", "o", "down"))
  model = Transformer(cfg, nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  flat, treedef = ckpt_lib.flatten(state)
  keys = iter(jax.random.split(jax.random.PRNGKey(2), len(flat)))
  flat = {k: (0.1 * jax.random.normal(next(keys), v.shape) if k.endswith("_lora_b") else v) for k, v in flat.items()}
  state = ckpt_lib.unflatten(treedef, flat, list(flat))
  other = dataclasses.replace(cfg, attention=attention, scan_layers=True, remat="full",
                              attention_chunk=8 if attention == "chunked" else 512)
  other_gd = nnx.split(Transformer(other, nnx.Rngs(params=0)))[0]
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 320, (2, 16)))
  adapters = nnx.All(nnx.Param, lambda path, x: isinstance(x, lora.LoRAParam))

  def loss(gd, s):
    m = nnx.merge(gd, s)
    return jnp.mean(jax.nn.log_softmax(m(tokens).logits)[..., 0])

  outs = []
  for gd in (graphdef, other_gd):
    ad, rest = nnx.split_state(state, adapters, ...)
    val, grads = jax.jit(jax.value_and_grad(lambda a, r, gd=gd: loss(gd, nnx.merge_state(a, r))))(ad, rest)
    outs.append((float(val), _flat(grads)))
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5)
  assert set(outs[0][1]) == set(outs[1][1]) and len(outs[0][1]) == 2 * 4 * 2
  for k, g in outs[0][1].items():
    np.testing.assert_allclose(outs[1][1][k], g, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.pipeline
def test_lora_grpo_on_a_sharded_mesh(llama, tmp_path):
  """GRPO by flags with a LoRA policy whose bfloat16 base is sharded over fsdp=2 x tensor=2 (x data=2),
  layers scanned and rematerialised, two microbatches, a KL reference (the policy's snapshot:
  adapters only): trains, the adapters are laid out along their weights' axes, the base is untouched."""
  from jaxopd import logs
  prompts = hf_fixtures.write_jsonl(str(tmp_path / "prompts.jsonl"), hf_fixtures.prompt_records(16))
  g = quiet(load_config("grpo.py"), 2, **{"mesh.shape": (2, 2, 2)})
  g.data.task = "files"
  g.data.files.train = prompts
  g.models.policy.init = f"hf:{llama}"
  g.models.policy.param_dtype = "bfloat16"
  g.models.policy.scan_layers = True
  g.models.policy.remat = "full"
  g.models.policy.lora.rank = RANK
  g.method.reward = "hf_fixtures:shorter_is_better"
  g.method.group_size, g.method.beta_kl = 4, 0.04
  g.batch_size, g.grad_accum = 8, 2
  g.rollout.prompt_len, g.rollout.max_new_tokens, g.seq_len = 24, 8, 32
  g.optim.lr = 1e-2
  m = methods.get("grpo")
  out = train.run(m.prepare(g, str(tmp_path / "g")), str(tmp_path / "g"), m.build(g))
  rec = logs.read_metrics(str(tmp_path / "g"), "train")
  assert all(np.isfinite(r["loss"]) for r in rec) and rec[-1]["grad_norm"] > 0
  params = out.state["params"]["policy"]
  wq_a = params["blocks"][0]["attn"]["wq_lora_a"]
  wq_b = params["blocks"][0]["attn"]["wq_lora_b"]
  assert wq_a.sharding.spec[0] == "fsdp" and wq_b.sharding.spec[1] == "tensor"
  assert set(out.state["snapshots"]["reference"]["blocks"][0]["attn"]) == set(params["blocks"][0]["attn"])
  assert {x.dtype for x in jax.tree.leaves(out.frozen["policy"])} == {np.dtype("bfloat16")}
  base = _flat(nnx.state(hf.load(llama, param_dtype="bfloat16"), nnx.Param))
  got = _flat(out.frozen["policy"])
  assert all(np.array_equal(got[k], base[k]) for k in base)
  assert any(np.abs(v).max() > 0 for k, v in _flat(params).items() if k.endswith("_lora_b"))


@pytest.mark.pipeline
@pytest.mark.parametrize("method", ["sft", "dpo", "tdpo", "sparsepo", "redi", "fdpg", "distillspec", "grpo"])
def test_every_method_trains_a_lora_policy_by_flags(tmp_path, method):
  """Each method with its trained role given adapters and its reference / f-DPG base declared
  base:policy, by the flags launch/fit_table.py --lora passes (FSDP over 8 devices, synthetic TRL
  files, a small random base): two steps train, finite; only adapters are trained and they move;
  the base is the one the seed made."""
  import fit_table
  data = fit_table.write_data(str(tmp_path / "data"), 16, 16, n=32)
  tiny = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 512}
  config = fit_table.cell_config(method, data, 32, 8, tiny, remat="full", scan=True, prompt=16, lora=RANK)
  config = quiet(config, 2, **{"optim.lr": 1e-2})
  m = methods.get(config.method.name)
  w = str(tmp_path / "w")
  if method != "fdpg":   # f-DPG's prepare fits its target on a loaded base (hf:, run:)
    config = m.prepare(config, w)
  out = train.run(config, w, m.build(config))
  role = fit_table.TRAINABLE_ROLES[method][0]
  trained = _flat(out.state["params"][role])
  assert trained and all(lora.is_adapter(k) for k in trained)
  assert any(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("_lora_b"))
  fresh = out.trainer.init()[1][role]
  assert all(np.array_equal(v, _flat(fresh)[k]) for k, v in _flat(out.frozen[role]).items())
  assert np.isfinite(out.train["loss"])
