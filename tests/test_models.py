"""The decoder LM: KV-cache decode equals the full forward, hidden states,
padding masks, logical axis names on every parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopd.models import KVCache, ModelConfig, Transformer

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_len=24),
    "llama_gqa": ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             max_len=24, tie_embeddings=False),
    "qwen2_bias": ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=1,
                              max_len=24, qkv_bias=True, tie_embeddings=False),
}


def _model(cfg, seed=0):
  m = Transformer(cfg, nnx.Rngs(params=seed))
  # Non-zero biases so a bias bug cannot hide behind zero init.
  for path, v in nnx.iter_graph(m):
    if isinstance(v, nnx.Param) and path[-1].startswith("b"):
      v[...] = jax.random.normal(jax.random.key(len(path)), v.shape) * 0.1
  return m


# A jitted forward: one compile per shape, where an eager forward compiles each of its ops.
_forward = nnx.jit(lambda m, *a, **k: m(*a, **k))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decode_matches_full_forward(name):
  cfg = CONFIGS[name]
  m = _model(cfg)
  toks = jax.random.randint(jax.random.key(1), (3, 12), 0, cfg.vocab_size)
  full = m(toks).logits
  cache = KVCache.zeros(cfg, 3, 20)
  call = jax.jit(lambda t, c: m(t, cache=c))   # one compile per shape: prefill, then the decode step
  out = call(toks[:, :5], cache)         # prefill 5, then decode one at a time
  logits = [out.logits]
  cache = out.cache
  for t in range(5, 12):
    out = call(toks[:, t:t + 1], cache)
    cache = out.cache
    logits.append(out.logits)
  dec = jnp.concatenate(logits, axis=1)
  np.testing.assert_allclose(np.asarray(dec), np.asarray(full), atol=2e-5, rtol=1e-5)
  assert int(cache.index) == 12


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_left_padding_with_positions_matches_unpadded(name):
  """A left-padded row with explicit positions and attention mask gives the
  same logits as the same tokens without padding (what a batched sampler needs)."""
  cfg = CONFIGS[name]
  m = _model(cfg)
  toks = jax.random.randint(jax.random.key(2), (1, 7), 0, cfg.vocab_size)
  ref = _forward(m, toks).logits
  pad = 3
  padded = jnp.concatenate([jnp.zeros((1, pad), toks.dtype), toks], 1)
  mask = jnp.concatenate([jnp.zeros((1, pad), bool), jnp.ones((1, 7), bool)], 1)
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  out = _forward(m, padded, pos, attention_mask=mask).logits[:, pad:]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
  # The same through the cache: prefill padded prompt, then decode one token.
  cache = KVCache.zeros(cfg, 1, 16)
  o = m(padded[:, :-1], pos[:, :-1], attention_mask=mask[:, :-1], cache=cache)
  o = m(padded[:, -1:], pos[:, -1:], cache=o.cache)
  np.testing.assert_allclose(np.asarray(o.logits[:, 0]), np.asarray(ref[:, -1]), atol=2e-5, rtol=1e-5)


def test_hidden_states_and_causality():
  cfg = CONFIGS["llama_gqa"]
  m = _model(cfg)
  toks = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
  out = m(toks, return_hidden=True)
  assert len(out.hidden) == cfg.n_layers + 1
  assert all(h.shape == (2, 9, cfg.d_model) for h in out.hidden)
  # Changing a later token must not change earlier logits.
  toks2 = toks.at[:, 6].set((toks[:, 6] + 1) % cfg.vocab_size)
  out2 = m(toks2)
  np.testing.assert_allclose(np.asarray(out.logits[:, :6]), np.asarray(out2.logits[:, :6]), atol=1e-6)
  assert not np.allclose(np.asarray(out.logits[:, 6:]), np.asarray(out2.logits[:, 6:]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_param_has_logical_axes(name):
  cfg = CONFIGS[name]
  m = _model(cfg)
  known = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "positions"}
  n = 0
  for path, v in nnx.iter_graph(m):
    if isinstance(v, nnx.Param):
      axes = v.get_metadata().get("logical_axes")
      assert axes is not None and len(axes) == v.ndim, path
      assert set(axes) <= known, (path, axes)
      n += 1
  assert n > 0
  if cfg.family == "gpt2":
    assert m.lm_head is None and m.pos_embed is not None   # tied embeddings, learned positions


def test_bfloat16_compute_close_to_float32():
  cfg = CONFIGS["llama_gqa"]
  m32 = _model(cfg)
  m16 = Transformer(ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"}), nnx.Rngs(params=0))
  nnx.update(m16, nnx.state(m32))
  toks = jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size)
  a, b = m32(toks).logits, m16(toks).logits
  assert b.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(a - b.astype(jnp.float32)))) < 0.05 * float(jnp.max(jnp.abs(a))) + 0.02


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_bfloat16_matmuls_with_float32_compute(family):
  """``matmul_dtype=bfloat16``: every projection and the head multiply bf16-rounded operands with a
  float32 result (checked on one projection against NumPy float64 of the rounded operands); the
  model's logits stay float32 and close to the float32 model's, and differ from them."""
  import ml_dtypes
  from jaxopd.models.transformer import _dense
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, 5, 32)).astype(np.float32), rng.normal(size=(32, 3, 4)).astype(np.float32)
  r = lambda a: np.asarray(a, ml_dtypes.bfloat16).astype(np.float64)
  want = (r(x).reshape(10, 32) @ r(w).reshape(32, 12)).reshape(2, 5, 3, 4)
  got = _dense(jnp.asarray(x), jnp.asarray(w), "bfloat16")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  cfg = CONFIGS[family]
  m32 = _model(cfg)
  mm = Transformer(ModelConfig(**{**cfg.__dict__, "matmul_dtype": "bfloat16"}), nnx.Rngs(params=0))
  nnx.update(mm, nnx.state(m32))
  toks = jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size)
  a, b = m32(toks).logits, mm(toks).logits
  assert b.dtype == jnp.float32 and not np.array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(a))) + 0.02
  with pytest.raises(ValueError, match="matmul_dtype"):
    ModelConfig(**{**cfg.__dict__, "matmul_dtype": "float16"}).validate()


@pytest.mark.parametrize("field,value,msg", [
    ("family", "gpt3", "config.model.family"),
    ("n_heads", 5, "config.model.n_heads"),
    ("n_kv_heads", 3, "config.model.n_kv_heads"),
    ("dtype", "float16", "config.model.dtype"),
])
def test_model_config_errors_name_the_field(field, value, msg):
  with pytest.raises(ValueError, match=msg):
    ModelConfig(**{**CONFIGS["llama_gqa"].__dict__, field: value}).validate()


def test_packed_rows_equal_separate_forwards():
  """Two examples packed in one row with segment ids and per-example positions
  give the logits of each example alone."""
  from jaxopd.data.pipeline import pack
  for name in ("gpt2", "llama_gqa"):
    cfg = CONFIGS[name]
    m = _model(cfg)
    a = np.array([1, 5, 6, 7, 2], np.int32)
    b = np.array([1, 9, 8, 2], np.int32)
    rec = lambda t: {"tokens": np.pad(t, (0, 8 - len(t))), "loss_mask": np.pad(np.ones_like(t), (0, 8 - len(t)))}
    rows, stats = pack([rec(a), rec(b)], seq_len=12)
    assert stats["rows"] == 1 and stats["fill"] == 9 / 12
    r = {k: jnp.asarray(v)[None] for k, v in rows[0].items()}
    out = _forward(m, r["tokens"], r["positions"], segment_ids=r["segment_ids"]).logits[0]
    np.testing.assert_allclose(np.asarray(out[:5]), np.asarray(_forward(m, jnp.asarray(a)[None]).logits[0]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out[5:9]), np.asarray(_forward(m, jnp.asarray(b)[None]).logits[0]), atol=2e-5)


def test_packed_sft_loss_equals_separate_examples_with_pad_equal_to_eos_and_no_bos():
  """Qwen2-style records (no BOS, pad id == EOS id, the loss mask on every response token from
  the first): packing keeps each example's trailing EOS, and the packed row's SFT loss sums and
  token count are those of the examples alone (no token is scored from the example before it)."""
  from jaxopd.data.pipeline import pack
  from jaxopd.losses import sft_loss
  cfg = CONFIGS["llama_gqa"]
  m = _model(cfg)
  eos = pad = 2
  exs = [np.array([5, 6, 7, eos], np.int32), np.array([9, 8, eos], np.int32), np.array([4, 11, 12, 13, eos], np.int32)]
  rec = lambda t: {"tokens": np.pad(t, (0, 8 - len(t)), constant_values=pad),
                   "loss_mask": np.pad(np.ones_like(t), (0, 8 - len(t)))}
  rows, stats = pack([rec(t) for t in exs], seq_len=10, pad_id=pad)
  assert stats["rows"] == 2 and stats["fill"] == 12 / 20          # every EOS kept: 4 + 3 | 5 tokens
  assert rows[0]["segment_ids"].tolist() == [1] * 4 + [2] * 3 + [0] * 3
  r = {k: jnp.asarray(np.stack([row[k] for row in rows])) for k in rows[0]}
  logits = _forward(m, r["tokens"], r["positions"], segment_ids=r["segment_ids"]).logits
  nll, n, _ = sft_loss(logits, r["tokens"], r["loss_mask"], r["segment_ids"])
  sep = [sft_loss(_forward(m, jnp.asarray(t)[None]).logits, jnp.asarray(t)[None], jnp.ones((1, len(t)), jnp.int32))
         for t in exs]
  assert float(n) == sum(float(x[1]) for x in sep) == sum(len(t) - 1 for t in exs)
  np.testing.assert_allclose(float(nll), sum(float(x[0]) for x in sep), rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "qwen2_bias"])   # MHA with biases; GQA (1 kv head) with q/k/v bias
@pytest.mark.parametrize("attention", [dict(attention="dot_product"), dict(attention="chunked", attention_chunk=5),
                                       dict(attention="splash")])
def test_attention_implementations_equal_einsum(name, attention):
  """attention=dot_product (jax.nn.dot_product_attention), attention=chunked (queries in chunks
  of 5, not dividing 12) and attention=splash (the TPU Pallas kernel, in interpret mode here)
  give the einsum path's logits and gradients: causal, left padding, GQA, packed segments and
  the KV-cache decode (float32: 1e-5; bf16 compute: within 2e-2 of each other relative to the
  logit scale; splash's KV-cache path is the einsum one)."""
  import dataclasses
  cfg = CONFIGS[name]
  ref, fast = _model(cfg), Transformer(dataclasses.replace(cfg, **attention), nnx.Rngs(params=0))
  nnx.update(fast, nnx.state(ref, nnx.Param))
  toks = jax.random.randint(jax.random.key(2), (3, 12), 0, cfg.vocab_size)
  mask = jnp.ones((3, 12), jnp.int32).at[1, :4].set(0)          # row 1 left-padded
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  seg = jnp.concatenate([jnp.ones((3, 7), jnp.int32), 2 * jnp.ones((3, 5), jnp.int32)], 1)
  seg_pos = jnp.concatenate([jnp.arange(7), jnp.arange(5)])[None].repeat(3, 0)
  for args, kw in (((toks,), {}), ((toks, pos), {"attention_mask": mask}), ((toks, seg_pos), {"segment_ids": seg})):
    a, b = _forward(ref, *args, **kw).logits, _forward(fast, *args, **kw).logits
    valid = np.asarray(kw.get("attention_mask", jnp.ones_like(toks)), bool)
    np.testing.assert_allclose(np.asarray(b)[valid], np.asarray(a)[valid], atol=1e-5, rtol=1e-5)

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(toks, pos, attention_mask=mask).logits)[..., 0] * mask)
  grad = nnx.jit(nnx.grad(loss))
  ga, gb = grad(ref), grad(fast)
  for x, y in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(nnx.state(gb))):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-4)

  cache_ref, cache_fast = KVCache.zeros(cfg, 3, 20), KVCache.zeros(fast.cfg, 3, 20)
  for t0, t1 in ((0, 5), (5, 6), (6, 7)):                    # prefill, then two decode steps
    oa = _forward(ref, toks[:, t0:t1], cache=cache_ref)
    ob = _forward(fast, toks[:, t0:t1], cache=cache_fast)
    np.testing.assert_allclose(np.asarray(ob.logits), np.asarray(oa.logits), atol=1e-5, rtol=1e-5)
    cache_ref, cache_fast = oa.cache, ob.cache

  bf = lambda c: Transformer(dataclasses.replace(c, dtype="bfloat16"), nnx.Rngs(params=0))
  ra, rb = bf(cfg), bf(fast.cfg)
  nnx.update(ra, nnx.state(ref, nnx.Param))
  nnx.update(rb, nnx.state(ref, nnx.Param))
  la, lb = np.asarray(_forward(ra, toks).logits, np.float32), np.asarray(_forward(rb, toks).logits, np.float32)
  assert np.abs(la - lb).max() < 2e-2 * np.abs(la).max()


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias"])   # 2 KV heads (split by tensor=2); 1 (repeated)
def test_splash_attention_under_a_mesh_runs_per_shard_and_equals_einsum(name, monkeypatch):
  """attention=splash on 8 devices (data 2 x fsdp 2 x tensor 2, the default rules): the kernel runs
  in a shard_map on one row and half the heads per device (its local shapes recorded), and the
  logits on valid positions and the gradients equal the einsum path's without a mesh (left
  padding, packed segments); the shared-prefix mask is refused with a one-line error."""
  import dataclasses
  from jaxopd import mesh as mesh_lib
  from jaxopd.errors import ConfigError
  from jaxopd.models import splash
  cfg = CONFIGS[name]
  ref, fast = _model(cfg), Transformer(dataclasses.replace(cfg, attention="splash"), nnx.Rngs(params=0))
  nnx.update(fast, nnx.state(ref, nnx.Param))
  toks = jax.random.randint(jax.random.key(3), (4, 12), 0, cfg.vocab_size)
  mask = jnp.ones((4, 12), jnp.int32).at[1, :4].set(0).at[2, :2].set(0)
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  seg = jnp.concatenate([jnp.ones((4, 7), jnp.int32), 2 * jnp.ones((4, 5), jnp.int32)], 1)
  shapes = []
  local = splash._local
  monkeypatch.setattr(splash, "_local", lambda q, *a, **k: shapes.append(q.shape) or local(q, *a, **k))
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(toks, pos, attention_mask=mask).logits)[..., 0] * mask)
  want = [_forward(ref, toks, pos, attention_mask=mask).logits, _forward(ref, toks, segment_ids=seg).logits]
  want_grad = nnx.jit(nnx.grad(loss))(ref)
  mesh = mesh_lib.make_mesh((2, 2, 2), 8)
  with jax.set_mesh(mesh), mesh_lib.use_rules(mesh_lib.rules_from_config(mesh_lib.DEFAULT_RULES)):
    got = [_forward(fast, toks, pos, attention_mask=mask).logits, _forward(fast, toks, segment_ids=seg).logits]
    got_grad = nnx.jit(nnx.grad(loss))(fast)
    with pytest.raises(ConfigError, match="share_prompt"):
      _forward(fast, toks, branch_ids=seg - 1).logits
  assert shapes and set(shapes) == {(1, cfg.n_heads // 2, 128, cfg.head_dim)}   # 4 rows / 4, heads / 2, padded
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(got[0])[valid], np.asarray(want[0])[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(nnx.state(want_grad)), jax.tree.leaves(nnx.state(got_grad))):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-4)


def test_bf16_attention_scores_are_accumulated_and_kept_in_float32():
  """bf16 queries and keys whose scores are large (~60) and close together: the einsum attention's
  output matches float64 attention on the same bf16 inputs to bf16 precision (probabilities and
  output rounded once); scores rounded to bf16 (a step of 0.25 at 60) would be off by up to ~13%."""
  import dataclasses
  from jaxopd.models.transformer import Attention
  cfg = dataclasses.replace(CONFIGS["llama_gqa"], dtype="bfloat16")
  attn = Attention(cfg, nnx.Rngs(params=0))
  rng = np.random.default_rng(0)
  b, t, h, dh = 2, 6, cfg.n_heads, cfg.head_dim
  base = np.ones(dh) * np.sqrt(60.0 * np.sqrt(dh) / dh)         # q.k / sqrt(dh) ~ 60 for every pair
  q = (base + 0.05 * rng.normal(size=(b, t, h, dh))).astype(jnp.bfloat16)
  k = (base + 0.05 * rng.normal(size=(b, t, cfg.kv_heads, dh))).astype(jnp.bfloat16)
  v = rng.normal(size=(b, t, cfg.kv_heads, dh)).astype(jnp.bfloat16)
  allowed = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
  out = np.asarray(attn._einsum_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed, "bsnk", True),
                   np.float64)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  g = h // cfg.kv_heads
  k64, v64 = np.repeat(k64, g, axis=2), np.repeat(v64, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q64, k64) / np.sqrt(dh)
  s = np.where(np.asarray(allowed)[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = np.einsum("bhts,bshd->bthd", p, v64)
  assert np.abs(s[np.isfinite(s)]).max() > 50
  np.testing.assert_allclose(out, ref, atol=0.03 * np.abs(ref).max())


def _padded_packed_batch(cfg, seed):
  """3 rows of 12 tokens, row 1 left-padded by 4, with its positions, and two packed segments."""
  toks = jax.random.randint(jax.random.key(seed), (3, 12), 0, cfg.vocab_size)
  mask = jnp.ones((3, 12), jnp.int32).at[1, :4].set(0)
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  seg = jnp.concatenate([jnp.ones((3, 7), jnp.int32), 2 * jnp.ones((3, 5), jnp.int32)], 1)
  return toks, mask, pos, seg


@pytest.mark.parametrize("name", ["gpt2", "qwen2_bias"])
def test_remat_gives_the_same_logits_and_gradients(name):
  """remat=full and remat=dots recompute in the backward what remat=none keeps: the same logits
  and parameter gradients (float32; the recomputation is the same arithmetic, so 1e-6 / 1e-5),
  with padding and packed segments; the KV-cache path ignores remat (no backward)."""
  import dataclasses
  cfg = CONFIGS[name]
  ref = _model(cfg)
  toks, mask, pos, seg = _padded_packed_batch(cfg, 3)

  def loss(model, segments):
    out = model(toks, pos, attention_mask=mask, segment_ids=seg if segments else None).logits
    return jnp.sum(jax.nn.log_softmax(out)[..., :7] * mask[..., None]), out
  step = nnx.jit(nnx.grad(loss, has_aux=True), static_argnums=1)
  for segments in (False, True):
    (g0, out0) = step(ref, segments)
    for policy in ("full", "dots"):
      m = Transformer(dataclasses.replace(cfg, remat=policy), nnx.Rngs(params=0))
      nnx.update(m, nnx.state(ref, nnx.Param))
      g, out = step(m, segments)
      np.testing.assert_allclose(np.asarray(out), np.asarray(out0), atol=1e-6, rtol=1e-6)
      for x, y in zip(jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-5)
  m = Transformer(dataclasses.replace(cfg, remat="full"), nnx.Rngs(params=0))
  nnx.update(m, nnx.state(ref, nnx.Param))
  cache = KVCache.zeros(cfg, 3, 20)
  a, b = ref(toks[:, :5], cache=cache), m(toks[:, :5], cache=cache)
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-6)
  np.testing.assert_allclose(np.asarray(b.cache.k[0]), np.asarray(a.cache.k[0]), atol=1e-6)


def test_remat_is_in_the_compiled_backward():
  """remat=full really recomputes: the jitted gradient's HLO of a 2-layer model contains the
  rematerialised forward (more dot ops than without remat)."""
  import dataclasses
  cfg = CONFIGS["llama_gqa"]
  toks = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)

  def dots(policy):
    m = Transformer(dataclasses.replace(cfg, remat=policy), nnx.Rngs(params=0))
    g, p = nnx.split(m)
    f = lambda p: jnp.sum(nnx.merge(g, p)(toks).logits)
    return jax.jit(jax.grad(f)).lower(p).as_text().count("dot_general")
  assert dots("full") > dots("none")


