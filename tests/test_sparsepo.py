"""SparsePO: the pure loss against an independent NumPy float64 reference written from
the paper's formulas (values and gradients), its identities (all-ones masks = TDPO1, w_d = 0
= DPO with per-token reward weights), the label-shift alignment of the masks, the
MaPO normalisation, the learned mask head, no gradient into the policy through the
mask input, and the smoke pipeline end to end.

Tolerances as tests/test_loss_references.py: JAX runs in float32.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import shared_smoke_stages, tiny_models
from test_loss_references import rand_batch
from jaxopd import errors, stages, train
from jaxopd.experiment import load_config
from jaxopd.methods import sparsepo
from jaxopd.losses import forward_kl_per_token, response_mask, tdpo_loss, dpo_loss, token_logprobs
from jaxopd.losses.sparsepo import (activation_mask, l1_penalty, mask_l1, sequence_terms, sparsepo_loss,
                                    znorm_minmax)
from jaxopd.models import ModelConfig, Transformer, table

TOL = dict(rtol=1e-5, atol=1e-6)
LP_TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# NumPy float64 references (from the paper's formulas)
# ----------------------------------------------------------------------------------------------

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  s = x - x.max(-1, keepdims=True)
  return s - np.log(np.exp(s).sum(-1, keepdims=True))


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_side(pi, ref, tokens, mask, w_u, w_d):
  """U, D of one side and their gradients w.r.t. the policy logits and the weights.

  Position t of the [N, T-1] arrays scores tokens[:, t+1] with mask loss_mask[:, t+1].
  """
  lpi, lr = np_log_softmax(pi), np_log_softmax(ref)
  ppi, pr = np.exp(lpi), np.exp(lr)
  n, t = tokens.shape
  m = mask[:, 1:].astype(np.float64)
  tok_pi = np.array([[lpi[i, s, tokens[i, s + 1]] for s in range(t - 1)] for i in range(n)])
  tok_r = np.array([[lr[i, s, tokens[i, s + 1]] for s in range(t - 1)] for i in range(n)])
  k = (pr * (lr - lpi)).sum(-1)[:, :-1]                          # KL(p_ref || p_pi) per position
  r = tok_pi - tok_r
  u = (m * w_u * r).sum(-1)
  d = (m * w_d * (pr * (lpi - lr)).sum(-1)[:, :-1]).sum(-1)     # = -sum m w_d k
  onehot = np.eye(pi.shape[-1])[tokens[:, 1:]]
  du = np.zeros(pi.shape)
  du[:, :-1] = (m * w_u)[..., None] * (onehot - ppi[:, :-1])
  dd = np.zeros(pi.shape)                                         # dk/dx_pi = p_pi - p_ref
  dd[:, :-1] = -(m * w_d)[..., None] * (ppi - pr)[:, :-1]
  return dict(u=u, d=d, du=du, dd=dd, du_dwu=m * r, dd_dwd=-m * k, k=k, m=m)


def np_sparsepo(sw, sl, beta, lu, ld, shared, wu_w, wu_l, wd_w, wd_l):
  z = (sw["u"] - sl["u"]) - (sw["d"] - sl["d"])
  scale = 0.5 if shared else 1.0
  pen = scale * (lu * (np.abs(wu_w * sw["m"]).sum(-1) + np.abs(wu_l * sl["m"]).sum(-1))
                 + ld * (np.abs(wd_w * sw["m"]).sum(-1) + np.abs(wd_l * sl["m"]).sum(-1)))
  loss = -np_log_sigmoid(beta * z) + pen
  g = (-beta / (1.0 + np.exp(beta * z)))                          # d loss / d z
  grads = {"pi_w": g[:, None, None] * (sw["du"] - sw["dd"]),
           "pi_l": g[:, None, None] * (-sl["du"] + sl["dd"]),
           "wu_w": g[:, None] * sw["du_dwu"] + scale * lu * sw["m"] * np.sign(wu_w),
           "wu_l": -g[:, None] * sl["du_dwu"] + scale * lu * sl["m"] * np.sign(wu_l),
           "wd_w": -g[:, None] * sw["dd_dwd"] + scale * ld * sw["m"] * np.sign(wd_w),
           "wd_l": g[:, None] * sl["dd_dwd"] + scale * ld * sl["m"] * np.sign(wd_l)}
  return loss, grads


def rand_side(seed, b, t, v, scale=2.0):
  """test_loss_references.rand_batch plus random token weights from the same stream."""
  rng = np.random.default_rng(seed)
  pi, ref, tokens, mask = rand_batch(seed, b, t, v, scale, rng=rng)
  w_u = rng.uniform(0.05, 2.0, size=(b, t - 1)).astype(np.float32)
  w_d = rng.uniform(0.05, 2.0, size=(b, t - 1)).astype(np.float32)
  return pi, ref, tokens, mask, w_u, w_d


def jax_pair_loss(pi_w, pi_l, ref_w, ref_l, tok_w, tok_l, m_w, m_l, wu_w, wu_l, wd_w, wd_l, beta, lu, ld,
                  shared, chunk=4):
  """The library's composition: logits -> U, D per side -> loss + L1 per pair."""
  def side(pi, ref, tok, mask, wu, wd):
    m = response_mask(mask)
    k = forward_kl_per_token(ref, pi, chunk)
    return sequence_terms(token_logprobs(pi, tok), token_logprobs(ref, tok), k, m, wu, wd) + (m,)
  u_w, d_w, mw = side(pi_w, ref_w, tok_w, m_w, wu_w, wd_w)
  u_l, d_l, ml = side(pi_l, ref_l, tok_l, m_l, wu_l, wd_l)
  pair = lambda a, b_: jnp.stack([a, b_], axis=1)
  return sparsepo_loss(u_w, u_l, d_w, d_l, beta) + l1_penalty(pair(wu_w, wu_l), pair(wd_w, wd_l), pair(mw, ml),
                                                               lu, ld, shared)


