"""f-DPG pure pieces on an enumerable space: pseudo-rewards, log Z, baseline. (The importance-
sampled divergences against exact values and the f-DPG steps that reduce the exact divergence are
tested once, with a model, through the method's rollout and loss in test_fdpg.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.losses.fdpg import Baseline, LogZ, pseudo_reward, surrogate_loss

N = 12   # outcomes (think: every sequence of a tiny vocabulary)


def _dists(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.dirichlet(np.ones(N))                     # base model
  b = (rng.random(N) < 0.5).astype(np.float64)      # pointwise constraint
  b[0] = 1
  P = a * b
  return a, b, P, P.sum()


def test_pseudo_rewards_match_f_prime_numerically():
  u = jnp.array([-2.0, -0.3, 0.4, 1.7])
  t = np.exp(np.asarray(u, np.float64))
  fs = {"fkl": lambda t: -np.log(t), "rkl": lambda t: t * np.log(t),
        "js": lambda t: t * np.log(2 * t / (1 + t)) + np.log(2 / (1 + t)),
        "tv": lambda t: 0.5 * np.abs(t - 1)}
  for name, f in fs.items():
    h = 1e-6
    fprime = (f(t + h) - f(t - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(pseudo_reward(u, name)), -fprime, rtol=1e-4, atol=1e-6)
  # Constraint violations (log P = -inf -> u = +inf): finite except rkl.
  inf = jnp.array([jnp.inf])
  assert float(pseudo_reward(inf, "fkl")[0]) == 0.0
  assert float(pseudo_reward(inf, "tv")[0]) == -0.5
  assert float(pseudo_reward(inf, "js")[0]) == pytest.approx(-np.log(2))
  assert float(pseudo_reward(inf, "rkl")[0]) == -np.inf
  with pytest.raises(ValueError, match="divergence='chi2'"):
    pseudo_reward(u, "chi2")


def test_log_z_is_the_running_mean_of_p_over_q_per_context():
  a, b, P, Z = _dists()
  q = np.full(N, 1.0 / N)
  rng = np.random.default_rng(1)
  state = LogZ.init(2)
  all_w = {0: [], 1: []}
  for _ in range(5):
    x = rng.integers(0, N, size=64)
    ctx = rng.integers(0, 2, size=64)
    log_score = np.where(P[x] > 0, np.log(np.where(P[x] > 0, P[x], 1)), -np.inf)
    state = state.update(jnp.asarray(log_score, jnp.float32), jnp.log(jnp.asarray(q[x], jnp.float32)), jnp.asarray(ctx))
    for c in (0, 1):
      all_w[c] += list(P[x[ctx == c]] / q[x[ctx == c]])
  for c in (0, 1):
    np.testing.assert_allclose(float(np.exp(state.value[c])), np.mean(all_w[c]), rtol=1e-5)
  # Importance sampling: the mean converges to Z.
  assert abs(float(np.exp(np.mean([state.value[0], state.value[1]]))) - Z) < 0.35 * Z


def test_baseline_is_a_windowed_mean_taken_before_the_update():
  b = Baseline.init(window=4)
  assert float(b.value) == 0.0
  b = b.update(jnp.array([1.0, 2.0]))
  assert float(b.value) == 1.5
  b = b.update(jnp.array([3.0, 4.0, 5.0]))
  assert float(b.value) == pytest.approx((2 + 3 + 4 + 5) / 4)


def _disco_reference(rewards, valid, groups, window, prior=()):
  """disco's procedure in NumPy float64 (WindowedMovingAverage + FDivergenceLoss called once per
  context, in order, skipping contexts whose Z is not > 0): per-row baseline used by the advantage,
  the window after the batch, and d loss / d log pi(x) per row (loss = mean over the valid contexts of
  the mean over each context's samples of -(R - b) log pi)."""
  buf, base, grad = list(prior), [], np.zeros(len(rewards))
  k = len(rewards) // groups
  n_valid = sum(bool(valid[g * k]) for g in range(groups))
  for g in range(groups):
    rows = slice(g * k, (g + 1) * k)
    b = sum(buf) / len(buf) if buf else 0.0
    base += [b] * k
    if valid[g * k]:
      grad[rows] = -(rewards[rows] - b) / k / n_valid
      buf = (buf + list(rewards[rows]))[-window:]
  return np.array(base), buf, grad


def test_several_contexts_per_batch_follow_disco():
  """Three contexts of 4 samples, the second without a valid log Z: its rows add nothing to the
  baseline window (disco skips that context) and nothing to the loss; the third context's
  advantage uses a baseline that already holds the first context's rewards (disco updates it per
  context); the loss is the mean over the two valid contexts of each one's sample mean (disco's),
  not a sum over all 12 rows divided by 12 - each checked against disco's procedure in NumPy."""
  from jaxopd.losses.fdpg import context_weights, group_baselines
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=12).astype(np.float32)
  valid = np.repeat([True, False, True], 4)
  prior = [0.5, -0.25]
  base0 = Baseline.init(6).update(jnp.asarray(prior, jnp.float32))
  b, base1 = group_baselines(base0, jnp.asarray(rewards), jnp.asarray(valid), 4)
  ref_b, ref_buf, _ = _disco_reference(rewards.astype(np.float64), valid, 3, 6, prior)
  np.testing.assert_allclose(np.asarray(b), ref_b, rtol=1e-6)
  assert np.asarray(b)[8] != np.asarray(b)[0]          # the third context saw the first one's rewards
  np.testing.assert_allclose(float(base1.value), np.mean(ref_buf), rtol=1e-6)
  assert int(base1.filled) == len(prior) + 8           # the invalid context added nothing
  # The loss and its gradient with respect to log pi (on-policy: w = 1).
  log_z = jnp.where(jnp.asarray(valid), 0.0, -jnp.inf)
  logp = jnp.asarray(rng.normal(size=12), jnp.float32)
  log_score = logp - jnp.asarray(np.log(np.where(valid, 2.0, 1.0)), jnp.float32)   # any finite score
  weight = context_weights(jnp.asarray(valid), 4)

  def mean_loss(lp):
    s, n, r = surrogate_loss(lp, jax.lax.stop_gradient(lp), log_score, log_z, b, "fkl", weight)
    return s / n, r
  (_, r), g = jax.value_and_grad(mean_loss, has_aux=True)(logp)
  # disco's per-context loss with the baselines above: -(R - b) / (samples of the context) / (valid contexts)
  ref_grad = np.where(valid, -(np.asarray(r, np.float64) - ref_b) / 4 / 2, 0.0)
  np.testing.assert_allclose(np.asarray(g), ref_grad, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g)[4:8] == 0)
  # No valid context at all: a zero loss and gradient, not 0 / 0.
  none = jnp.zeros(12, bool)
  s, n, _ = surrogate_loss(logp, logp, log_score, jnp.full(12, -jnp.inf), b, "fkl", context_weights(none, 4))
  assert float(s) == 0.0 and float(s / n) == 0.0