@pytest.mark.parametrize("name", ["gpt2", "qwen2_bias"])
def test_scanned_layers_give_the_unrolled_logits_hidden_states_and_gradients(name):
  """scan_layers=True (one lax.scan over the stacked blocks), alone and with remat=full / dots,
  gives the unrolled model's logits, hidden states and parameter gradients (float32: 1e-5),
  with padding and packed segments; the parameter tree is the same, and the KV-cache path (not
  scanned) gives the same logits."""
  import dataclasses
  cfg = CONFIGS[name]
  ref = _model(cfg)
  toks, mask, pos, seg = _padded_packed_batch(cfg, 4)

  def loss(model):
    out = model(toks, pos, attention_mask=mask, segment_ids=seg, return_hidden=True)
    return jnp.sum(jax.nn.log_softmax(out.logits)[..., :5] * mask[..., None]), out
  step = nnx.jit(nnx.grad(loss, has_aux=True))
  g0, out0 = step(ref)
  for remat in ("none", "full", "dots"):
    m = Transformer(dataclasses.replace(cfg, scan_layers=True, remat=remat), nnx.Rngs(params=0))
    assert jax.tree.structure(nnx.state(m, nnx.Param)) == jax.tree.structure(nnx.state(ref, nnx.Param))
    nnx.update(m, nnx.state(ref, nnx.Param))
    g, out = step(m)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(out0.logits), atol=1e-5, rtol=1e-5)
    assert len(out.hidden) == len(out0.hidden) == cfg.n_layers + 1
    for a, b in zip(out.hidden, out0.hidden):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g))):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-5)
  cache = KVCache.zeros(cfg, 3, 20)
  np.testing.assert_allclose(np.asarray(m(toks[:, :5], cache=cache).logits),
                             np.asarray(ref(toks[:, :5], cache=cache).logits), atol=1e-5)