# ----------------------------------------------------------------------------------------------
# The loss: values, gradients, identities
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,shape", [(0, (2, 7, 13)), (1, (3, 12, 31))])
@pytest.mark.parametrize("beta,lu,ld,shared", [(0.1, 0.0, 0.0, False), (0.8, 0.01, 0.003, False),
                                               (0.3, 0.02, 0.05, True)])
def test_loss_and_gradients_match_numpy(seed, shape, beta, lu, ld, shared):
  pi_w, ref_w, tok_w, m_w, wu_w, wd_w = rand_side(seed, *shape)
  pi_l, ref_l, tok_l, m_l, wu_l, wd_l = rand_side(seed + 100, *shape)
  sw = np_side(pi_w, ref_w, tok_w, m_w, wu_w, wd_w)
  sl = np_side(pi_l, ref_l, tok_l, m_l, wu_l, wd_l)
  want, g = np_sparsepo(sw, sl, beta, lu, ld, shared, wu_w, wu_l, wd_w, wd_l)

  def f(pw, pl, a, b_, c, d):
    per_pair = jax_pair_loss(pw, pl, ref_w, ref_l, tok_w, tok_l, m_w, m_l, a, b_, c, d, beta, lu, ld, shared)
    return jnp.sum(per_pair), per_pair

  args = [jnp.asarray(x) for x in (pi_w, pi_l, wu_w, wu_l, wd_w, wd_l)]
  (_, got), grads = jax.jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))(*args)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  for name, gj in zip(("pi_w", "pi_l", "wu_w", "wu_l", "wd_w", "wd_l"), grads):
    np.testing.assert_allclose(np.asarray(gj), g[name], **LP_TOL, err_msg=name)


