"""The rotary families beyond Llama 2 / Qwen2: tiny random Qwen3, Llama 3.1 (llama3 rotary
scaling, tied), Mistral (sliding window), Gemma 2 (sandwich norms, soft-capping, alternating
windows), Gemma 3 (q/k norm, per-layer-type rotary) and OLMo 2 (post norms, full-width q/k
norm) made with transformers, saved in float32 and bfloat16. Each: log-probs equal
transformers' on a right-padded batch (float32 compute, <= 1e-4), the KV-cache decode equals
the full forward, export reloads in transformers with the same logits and tensors, every
attention implementation agrees (windows shorter and longer than the sequence, layers scanned),
and a few SGD steps lower the loss."""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from jaxopd.errors import ConfigError  # noqa: E402
from jaxopd.models import hf  # noqa: E402
from jaxopd.models.transformer import KVCache, Transformer  # noqa: E402

ATOL = 1e-4
T = 16
LENGTHS = np.array([16, 11, 7, 3])
TOKENS = np.random.RandomState(0).randint(0, 128, (4, T))
MASK = np.arange(T)[None, :] < LENGTHS[:, None]
WINDOW = 5   # shorter than the sequence


def _configs():
  small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
  mixed = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
  return {
      "qwen3": transformers.Qwen3Config(head_dim=24, tie_word_embeddings=False, **small),
      "llama3.1": transformers.LlamaConfig(
          tie_word_embeddings=True, **small,
          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
      "mistral": transformers.MistralConfig(head_dim=16, sliding_window=WINDOW, **small),
      "gemma2": transformers.Gemma2Config(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                                          layer_types=mixed, attn_logit_softcapping=5.0,
                                          final_logit_softcapping=3.0, **small),
      "gemma3": transformers.Gemma3TextConfig(
          head_dim=24, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=mixed[:1] * 3 + mixed[1:2],
          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}, **small),
      "olmo2": transformers.Olmo2Config(**small),
  }


FAMILIES = list(_configs())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """family -> {"float32": dir, "bfloat16": dir, "torch": the float32 model}."""
  out = {}
  for i, (name, config) in enumerate(_configs().items()):
    torch.manual_seed(i)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    dirs = {"torch": model}
    for dtype in ("float32", "bfloat16"):
      path = str(tmp_path_factory.mktemp(f"{name}-{dtype}"))
      copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(path)
      dirs[dtype] = path
    out[name] = dirs
  return out


def _torch_logprobs(model, tokens=TOKENS, mask=MASK):
  with torch.no_grad():
    logits = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits
  return torch.log_softmax(logits.double(), -1).numpy()


def _forward(model, tokens=TOKENS, mask=MASK):
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask=m).logits)
  return np.asarray(f(state, tokens, mask), np.float64)


def _logprobs(model, tokens=TOKENS, mask=MASK):
  z = _forward(model, tokens, mask)
  return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)


def _with(model, **changes):
  """The same parameters under a config with ``changes`` (attention, scan_layers, window ...)."""
  cfg = dataclasses.replace(model.cfg, **changes)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_logprobs_match_transformers(ckpts, name, dtype):
  """Both sides compute in float32 from the same file (bf16 files: the same rounded weights)."""
  path = ckpts[name][dtype]
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  model = hf.load(path)
  assert model.cfg.export_type == json.load(open(os.path.join(path, "config.json")))["model_type"]
  want, got = _torch_logprobs(ref), _logprobs(model)
  diff = np.abs(got - want)[MASK].max()
  print(f"{name} {dtype}: max |log p diff| {diff:.2e} on valid positions")
  assert diff <= ATOL


def test_family_options_are_read(ckpts):
  cfgs = {name: hf.load(ckpts[name]["float32"]).cfg for name in FAMILIES}
  assert cfgs["qwen3"].head_dim == 24 and cfgs["qwen3"].qk_norm == "head"
  assert cfgs["llama3.1"].rope_type == "llama3" and cfgs["llama3.1"].tie_embeddings
  assert cfgs["mistral"].local_layers == (True,) * 4 and cfgs["mistral"].sliding_window == WINDOW
  assert cfgs["gemma2"].local_layers == (True, False) * 2 and cfgs["gemma2"].attn_softcap == 5.0
  assert cfgs["gemma2"].logit_softcap == 3.0 and cfgs["gemma2"].norm_layout == "sandwich"
  assert cfgs["gemma3"].rope_local_theta == 10000.0 and cfgs["gemma3"].rope_type == "linear"
  assert cfgs["olmo2"].qk_norm == "full" and cfgs["olmo2"].norm_layout == "post"


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_decode_equals_full_forward(ckpts, name):
  """Prefill 6 tokens, then decode one token at a time past the window: each step's logits
  equal the full forward's at that position."""
  model = hf.load(ckpts[name]["float32"])
  full = _forward(model, TOKENS, np.ones_like(MASK))
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c))
  out = step(state, TOKENS[:, :6], KVCache.zeros(model.cfg, 4, T))
  got = [np.asarray(out.logits)]
  cache = out.cache
  for i in range(6, T):
    out = step(state, TOKENS[:, i:i + 1], cache)
    cache = out.cache
    got.append(np.asarray(out.logits))
  diff = np.abs(np.concatenate(got, axis=1) - full).max()
  print(f"{name}: cache vs full max |logits diff| {diff:.2e}")
  assert diff <= ATOL


