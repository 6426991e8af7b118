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