def test_shared_mask_gradient_is_the_sum_of_both_roles():
  """One shared mask w (w_u = w_d = w): dL/dw = dL/dw_u + dL/dw_d, L1 coefficients halved."""
  pi_w, ref_w, tok_w, m_w, w_w, _ = rand_side(3, 2, 9, 11)
  pi_l, ref_l, tok_l, m_l, w_l, _ = rand_side(4, 2, 9, 11)
  sw = np_side(pi_w, ref_w, tok_w, m_w, w_w, w_w)
  sl = np_side(pi_l, ref_l, tok_l, m_l, w_l, w_l)
  want, g = np_sparsepo(sw, sl, 0.5, 0.02, 0.04, True, w_w, w_l, w_w, w_l)
  f = lambda a, b_: jnp.sum(jax_pair_loss(pi_w, pi_l, ref_w, ref_l, tok_w, tok_l, m_w, m_l, a, b_, a, b_, 0.5,
                                          0.02, 0.04, True))
  val, (ga, gb) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(w_w), jnp.asarray(w_l))
  np.testing.assert_allclose(float(val), want.sum(), **TOL)
  np.testing.assert_allclose(np.asarray(ga), g["wu_w"] + g["wd_w"], **LP_TOL)
  np.testing.assert_allclose(np.asarray(gb), g["wu_l"] + g["wd_l"], **LP_TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_all_ones_masks_and_no_penalty_is_tdpo1(seed):
  pi_w, ref_w, tok_w, m_w, _, _ = rand_side(seed, 3, 10, 17)
  pi_l, ref_l, tok_l, m_l, _, _ = rand_side(seed + 7, 3, 10, 17)
  ones = jnp.ones((3, 9))
  got = jax_pair_loss(pi_w, pi_l, ref_w, ref_l, tok_w, tok_l, m_w, m_l, ones, ones, ones, ones, 0.2, 0.0, 0.0,
                      True)
  def rk(pi, ref, tok, mask):
    m = response_mask(jnp.asarray(mask))
    r = jnp.sum(m * (token_logprobs(pi, tok) - token_logprobs(ref, tok)), -1)
    return r, jnp.sum(m * forward_kl_per_token(ref, pi, 4), -1)
  (r_w, k_w), (r_l, k_l) = rk(pi_w, ref_w, tok_w, m_w), rk(pi_l, ref_l, tok_l, m_l)
  np.testing.assert_allclose(np.asarray(got), np.asarray(tdpo_loss(r_w, r_l, k_w, k_l, 0.2, variant=1)), **TOL)


def test_zero_kl_mask_is_dpo_with_token_reward_weights():
  pi_w, ref_w, tok_w, m_w, wu_w, _ = rand_side(5, 3, 10, 17)
  pi_l, ref_l, tok_l, m_l, wu_l, _ = rand_side(6, 3, 10, 17)
  zeros = jnp.zeros((3, 9))
  got = jax_pair_loss(pi_w, pi_l, ref_w, ref_l, tok_w, tok_l, m_w, m_l, wu_w, wu_l, zeros, zeros, 0.4, 0.0, 0.0,
                      False)
  sw = np_side(pi_w, ref_w, tok_w, m_w, wu_w, np.zeros((3, 9)))
  sl = np_side(pi_l, ref_l, tok_l, m_l, wu_l, np.zeros((3, 9)))
  np.testing.assert_allclose(np.asarray(got), -np_log_sigmoid(0.4 * (sw["u"] - sl["u"])), **TOL)
  ones = jnp.ones((3, 9))          # ... and with all-ones reward weights it is DPO itself
  got = jax_pair_loss(pi_w, pi_l, ref_w, ref_l, tok_w, tok_l, m_w, m_l, ones, ones, zeros, zeros, 0.4, 0.0, 0.0,
                      False)
  r = lambda pi, ref, tok, mask: jnp.sum(response_mask(jnp.asarray(mask)) * (token_logprobs(pi, tok)
                                                                            - token_logprobs(ref, tok)), -1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(dpo_loss(r(pi_w, ref_w, tok_w, m_w),
                                                                  r(pi_l, ref_l, tok_l, m_l), 0.4)), **TOL)


def test_mask_weight_at_t_multiplies_the_term_of_token_t_plus_1():
  """A one-hot weight at index t picks exactly token t+1's log-ratio and KL (label shift)."""
  pi, ref, tok, _, _, _ = rand_side(9, 1, 8, 13)
  mask = np.ones((1, 8), np.float32)
  lpi, lr = np_log_softmax(pi), np_log_softmax(ref)
  for t in range(7):
    w = np.zeros((1, 7), np.float32)
    w[0, t] = 1.0
    m = response_mask(jnp.asarray(mask))
    u, d = sequence_terms(token_logprobs(pi, tok), token_logprobs(ref, tok), forward_kl_per_token(ref, pi, 3),
                          m, jnp.asarray(w), jnp.asarray(w))
    want_u = lpi[0, t, tok[0, t + 1]] - lr[0, t, tok[0, t + 1]]
    want_d = -(np.exp(lr[0, t]) * (lr[0, t] - lpi[0, t])).sum()
    np.testing.assert_allclose(float(u[0]), want_u, **LP_TOL)
    np.testing.assert_allclose(float(d[0]), want_d, **LP_TOL)
  # a weight on a prompt/padding target (loss_mask[:, t+1] = 0) does nothing
  mask[0, 5] = 0.0
  w = np.zeros((1, 7), np.float32)
  w[0, 4] = 5.0
  u, d = sequence_terms(token_logprobs(pi, tok), token_logprobs(ref, tok), forward_kl_per_token(ref, pi),
                        response_mask(jnp.asarray(mask)), jnp.asarray(w), jnp.asarray(w))
  assert float(u[0]) == 0.0 and float(d[0]) == 0.0


def test_l1_penalty_and_pi_equals_ref():
  w = np.abs(np.random.default_rng(0).normal(size=(2, 2, 5))).astype(np.float32)
  m = np.array([[[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]] * 2, np.float32)
  want = (w * m).sum((-1, -2))
  np.testing.assert_allclose(np.asarray(l1_penalty(w, 2 * w, m, 0.1, 0.3, False)), 0.1 * want + 0.3 * 2 * want,
                             **TOL)
  np.testing.assert_allclose(np.asarray(l1_penalty(w, w, m, 0.1, 0.3, True)), 0.5 * 0.4 * want, **TOL)
  np.testing.assert_allclose(np.asarray(mask_l1(jnp.asarray(-w[:, 0]), jnp.asarray(m[:, 0]))),
                             (w[:, 0] * m[:, 0]).sum(-1), **TOL)
  pi, _, tok, mask, wu, wd = rand_side(1, 2, 6, 9)       # pi == ref: log 2 whatever the masks
  got = jax_pair_loss(pi, pi, pi, pi, tok, tok, mask, mask, wu, wd, wd, wu, 0.7, 0.0, 0.0, False)
  np.testing.assert_allclose(np.asarray(got), np.log(2.0), **TOL)


# ----------------------------------------------------------------------------------------------
# MaPO: z-normalisation, min-max, averaging
# ----------------------------------------------------------------------------------------------

def np_znorm_minmax(x, m):
  out = np.zeros(x.shape)
  for i in range(x.shape[0]):
    v = m[i] > 0
    if not v.any():
      continue
    xs = x[i][v].astype(np.float64)
    z = (xs - xs.mean()) / (xs.std() + 1e-12)
    out[i][v] = 1.0 if z.max() == z.min() else (z - z.min()) / (z.max() - z.min())
  return out


def test_znorm_minmax_matches_numpy_and_guards_constant_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 9)).astype(np.float32) * 3 + 1
  m = (rng.uniform(size=(5, 9)) > 0.3).astype(np.float32)
  x[1] = 4.2                                    # constant activations: max == min
  m[2] = 0.0
  m[2, 3] = 1.0                                 # one valid token
  m[3] = 0.0                                    # no valid token
  got = np.asarray(znorm_minmax(jnp.asarray(x), jnp.asarray(m)))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, np_znorm_minmax(x, m), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[1], m[1])   # constant -> weight 1 on every valid token
  np.testing.assert_array_equal(got[2], m[2])
  np.testing.assert_array_equal(got[3], 0.0)
  valid = m > 0
  assert got[valid].min() >= 0.0 and got[valid].max() <= 1.0 and np.all(got[~valid] == 0.0)
  # the valid row's extremes reach exactly 0 and 1
  assert got[0][valid[0]].min() == 0.0 and got[0][valid[0]].max() == pytest.approx(1.0)


