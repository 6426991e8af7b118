"""Hugging Face interop: tiny random GPT-2 / Llama (GQA) / Qwen2 checkpoints made with
transformers load into jaxopd with the same logits (float32, max abs diff < 1e-4), on
one device and sharded over data=2, fsdp=2, tensor=2; export reloads in transformers;
errors name the tensor / field and the file; a run from an HF directory and the export CLI."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from helpers import SFT, params_of, tiny_config  # noqa: E402
from jaxopd import checkpoint as ckpt_lib  # noqa: E402
from jaxopd import mesh as mesh_lib  # noqa: E402
from jaxopd import train  # noqa: E402
from jaxopd.errors import ConfigError  # noqa: E402
from jaxopd.data.tokenizer import hf_tokenizer
from jaxopd.models import export, hf  # noqa: E402

ATOL = 1e-4
TOKENS = np.random.RandomState(0).randint(0, 128, (4, 16))


def _hf_configs():
  small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, bos_token_id=None, eos_token_id=None)
  return {
      "gpt2": transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=None, eos_token_id=None),
      "llama": transformers.LlamaConfig(rms_norm_eps=1e-5, **small,
                                        rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
      "qwen2": transformers.Qwen2Config(tie_word_embeddings=True, **small),
  }


def _random_hf_model(config, seed=0):
  """A transformers model with every parameter random (norm scales around 1, nonzero biases)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
  return model


def _tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")


def _torch_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _logits(model, mesh=None, rules=None, tokens=TOKENS):
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
  if mesh is None:
    return np.asarray(f(state, tokens))
  with jax.set_mesh(mesh), mesh_lib.use_rules(rules):
    return np.asarray(f(state, tokens))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """family -> (HF dir, torch model); qwen2 saved in 11 shards (the index-file path),
  llama with a tokenizer."""
  out = {}
  for name, config in _hf_configs().items():
    path = str(tmp_path_factory.mktemp(name))
    model = _random_hf_model(config)
    model.save_pretrained(path, **({"max_shard_size": "40KB"} if name == "qwen2" else {}))
    if name == "llama":
      _tokenizer().save_pretrained(path)
    out[name] = (path, model)
  assert os.path.isfile(os.path.join(out["qwen2"][0], hf.INDEX))
  return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_load_matches_transformers(ckpts, name):
  path, ref = ckpts[name]
  model, tok = hf.load(path), hf_tokenizer(path)
  assert model.cfg.family == ("gpt2" if name == "gpt2" else "llama")
  assert model.cfg.qkv_bias == (name == "qwen2") and model.cfg.tie_embeddings == (name != "llama")
  assert (tok is not None) == (name == "llama")
  if tok is not None:
    assert tok("w5 w7")["input_ids"] == [5, 7]
  want = _torch_logits(ref)
  diff = np.abs(_logits(model) - want).max()
  print(f"{name}: max |logits diff| {diff:.2e} (logits up to {np.abs(want).max():.1f})")
  assert diff < ATOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_load_sharded_on_2x2x2_mesh(ckpts, name, monkeypatch):
  """Each parameter is created in the sharding its logical axes give, and each
  device reads only its own block from the file."""
  path, ref = ckpts[name]
  reads = {}
  read = hf._read_block

  def spy(sl, src, idx):
    block = read(sl, src, idx)
    reads.setdefault((src.name, src.offset), set()).add(block.shape)
    return block

  monkeypatch.setattr(hf, "_read_block", spy)
  mesh = mesh_lib.make_mesh((2, 2, 2))
  rules = mesh_lib.DEFAULT_RULES
  model = hf.load(path, mesh, rules)
  layout, _ = hf._layout(model.cfg)
  state = nnx.state(model, nnx.Param)
  params = ckpt_lib.flatten(state)[0]
  variables = dict(zip(params, jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))))
  sharded = 0
  for key, arr in params.items():
    spec = mesh_lib.logical_to_spec(variables[key].get_metadata()["logical_axes"], rules)
    assert arr.sharding.spec == spec, key
    assert len(arr.sharding.device_set) == 8
    assert reads[(layout[key].name, layout[key].offset)] == {arr.sharding.shard_shape(arr.shape)}, key
    sharded += arr.sharding.shard_shape(arr.shape) != arr.shape
  assert sharded >= 6 * model.cfg.n_layers
  diff = np.abs(_logits(model, mesh, rules) - _torch_logits(ref)).max()
  print(f"{name} on (2, 2, 2): max |logits diff| {diff:.2e}")
  assert diff < ATOL


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_export_reloads_in_transformers(ckpts, name, tmp_path):
  path, ref = ckpts[name]
  model, tok = hf.load(path), hf_tokenizer(path)
  out = hf.export(model, model.cfg, str(tmp_path / "out"), tokenizer=tok)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(back) is type(ref)
  diff = np.abs(_torch_logits(back) - _logits(model)).max()
  print(f"{name} exported: max |logits diff| {diff:.2e}")
  assert diff < ATOL
  # The written tensors are the original ones.
  original = {k: v.numpy() for k, v in ref.state_dict().items()}
  for k, v in load_file(os.path.join(out, hf.SINGLE)).items():
    np.testing.assert_array_equal(v, original[k], err_msg=k)
  assert (hf_tokenizer(out) is not None) == (tok is not None)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_bad_tensors_name_the_tensor_and_file(ckpts, tmp_path):
  path = _copy(ckpts["llama"][0], tmp_path / "c")
  f = os.path.join(path, hf.SINGLE)
  tensors = load_file(f)
  name = "model.layers.1.mlp.up_proj.weight"
  save_file({**tensors, name: tensors[name][:96]}, f, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has shape \(96, 64\)"):
    hf.load(path)
  save_file({k: v for k, v in tensors.items() if k != name}, f, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' is missing"):
    hf.load(path)
  save_file({**tensors, "model.layers.0.mlp.extra.weight": tensors[name]}, f, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra"):
    hf.load(path)
  # Sharded: the index file is named.
  path = _copy(ckpts["qwen2"][0], tmp_path / "q")
  index = json.load(open(os.path.join(path, hf.INDEX)))
  del index["weight_map"]["model.norm.weight"]
  json.dump(index, open(os.path.join(path, hf.INDEX), "w"))
  with pytest.raises(ValueError, match=r"index\.json: tensor 'model\.norm\.weight' is missing"):
    hf.load(path)


@pytest.mark.parametrize("edit, field", [
    ({"model_type": "phi3"}, "model_type='phi3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0}}, "rope_parameters="),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention"]}, "layer_types="),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}}, "transformers cannot read"),
])
def test_unsupported_config_names_field_and_file(ckpts, tmp_path, edit, field):
  path = os.path.join(_copy(ckpts["llama"][0], tmp_path / "c"), "config.json")
  hc = json.load(open(path))
  json.dump({**hc, **edit}, open(path, "w"))
  with pytest.raises(ConfigError, match=rf"config\.json: {field}"):
    hf.config_from_hf(os.path.dirname(path))


