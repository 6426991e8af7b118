"""Token log-probs and the SFT loss against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.losses import sft_loss, token_logprobs


def np_log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_logprobs_and_sft_loss_match_numpy():
  rng = np.random.default_rng(0)
  b, t, v = 3, 7, 11
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
  tokens = rng.integers(0, v, size=(b, t))
  mask = (rng.random((b, t)) < 0.6).astype(np.int32)
  lp = np_log_softmax(logits)
  ref_tok = np.array([[lp[i, j, tokens[i, j + 1]] for j in range(t - 1)] for i in range(b)])
  got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  np.testing.assert_allclose(got, ref_tok, rtol=1e-5, atol=1e-5)

  nll, n, correct = sft_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  m = mask[:, 1:]
  np.testing.assert_allclose(float(nll), -(ref_tok * m).sum(), rtol=1e-5)
  assert float(n) == m.sum()
  argmax = logits[:, :-1].argmax(-1)
  assert float(correct) == ((argmax == tokens[:, 1:]) * m).sum()


def test_token_logprobs_float32_from_bfloat16_logits():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7)).astype(jnp.bfloat16) * 20
  tokens = jnp.zeros((2, 5), jnp.int32)
  out = token_logprobs(logits, tokens)
  assert out.dtype == jnp.float32
  ref = np_log_softmax(np.asarray(logits.astype(jnp.float32)))[:, :-1, 0]
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_divergences_of_a_padded_vocabulary_have_finite_gradients():
  """Logits at -inf for padded vocabulary entries (in both models): every divergence equals the one on
  the real entries, and its gradient is finite (the masked KL terms once gave 0 * inf = nan)."""
  from jaxopd.losses import DIVERGENCES, divergence
  rng = np.random.default_rng(1)
  p = rng.normal(size=(2, 3, 6)).astype(np.float32)
  q = rng.normal(size=(2, 3, 6)).astype(np.float32)
  pad = lambda x: jnp.concatenate([jnp.asarray(x), jnp.full(x.shape[:-1] + (2,), -jnp.inf)], -1)
  for name in DIVERGENCES:
    for beta in ((0.0, 0.5, 1.0) if name == "jsd" else (0.5,)):
      f = lambda a, b: jnp.sum(divergence(name, a, b, beta=beta))
      np.testing.assert_allclose(float(f(pad(p), pad(q))), float(f(jnp.asarray(p), jnp.asarray(q))), rtol=1e-6)
      gp, gq = jax.grad(f, argnums=(0, 1))(pad(p), pad(q))
      assert np.all(np.isfinite(np.asarray(gp))) and np.all(np.isfinite(np.asarray(gq))), (name, beta)
      rp, rq = jax.grad(f, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(q))
      np.testing.assert_allclose(np.asarray(gp)[..., :6], np.asarray(rp), rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(np.asarray(gq)[..., :6], np.asarray(rq), rtol=1e-5, atol=1e-7)