def test_activation_mask_averages_layers_then_types_and_is_detached():
  rng = np.random.default_rng(1)
  m = np.ones((2, 6), np.float32)
  m[1, :2] = 0
  acts = {"resid": [rng.normal(size=(2, 6, 4)).astype(np.float32) for _ in range(3)],
          "logits": [rng.normal(size=(2, 6, 7)).astype(np.float32)]}
  got = np.asarray(activation_mask({k: [jnp.asarray(a) for a in v] for k, v in acts.items()}, jnp.asarray(m)))
  per_type = [np.mean([np_znorm_minmax(a.mean(-1), m) for a in acts[k]], axis=0) for k in ("logits", "resid")]
  np.testing.assert_allclose(got, np.mean(per_type, axis=0), rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda a: jnp.sum(activation_mask({"x": [a]}, jnp.asarray(m))))(jnp.asarray(acts["logits"][0]))
  assert float(jnp.abs(g).max()) == 0.0


# ----------------------------------------------------------------------------------------------
# The learned mask head and the step with models
# ----------------------------------------------------------------------------------------------

def test_mask_head_formula_and_ones_init():
  head = sparsepo.MaskHead(3, 8, nnx.Rngs(params=0), "uniform")
  h = np.random.default_rng(0).normal(size=(3, 2, 5, 8)).astype(np.float32)
  w, b, a = (np.asarray(x[...], np.float64) for x in (head.w, head.b, head.a))
  ln = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  per_layer = np.maximum(np.einsum("lntd,ld->lnt", ln, w) + b[:, None, None], 0)
  want = np.maximum(np.einsum("lnt,l->nt", per_layer, a[:, 0]), 0)
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(h))), want, rtol=1e-5, atol=1e-6)
  ones = sparsepo.MaskHead(3, 8, nnx.Rngs(params=0), "ones")
  np.testing.assert_allclose(np.asarray(ones(jnp.asarray(h))), 1.0, rtol=1e-6)
  shared = sparsepo.SparseMask(3, 8, True, nnx.Rngs(params=0))
  u, d = shared(jnp.asarray(h))
  assert u is d
  indep = sparsepo.SparseMask(3, 8, False, nnx.Rngs(params=0))
  u, d = indep(jnp.asarray(h))
  assert not np.allclose(np.asarray(u), np.asarray(d))


