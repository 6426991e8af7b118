"""jaxopd.losses against independent NumPy float64 references written from the papers' formulas.

Sections covered: Notation (token log-probs, response mask), DPO, TDPO (per-token
forward KL, TDPO1/TDPO2, end-to-end composition and gradients) and Divergences
(forward/reverse KL, generalized JSD, TVD, the token-averaged loss).

The references below are written from the papers' formulas only, in
float64. JAX runs in float32 (x64 is off), so the comparisons use float32
tolerances:

* ``RTOL = 1e-5, ATOL = 1e-6`` for quantities of order one computed from one
  log-softmax (per-position divergences, per-pair losses, gradients);
* ``RTOL = 1e-5, ATOL = 1e-5`` (``LP_TOL``) where a value is a log-probability of
  size ``log V`` or a sum of such over a sequence (float32 eps * |value| is then
  ~1e-6 per term and accumulates over T positions).

Mask convention (jaxopd.losses.common): ``loss_mask[B, T]``
is aligned with ``tokens``; position t of ``[B, T-1]`` arrays scores
``tokens[:, t+1]`` and is weighted by ``loss_mask[:, t+1]`` (as in the official
TDPO code: ``labels[:, 1:]`` / ``logits[:, :-1]``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.losses import (DIVERGENCES, divergence, dpo_loss, forward_kl, forward_kl_per_token, jsd,
                           response_mask, reverse_kl, sequence_logps, tdpo_loss, token_divergence_loss,
                           token_logprobs, tvd)

RTOL, ATOL = 1e-5, 1e-6
LP_TOL = dict(rtol=1e-5, atol=1e-5)
TOL = dict(rtol=RTOL, atol=ATOL)

SHAPES = [(2, 5, 7), (3, 9, 33), (1, 16, 64)]
SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# NumPy float64 references (from the papers' formulas)
# ----------------------------------------------------------------------------------------------

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  mx = np.max(x, axis=-1, keepdims=True)
  s = x - mx
  return s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))


def np_kl(lp_a, lp_b):
  """KL(a || b) = sum_v a (log a - log b); 0 log 0 = 0."""
  pa = np.exp(lp_a)
  with np.errstate(invalid="ignore"):
    terms = np.where(pa > 0, pa * (lp_a - lp_b), 0.0)
  return terms.sum(-1)


def np_tok(lp, tokens):
  """tok(lp)[b, t] = lp[b, t, tokens[b, t+1]] for t < T-1."""
  b, t = tokens.shape
  out = np.empty((b, t - 1))
  for i in range(b):
    for j in range(t - 1):
      out[i, j] = lp[i, j, tokens[i, j + 1]]
  return out


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sigmoid(x):
  return np.exp(np_log_sigmoid(x))


def np_dpo(rw, rl, beta):
  return -np_log_sigmoid(beta * (rw - rl))


def np_tdpo_z(rw, rl, kw, kl, alpha, variant):
  if variant == 1:
    return (rw - rl) - (kl - kw)
  return (rw - rl) - alpha * (kl - kw)


def np_tdpo(rw, rl, kw, kl, beta, alpha, variant):
  return -np_log_sigmoid(beta * np_tdpo_z(rw, rl, kw, kl, alpha, variant))


def np_per_token_kl(ref_logits, pi_logits):
  """k_t = sum_v p_ref (lp_ref - lp_pi), positions 0..T-2."""
  return np_kl(np_log_softmax(ref_logits), np_log_softmax(pi_logits))[:, :-1]


def np_div(name, p_logits, q_logits, beta=0.5, temperature=1.0):
  lp = np_log_softmax(np.asarray(p_logits, np.float64) / temperature)
  lq = np_log_softmax(np.asarray(q_logits, np.float64) / temperature)
  if name == "fkl":
    return np_kl(lp, lq)
  if name == "rkl":
    return np_kl(lq, lp)
  if name == "tvd":
    return 0.5 * np.abs(np.exp(lp) - np.exp(lq)).sum(-1)
  if name == "jsd":
    if beta == 0.0:
      return np_kl(lp, lq)
    if beta == 1.0:
      return np_kl(lq, lp)
    lm = np.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)
    return beta * np_kl(lp, lm) + (1.0 - beta) * np_kl(lq, lm)
  raise ValueError(name)


def np_div_grad_q(name, p_logits, q_logits, beta=0.5):
  """Analytic d D / d q_logits (temperature 1), derived by hand.

  With g_v = dD/dq_v (q as a free vector), softmax gives dD/dx_v = q_v (g_v - sum_u q_u g_u).
  fkl: D = -sum p log q + const  -> dD/dx = q - p.
  rkl: g = log q - log p + 1     -> q (d - KL(q||p)), d = lq - lp.
  jsd: g = (1 - beta) log(q / M) (the M-derivatives cancel because sum_u dM_u = 0 weighted
       by beta p/M + (1-beta) q/M = 1).
  tvd: g = 0.5 sign(q - p).
  """
  lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
  p, q = np.exp(lp), np.exp(lq)
  if name == "fkl":
    return q - p
  if name == "rkl":
    g = lq - lp
  elif name == "jsd":
    lm = np.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)
    g = (1.0 - beta) * (lq - lm)
  elif name == "tvd":
    g = 0.5 * np.sign(q - p)
  else:
    raise ValueError(name)
  return q * (g - (q * g).sum(-1, keepdims=True))


def rand_batch(seed, b, t, v, scale=2.0, rng=None):
  """Random logits for pi and ref, tokens, and a prompt/response/padding loss mask
  (drawn from ``rng`` when given, so a caller can draw more from the same stream)."""
  rng = np.random.default_rng(seed) if rng is None else rng
  pi = (rng.normal(size=(b, t, v)) * scale).astype(np.float32)
  ref = (pi + rng.normal(size=(b, t, v)) * 0.7 * scale).astype(np.float32)
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  mask = np.zeros((b, t), np.float32)
  for i in range(b):
    start = rng.integers(1, max(2, t // 2))
    end = rng.integers(start + 1, t + 1)
    mask[i, start:end] = 1.0
  return pi, ref, tokens, mask


def j(x):
  return jnp.asarray(x)


# ----------------------------------------------------------------------------------------------
# Notation: token log-probs, response mask, sequence log-probs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,shape", list(zip(SEEDS, SHAPES)))
def test_token_logprobs_response_mask_sequence_logps(seed, shape):
  pi, _, tokens, mask = rand_batch(seed, *shape, scale=3.0)
  lp = np_log_softmax(pi)
  ref_tok = np_tok(lp, tokens)
  got = token_logprobs(j(pi), j(tokens))
  assert got.shape == (shape[0], shape[1] - 1) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref_tok, **LP_TOL)

  rm = response_mask(j(mask))
  assert rm.shape == (shape[0], shape[1] - 1) and rm.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(rm), mask[:, 1:])

  seq = sequence_logps(j(pi), j(tokens), j(mask))
  assert seq.shape == (shape[0],) and seq.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(seq), (ref_tok * mask[:, 1:]).sum(-1), **LP_TOL)


def test_token_logprobs_large_logits_and_bfloat16():
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(2, 6, 19)) * 1e4).astype(np.float32)
  logits[:, :, :3] = -1e9  # masked vocabulary entries
  tokens = rng.integers(3, 19, size=(2, 6)).astype(np.int32)
  got = np.asarray(token_logprobs(j(logits), j(tokens)))
  assert np.all(np.isfinite(got))
  ref = np_tok(np_log_softmax(logits), tokens)
  # values up to ~1e4 in size: float32 relative precision
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-2)

  bf = j(rng.normal(size=(2, 6, 19)) * 5).astype(jnp.bfloat16)
  mask = j(np.ones((2, 6), np.float32))
  out_tok = token_logprobs(bf, j(tokens))
  out_seq = sequence_logps(bf, j(tokens), mask)
  assert out_tok.dtype == jnp.float32 and out_seq.dtype == jnp.float32
  ref_bf = np_tok(np_log_softmax(np.asarray(bf.astype(jnp.float32))), tokens)
  np.testing.assert_allclose(np.asarray(out_tok), ref_bf, **LP_TOL)
  np.testing.assert_allclose(np.asarray(out_seq), ref_bf.sum(-1), **LP_TOL)


# ----------------------------------------------------------------------------------------------
# TDPO: per-token forward KL (chunked)
# ----------------------------------------------------------------------------------------------

KL_SHAPES = [(2, 7, 11), (3, 10, 29)]  # T-1 = 6 and 9


@pytest.mark.parametrize("seed,shape", [(0, KL_SHAPES[0]), (1, KL_SHAPES[1])])
@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 6, 7, 100, 128])
def test_forward_kl_per_token_matches_numpy(seed, shape, chunk):
  pi, ref, _, _ = rand_batch(seed, *shape)
  got = forward_kl_per_token(j(ref), j(pi), chunk=chunk)
  assert got.shape == (shape[0], shape[1] - 1) and got.dtype == jnp.float32
  want = np_per_token_kl(ref, pi)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  assert np.all(want > 0)


def test_forward_kl_per_token_ignores_last_position_and_is_zero_for_equal_models():
  pi, ref, _, _ = rand_batch(5, 2, 7, 13)
  base = np.asarray(forward_kl_per_token(j(ref), j(pi), chunk=4))
  pi2, ref2 = pi.copy(), ref.copy()
  pi2[:, -1] += 10 * np.random.default_rng(0).normal(size=pi2[:, -1].shape).astype(np.float32)
  ref2[:, -1] -= 3.0 * np.arange(13, dtype=np.float32)
  np.testing.assert_array_equal(np.asarray(forward_kl_per_token(j(ref2), j(pi2), chunk=4)), base)
  same = np.asarray(forward_kl_per_token(j(pi), j(pi), chunk=3))
  np.testing.assert_allclose(same, 0.0, atol=ATOL)
  # p_ref == p_pi as distributions although the logits differ by a per-position constant
  shifted = np.asarray(forward_kl_per_token(j(pi), j(pi + 7.5), chunk=3))
  np.testing.assert_allclose(shifted, 0.0, atol=1e-5)


def test_forward_kl_per_token_bfloat16_gives_float32():
  pi, ref, _, _ = rand_batch(6, 2, 7, 11)
  pib, refb = j(pi).astype(jnp.bfloat16), j(ref).astype(jnp.bfloat16)
  got = forward_kl_per_token(refb, pib, chunk=4)
  assert got.dtype == jnp.float32
  want = np_per_token_kl(np.asarray(refb.astype(jnp.float32)), np.asarray(pib.astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


@pytest.mark.parametrize("seed,chunk", [(0, 1), (1, 4), (2, 100)])
def test_forward_kl_per_token_gradients(seed, chunk):
  """L = sum c * k with a random cotangent c.

  dk_t/dpi_logits[t] = p_pi - p_ref (0 at the last position);
  dk_t/dref_logits[t] = p_ref (d - k_t), d = lp_ref - lp_pi.
  The chunked gradient must also equal the unchunked (chunk = T) one.
  """
  b, t, v = 2, 7, 11
  pi, ref, _, _ = rand_batch(seed, b, t, v)
  c = np.random.default_rng(seed + 100).normal(size=(b, t - 1)).astype(np.float32)

  def loss(ref_l, pi_l, ch):
    return jnp.sum(j(c) * forward_kl_per_token(ref_l, pi_l, chunk=ch))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  g_ref, g_pi = grad(j(ref), j(pi), chunk)
  lr, lpi = np_log_softmax(ref), np_log_softmax(pi)
  pr, ppi = np.exp(lr), np.exp(lpi)
  k = np_kl(lr, lpi)
  want_pi = np.zeros((b, t, v))
  want_pi[:, :-1] = c[..., None] * (ppi - pr)[:, :-1]
  want_ref = np.zeros((b, t, v))
  want_ref[:, :-1] = c[..., None] * (pr * ((lr - lpi) - k[..., None]))[:, :-1]
  np.testing.assert_allclose(np.asarray(g_pi), want_pi, **TOL)
  np.testing.assert_allclose(np.asarray(g_ref), want_ref, **TOL)

  g_ref_full, g_pi_full = grad(j(ref), j(pi), t)
  np.testing.assert_allclose(np.asarray(g_pi), np.asarray(g_pi_full), **TOL)
  np.testing.assert_allclose(np.asarray(g_ref), np.asarray(g_ref_full), **TOL)


# ----------------------------------------------------------------------------------------------
# DPO and TDPO per-pair losses
# ----------------------------------------------------------------------------------------------

def rand_pairs(seed, n=6):
  rng = np.random.default_rng(seed)
  rw, rl = (rng.normal(size=n) * 3).astype(np.float32), (rng.normal(size=n) * 3).astype(np.float32)
  kw, kl = rng.gamma(2.0, 1.0, size=n).astype(np.float32), rng.gamma(2.0, 1.0, size=n).astype(np.float32)
  return rw, rl, kw, kl


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_numpy(seed, beta):
  rw, rl, _, _ = rand_pairs(seed)
  got = dpo_loss(j(rw), j(rl), beta)
  assert got.shape == rw.shape
  np.testing.assert_allclose(np.asarray(got), np_dpo(rw.astype(np.float64), rl.astype(np.float64), beta),
                             **TOL)
  # d loss / d R_w = -beta sigmoid(-beta (R_w - R_l)) = - d loss / d R_l
  gw, gl = jax.grad(lambda a, b_: jnp.sum(dpo_loss(a, b_, beta)), argnums=(0, 1))(j(rw), j(rl))
  want = -beta * np_sigmoid(-beta * (rw.astype(np.float64) - rl))
  np.testing.assert_allclose(np.asarray(gw), want, **TOL)
  np.testing.assert_allclose(np.asarray(gl), -want, **TOL)


def test_dpo_loss_extreme_margins_are_finite():
  rw = j(np.array([1e4, -1e4, 0.0], np.float32))
  rl = j(np.zeros(3, np.float32))
  got = np.asarray(dpo_loss(rw, rl, 0.1))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, [0.0, 1e3, np.log(2.0)], rtol=RTOL, atol=ATOL)
  g = np.asarray(jax.grad(lambda a: jnp.sum(dpo_loss(a, rl, 0.1)))(rw))
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, [0.0, -0.1, -0.05], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (1.0, 0.3), (0.5, 1.0)])
def test_tdpo_loss_matches_numpy(seed, variant, beta, alpha):
  rw, rl, kw, kl = rand_pairs(seed)
  got = tdpo_loss(j(rw), j(rl), j(kw), j(kl), beta, alpha, variant)
  assert got.shape == rw.shape
  want = np_tdpo(*(x.astype(np.float64) for x in (rw, rl, kw, kl)), beta, alpha, variant)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_tdpo_default_arguments_are_tdpo2_alpha_half():
  rw, rl, kw, kl = rand_pairs(7)
  got = tdpo_loss(j(rw), j(rl), j(kw), j(kl), 0.1)
  want = np_tdpo(*(x.astype(np.float64) for x in (rw, rl, kw, kl)), 0.1, 0.5, 2)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_pi_equals_ref_gives_log2(variant):
  z = j(np.zeros(4, np.float32))
  for beta in (0.1, 1.0):
    np.testing.assert_allclose(np.asarray(tdpo_loss(z, z, z, z, beta, 0.5, variant)), np.log(2.0), **TOL)
  np.testing.assert_allclose(np.asarray(dpo_loss(z, z, 0.1)), np.log(2.0), **TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.7, 0.2)])
def test_tdpo_gradients_wrt_kl_terms(seed, beta, alpha):
  """dL/dz = -beta sigmoid(-beta z).

  TDPO1: dz/dK_w = +1, dz/dK_l = -1  -> dL/dK_w = -beta s, dL/dK_l = +beta s;
  TDPO2: dz/dK_w = 0 (stop-gradient), dz/dK_l = -alpha -> dL/dK_l = +alpha beta s,
  with s = sigmoid(-beta z). Also at pi == ref (z = 0, s = 1/2).
  """
  rw, rl, kw, kl = rand_pairs(seed)
  args64 = [x.astype(np.float64) for x in (rw, rl, kw, kl)]

  def grads(variant, *arrs):
    f = lambda a, b_, c, d: jnp.sum(tdpo_loss(a, b_, c, d, beta, alpha, variant))
    return [np.asarray(g) for g in jax.grad(f, argnums=(0, 1, 2, 3))(*map(j, arrs))]

  for variant in (1, 2):
    s = np_sigmoid(-beta * np_tdpo_z(*args64, alpha, variant))
    g_rw, g_rl, g_kw, g_kl = grads(variant, rw, rl, kw, kl)
    np.testing.assert_allclose(g_rw, -beta * s, **TOL)
    np.testing.assert_allclose(g_rl, beta * s, **TOL)
    if variant == 1:
      np.testing.assert_allclose(g_kw, -beta * s, **TOL)
      np.testing.assert_allclose(g_kl, beta * s, **TOL)
      assert np.all(np.abs(g_kw) > 1e-4)
    else:
      np.testing.assert_array_equal(g_kw, 0.0)
      np.testing.assert_allclose(g_kl, alpha * beta * s, **TOL)

  zeros = np.zeros(3, np.float32)
  g1 = grads(1, zeros, zeros, zeros, zeros)
  g2 = grads(2, zeros, zeros, zeros, zeros)
  np.testing.assert_array_equal(g2[2], 0.0)
  np.testing.assert_allclose(g2[3], alpha * beta * 0.5, **TOL)
  np.testing.assert_allclose(g1[2], -beta * 0.5, **TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_tdpo_without_kl_terms_equals_dpo(seed, alpha):
  rw, rl, _, _ = rand_pairs(seed)
  z = j(np.zeros_like(rw))
  d = np.asarray(dpo_loss(j(rw), j(rl), 0.3))
  np.testing.assert_allclose(np.asarray(tdpo_loss(j(rw), j(rl), z, z, 0.3, alpha, 1)), d, **TOL)
  np.testing.assert_allclose(np.asarray(tdpo_loss(j(rw), j(rl), z, z, 0.3, alpha, 2)), d, **TOL)
  # equal KLs on both sides also cancel in TDPO1 (z only sees K_l - K_w)
  k = j(np.full_like(rw, 1.7))
  np.testing.assert_allclose(np.asarray(tdpo_loss(j(rw), j(rl), k, k, 0.3, alpha, 1)), d, **TOL)


# ----------------------------------------------------------------------------------------------
# End to end: logits -> R, K -> DPO / TDPO1 / TDPO2 (values and gradients)
# ----------------------------------------------------------------------------------------------

def np_side(pi, ref, tokens, mask):
  """R = sum_t m (tok(lp_pi) - tok(lp_ref)), K = sum_t m k_t, and their logit gradients."""
  lpi, lr = np_log_softmax(pi), np_log_softmax(ref)
  m = mask[:, 1:].astype(np.float64)
  r = ((np_tok(lpi, tokens) - np_tok(lr, tokens)) * m).sum(-1)
  k = (np_kl(lr, lpi)[:, :-1] * m).sum(-1)
  ppi, pr = np.exp(lpi), np.exp(lr)
  onehot = np.eye(pi.shape[-1])[tokens[:, 1:]]
  dr = np.zeros(pi.shape)
  dr[:, :-1] = m[..., None] * (onehot - ppi[:, :-1])
  dk = np.zeros(pi.shape)
  dk[:, :-1] = m[..., None] * (ppi - pr)[:, :-1]
  return r, k, dr, dk


def jax_loss(kind, pi_w, pi_l, ref_w, ref_l, tok_w, tok_l, m_w, m_l, beta, alpha, chunk):
  r_w = sequence_logps(pi_w, tok_w, m_w) - sequence_logps(ref_w, tok_w, m_w)
  r_l = sequence_logps(pi_l, tok_l, m_l) - sequence_logps(ref_l, tok_l, m_l)
  if kind == "dpo":
    return dpo_loss(r_w, r_l, beta)
  k_w = jnp.sum(response_mask(m_w) * forward_kl_per_token(ref_w, pi_w, chunk=chunk), -1)
  k_l = jnp.sum(response_mask(m_l) * forward_kl_per_token(ref_l, pi_l, chunk=chunk), -1)
  return tdpo_loss(r_w, r_l, k_w, k_l, beta, alpha, 1 if kind == "tdpo1" else 2)


@pytest.mark.parametrize("seed,shape,chunk", [(0, (2, 7, 13), 4), (1, (3, 12, 31), 5)])
@pytest.mark.parametrize("kind", ["dpo", "tdpo1", "tdpo2"])
def test_end_to_end_loss_and_gradient(seed, shape, chunk, kind):
  beta, alpha = 0.1, 0.5
  pi_w, ref_w, tok_w, m_w = rand_batch(seed, *shape)
  pi_l, ref_l, tok_l, m_l = rand_batch(seed + 1000, *shape)
  r_w, k_w, dr_w, dk_w = np_side(pi_w, ref_w, tok_w, m_w)
  r_l, k_l, dr_l, dk_l = np_side(pi_l, ref_l, tok_l, m_l)
  if kind == "dpo":
    z = r_w - r_l
    dz_w, dz_l = dr_w, -dr_l
  elif kind == "tdpo1":
    z = (r_w - r_l) - (k_l - k_w)
    dz_w, dz_l = dr_w + dk_w, -dr_l - dk_l
  else:  # K_w detached: no gradient through the chosen KL
    z = (r_w - r_l) - alpha * (k_l - k_w)
    dz_w, dz_l = dr_w, -dr_l - alpha * dk_l
  want = -np_log_sigmoid(beta * z)
  dl_dz = (-beta * np_sigmoid(-beta * z))[:, None, None]

  args = [j(x) for x in (pi_w, pi_l, ref_w, ref_l, tok_w, tok_l, m_w, m_l)]
  def f(a, b_, *rest):
    per_pair = jax_loss(kind, a, b_, *rest, beta, alpha, chunk)
    return jnp.sum(per_pair), per_pair

  (_, got), (g_w, g_l) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(*args)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  np.testing.assert_allclose(np.asarray(g_w), dl_dz * dz_w, **TOL)
  np.testing.assert_allclose(np.asarray(g_l), dl_dz * dz_l, **TOL)


def test_end_to_end_pi_equals_ref_is_log2():
  pi, _, tok, m = rand_batch(11, 3, 9, 17)
  args = [j(x) for x in (pi, pi[::-1].copy(), pi, pi[::-1].copy(), tok, tok[::-1].copy(), m, m[::-1].copy())]
  for kind in ("dpo", "tdpo1", "tdpo2"):
    np.testing.assert_allclose(np.asarray(jax_loss(kind, *args, 0.1, 0.5, 4)), np.log(2.0), **TOL)


# ----------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------

FUNCS = {
    "fkl": lambda p, q, beta, temp: forward_kl(p, q, temperature=temp),
    "rkl": lambda p, q, beta, temp: reverse_kl(p, q, temperature=temp),
    "jsd": lambda p, q, beta, temp: jsd(p, q, beta=beta, temperature=temp),
    "tvd": lambda p, q, beta, temp: tvd(p, q, temperature=temp),
}


def rand_pq(seed, shape, scale=2.0):
  rng = np.random.default_rng(seed)
  p = (rng.normal(size=shape) * scale).astype(np.float32)
  q = (rng.normal(size=shape) * scale).astype(np.float32)
  return p, q


def test_divergence_names():
  assert set(DIVERGENCES) == {"fkl", "rkl", "jsd", "tvd"}


@pytest.mark.parametrize("seed,shape,temperature", [(0, (5, 7), 1.0), (1, (2, 3, 41), 0.7), (2, (4, 19), 2.0)])
@pytest.mark.parametrize("name,beta", [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("jsd", 0.0), ("jsd", 0.1),
                                       ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0)])
def test_divergences_match_numpy(seed, shape, name, beta, temperature):
  p, q = rand_pq(seed, shape)
  want = np_div(name, p, q, beta, temperature)
  got = FUNCS[name](j(p), j(q), beta, temperature)
  assert got.shape == shape[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  by_name = divergence(name, j(p), j(q), beta=beta, temperature=temperature)
  np.testing.assert_allclose(np.asarray(by_name), want, **TOL)
  # temperature scaling = dividing the logits
  scaled = FUNCS[name](j(p / np.float32(temperature)), j(q / np.float32(temperature)), beta, 1.0)
  np.testing.assert_allclose(np.asarray(scaled), np.asarray(got), **TOL)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,beta", [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("jsd", 0.0), ("jsd", 0.3),
                                       ("jsd", 0.5), ("jsd", 1.0)])
def test_divergences_zero_iff_equal(seed, name, beta):
  p, q = rand_pq(seed, (4, 6, 23))
  same = np.asarray(divergence(name, j(p), j(p), beta=beta))
  np.testing.assert_allclose(same, 0.0, atol=ATOL)
  # same distribution, logits shifted by a per-position constant
  shift = np.random.default_rng(seed).normal(size=(4, 6, 1)).astype(np.float32) * 5
  shifted = np.asarray(divergence(name, j(p), j(p + shift), beta=beta))
  np.testing.assert_allclose(shifted, 0.0, atol=1e-5)
  diff = np.asarray(divergence(name, j(p), j(q), beta=beta))
  assert np.all(diff > 1e-3)


@pytest.mark.parametrize("seed", SEEDS)
def test_jsd_identities(seed):
  p, q = rand_pq(seed, (6, 31), scale=3.0)
  P, Q = j(p), j(q)
  a = np.asarray(jsd(P, Q, beta=0.5))
  b = np.asarray(jsd(Q, P, beta=0.5))
  np.testing.assert_allclose(a, b, **TOL)  # symmetric
  assert np.all(a <= np.log(2.0) + 1e-6) and np.all(a >= 0)
  # disjoint supports reach log 2
  far = np.full((2, 4), -1e9, np.float32)
  near = far.copy()
  far[:, 0] = 0.0
  near[:, 1] = 0.0
  np.testing.assert_allclose(np.asarray(jsd(j(far), j(near), beta=0.5)), np.log(2.0), **TOL)

  for beta in (0.2, 0.7):  # JSD_beta(p, q) = JSD_{1-beta}(q, p)
    np.testing.assert_allclose(np.asarray(jsd(P, Q, beta=beta)), np.asarray(jsd(Q, P, beta=1 - beta)), **TOL)
    # KL(p||M) <= -log beta since M >= beta p: JSD_beta <= binary entropy h(beta)
    h = -beta * np.log(beta) - (1 - beta) * np.log(1 - beta)
    assert np.all(np.asarray(jsd(P, Q, beta=beta)) <= h + 1e-6)

  # endpoints are the KLs exactly
  np.testing.assert_array_equal(np.asarray(jsd(P, Q, beta=0.0)), np.asarray(forward_kl(P, Q)))
  np.testing.assert_array_equal(np.asarray(jsd(P, Q, beta=1.0)), np.asarray(reverse_kl(P, Q)))
  np.testing.assert_allclose(np.asarray(jsd(P, Q, beta=0.0)), np_kl(np_log_softmax(p), np_log_softmax(q)), **TOL)
  np.testing.assert_allclose(np.asarray(jsd(P, Q, beta=1.0)), np_kl(np_log_softmax(q), np_log_softmax(p)), **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_jsd_behaviour_near_the_endpoints(seed):
  """What the convention implies near beta = 0 and 1 (justified by expansion).

  M = q (1 + beta r), r = (p - q) / q: KL(q||M) = beta^2/2 chi2(p||q) + O(beta^3) and
  KL(p||M) = KL(p||q) - beta chi2(p||q) + O(beta^2), so
  JSD_beta = beta KL(p||q) - beta^2 chi2(p||q) / 2 + O(beta^3): JSD_beta -> 0 (the interior formula is discontinuous
  at the endpoints, which are *defined* as the KLs) while JSD_beta / beta -> KL(p||q).
  Symmetrically JSD_beta / (1 - beta) -> KL(q||p) as beta -> 1.
  """
  p, q = rand_pq(seed, (5, 17), scale=1.5)
  P, Q = j(p), j(q)
  fkl = np_kl(np_log_softmax(p), np_log_softmax(q))
  rkl = np_kl(np_log_softmax(q), np_log_softmax(p))
  pp, qq = np.exp(np_log_softmax(p)), np.exp(np_log_softmax(q))
  chi2_pq, chi2_qp = (pp ** 2 / qq).sum(-1) - 1, (qq ** 2 / pp).sum(-1) - 1
  for eps in (1e-3, 1e-4):
    lo, hi = np.asarray(jsd(P, Q, beta=eps)), np.asarray(jsd(P, Q, beta=1 - eps))
    # implementation vs the float64 reference at the same beta (float32 cancellation in values ~eps)
    np.testing.assert_allclose(lo, np_div("jsd", p, q, eps), rtol=2e-3, atol=ATOL)
    np.testing.assert_allclose(hi, np_div("jsd", p, q, 1 - eps), rtol=2e-3, atol=ATOL)
    # second order: JSD_eps / eps = KL(p||q) - eps chi2(p||q) / 2 + O(eps^2)
    np.testing.assert_allclose(lo / eps, fkl - eps * chi2_pq / 2, rtol=1e-2)
    np.testing.assert_allclose(hi / eps, rkl - eps * chi2_qp / 2, rtol=1e-2)
  # first order at eps = 1e-4: O(eps chi2) relative deviation + float32 noise ~1e-3
  np.testing.assert_allclose(lo / eps, fkl, rtol=1e-2)
  np.testing.assert_allclose(hi / eps, rkl, rtol=1e-2)
  # and the value itself tends to 0, not to the endpoint KL
  tiny = 1e-6
  assert np.all(np.asarray(jsd(P, Q, beta=tiny)) <= 2 * tiny * fkl + 1e-5)
  assert np.all(np.asarray(jsd(P, Q, beta=1 - tiny)) <= 2 * tiny * rkl + 1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_tvd_range(seed):
  p, q = rand_pq(seed, (7, 29), scale=4.0)
  t = np.asarray(tvd(j(p), j(q)))
  assert np.all(t >= 0) and np.all(t <= 1 + 1e-6)
  far = np.full((3, 5), -1e9, np.float32)
  near = far.copy()
  far[:, 0] = 0.0
  near[:, 2] = 0.0
  np.testing.assert_allclose(np.asarray(tvd(j(far), j(near))), 1.0, **TOL)
  # TVD = 1 - sum min(p, q)
  pp, qq = np.exp(np_log_softmax(p)), np.exp(np_log_softmax(q))
  np.testing.assert_allclose(t, 1.0 - np.minimum(pp, qq).sum(-1), **TOL)


@pytest.mark.parametrize("name,beta", [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("jsd", 0.0), ("jsd", 0.5),
                                       ("jsd", 0.9), ("jsd", 1.0)])
def test_divergences_peaked_and_masked_logits_stay_finite(name, beta):
  rng = np.random.default_rng(4)
  shape = (3, 4, 19)
  p = (rng.normal(size=shape) * 1e4).astype(np.float32)
  q = (rng.normal(size=shape) * 1e4).astype(np.float32)
  p[..., :4] = -1e9  # masked entries in both
  q[..., :4] = -1e9
  p[..., 4] = -1e9  # masked in p only
  q[..., 5] = -1e9  # masked in q only
  for temp in (1.0, 0.5):
    got = np.asarray(divergence(name, j(p), j(q), beta=beta, temperature=temp))
    assert np.all(np.isfinite(got)), got
    want = np_div(name, p, q, beta, temp)
    # values up to ~1e4 (KL of near one-hot distributions); float32 relative precision
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert np.all(got >= -1e-3)
  same = np.asarray(divergence(name, j(p), j(p), beta=beta))
  np.testing.assert_allclose(same, 0.0, atol=ATOL)
  # gradients stay finite too
  g = jax.grad(lambda x: jnp.sum(divergence(name, j(p), x, beta=beta)))(j(q))
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("name,beta", [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("jsd", 0.5), ("jsd", 0.0),
                                       ("jsd", 1.0)])
def test_divergences_bfloat16_inputs_give_float32(name, beta):
  p, q = rand_pq(8, (2, 5, 13))
  pb, qb = j(p).astype(jnp.bfloat16), j(q).astype(jnp.bfloat16)
  got = divergence(name, pb, qb, beta=beta)
  assert got.dtype == jnp.float32
  want = np_div(name, np.asarray(pb.astype(jnp.float32)), np.asarray(qb.astype(jnp.float32)), beta)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  s, n = token_divergence_loss(name, pb, qb, j(np.ones((2, 5), np.float32)), beta=beta)
  assert s.dtype == jnp.float32


@pytest.mark.parametrize("seed,name,beta", [(0, "fkl", 0.5), (1, "rkl", 0.5), (2, "tvd", 0.5), (3, "jsd", 0.3),
                                            (4, "jsd", 0.5)])
def test_divergence_gradients_wrt_student(seed, name, beta):
  p, q = rand_pq(seed, (3, 4, 17))
  g = jax.grad(lambda x: jnp.sum(divergence(name, j(p), x, beta=beta)))(j(q))
  np.testing.assert_allclose(np.asarray(g), np_div_grad_q(name, p, q, beta), **TOL)


@pytest.mark.parametrize("seed,name,beta,temperature", [(0, "fkl", 0.5, 1.0), (1, "rkl", 0.5, 2.0),
                                                        (2, "jsd", 0.5, 1.0), (3, "jsd", 0.1, 0.8),
                                                        (4, "tvd", 0.5, 1.0)])
def test_token_divergence_loss(seed, name, beta, temperature):
  b, t, v = 4, 6, 21
  p, q = rand_pq(seed, (b, t, v))
  mask = (np.random.default_rng(seed + 50).random((b, t)) < 0.6).astype(np.float32)
  mask[0, 0] = 1.0
  d = np_div(name, p, q, beta, temperature)
  s, n = token_divergence_loss(name, j(p), j(q), j(mask), beta=beta, temperature=temperature)
  np.testing.assert_allclose(float(s), (mask * d).sum(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(n), mask.sum(), rtol=0, atol=0)
  # global-batch mean: sums over micro-batches add up
  s1, n1 = token_divergence_loss(name, j(p[:1]), j(q[:1]), j(mask[:1]), beta=beta, temperature=temperature)
  s2, n2 = token_divergence_loss(name, j(p[1:]), j(q[1:]), j(mask[1:]), beta=beta, temperature=temperature)
  np.testing.assert_allclose((float(s1) + float(s2)) / (float(n1) + float(n2)),
                             (mask * d).sum() / mask.sum(), rtol=RTOL, atol=ATOL)
  # masked positions carry no gradient
  g = np.asarray(jax.jit(jax.grad(lambda x: token_divergence_loss(name, j(p), x, j(mask), beta=beta,
                                                          temperature=temperature)[0]))(j(q)))
  assert np.all(g[mask == 0] == 0)


def test_invalid_divergence_arguments_raise():
  p, q = rand_pq(0, (2, 5))
  with pytest.raises(ValueError):
    jsd(j(p), j(q), beta=1.5)
  with pytest.raises(ValueError):
    jsd(j(p), j(q), beta=-0.1)
  with pytest.raises(ValueError):
    divergence("kl", j(p), j(q))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_loss_matches_numpy(seed, beta):
  """IPO (Azar et al. 2023): (R_w - R_l - 1/(2 beta))^2 and its gradient 2 (h - 1/(2 beta)), float64."""
  from jaxopd.losses import ipo_loss
  rw, rl, _, _ = rand_pairs(seed)
  h = rw.astype(np.float64) - rl.astype(np.float64) - 1.0 / (2.0 * beta)
  np.testing.assert_allclose(np.asarray(ipo_loss(j(rw), j(rl), beta)), h ** 2, **TOL)
  gw, gl = jax.grad(lambda a, b_: jnp.sum(ipo_loss(a, b_, beta)), argnums=(0, 1))(j(rw), j(rl))
  np.testing.assert_allclose(np.asarray(gw), 2 * h, **TOL)
  np.testing.assert_allclose(np.asarray(gl), -2 * h, **TOL)
