"""Vocabulary-wide quantities from hidden states in chunks (jaxopd.models.heads): equal to the
same quantities computed from the full [B, T, V] logits, values and gradients, for chunk sizes
that do and do not divide the sequence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_models
from jaxopd.losses import forward_kl_per_token, sft_loss, token_logprobs
from jaxopd.models import ModelConfig, Transformer
from jaxopd.models import heads

CFG = ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=24,
                  tie_embeddings=False)


@pytest.mark.parametrize("chunk", [0, 4, 5, 64])
def test_sft_loss_in_chunks_equals_full_logits(chunk):
  from jaxopd.methods import sft
  pi = tiny_models(CFG, ("policy",))["policy"]
  toks = jax.random.randint(jax.random.key(0), (3, 13), 0, CFG.vocab_size)
  mask = jnp.ones((3, 13), jnp.int32).at[:, :4].set(0)
  seg = jnp.concatenate([jnp.ones((3, 6), jnp.int32), 2 * jnp.ones((3, 7), jnp.int32)], 1)
  pos = jnp.concatenate([jnp.arange(6), jnp.arange(7)])[None].repeat(3, 0)
  batch = {"tokens": toks, "loss_mask": mask, "segment_ids": seg, "positions": pos}
  loss_fn = sft.make_loss_fn(chunk)

  def chunked(m):
    out = loss_fn({"policy": m}, batch, None)
    return out.loss, (out.count, out.metrics["accuracy"])

  def full(m):
    nll, n, correct = sft_loss(m(toks, pos, segment_ids=seg).logits, toks, mask, seg)
    return nll, (n, correct)
  (a, (na, ca)), ga = nnx.jit(nnx.value_and_grad(chunked, has_aux=True))(pi)
  (b, (nb, cb)), gb = nnx.jit(nnx.value_and_grad(full, has_aux=True))(pi)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  assert float(na) == float(nb) and float(ca) == float(cb)
  for x, y in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(nnx.state(gb))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_chunked_log_probs_and_kl_equal_full_logits_with_no_gradient_into_frozen():
  pi, ref = tiny_models(CFG, ("policy", "reference")).values()
  toks = jax.random.randint(jax.random.key(1), (2, 11), 0, CFG.vocab_size)

  def terms(z, t):
    lr = jax.nn.log_softmax(z["ref"].astype(jnp.float32))
    lp = jax.nn.log_softmax(z["pi"].astype(jnp.float32))
    return {"lp": heads.label_logprob(z["pi"], t), "kl": jnp.sum(jnp.exp(lr) * (lr - lp), -1)}

  def chunked(p, r):
    t = heads.chunked_terms({"pi": p, "ref": r}, toks, terms, 3, frozen=("ref",))
    return jnp.sum(t["lp"]) + jnp.sum(t["kl"]), t

  def full(p, r):
    zp, zr = p(toks).logits, jax.lax.stop_gradient(r(toks).logits)
    lp, kl = token_logprobs(zp, toks), forward_kl_per_token(zr, zp, 64)
    return jnp.sum(lp) + jnp.sum(kl), {"lp": lp, "kl": kl}
  (va, ta), (gpa, gra) = nnx.jit(nnx.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(pi, ref)
  (vb, tb), (gpb, _) = nnx.jit(nnx.value_and_grad(full, argnums=(0, 1), has_aux=True))(pi, ref)
  for k in ("lp", "kl"):
    assert ta[k].shape == (2, 10)
    np.testing.assert_allclose(np.asarray(ta[k]), np.asarray(tb[k]), rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(nnx.state(gpa)), jax.tree.leaves(nnx.state(gpb))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(nnx.state(gra)))
  lp = heads.token_logprobs(pi, toks, 4, frozen=True)
  np.testing.assert_allclose(np.asarray(lp), np.asarray(tb["lp"]), rtol=1e-5, atol=1e-6)


def test_no_full_vocabulary_array_in_the_compiled_step():
  """With chunk 4 of T-1 = 15 positions, B = 3 and V = 4099, no [B, T-1, V] (or [B, T, V]) array exists
  in the optimised HLO of the SFT loss's gradient; the full-logits version has one."""
  from jaxopd.methods import sft
  cfg = dataclasses.replace(CFG, vocab_size=4099)
  m = Transformer(cfg, nnx.Rngs(params=0))
  toks = jax.random.randint(jax.random.key(0), (3, 16), 0, cfg.vocab_size)
  batch = {"tokens": toks, "loss_mask": jnp.ones_like(toks)}
  g, p = nnx.split(m)
  loss_fn = sft.make_loss_fn(4)
  chunked = lambda p: loss_fn({"policy": nnx.merge(g, p)}, batch, None).loss
  full = lambda p: sft_loss(nnx.merge(g, p)(toks).logits, toks, batch["loss_mask"])[0]
  hlo = lambda f: jax.jit(jax.grad(f)).lower(p).compile().as_text()
  big = ("[3,15,4099]", "[3,16,4099]", "[45,4099]", "[48,4099]")
  assert not any(s in hlo(chunked) for s in big)
  assert any(s in hlo(full) for s in big)