@pytest.mark.parametrize("n_layers", [1, 2, 4, 12])
def test_positive_init_is_positive_on_average_and_never_all_zero(n_layers):
  """The default init as its formula says (official W; b = 1 + U(+-1/sqrt(D)), a ~ U(0, 2/L)). On isotropic
  hidden states, with a >= 0 and W LN(h) ~ N(0, |W|^2 ~= 1/3) (LN(h) has unit RMS), E[w] = sum_l a_l
  E[relu(N(b_l, 1/3))] ~= 1.01 sum_l a_l (the Gaussian formula, computed here); with a dominant shared
  direction the mean is still positive. On isotropic states a few % of the tokens are zero, never all."""
  d = 64
  rng = np.random.default_rng(n_layers)
  shape = (n_layers, 8, 32, d)
  iso = rng.normal(size=shape) * rng.uniform(0.5, 5.0, size=shape[:-1] + (1,))       # LN removes the scale
  aniso = np.sqrt(0.5) * rng.normal(size=(n_layers, 1, 1, d)) + np.sqrt(0.5) * rng.normal(size=shape) + 3.0
  mu, sd = 1.0, 1 / np.sqrt(3)
  want = mu * 0.5 * (1 + math.erf(mu / sd / np.sqrt(2))) + sd * np.exp(-(mu / sd) ** 2 / 2) / np.sqrt(2 * np.pi)
  assert want == pytest.approx(1.01, abs=0.005)
  ratios = []
  for seed in range(20):
    head = sparsepo.MaskHead(n_layers, d, nnx.Rngs(params=seed))
    w, b, a = (np.asarray(x[...], np.float64) for x in (head.w, head.b, head.a))
    assert np.all(np.abs(w) <= 1 / np.sqrt(d)) and np.all(np.abs(b - 1) <= 1 / np.sqrt(d))
    assert np.all(a >= 0) and np.all(a <= 2 / n_layers)
    out = np.asarray(head(jnp.asarray(iso, jnp.float32)))
    assert out.min() >= 0.0 and (out == 0).mean() < 0.15, (seed, (out == 0).mean())
    ratios.append(out.mean() / a.sum())
    out = np.asarray(head(jnp.asarray(aniso, jnp.float32)))     # a layer may be cut on most tokens, not all
    assert out.min() >= 0.0 and out.mean() > 0.0, seed
  assert np.mean(ratios) == pytest.approx(want, rel=0.1)
  assert min(ratios) > 0.5 and max(ratios) < 1.6, ratios
  # The official init, by contrast, gives an all-zero head for some seeds (every a_l < 0: probability 2^-L).
  if n_layers == 2:
    official = [np.asarray(sparsepo.MaskHead(2, d, nnx.Rngs(params=s_), "uniform")(jnp.asarray(iso, jnp.float32)))
                for s_ in range(20)]
    assert any(not np.any(out) for out in official), "the official init was expected to die for some seed of 20"


def _dead(head):
  """``head`` with every mixer weight negative: ``w = relu(sum_l a_l relu(.)) = 0`` on every token."""
  head.a[...] = -jnp.abs(head.a[...]) - 0.1
  return head