def _tiny_llama_dir(path):
  """An HF Llama matching tests/helpers.tiny_config's model (vocab 32, d 32, 2 layers, GQA 4/2)."""
  config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None,
                                    eos_token_id=None)
  model = _random_hf_model(config, seed=1)
  model.save_pretrained(path)
  return model


@pytest.mark.pipeline
def test_run_from_hf_dir_and_export_cli(tmp_path):
  """A run starts from an HF directory (lr ~0: its weights stay); the export CLI writes its
  checkpoint back out as an HF directory with the same logits; a mismatched model field is a
  ConfigError naming it."""
  ref = _tiny_llama_dir(tmp_path / "hf")
  assert hf.is_hf_dir(str(tmp_path / "hf"))
  cfg = tiny_config(total_steps=1, **{"models.policy.init": f"hf:{tmp_path / 'hf'}", "optim.lr": 1e-12})
  out = train.run(cfg, tmp_path / "run", SFT.build(cfg))
  assert not hf.is_hf_dir(str(tmp_path / "run"))
  want = hf.load(str(tmp_path / "hf"))
  got = params_of(out)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(nnx.to_pure_dict(nnx.state(want))))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

  assert export.main(["--workdir", str(tmp_path / "run"), "--model", "policy",
                  "--out", str(tmp_path / "exported")]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32)
  tokens = TOKENS[:, :16] % 32
  policy = out.trainer.models(out.state, out.frozen)["policy"]
  diff = np.abs(_torch_logits(back.eval(), tokens) - np.asarray(policy(tokens).logits)).max()
  print(f"hf: init -> run -> export CLI: max |logits diff| {diff:.2e}")
  assert diff < ATOL
  assert np.abs(_torch_logits(ref, tokens) - _torch_logits(back, tokens)).max() < ATOL

  cfg.model.norm_eps = 1e-6   # arch=model: config.model is checked against the checkpoint, before any build
  cfg.models.policy.arch = "model"
  with pytest.raises(ConfigError, match=r"config\.model\.norm_eps=1e-06 \(arch of config\.models\.policy\) but "
                                        r".*config\.json has 1e-05"):
    SFT.build(cfg)