@pytest.mark.parametrize("name", FAMILIES)
def test_export_reloads_in_transformers(ckpts, name, tmp_path):
  ref = ckpts[name]["torch"]
  model = hf.load(ckpts[name]["float32"])
  out = hf.export(model, model.cfg, str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(back) is type(ref)
  diff = np.abs(_torch_logprobs(back) - _logprobs(model))[MASK].max()
  print(f"{name} exported: max |log p diff| {diff:.2e}")
  assert diff <= ATOL
  original = {k: v.numpy() for k, v in ref.state_dict().items()}
  for k, v in load_file(os.path.join(out, hf.SINGLE)).items():
    np.testing.assert_array_equal(v, original[k], err_msg=k)


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_attention_implementations_agree(ckpts, name):
  """einsum (the reference) = dot_product = chunked = splash, one block per layer and scanned;
  a window longer than the sequence = one as long as it = no window; one key fewer differs."""
  model = hf.load(ckpts[name]["float32"])
  ref = _logprobs(model)
  variants = [dict(attention="chunked", attention_chunk=4), dict(attention="splash"),
              dict(scan_layers=True), dict(scan_layers=True, remat="full"),
              dict(attention="splash", scan_layers=True)]
  if not model.cfg.attn_softcap:
    variants.append(dict(attention="dot_product"))
  else:
    with pytest.raises(ConfigError, match="attn_softcap"):
      _logprobs(_with(model, attention="dot_product"))
  for changes in variants:
    diff = np.abs(_logprobs(_with(model, **changes)) - ref)[MASK].max()
    print(f"{name} {changes}: max |log p diff| {diff:.2e}")
    assert diff <= ATOL, changes
  long = _logprobs(_with(model, sliding_window=2 * T))
  whole = _logprobs(_with(model, sliding_window=T))     # keys 0 .. T-1 back: the whole sequence
  np.testing.assert_allclose(long[MASK], whole[MASK], atol=ATOL)
  if not model.cfg.rope_local_theta:   # (Gemma 3's sliding layers keep their own rotary base)
    no_window = _logprobs(_with(model, sliding_window=0, layer_types=()))
    np.testing.assert_allclose(long[MASK], no_window[MASK], atol=ATOL)
  assert np.abs(whole - ref)[MASK].max() > 1e-3   # the short window does change the result
  narrower = _logprobs(_with(model, sliding_window=T - 1))
  assert np.abs(narrower - whole)[MASK].max() > 1e-5   # and one key less is seen


@pytest.mark.parametrize("name", FAMILIES)
def test_a_few_sgd_steps_lower_the_loss(ckpts, name):
  model = hf.load(ckpts[name]["bfloat16"])
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    logits = nnx.merge(graphdef, p)(TOKENS[:, :-1], attention_mask=MASK[:, :-1]).logits.astype(jnp.float32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], -1)[..., 0]
    w = MASK[:, 1:]
    return -(lp * w).sum() / w.sum()
  grad = jax.jit(jax.value_and_grad(loss))
  losses = []
  for _ in range(4):
    value, g = grad(params)
    losses.append(float(value))
    params = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
  print(f"{name}: NLL {losses}")
  assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_greedy_sampling_past_the_window_equals_transformers(ckpts, name):
  """Greedy decoding of left-padded prompts past the sliding window (prompts 8 and 5 tokens, 10 new,
  window 5): jaxopd's sampler, with a row per sample and with each prompt's cache shared by 2
  rows (GRPO's layout), gives transformers' ``generate`` tokens."""
  from jaxopd import sampling
  model = hf.load(ckpts[name]["float32"])
  ref = ckpts[name]["torch"]
  prompt, plen, n = TOKENS[:2, :8], np.array([8, 5]), 10
  cfg = sampling.SamplingConfig(max_new_tokens=n, eos_id=127, pad_id=0, greedy=True)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, p, l, r: sampling.sample(nnx.merge(graphdef, s), p, l, jax.random.key(0), cfg, repeats=r),
                static_argnums=3)
  one = np.asarray(run(state, np.repeat(prompt, 2, 0), np.repeat(plen, 2), 1).tokens)
  shared = np.asarray(run(state, prompt, plen, 2).tokens)
  np.testing.assert_array_equal(shared, one)
  left = np.stack([np.concatenate([np.zeros(8 - k, int), prompt[i, :k]]) for i, k in enumerate(plen)])
  with torch.no_grad():
    gen = ref.generate(torch.tensor(left), attention_mask=torch.tensor((left * 0 + (np.arange(8) >= 8 - plen[:, None]))
                                                                        .astype(np.int64)),
                       max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
  for i, k in enumerate(plen):
    assert one[2 * i, k:k + n].tolist() == gen[i, 8:].tolist(), (name, i)