def test_dead_mask_stops_the_run_or_warns_naming_the_step(capsys):
  """A dead shared mask: the loss is exactly log 2 and the policy's gradient exactly 0 although the policy
  differs from the reference; the eval's check stops with a one-line TrainingError naming the step. A dead
  independent w_u stops too; a dead w_d alone (the loss is then DPO with token weights) warns."""
  import ml_collections
  cfg, (pol, ref) = MODEL, tiny_models(MODEL, ("policy", "reference")).values()
  batch = _batch()
  dead = sparsepo.SparseMask(cfg.n_layers, cfg.d_model, True, nnx.Rngs(params=1))
  _dead(dead.u)
  loss_fn = sparsepo.make_loss_fn("learned", True, 0.5, chunk=4)
  gd, state = nnx.split(pol)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda st: loss_fn({"policy": nnx.merge(gd, st), "reference": ref, "mask": dead}, batch, None).loss))(state)
  np.testing.assert_allclose(float(loss) / 2, np.log(2.0), rtol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0
  assert not np.allclose(np.asarray(pol(batch["tokens"][:, 0]).logits), np.asarray(ref(batch["tokens"][:, 0]).logits))

  recs = [{"tokens": np.asarray(batch["tokens"][i]), "loss_mask": np.asarray(batch["loss_mask"][i])} for i in range(2)]

  def evaluate(shared, init="uniform"):
    c = ml_collections.ConfigDict(dict(seq_len=10, method=dict(mask="learned", shared=shared, mask_init=init)))
    return sparsepo.make_evaluate(c, None, [], recs)     # no suite: the check alone, on the probed pairs
  models = {"policy": pol, "reference": ref}
  with pytest.raises(errors.TrainingError, match=r"w_u is zero on every response token of the 4 probed sequences "
                                                r"at step 7 .*mask_init=positive"):
    evaluate(True)({**models, "mask": dead}, 7)
  indep = sparsepo.SparseMask(cfg.n_layers, cfg.d_model, False, nnx.Rngs(params=1))
  assert evaluate(False)({**models, "mask": indep}, 3) == {}
  assert capsys.readouterr().out == ""
  _dead(indep.d)
  evaluate(False, "positive")({**models, "mask": indep}, 9)
  out = capsys.readouterr().out
  assert out.startswith("warning: SparsePO: the learned KL mask w_d is zero") and "at step 9" in out
  assert "mask_init=ones" in out
  _dead(indep.u)
  with pytest.raises(sparsepo.DeadMaskError, match="at step 11"):
    evaluate(False)({**models, "mask": indep}, 11)


MODEL = ModelConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, max_len=16)


def _batch(b=2, t=10, v=23, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, v, size=(b, 2, t)).astype(np.int32)
  mask = np.zeros((b, 2, t), np.float32)
  mask[..., 3:t - 1] = 1
  gold = (rng.uniform(size=(b, 2, t)) > 0.7).astype(np.float32)
  return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask), "gold": jnp.asarray(gold)}


@pytest.mark.parametrize("mask,shared", [("learned", True), ("learned", False), ("mapo", True)])
def test_step_no_gradient_into_policy_through_the_mask_input(mask, shared):
  """The policy's gradient equals the gradient with the masks fed in as constants; the reference
  (whose states are the mask input) gets no gradient; the learned mask does."""
  cfg, (pol, ref) = MODEL, tiny_models(MODEL, ("policy", "reference")).values()
  params = {"policy": pol}         # the trainable modules
  if mask == "learned":
    params["mask"] = sparsepo.SparseMask(cfg.n_layers, cfg.d_model, shared, nnx.Rngs(params=5), "ones")
  frozen = {"reference": ref}
  batch = _batch()
  # Move the policy away from the reference so that every term is non-zero.
  pol_state = jax.tree.map(lambda x: x * 1.1, nnx.state(pol, nnx.Param))
  nnx.update(pol, pol_state)
  loss_fn = sparsepo.make_loss_fn(mask, shared, 0.5, 0.01, 0.02, chunk=4)
  p_gd, p_state = nnx.split(params)
  f_gd, f_state = nnx.split(frozen)

  def full(ps, fs):
    return loss_fn({**nnx.merge(p_gd, ps), **nnx.merge(f_gd, fs)}, batch, None).loss
  g_params, g_frozen = jax.jit(jax.grad(full, argnums=(0, 1)))(p_state, f_state)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_frozen)) == 0.0
  if mask == "learned":
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_params["mask"])) > 0.0

  flat = batch["tokens"].reshape(4, -1)
  m = response_mask(batch["loss_mask"].reshape(4, -1))
  ref_logits = ref(flat).logits                   # the full logits, independently of the chunked loss
  ref_out = ref(flat, return_hidden=True)
  w_u, w_d = sparsepo.token_weights(mask, params.get("mask"), ref_out.hidden, jnp.mean(ref_logits[:, :-1], -1), m)
  w_u, w_d = jax.lax.stop_gradient(w_u), jax.lax.stop_gradient(w_d)

  def const(ps):
    p = nnx.merge(p_gd, ps)["policy"]
    logits = p(flat).logits
    k = forward_kl_per_token(ref_logits, logits, 4)
    u, d = sequence_terms(token_logprobs(logits, flat), token_logprobs(ref_logits, flat), k, m, w_u, w_d)
    u, d = u.reshape(2, 2), d.reshape(2, 2)
    pen = l1_penalty(w_u.reshape(2, 2, -1), w_d.reshape(2, 2, -1), m.reshape(2, 2, -1), 0.01, 0.02, shared)
    return jnp.sum(sparsepo_loss(u[:, 0], u[:, 1], d[:, 0], d[:, 1], 0.5) + pen)
  g_const = jax.jit(jax.grad(const))(p_state)
  for a, b_ in zip(jax.tree.leaves(g_params["policy"]), jax.tree.leaves(g_const["policy"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-6)


def test_mask_of_token_t_plus_1_comes_from_states_at_t():
  """w[:, t] (weight of token t+1) is causal in the tokens up to t: changing token t+1 leaves it,
  changing token t moves it (learned and MaPO)."""
  cfg, ref = MODEL, tiny_models(MODEL, ("policy", "reference"))["reference"]
  head = sparsepo.SparseMask(cfg.n_layers, cfg.d_model, True, nnx.Rngs(params=3))
  head.u.a[...] = jnp.abs(head.u.a[...])        # positive mixer and biases: no ReLU cuts the weight to 0
  head.u.b[...] = jnp.abs(head.u.b[...]) + 1.0
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 23, size=(1, 10)), jnp.int32)
  m = jnp.ones((1, 9))
  for mask, model in (("learned", head), ("mapo", None)):
    def weights(tok):
      logits, hidden = sparsepo.reference_outputs(ref, tok)
      return np.asarray(sparsepo.token_weights(mask, model, hidden, logits, m)[0])
    base = weights(tokens)
    t = 5
    changed_next = weights(tokens.at[0, t + 1].set((tokens[0, t + 1] % 22) + 1))
    changed_here = weights(tokens.at[0, t].set((tokens[0, t] % 22) + 1))
    if mask == "learned":      # MaPO normalises over the whole sequence, so only the learned mask is local
      np.testing.assert_allclose(changed_next[0, :t + 1], base[0, :t + 1], rtol=1e-6)
      assert not np.allclose(changed_here[0, t], base[0, t])
    else:
      assert not np.allclose(changed_here, base)


