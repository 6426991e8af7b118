"""f-DPG pure pieces on an enumerable space: pseudo-rewards, log Z, baseline,
importance-sampled divergences against exact values, and f-DPG steps on a
tabular policy that reduce the exact divergence to the target."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopd.losses.fdpg import (Baseline, LogZ, divergence_estimates, pointwise_log_score, pseudo_reward,
                                surrogate_loss)

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


def test_importance_sampled_divergences_match_exact_values():
  a, b, P, Z = _dists(2)
  p = P / Z
  rng = np.random.default_rng(3)
  pi = rng.dirichlet(np.ones(N) * 2)
  q = 0.5 * pi + 0.5 / N
  x = rng.choice(N, size=200_000, p=q)
  log_score = jnp.asarray(np.where(P[x] > 0, np.log(np.where(P[x] > 0, P[x], 1)), -np.inf), jnp.float32)
  est = divergence_estimates(jnp.log(jnp.asarray(pi[x], jnp.float32)), jnp.log(jnp.asarray(q[x], jnp.float32)),
                             log_score, jnp.float32(np.log(Z)))
  nz = p > 0
  exact = {
      "kl_target_policy": np.sum(p[nz] * np.log(p[nz] / pi[nz])),
      "tv": 0.5 * np.abs(p - pi).sum(),
      "js": 0.5 * np.sum(p[nz] * np.log(2 * p[nz] / (p[nz] + pi[nz])))
            + 0.5 * np.sum(pi * np.log(2 * pi / (p + pi))),
  }
  for k, v in exact.items():
    assert float(est[k]) == pytest.approx(v, rel=0.03, abs=0.01), k
  assert float(est["kl_policy_target"]) == np.inf     # pi puts mass where p = 0


@pytest.mark.parametrize("f", ["fkl", "rkl", "tv", "js"])
def test_fdpg_steps_reduce_the_exact_divergence(f):
  a, b, P, Z = _dists(4)
  eps = 1e-3 if f == "rkl" else 0.0
  log_P_all = np.asarray(pointwise_log_score(jnp.log(jnp.asarray(a, jnp.float32)), jnp.asarray(b), eps))
  p = np.exp(log_P_all - np.log(np.exp(log_P_all).sum()))
  theta = jnp.log(jnp.asarray(a, jnp.float32))             # policy starts at the base model
  opt = optax.adam(0.05)
  opt_state = opt.init(theta)
  logz, base = LogZ.init(), Baseline.init(256)

  def exact(th):
    pi = np.exp(np.asarray(jax.nn.log_softmax(th), np.float64))
    nz = p > 0
    if f == "fkl":
      return np.sum(p[nz] * np.log(p[nz] / pi[nz]))
    if f == "rkl":
      return np.sum(pi * np.log(pi / p))           # p > 0 everywhere thanks to eps
    if f == "tv":
      return 0.5 * np.abs(pi - p).sum()
    m = 0.5 * (p + pi)
    return 0.5 * np.sum(p[nz] * np.log(p[nz] / m[nz])) + 0.5 * np.sum(pi * np.log(pi / m))

  d0 = exact(theta)
  key = jax.random.key(0)
  for step in range(150):
    key, k = jax.random.split(key)
    x = jax.random.categorical(k, theta, shape=(128,))
    log_score = jnp.asarray(log_P_all)[x]
    q_logp = jax.nn.log_softmax(theta)[x]
    logz = logz.update(log_score, q_logp)

    def loss(th):
      lp = jax.nn.log_softmax(th)[x]
      s, n, r = surrogate_loss(lp, jax.lax.stop_gradient(lp), log_score, logz.value[0], base.value, f)
      return s / n, r

    (l, r), g = jax.value_and_grad(loss, has_aux=True)(theta)
    base = base.update(r)
    upd, opt_state = opt.update(g, opt_state)
    theta = optax.apply_updates(theta, upd)
  d1 = exact(theta)
  assert np.isfinite(d1) and d1 < 0.5 * d0, (f, d0, d1)