def test_scanned_layers_compile_one_block():
  """The scanned forward's HLO holds one block's matmuls whatever the depth (a 3-layer and a
  6-layer model lower to the same number of dot ops); the unrolled one grows with depth."""
  import dataclasses
  toks = jnp.zeros((2, 8), jnp.int32)

  def dots(n_layers, scan):
    cfg = dataclasses.replace(CONFIGS["qwen2_bias"], n_layers=n_layers, scan_layers=scan)
    g, p = nnx.split(Transformer(cfg, nnx.Rngs(params=0)))
    return jax.jit(lambda p: nnx.merge(g, p)(toks).logits).lower(p).as_text().count("dot_general")
  assert dots(3, True) == dots(6, True)
  assert dots(6, False) > dots(3, False)


def test_chunked_attention_never_holds_the_full_score_matrix():
  """attention=chunked: the compiled gradient has no [B, n, g, T, T] score array (only chunks of
  5 queries); the einsum attention's has one."""
  import dataclasses
  cfg = CONFIGS["qwen2_bias"]                      # 1 kv head, 4 query heads per group
  toks = jnp.zeros((3, 12), jnp.int32)

  def hlo(**attention):
    g, p = nnx.split(Transformer(dataclasses.replace(cfg, **attention), nnx.Rngs(params=0)))
    return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(g, p)(toks).logits))).lower(p).compile().as_text()
  assert "f32[3,1,4,12,12]" in hlo(attention="einsum")
  chunked = hlo(attention="chunked", attention_chunk=5)
  assert "f32[3,1,4,12,12]" not in chunked and "f32[3,1,4,5,12]" in chunked