def test_loss_fn_metrics_and_log2_at_start():
  cfg, (pol, ref) = MODEL, tiny_models(MODEL, ("policy", "reference")).values()
  ref = Transformer(cfg, nnx.Rngs(params=0))      # the same weights: pi == ref
  params = {"policy": pol, "mask": sparsepo.SparseMask(cfg.n_layers, cfg.d_model, False, nnx.Rngs(params=2))}
  out = sparsepo.make_loss_fn("learned", False, 0.1)({**params, "reference": ref}, _batch(), None)
  np.testing.assert_allclose(float(out.loss) / float(out.count), np.log(2.0), rtol=1e-6)
  for k in ("rewards/chosen", "rewards/accuracies", "logps/chosen", "kl/chosen", "kl/margin",
            "kl_weighted/chosen", "mask/u_mean", "mask/u_zero", "mask/u_gold", "mask/u_other", "mask/d_mean",
            "mask/d_gold"):
    assert k in out.metrics, k
  num, den = out.metrics["mask/u_zero"]
  assert 0.0 <= float(num) <= float(den)


def test_auroc_matches_pairwise_count():
  rng = np.random.default_rng(0)
  s = np.round(rng.uniform(size=200), 1)           # many ties
  y = rng.uniform(size=200) > 0.6
  pos, neg = s[y], s[~y]
  want = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
  assert sparsepo.auroc(s, y) == pytest.approx(want, abs=1e-12)
  assert sparsepo.auroc(y.astype(float), y) == 1.0 and np.isnan(sparsepo.auroc(s, np.zeros(200)))


# ----------------------------------------------------------------------------------------------
# The experiment end to end (smoke)
# ----------------------------------------------------------------------------------------------

SPARSEPO = sparsepo


