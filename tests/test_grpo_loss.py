"""GRPO with ProRL's controls and on-policy distillation: the pieces of jaxopd/losses/grpo.py against independent
NumPy float64 implementations (group advantages, KL estimators, the clipped policy loss under every aggregation with
its metrics and gradient, the distillation divergences and their gradients, the distillation weight schedule), the
the methods' identities (equal rewards give zero gradient; rho = 1 is REINFORCE with the group baseline; a hand-made
clip-fraction case) and pass@k against brute-force enumeration."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.losses import grpo as G

RTOL, ATOL = 1e-5, 1e-6
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _f64(x):
  return np.asarray(x, np.float64)


# ------------------------------------------------------------------ NumPy float64 references

def np_group_advantages(r, kind, eps=1e-6):
  r = _f64(r)
  c = r - r.mean(1, keepdims=True)
  c[(r == r[:, :1]).all(1)] = 0.0  # mathematically exact: equal rewards are centred to 0
  return c if kind == "dr_grpo" else c / (r.std(1, ddof=1, keepdims=True) + eps)


def np_kl(lp, lp_ref, kind):
  """(k, dk/dlp) with u = lp_ref - lp."""
  u = _f64(lp_ref) - _f64(lp)
  return {"k1": (-u, np.ones_like(u)), "k2": (u**2 / 2, -u), "k3": (np.expm1(u) - u, -np.expm1(u))}[kind]


def np_policy(lp, lp_old, adv, mask, eps_low, eps_high, beta, lp_ref, kl, agg, max_len, rw):
  """float64: (loss_sum, count, metric values, d(loss_sum/count)/d lp)."""
  lp, lp_old, a, rw = _f64(lp), _f64(lp_old), _f64(adv)[:, None], _f64(rw)
  rho = np.exp(lp - lp_old)
  pg = -np.minimum(rho * a, np.clip(rho, 1 - eps_low, 1 + eps_high) * a)
  low, high = (a < 0) & (rho < 1 - eps_low), (a > 0) & (rho > 1 + eps_high)
  dpg = np.where(low | high, 0.0, -rho * a)  # the clipped branch is strictly smaller only outside the clip range
  l, dl = pg, dpg
  if lp_ref is not None:
    k, dk = np_kl(lp, lp_ref, kl)
    if beta > 0:
      l, dl = pg + beta * k, dpg + beta * dk
  m = _f64(mask) * rw[:, None]
  n = m.sum(1)
  if agg == "token_mean":
    count, w = m.sum(), m
  elif agg == "seq_mean_token_mean":
    count, w = float((n > 0).sum()), m / np.maximum(n, 1)[:, None]
  else:
    count, w = float((rw > 0).sum() * (max_len or lp.shape[1])), m
  loss_sum = (w * l).sum()
  mets = {"clip_ratio/low": (m * low).sum() / m.sum(), "clip_ratio/high": (m * high).sum() / m.sum(),
          "clip_ratio/region": (m * (low | high)).sum() / m.sum(), "ratio/mean": (m * rho).sum() / m.sum(),
          "pg_loss": (m * pg).sum() / m.sum()}  # the clipped surrogate alone, without the KL term
  if lp_ref is not None:
    mets["kl"] = (m * k).sum() / m.sum()
  return loss_sum, count, mets, w * dl / count


def np_log_softmax(z):
  z = _f64(z)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_distill(s, t, kind, temp):
  """float64: (per-token loss, d loss / d student logits)."""
  lq, lp = np_log_softmax(_f64(s) / temp), np_log_softmax(_f64(t) / temp)
  q, p = np.exp(lq), np.exp(lp)
  if kind == "reverse_kl":
    f = lq - lp
    return (q * f).sum(-1), q * (f - (q * f).sum(-1, keepdims=True)) / temp
  if kind == "forward_kl":
    return (p * (lp - lq)).sum(-1), (q - p) / temp
  onehot = np.eye(s.shape[-1])[np.argmax(_f64(t), -1)]
  return -(onehot * lq).sum(-1), (q - onehot) / temp


# ------------------------------------------------------------------ fixtures

def _batch(seed=0, b=8, t=12):
  """Random log-probs whose ratios lie on both sides of the clip range (none within 1e-3 of an edge), masks of
  unequal lengths, one row with an empty mask, one dropped row (row_weight 0), one zero advantage."""
  rng = np.random.default_rng(seed)
  lp_old = -rng.uniform(0.05, 3.0, (b, t))
  d = rng.normal(0, 0.4, (b, t))
  for edge in (np.log(1 - EPS_LOW), np.log(1 + EPS_HIGH)):
    d = np.where(np.abs(d - edge) < 1e-3, d + 1e-2, d)
  lp, lp_ref = lp_old + d, lp_old + rng.normal(0, 0.5, (b, t))
  mask = np.zeros((b, t))
  for i in range(b):
    s = rng.integers(0, 3)
    mask[i, s:rng.integers(s + 1, t + 1)] = 1
  mask[3] = 0
  adv = rng.uniform(0.3, 2.0, b) * np.array([1, -1, 1, -1, 0, -1, 1, -1])[:b]
  rw = np.ones(b)
  rw[2] = 0.0
  f32 = lambda x: np.asarray(x, np.float32)
  return f32(lp), f32(lp_old), f32(lp_ref), f32(mask), f32(adv), f32(rw)


# ------------------------------------------------------------------ advantages, KL estimators

@pytest.mark.parametrize("kind", ["grpo", "dr_grpo"])
def test_group_advantages_match_numpy(kind):
  assert G.ADVANTAGES == ("grpo", "dr_grpo")
  rng = np.random.default_rng(1)
  r = rng.normal(0, 1, (5, 8)).astype(np.float32)
  r[1] = 1.0  # equal rewards (exact in float32)
  r[2] = 0.0
  r[3] = 0.7  # equal rewards whose float32 mean over 8 is not exactly 0.7
  r[4, :4], r[4, 4:] = 0.0, 1.0  # binary rewards
  got = np.asarray(G.group_advantages(jnp.asarray(r), kind=kind))
  np.testing.assert_allclose(got, np_group_advantages(r, kind), rtol=RTOL, atol=ATOL)
  assert np.all(got[1:3] == 0)
  np.testing.assert_array_equal(np.asarray(G.kept_groups(jnp.asarray(r))), [True, False, False, False, True])


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy_and_agree_near_zero(kind):
  assert G.KL_ESTIMATORS == ("k1", "k2", "k3")
  rng = np.random.default_rng(2)
  lp, lp_ref = [(-rng.uniform(0.0, 4.0, (4, 7))).astype(np.float32) for _ in range(2)]
  got = np.asarray(G.kl_estimate(jnp.asarray(lp), jnp.asarray(lp_ref), kind))
  assert got.shape == lp.shape
  np.testing.assert_allclose(got, np_kl(lp, lp_ref, kind)[0], rtol=RTOL, atol=ATOL)
  if kind == "k3":
    assert np.all(got >= 0)
  # second-order agreement near u = 0: |k3 - k2| <= |u|^3 / 6 * e^|u| (Taylor), and k1 + u = 0 exactly
  for u in (1e-1, -1e-1, 3e-2, -3e-2):
    lp0, ref = jnp.float32(-1.0), jnp.float32(-1.0 + u)
    uu = float(ref) - float(lp0)
    k2, k3 = [float(G.kl_estimate(lp0, ref, k)) for k in ("k2", "k3")]
    assert abs(k3 - k2) <= abs(uu)**3 / 6 * math.exp(abs(uu)) + 5e-7
    np.testing.assert_allclose(float(G.kl_estimate(lp0, ref, "k1")), -uu, rtol=1e-6)


# ------------------------------------------------------------------ policy loss: value, metrics, gradient

CASES = [(0.0, "k3", False), (0.0, "k3", True), (0.1, "k1", True), (0.1, "k2", True), (0.1, "k3", True)]


def _call(lp, lp_old, lp_ref, mask, adv, rw, beta, kl, agg, max_len, with_ref):
  return G.policy_loss(lp, jnp.asarray(lp_old), jnp.asarray(adv), jnp.asarray(mask), eps_low=EPS_LOW,
                       eps_high=EPS_HIGH, beta_kl=beta, lp_ref=jnp.asarray(lp_ref) if with_ref else None, kl=kl,
                       aggregation=agg, max_len=max_len, row_weight=jnp.asarray(rw))


@pytest.mark.parametrize("agg,max_len", [("token_mean", None), ("seq_mean_token_mean", None), ("dr_grpo", None),
                                         ("dr_grpo", 14)])
@pytest.mark.parametrize("beta,kl,with_ref", CASES)
def test_policy_loss_value_metrics_and_gradient(agg, max_len, beta, kl, with_ref):
  assert G.AGGREGATIONS == ("token_mean", "seq_mean_token_mean", "dr_grpo")
  lp, lp_old, lp_ref, mask, adv, rw = _batch()
  want_sum, want_count, want_m, want_g = np_policy(lp, lp_old, adv, mask, EPS_LOW, EPS_HIGH, beta,
                                                   lp_ref if with_ref else None, kl, agg, max_len, rw)
  assert want_m["clip_ratio/low"] > 0 and want_m["clip_ratio/high"] > 0  # the fixture exercises both clipped sides
  loss_sum, count, mets = _call(jnp.asarray(lp), lp_old, lp_ref, mask, adv, rw, beta, kl, agg, max_len, with_ref)
  np.testing.assert_allclose(float(count), want_count, rtol=1e-6)
  np.testing.assert_allclose(float(loss_sum) / float(count), want_sum / want_count, rtol=RTOL, atol=ATOL)
  assert set(mets) == set(want_m)
  for name, val in want_m.items():
    s, c = mets[name]
    np.testing.assert_allclose(float(s) / float(c), val, rtol=RTOL, atol=ATOL, err_msg=name)

  def f(x):
    s, c, _ = _call(x, lp_old, lp_ref, mask, adv, rw, beta, kl, agg, max_len, with_ref)
    return s / c

  g = np.asarray(jax.grad(f)(jnp.asarray(lp)))
  np.testing.assert_allclose(g, want_g, rtol=RTOL, atol=ATOL)
  off = (mask * rw[:, None]) == 0
  assert off[2].all() and off[3].all() and np.all(g[off] == 0)  # masked and dropped tokens get exactly 0


def test_equal_rewards_give_zero_gradient():
  """Identity: G responses of equal reward, beta_kl = 0 -> the loss gradient is exactly 0."""
  lp, lp_old, lp_ref, mask, _, _ = _batch(seed=5)
  rw = np.ones(lp.shape[0], np.float32)
  for kind in G.ADVANTAGES:
    adv = G.group_advantages(jnp.ones((1, lp.shape[0]), jnp.float32), kind=kind)[0]
    assert np.all(np.asarray(adv) == 0)
    for agg in G.AGGREGATIONS:
      f = lambda x: (lambda s, c, _: s / c)(*_call(x, lp_old, lp_ref, mask, adv, rw, 0.0, "k3", agg, None, True))
      assert np.all(np.asarray(jax.grad(f)(jnp.asarray(lp))) == 0), (kind, agg)


def test_rho_one_is_reinforce_with_group_baseline():
  """Identity: lp_old = sg(lp) -> rho = 1, no clipping; the token_mean gradient is -A_b m / sum(m) per token."""
  lp, _, lp_ref, mask, _, _ = _batch(seed=6)
  rw = np.ones(lp.shape[0], np.float32)
  rewards = np.random.default_rng(6).integers(0, 2, (1, lp.shape[0])).astype(np.float32)
  rewards[0, :2] = [0, 1]
  adv = G.group_advantages(jnp.asarray(rewards))[0]

  def f(x):
    s, c, mets = G.policy_loss(x, jax.lax.stop_gradient(x), adv, jnp.asarray(mask), eps_low=EPS_LOW,
                               eps_high=EPS_HIGH, aggregation="token_mean", row_weight=jnp.asarray(rw))
    return s / c, mets

  g, mets = jax.grad(f, has_aux=True)(jnp.asarray(lp))
  want = -np_group_advantages(rewards, "grpo")[0][:, None] * mask / mask.sum()
  np.testing.assert_allclose(np.asarray(g), want, rtol=RTOL, atol=ATOL)
  assert float(mets["clip_ratio/region"][0]) == 0
  np.testing.assert_allclose(float(mets["ratio/mean"][0]) / float(mets["ratio/mean"][1]), 1.0, rtol=1e-6)


def test_hand_made_clip_fractions():
  """(rho, A) = (1.5, +1), (1.1, +1), (0.5, -1), (0.9, -1), eps 0.2 / 0.28: high 1/4, low 1/4, region 2/4;
  the loss is (-1.28 - 1.1 + 0.8 + 0.9) / 4 = -0.17."""
  lp = jnp.log(jnp.asarray([[1.5, 1.1], [0.5, 0.9]], jnp.float32))
  s, c, mets = G.policy_loss(lp, jnp.zeros((2, 2)), jnp.asarray([1.0, -1.0]), jnp.ones((2, 2)), eps_low=0.2,
                             eps_high=0.28)
  np.testing.assert_allclose(float(s) / float(c), -0.17, rtol=RTOL)
  for name, want in (("clip_ratio/high", 0.25), ("clip_ratio/low", 0.25), ("clip_ratio/region", 0.5),
                     ("ratio/mean", 1.0)):
    np.testing.assert_allclose(float(mets[name][0]) / float(mets[name][1]), want, rtol=1e-6, err_msg=name)
  assert "kl" not in mets


# ------------------------------------------------------------------ distillation

@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "hard_ce"])
def test_distill_per_token_value_and_gradients(kind, temp):
  assert G.DISTILL == ("reverse_kl", "forward_kl", "hard_ce")
  rng = np.random.default_rng(7)
  s, t = [(2 * rng.normal(size=(3, 5, 11))).astype(np.float32) for _ in range(2)]
  want, want_g = np_distill(s, t, kind, temp)
  got = np.asarray(G.distill_per_token(jnp.asarray(s), jnp.asarray(t), kind, temperature=temp))
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  gs, gt = jax.grad(lambda a, b: G.distill_per_token(a, b, kind, temperature=temp).sum(), argnums=(0, 1))(
      jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(gs), want_g, rtol=RTOL, atol=ATOL)  # hard_ce: SFT on argmax(teacher)
  assert np.all(np.asarray(gt) == 0)  # no gradient into the teacher
  if kind != "hard_ce":  # teacher == student: 0 loss and 0 gradient
    f = lambda a: G.distill_per_token(a, jnp.asarray(s), kind, temperature=temp).sum()
    same = G.distill_per_token(jnp.asarray(s), jnp.asarray(s), kind, temperature=temp)
    np.testing.assert_allclose(np.asarray(same), 0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray(s))), 0, atol=ATOL)


def test_distill_weight_schedules():
  S, lam = 100, 0.3
  for step in (0, S // 2, S):
    np.testing.assert_allclose(float(G.distill_weight(step, S, lam, "constant")), lam, rtol=1e-6)
  for step, want in ((0, lam), (S // 2, lam / 2), (S, 0.0), (S // 4, lam * (0.5 * math.cos(math.pi / 4) + 0.5))):
    np.testing.assert_allclose(float(G.distill_weight(step, S, lam, "cosine")), want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ pass@k

def test_pass_at_k_matches_enumeration():
  from jaxopd.evaluation import pass_at_k
  for n in range(1, 8):
    for c in range(n + 1):
      for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 are the correct ones
        brute = sum(min(sub) < c for sub in subsets) / len(subsets)
        assert abs(pass_at_k(n, c, k) - brute) < 1e-12, (n, c, k)
  for n, c, k in ((200, 13, 1), (200, 13, 10), (200, 0, 5), (200, 195, 10), (50, 7, 20)):
    prod = 1.0 - np.prod([1 - k / i for i in range(n - c + 1, n + 1)])  # Chen et al. 2021, numerically stable form
    np.testing.assert_allclose(pass_at_k(n, c, k), prod if n - c >= k else 1.0, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(pass_at_k(200, 13, 1), 13 / 200, rtol=1e-12)


def np_gspo(lp, lp_old, adv, mask, eps_low, eps_high, agg, max_len, rw):
  """float64 GSPO (TRL's ``importance_sampling_level="sequence"``): per response the ratio
  ``s = exp(sum_t m (lp - lp_old) / max(sum_t m, 1))``; every token's loss is
  ``-min(s A, clip(s) A)``. Returns (loss_sum, count, d(loss_sum/count)/d lp)."""
  lp, lp_old, a, raw, rw = _f64(lp), _f64(lp_old), _f64(adv), _f64(mask), _f64(rw)
  n = np.maximum(raw.sum(1), 1.0)
  s = np.exp(((lp - lp_old) * raw).sum(1) / n)
  pg = -np.minimum(s * a, np.clip(s, 1 - eps_low, 1 + eps_high) * a)
  clipped = ((a < 0) & (s < 1 - eps_low)) | ((a > 0) & (s > 1 + eps_high))
  dpg_ds = np.where(clipped, 0.0, -a)
  m = raw * rw[:, None]
  if agg == "token_mean":
    count, w = m.sum(), m
  elif agg == "seq_mean_token_mean":
    k = m.sum(1)
    count, w = float((k > 0).sum()), m / np.maximum(k, 1)[:, None]
  else:
    count, w = float((rw > 0).sum() * (max_len or lp.shape[1])), m
  loss_sum = (w * pg[:, None]).sum()
  grad = (w.sum(1) * dpg_ds * s / n)[:, None] * raw       # d s / d lp_t = s m_t / n
  return loss_sum, count, grad / count


@pytest.mark.parametrize("agg", G.AGGREGATIONS)
def test_gspo_sequence_ratio_value_and_gradient(agg):
  """The sequence-level ratio against NumPy float64, rows on both sides of the clip range; at
  lp = lp_old it is the token-level loss (both ratios 1)."""
  lp, lp_old, _, mask, adv, rw = _batch(seed=3)
  shift = np.array([0.5, -0.5, 0.05, 0.0, -0.4, 0.1, 0.45, -0.03], np.float32)   # per response
  lp = (lp_old + shift[:, None] + 0.05 * np.random.default_rng(1).normal(size=lp.shape)).astype(np.float32)
  want_sum, want_count, want_g = np_gspo(lp, lp_old, adv, mask, EPS_LOW, EPS_HIGH, agg, None, rw)
  f = lambda x: G.policy_loss(x, lp_old, adv, mask, EPS_LOW, EPS_HIGH, aggregation=agg, row_weight=rw,
                              ratio_level="sequence")
  s, c, mets = f(jnp.asarray(lp))
  np.testing.assert_allclose(float(c), want_count, rtol=1e-6)
  np.testing.assert_allclose(float(s) / float(c), want_sum / want_count, rtol=RTOL, atol=ATOL)
  assert float(mets["clip_ratio/low"][0]) > 0 and float(mets["clip_ratio/high"][0]) > 0
  g = np.asarray(jax.grad(lambda x: (lambda s, c, _: s / c)(*f(x)))(jnp.asarray(lp)))
  np.testing.assert_allclose(g, want_g, rtol=RTOL, atol=ATOL)
  same = [G.policy_loss(jnp.asarray(lp_old), lp_old, adv, mask, EPS_LOW, EPS_HIGH, aggregation=agg, row_weight=rw,
                        ratio_level=level)[0] for level in G.RATIO_LEVELS]
  assert float(same[0]) == float(same[1])
  with pytest.raises(ValueError, match="config.method.ratio_level='seq'"):
    G.policy_loss(jnp.asarray(lp), lp_old, adv, mask, EPS_LOW, EPS_HIGH, ratio_level="seq")


def np_rollout_correction(lp_old, lp_rollout, mask, kind, cap):
  """float64: (token weight, row keep, metric values) of TIS / MIS and the mismatch metrics."""
  d = _f64(lp_old) - _f64(lp_rollout)
  m = _f64(mask)
  n_tok, rows = m.sum(), m.shape[0]
  mets = {"rollout/logp_diff": (np.abs(d) * m).sum() / n_tok,
          "rollout/logp_diff_seqmax": (np.abs(d) * m).max(1).sum() / rows,
          "rollout/kl": (-d * m).sum() / rows}
  w, keep = np.ones_like(d), np.ones(rows)
  if kind == "tis":
    w = np.minimum(np.exp(d), cap)
    mets["rollout/tis_truncated"] = ((np.exp(d) > cap) * m).sum() / n_tok
  elif kind == "mis":
    geo = (d * m).sum(1) / np.maximum(m.sum(1), 1)
    keep = (np.abs(geo) <= np.log(cap)).astype(np.float64)
    mets["rollout/mis_masked"] = (1 - keep).sum() / rows
  return w, keep, mets


@pytest.mark.parametrize("kind", G.CORRECTIONS)
def test_rollout_correction_and_corrected_loss_match_numpy(kind):
  """A sampler off the trainer by up to ~1 nat per token (some responses far off): the mismatch
  metrics, TIS's truncated token weights and MIS's masked responses against NumPy float64, and
  the corrected surrogate's value and gradient (weights and masks from the reference, the loss
  from the float64 policy reference with the token weights applied)."""
  lp, lp_old, _, mask, adv, rw = _batch(seed=5)
  rng = np.random.default_rng(7)
  off = np.array([0.0, 0.9, -0.05, 0.0, 1.2, -0.8, 0.02, 0.3], np.float32)[:, None]
  lp_rollout = (lp_old - off - 0.1 * rng.normal(size=lp.shape)).astype(np.float32)
  cap = 2.0
  tw, keep, mets = G.rollout_correction(jnp.asarray(lp_old), jnp.asarray(lp_rollout), jnp.asarray(mask), kind, cap)
  want_w, want_keep, want_mets = np_rollout_correction(lp_old, lp_rollout, mask, kind, cap)
  np.testing.assert_allclose(np.asarray(tw), want_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(keep), want_keep)
  assert set(mets) == set(want_mets)
  for k, v in want_mets.items():
    np.testing.assert_allclose(float(mets[k][0]) / float(mets[k][1]), v, rtol=RTOL, atol=ATOL, err_msg=k)
  if kind == "tis":
    assert 0 < want_mets["rollout/tis_truncated"] < 1
  if kind == "mis":
    assert 0 < want_keep.sum() < len(want_keep)
  rows = rw * want_keep
  f = lambda x: G.policy_loss(x, lp_old, adv, mask, EPS_LOW, EPS_HIGH, row_weight=rows.astype(np.float32),
                              token_weight=tw)
  s, c, _ = f(jnp.asarray(lp))
  # The float64 reference with the token weights folded in: loss and gradient are linear in them.
  lp64, old64, a = _f64(lp), _f64(lp_old), _f64(adv)[:, None]
  rho = np.exp(lp64 - old64)
  pg = -np.minimum(rho * a, np.clip(rho, 1 - EPS_LOW, 1 + EPS_HIGH) * a) * want_w
  clipped = ((a < 0) & (rho < 1 - EPS_LOW)) | ((a > 0) & (rho > 1 + EPS_HIGH))
  m = _f64(mask) * rows[:, None]
  np.testing.assert_allclose(float(c), m.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(s) / float(c), (m * pg).sum() / m.sum(), rtol=RTOL, atol=ATOL)
  g = np.asarray(jax.grad(lambda x: (lambda s, c, _: s / c)(*f(x)))(jnp.asarray(lp)))
  np.testing.assert_allclose(g, m * np.where(clipped, 0.0, -rho * a) * want_w / m.sum(), rtol=RTOL, atol=ATOL)


def test_no_mismatch_when_the_sampler_is_the_trainer():
  """Equal log-probs: every mismatch metric 0, TIS weights 1, MIS keeps every response."""
  lp, lp_old, _, mask, adv, rw = _batch(seed=6)
  for kind in G.CORRECTIONS:
    tw, keep, mets = G.rollout_correction(jnp.asarray(lp_old), jnp.asarray(lp_old), jnp.asarray(mask), kind, 2.0)
    assert np.all(np.asarray(tw) == 1) and np.all(np.asarray(keep) == 1)
    assert all(float(v[0]) == 0 for v in mets.values())


def test_gspo_equals_trl_sequence_level_loss():
  """GSPO against TRL 1.16's own ``GRPOTrainer._compute_loss`` (``importance_sampling_level=
  "sequence"``, ``loss_type="grpo"``: a mean per response, then over responses; no KL) on the
  same log-probs: the loss and its gradient with respect to the policy's log-probs."""
  torch = pytest.importorskip("torch")
  trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
  import collections
  import types
  rng = np.random.default_rng(7)
  r, n = 6, 9
  lp_old = rng.normal(-2.0, 0.5, (r, n)).astype(np.float32)
  shift = np.array([0.5, -0.5, 0.05, 0.0, -0.4, 0.3], np.float32)      # both sides of the clip range
  lp = (lp_old + shift[:, None] + 0.05 * rng.normal(size=(r, n))).astype(np.float32)
  mask = (np.arange(n)[None, :] < np.array([9, 4, 7, 1, 9, 5])[:, None]).astype(np.float32)
  adv = np.array([1.0, -1.2, 0.7, -0.3, 0.9, -0.8], np.float32)
  lp_t = torch.tensor(lp, requires_grad=True)
  acc = types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x, sync_gradients=True)
  fake = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *a, **k: (lp_t, torch.zeros(r, n), None),
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="sequence", beta=0.0,
      args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False), loss_type="grpo",
      epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, use_vllm=False, vllm_importance_sampling_correction=False,
      model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
      _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=acc,
      _metrics={"train": collections.defaultdict(list)})
  inputs = {"prompt_ids": torch.zeros(r, 2, dtype=torch.long), "prompt_mask": torch.ones(r, 2, dtype=torch.long),
            "completion_ids": torch.zeros(r, n, dtype=torch.long), "completion_mask": torch.tensor(mask),
            "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(lp_old)}
  want = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
  want.backward()
  f = lambda x: (lambda s, c, _: s / c)(*G.policy_loss(x, lp_old, adv, mask, EPS_LOW, EPS_HIGH,
                                                       aggregation="seq_mean_token_mean", ratio_level="sequence"))
  np.testing.assert_allclose(float(f(jnp.asarray(lp))), want.item(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray(lp))), lp_t.grad.numpy(), rtol=1e-5, atol=1e-7)
  assert fake._metrics["train"]["clip_ratio/region_mean"][0] > 0      # the clip binds on some responses
