"""f-DPG pure pieces on an enumerable space: pseudo-rewards, log Z, baseline. (The importance-
sampled divergences against exact values and the f-DPG steps that reduce the exact divergence are
tested once, with a model, through the method's rollout and loss in test_fdpg.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.losses.fdpg import Baseline, LogZ, pseudo_reward

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