@pytest.mark.pipeline
def test_sparsepo_smoke_pipeline(tmp_path, capsys):
  """The smoke run trains: the loss leaves log 2, the policy moves by gradient (its group has no weight decay),
  the mask is not all zero; a dead mask stops the experiment's evaluation naming the step."""
  from jaxopd import logs
  from jaxopd.experiment import DataShard
  c = load_config("sparsepo.py:smoke,independent")
  c.progress = False
  assert c.optim.groups.mask.weight_decay == 0.01 and c.method.mask_init == "positive"
  # AdamW's decoupled decay is the only thing that moves a parameter without a gradient: the policy has none.
  assert c.optim.weight_decay == 0.0 and "policy" not in c.optim.groups
  with shared_smoke_stages(c):
    c = SPARSEPO.prepare(c, str(tmp_path / "sp"))
  exp = SPARSEPO.build(c)
  summary = train.run(c, str(tmp_path / "sp"), exp)
  SPARSEPO.report(c, str(tmp_path / "sp"), summary)
  out = capsys.readouterr().out
  ev = summary.eval
  for k in ("rewards/accuracies", "kl/chosen", "kl/margin", "sample/reward", "sample/kl_ref", "mask/u_zero",
            "mask/u_gold", "mask/u_other", "mask/d_zero", "mask/auroc_u", "mask/auroc_d"):
    assert k in ev, k
  assert 0.0 <= ev["mask/auroc_u"] <= 1.0 and 0.0 <= ev["mask/u_zero"] <= 1.0
  assert "mask w_u: zero fraction" in out and "mask w_d" in out and "warning" not in out
  ex = json.load(open(tmp_path / "sp" / "mask_examples.json"))
  assert ex["label"] == "sparsepo-indep" and len(ex["examples"]) == c.heatmap_examples
  e0 = ex["examples"][0]
  assert len(e0["words"]) == len(e0["w_u"]) == len(e0["gold"]) > 0
  assert os.path.getsize(tmp_path / "sp" / "heatmap.png") > 1000

  # (a) the loss leaves log 2 (it starts there: pi = ref); (c) the masks are not all zero, at any step.
  recs = logs.read_metrics(str(tmp_path / "sp"), "train")
  losses = [r["loss"] for r in recs]
  assert losses[0] == pytest.approx(np.log(2), abs=1e-5)
  assert losses[-1] < np.log(2) - 5e-3, losses
  assert max(r[k] for r in recs for k in ("mask/u_zero", "mask/d_zero")) < 1.0
  assert ev["mask/u_zero"] < 1.0 and ev["mask/d_zero"] < 1.0
  # (b) the policy moved from its start (the reference's SFT weights) by gradient: no weight decay acts on it,
  # and at pi = ref with the initial mask the loss gives it a gradient (the KL term's is 0 there: only the
  # reward term, through w_u, contributes), which the official init's dead mask would not.
  tr = summary.trainer
  models = tr.models(summary.state, summary.frozen)
  pol, ref = (nnx.to_pure_dict(nnx.state(models[n], nnx.Param)) for n in ("policy", "reference"))
  assert max(float(jnp.abs(jnp.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(pol),
                                                                      jax.tree.leaves(ref))) > 1e-4
  batch = {k: jnp.asarray(v) for k, v in next(iter(exp.train_data(DataShard(0, 0, 1, c.batch_size)))).items()}
  init_mask = tr.make_models(tr.model_key)[0]["mask"]
  gd, ref_state = nnx.split(models["reference"])
  g = jax.jit(jax.grad(lambda st: exp.loss_fn({"policy": nnx.merge(gd, st), "reference": models["reference"],
                                               "mask": init_mask}, batch, None).loss))(ref_state)
  assert float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))) > 1e-2
  # A dead mask (every mixer weight negative) stops the experiment's evaluation, before any sampling.
  dead = nnx.clone(models["mask"])
  dead.u.a[...] = -jnp.abs(dead.u.a[...]) - 0.1
  with pytest.raises(errors.TrainingError, match="w_u is zero on every response token .* at step 123"):
    exp.evaluate({**models, "mask": dead}, 123)

  # MaPO reuses the cached stages; no mask model, no mask group (its step: the unit tests above).
  m = load_config("sparsepo.py:smoke,mapo")
  m.data.data_dir, m.sft.workdir, m.progress = c.data.data_dir, c.sft.workdir, False
  assert "mask" not in m.optim.groups
  sft = table.parse_init("reference", c.models.reference.init).path
  done = stages.record(sft)
  m = SPARSEPO.prepare(m, str(tmp_path / "mapo"))
  assert m.models.reference.init == c.models.reference.init and stages.record(sft) == done   # reused
  exp = SPARSEPO.build(m)
  assert exp.roles == {"policy": True, "reference": False} and exp.init_heads is None


def test_bad_sparsepo_fields_are_config_errors(tmp_path):
  from jaxopd.errors import ConfigError
  cases = [("smoke", "mask", "bernoulli", "config.method.mask='bernoulli'"),
           ("smoke", "beta", 0.0, "config.method.beta=0.0"),
           ("smoke", "lambda_u", -1.0, "config.method.lambda_u=-1.0"),
           ("smoke,mapo", "shared", False, "MaPO has one mask"),
           ("smoke,mapo", "lambda_d", 0.1, "detached"),
           ("smoke", "mask_init", "zeros", "config.method.mask_init='zeros'"),
           ("smoke,mapo", "mask_init", "uniform", "only the learned mask is initialised")]
  for preset, field, value, msg in cases:
    c = load_config("sparsepo.py:" + preset)
    c.data.data_dir = str(tmp_path / "data")
    c.method[field] = value
    with pytest.raises(ConfigError, match=msg):
      SPARSEPO.prepare(c, str(tmp_path / "w"))
