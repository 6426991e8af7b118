"""The DPO/TDPO step on models: identities at pi == ref, TRL metrics, the
reference gets no gradient, and the pair layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopd.models import ModelConfig, Transformer
from jaxopd.methods.tdpo import make_loss_fn

CFG = ModelConfig(family="llama", vocab_size=17, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=16,
                  init_std=0.2)


def _batch(b=4, t=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, size=(b, 2, t)).astype(np.int32)
  mask = np.zeros((b, 2, t), np.int32)
  for i in range(b):
    for j in range(2):
      start, end = rng.integers(2, 5), rng.integers(6, t + 1)
      mask[i, j, start:end] = 1
  return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}


@pytest.mark.parametrize("loss", ["dpo", "tdpo1", "tdpo2"])
def test_policy_equal_reference_gives_log2_and_zero_rewards(loss):
  pol = Transformer(CFG, nnx.Rngs(params=0))
  ref = Transformer(CFG, nnx.Rngs(params=0))
  out = make_loss_fn(loss, beta=0.1)({"policy": pol, "reference": ref}, _batch(), None)
  b = 4
  assert float(out.count) == b
  np.testing.assert_allclose(float(out.loss) / b, np.log(2), rtol=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl/chosen", "kl/rejected"):
    assert abs(float(out.metrics[k])) < 1e-5, k
  assert float(out.metrics["logps/chosen"]) < 0


def test_ipo_is_one_table_entry_through_the_step():
  """IPO, added as one function (jaxopd.losses.ipo_loss) and one entry of PAIR_LOSSES: with the
  policy equal to the reference every pair's loss is (0 - 1/(2 beta))^2, and the preset exists."""
  from jaxopd.experiment import load_config
  from jaxopd.methods import tdpo
  assert "ipo" in tdpo.PAIR_LOSSES and load_config("tdpo.py:ipo").method.loss == "ipo"
  pol = Transformer(CFG, nnx.Rngs(params=0))
  ref = Transformer(CFG, nnx.Rngs(params=0))
  out = make_loss_fn("ipo", beta=0.1)({"policy": pol, "reference": ref}, _batch(), None)
  np.testing.assert_allclose(float(out.loss) / float(out.count), (1 / (2 * 0.1)) ** 2, rtol=1e-6)


def test_gradients_flow_to_policy_only_and_tdpo2_ignores_chosen_kl_gradient():
  """The reference gets no gradient; TDPO2's policy gradient is that of
  z = (R_w - R_l) - alpha (K_l - sg(K_w)) written here from the logits (TDPO's formula), and differs from
  the one with K_w's gradient kept (so the detach is what the test checks)."""
  pol = Transformer(CFG, nnx.Rngs(params=0))
  ref = Transformer(CFG, nnx.Rngs(params=1))
  batch = _batch(seed=1)
  beta, alpha = 0.5, 0.5
  gd, pstate = nnx.split({"policy": pol})
  rgd, rstate = nnx.split({"reference": ref})

  def f(ps, rs, loss):
    return make_loss_fn(loss, beta=beta, alpha=alpha)({**nnx.merge(gd, ps), **nnx.merge(rgd, rs)}, batch, None).loss

  g_ref = jax.jit(jax.grad(f, argnums=1), static_argnums=2)(pstate, rstate, "tdpo2")
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref)) == 0.0
  g_pol = jax.jit(jax.grad(f), static_argnums=2)(pstate, rstate, "tdpo2")

  toks = batch["tokens"].reshape(8, -1)
  m = batch["loss_mask"].reshape(8, -1)[:, 1:].astype(jnp.float32)
  r = jax.nn.log_softmax(ref(toks).logits[:, :-1].astype(jnp.float32))

  def direct(ps, detach_chosen):
    a = jax.nn.log_softmax(nnx.merge(gd, ps)["policy"](toks).logits[:, :-1].astype(jnp.float32))
    tok = lambda l: jnp.take_along_axis(l, toks[:, 1:, None], -1)[..., 0]
    R = jnp.sum((tok(a) - tok(r)) * m, 1).reshape(4, 2)
    K = jnp.sum(jnp.sum(jnp.exp(r) * (r - a), -1) * m, 1).reshape(4, 2)
    k_w = jax.lax.stop_gradient(K[:, 0]) if detach_chosen else K[:, 0]
    z = (R[:, 0] - R[:, 1]) - alpha * (K[:, 1] - k_w)
    return jnp.sum(jax.nn.softplus(-beta * z))

  grad_direct = jax.jit(jax.grad(direct), static_argnums=1)
  want, undetached = grad_direct(pstate, True), grad_direct(pstate, False)
  for x, y in zip(jax.tree.leaves(g_pol), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-6)   # float32, another order
  gap = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(undetached)))
  assert gap > 1e-3 * max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))


def test_metrics_match_a_direct_computation():
  pol = Transformer(CFG, nnx.Rngs(params=0))
  ref = Transformer(CFG, nnx.Rngs(params=1))
  batch = _batch(seed=2)
  beta = 0.3
  out = make_loss_fn("tdpo1", beta=beta)({"policy": pol, "reference": ref}, batch, None)
  # Direct: per sequence, float64 from the logits.
  toks = np.asarray(batch["tokens"]).reshape(8, -1)
  m = np.asarray(batch["loss_mask"]).reshape(8, -1)[:, 1:].astype(np.float64)
  lp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  a = lp(np.asarray(pol(jnp.asarray(toks)).logits, np.float64))[:, :-1]
  r = lp(np.asarray(ref(jnp.asarray(toks)).logits, np.float64))[:, :-1]
  tok = lambda l: np.take_along_axis(l, toks[:, 1:, None], -1)[..., 0]
  R = ((tok(a) - tok(r)) * m).sum(1).reshape(4, 2)
  K = ((np.exp(r) * (r - a)).sum(-1) * m).sum(1).reshape(4, 2)
  z = (R[:, 0] - R[:, 1]) - (K[:, 1] - K[:, 0])
  np.testing.assert_allclose(float(out.loss), np.sum(np.log1p(np.exp(-beta * z))), rtol=1e-4)
  reward = beta * (R + K)
  np.testing.assert_allclose(float(out.metrics["rewards/chosen"]), reward[:, 0].sum(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(out.metrics["kl/margin"]), (K[:, 1] - K[:, 0]).sum(), rtol=1e-4, atol=1e-6)
  assert float(out.metrics["rewards/accuracies"]) == float((reward[:, 0] > reward[:, 1]).sum())


def test_unknown_loss_is_an_error():
  with pytest.raises(ValueError, match="config.method.loss='orpo'"):
    make_loss_fn("orpo", beta=0.1)