# --- real-family checkpoints: bfloat16 safetensors, family tokenizers ---------------------------
@pytest.fixture(scope="module")
def families(tmp_path_factory):
  import hf_fixtures
  return hf_fixtures.family_dirs(str(tmp_path_factory.mktemp("families")))


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_bf16_checkpoint_loads_keeps_dtype_and_exports(families, name, tmp_path):
  """A bfloat16 checkpoint loads (float32 parameters: the bf16 values exactly, logits within
  1e-4 of transformers'); with param_dtype=bfloat16 the parameters stay bf16 at half the
  bytes per device on a 2x2x2 mesh; exporting them writes bf16 safetensors that transformers
  reloads to the same logits (exact: the same weights)."""
  import hf_fixtures
  path = families[name]
  header, _ = hf.st_io.read_header(os.path.join(path, hf.SINGLE))
  assert {t["dtype"] for t in header.values()} == {"BF16"}
  tokens = np.random.RandomState(1).randint(0, 320, (2, 12))
  want = hf_fixtures.torch_logits(path, tokens)
  f32 = hf.load(path)
  diff = np.abs(_logits(f32, tokens=tokens) - want).max()
  print(f"{name} bf16 file, float32 params: max |logits diff| {diff:.2e}")
  assert diff < ATOL

  mesh = mesh_lib.make_mesh((2, 2, 2))
  bf16 = hf.load(path, mesh, mesh_lib.DEFAULT_RULES, param_dtype="bfloat16")
  p16, p32 = jax.tree.leaves(nnx.state(bf16, nnx.Param)), jax.tree.leaves(nnx.state(f32, nnx.Param))
  assert {x.dtype for x in p16} == {np.dtype("bfloat16")}
  per_device = lambda leaves: sum(x.addressable_shards[0].data.nbytes for x in leaves)
  full = lambda leaves: sum(x.nbytes for x in leaves)
  assert full(p16) * 2 == full(p32)
  assert per_device(p16) < full(p16)         # sharded: a device holds part of it
  for a, b in zip(p16, p32):                 # the bf16 values of the file, unchanged
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))

  out = hf.export(bf16, bf16.cfg, str(tmp_path / "out"))
  header, _ = hf.st_io.read_header(os.path.join(out, hf.SINGLE))
  assert {t["dtype"] for t in header.values()} == {"BF16"}
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  np.testing.assert_array_equal(hf_fixtures.torch_logits(out, tokens), want)
  out32 = hf.export(bf16, bf16.cfg, str(tmp_path / "out32"), dtype="float32")
  header, _ = hf.st_io.read_header(os.path.join(out32, hf.SINGLE))
  assert {t["dtype"] for t in header.values()} == {"F32"}


def test_family_tokenizers_and_records(families):
  """Qwen2 (no BOS, eos <|im_end|>, pad <|endoftext|>, ChatML), Llama (BOS, no pad -> eos) and
  GPT-2 (bos = eos = pad) tokenizers load; string records get the BOS only where the family
  has one, end their responses with the family's EOS inside the loss mask; conversational
  records are rendered by the chat template with the assistant's <|im_end|> trained."""
  from jaxopd.data import formats
  from jaxopd.data.tokenizer import load_tokenizer
  want = {"qwen2": (None, "<|im_end|>", "<|endoftext|>"), "llama": ("<s>", "</s>", "</s>"),
          "gpt2": ("<|endoftext|>",) * 3}
  rec = {"prompt": "the movie was", "chosen": " great fun", "rejected": " boring"}
  for name, path in families.items():
    tok = load_tokenizer(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == want[name], name
    (out,), stats = formats.encode([("x:1", rec)], "preference", tok, 24)
    assert stats.kept == 1
    for side, text in ((0, rec["chosen"]), (1, rec["rejected"])):
      ids = out["tokens"][side][out["loss_mask"][side] == 1].tolist()
      assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], name
      first = int(out["tokens"][side][0])
      prompt_ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
      assert first == (prompt_ids[0] if tok.bos_token_id is None else tok.bos_token_id), name
  tok = load_tokenizer(families["qwen2"])
  conv = {"prompt": [{"role": "user", "content": "the plot"}], "chosen": [{"role": "assistant", "content": "fun"}],
          "rejected": [{"role": "assistant", "content": "bad"}]}
  (out,), _ = formats.encode([("x:1", conv)], "preference", tok, 32)
  trained = tok.decode(out["tokens"][0][out["loss_mask"][0] == 1])
  assert trained == "fun<|im_end|>\n"
  prompt = tok.decode(out["tokens"][0][:int(np.argmax(out["loss_mask"][0]))])
  assert prompt == "<|im_start|>user\nthe plot<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_mistakes_are_one_line(tmp_path):
  from jaxopd.data.tokenizer import load_tokenizer
  with pytest.raises(ConfigError, match=r"tokenizer .*nope: not a directory"):
    load_tokenizer(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match=r"tokenizer .*empty: transformers cannot load it"):
    load_tokenizer(str(tmp_path / "empty"))


def test_truncated_safetensors_is_named(families, tmp_path):
  path = _copy(families["qwen2"], tmp_path / "q")
  f = os.path.join(path, hf.SINGLE)
  data = open(f, "rb").read()
  open(f, "wb").write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* past the end of the file .*truncated"):
    hf.load(path)
