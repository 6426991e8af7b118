"""f-DPG with a real (tiny) model on an enumerable space: vocabulary 5, three
response tokens, no EOS, so the 125 sequences can be scored exactly.

Checked: moment matching against its closed form; the rollout + loss metrics
(importance-sampled divergences to the target with the running log Z) against
exact values; a few f-DPG steps with each divergence reduce the exact
divergence to the target; reverse KL on a pointwise target needs the epsilon
floor and with it nothing non-finite reaches the parameters; the offline
proposal is replaced once the policy is closer; non-ancestral sampling is refused.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import tiny_models
from jaxopd import logs
from jaxopd.errors import ConfigError
from jaxopd.methods.fdpg import Target, check_sampling, fit_lambdas, init_state, make_loss_fn, make_rollout
from jaxopd.losses import token_logprobs
from jaxopd.models import ModelConfig
from jaxopd.sampling import SamplingConfig

V, N = 5, 3
SCFG = SamplingConfig(max_new_tokens=N, eos_id=V + 10, pad_id=0)      # no EOS: every response has N tokens
CFG = ModelConfig(family="llama", vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_len=8, init_std=0.4)
SEQS = np.array([[0, *s] for s in itertools.product(range(V), repeat=N)], np.int32)   # [125, 4], prompt = [0]
MASK = np.concatenate([np.zeros((len(SEQS), 1), np.int32), np.ones((len(SEQS), N), np.int32)], 1)


def _exact_logp(model) -> np.ndarray:
  lp = token_logprobs(model(jnp.asarray(SEQS)).logits, jnp.asarray(SEQS))
  return np.asarray(jnp.sum(lp * MASK[:, 1:], axis=1), np.float64)


def _exact_divs(pi_logp, log_p):
  p, pi = np.exp(log_p), np.exp(pi_logp)
  m = 0.5 * (p + pi)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl_p_pi = np.sum(np.where(p > 0, p * (log_p - pi_logp), 0.0))
    kl_pi_p = np.sum(pi * (pi_logp - log_p))
    js = 0.5 * np.sum(np.where(p > 0, p * np.log(p / m), 0.0)) + 0.5 * np.sum(pi * np.log(pi / m))
  return {"fkl": kl_p_pi, "rkl": kl_pi_p, "tv": 0.5 * np.sum(np.abs(p - pi)), "js": js}


def _exact_target(base, target):
  a = _exact_logp(base)
  log_phi = np.asarray(target.log_phi(jnp.asarray(SEQS), jnp.asarray(MASK)), np.float64)
  log_P = a + log_phi
  log_z = np.log(np.sum(np.exp(log_P)))
  return log_P - log_z, log_z


def _batch(b):
  return {"prompt": jnp.zeros((b, 1), jnp.int32), "prompt_len": jnp.ones((b,), jnp.int32),
          "context": jnp.zeros((b,), jnp.int32)}


def _trainer(target, divergence, eps=0.0, offline=False, lr=3e-3, proposal_every=2):
  """A minimal jitted loop over the same rollout and loss the experiment uses (Adam
  with a short warm-up: the first step has no baseline yet, as in disco)."""
  base, policy = tiny_models(CFG, ("base", "policy"), (0, 0)).values()   # f-DPG starts from the base
  gd, params = nnx.split(policy)
  rollout = make_rollout(target, divergence, SCFG, eps=eps, offline=offline, proposal_every=proposal_every)
  loss_fn = make_loss_fn(divergence, on_policy=not offline)
  tx = optax.adam(optax.linear_schedule(lr / 4, lr, 4))
  state = init_state(1, 256, params if offline else None)

  @jax.jit
  def step(params, opt, state, rng):
    models = {"policy": nnx.merge(gd, jax.lax.stop_gradient(params)), "base": base}
    batch, state = rollout(models, _batch(256), rng, state)
    def f(p):
      out = loss_fn({"policy": nnx.merge(gd, p), "base": base}, batch, rng)
      return out.loss / out.count, out
    (_, out), g = jax.value_and_grad(f, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, state, {k: n / d for k, (n, d) in out.metrics.items()}, g

  return base, gd, params, tx.init(params), state, step


def test_fit_lambdas_matches_the_closed_form_for_one_binary_feature():
  rng = np.random.default_rng(0)
  f = (rng.random((5000, 1)) < 0.2).astype(np.float64)
  m = f.mean()
  lam = fit_lambdas(f, np.array([0.5]))
  np.testing.assert_allclose(lam[0], np.log(0.5 / 0.5) - np.log(m / (1 - m)), rtol=1e-9)
  # Two features: the reweighted sample moments hit the targets.
  f2 = np.stack([f[:, 0], (rng.random(5000) < 0.6).astype(np.float64)], 1)
  lam2 = fit_lambdas(f2, np.array([0.4, 0.3]))
  w = np.exp(f2 @ lam2)
  np.testing.assert_allclose((w @ f2) / w.sum(), [0.4, 0.3], atol=1e-9)
  with pytest.raises(ValueError, match="outside the range"):
    fit_lambdas(f, np.array([1.0]))


def test_sampled_divergence_metrics_match_exact_values():
  target = Target("distributional", feature_ids=((3,),), lambdas=(1.5,))
  base, gd, params, opt, aux, _ = _trainer(target, "fkl")
  policy = nnx.merge(gd, params)
  log_p, log_z = _exact_target(base, target)
  exact = _exact_divs(_exact_logp(policy), log_p)
  rollout = jax.jit(make_rollout(target, "fkl", SCFG))
  loss_fn = nnx.jit(make_loss_fn("fkl", on_policy=True))
  sums = {}
  for i in range(8):             # 8 x 1024 samples, log Z running over all of them
    batch, aux = rollout({"policy": policy, "base": base}, _batch(1024), jax.random.PRNGKey(i), aux)
    out = loss_fn({"policy": policy, "base": base}, batch, None)
    for k, (num, den) in out.metrics.items():     # metrics: (sum, samples) pairs
      sums[k] = sums.get(k, 0.0) + float(num) / float(den) / 8
  np.testing.assert_allclose(float(aux["log_z"].value[0]), log_z, atol=0.02)
  names = {"fkl": "target/kl_target_policy", "rkl": "target/kl_policy_target", "tv": "target/tv", "js": "target/js"}
  for f, key in names.items():
    assert sums[key] == pytest.approx(exact[f], rel=0.1, abs=0.01), (f, sums[key], exact[f])
  # alignment = E_pi[feature]; exact from the enumeration
  feat = (SEQS[:, 1:] == 3).any(1)
  assert sums["alignment"] == pytest.approx(float(np.sum(np.exp(_exact_logp(policy))[feat])), abs=0.02)


@pytest.mark.parametrize("f", ["fkl", "rkl", "tv", "js"])
def test_fdpg_steps_reduce_the_exact_divergence(f):
  target = Target("distributional", feature_ids=((3,),), lambdas=(2.0,))
  base, gd, params, opt, aux, step = _trainer(target, f)
  log_p, _ = _exact_target(base, target)
  before = _exact_divs(_exact_logp(nnx.merge(gd, params)), log_p)[f]
  trace = []
  for i in range(20):
    params, opt, aux, m, _ = step(params, opt, aux, jax.random.PRNGKey(100 + i))
    trace.append(_exact_divs(_exact_logp(nnx.merge(gd, params)), log_p)[f])
  # Single-sample-per-step REINFORCE is noisy (TV's pseudo-reward is +-0.5), so
  # compare the mean over the last five steps with the start.
  assert np.mean(trace[-5:]) < 0.85 * before, (f, before, trace)


def test_pointwise_reverse_kl_needs_the_epsilon_floor_and_stays_finite():
  target = Target("pointwise", token_ids=(3,))
  with pytest.raises(ConfigError, match="eps"):
    make_rollout(target, "rkl", SCFG, eps=0.0)
  base, gd, params, opt, aux, step = _trainer(target, "rkl", eps=1e-3)
  log_p, _ = _exact_target(base, target)          # the true target (b, not max(b, eps))
  p = np.exp(log_p)
  before = np.exp(_exact_logp(nnx.merge(gd, params)))
  for i in range(15):
    params, opt, aux, m, g = step(params, opt, aux, jax.random.PRNGKey(200 + i))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g)), f"non-finite gradient at step {i}"
    assert np.isfinite(float(m["pseudo_reward"]))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  after = np.exp(_exact_logp(nnx.merge(gd, params)))
  # mass moves onto the sequences that satisfy the constraint, and TV to p falls
  assert after[p > 0].sum() > before[p > 0].sum() + 0.1
  assert 0.5 * np.abs(p - after).sum() < 0.5 * np.abs(p - before).sum()


def test_offline_proposal_is_replaced_when_the_policy_gets_closer():
  target = Target("distributional", feature_ids=((3,),), lambdas=(2.0,))
  base, gd, params, opt, aux, step = _trainer(target, "fkl", offline=True, proposal_every=3)
  log_p, _ = _exact_target(base, target)
  before = _exact_divs(_exact_logp(nnx.merge(gd, params)), log_p)["fkl"]
  swaps = []
  for i in range(12):
    params, opt, aux, m, _ = step(params, opt, aux, jax.random.PRNGKey(400 + i))
    swaps.append(int(aux["swaps"]))
  after = _exact_divs(_exact_logp(nnx.merge(gd, params)), log_p)["fkl"]
  assert after < 0.7 * before
  assert swaps[1] == 0 and swaps[-1] >= 1        # checks only every 3 rollouts; the policy improved
  # the proposal now holds a past policy, not the base model
  prop = nnx.merge(gd, aux["proposal"])
  assert not np.allclose(_exact_logp(prop), _exact_logp(base))


def test_non_ancestral_sampling_is_refused():
  for kw in (dict(temperature=0.7), dict(top_k=3), dict(top_p=0.9), dict(greedy=True)):
    with pytest.raises(ConfigError, match="ancestral"):
      check_sampling(SamplingConfig(max_new_tokens=3, eos_id=1, **kw))


@pytest.mark.pipeline
def test_fdpg_smoke_pipeline_resumes_its_method_state(tmp_path):
  """experiments/fdpg.py end to end (smoke sizes, offline, distributional): the
  target fit, training, report; stopped at step 3 and resumed to step 6, the
  running log Z has counted every sample once (the method state is checkpointed)."""
  import json
  import os

  from helpers import shared_smoke_stages
  from jaxopd import train
  from jaxopd.experiment import load_config
  from jaxopd.methods import fdpg as fd

  def config(steps):
    c = load_config("fdpg.py:smoke,distributional,offline")
    c.progress = False
    c.total_steps = steps
    c.checkpoint.async_save = False
    return c

  work = str(tmp_path / "fdpg")
  with shared_smoke_stages(config(3)) as c:
    c = fd.prepare(c, work)
  assert len(c.eval.log_z) == 1 and len(c.method.lambdas) == 1
  train.run(c, work, fd.build(c))
  with shared_smoke_stages(config(6)) as c:
    c = fd.prepare(c, work)              # the target fit is cached in work/target.json
  s = train.run(c, work, fd.build(c))
  assert s.resumed_from == 3
  aux = s.state["method"]
  assert float(aux["log_z"].count[0]) == 6 * c.batch_size
  assert int(aux["rollouts"]) == 6 and bool(aux["proposal_set"])
  fd.report(c, work, s)
  summ = json.load(open(os.path.join(work, "summary.json")))
  for k in fd.KEYS:
    assert np.isfinite(summ["after"][k]), k
  assert summ["before"]["sample/kl_base"] == pytest.approx(0.0, abs=1e-5)   # the base against itself
  # Training moved the policy off the base by gradient (weight decay is 0 here): every step's
  # gradient is non-zero and the parameters differ from the base's (6 steps are too few for the
  # sampled KL estimate to tell).
  assert c.optim.weight_decay == 0.0
  assert all(r["grad_norm"] > 0 for r in logs.read_metrics(work, "train"))
  models = s.trainer.models(s.state, s.frozen)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(nnx.state(models["policy"], nnx.Param)),
                                                              jax.tree.leaves(nnx.state(models["base"], nnx.Param))))
  assert moved > 1e-4, moved


def test_on_policy_importance_weight_is_exactly_one():
  """On-policy the weight pi/q is 1 (the paper's identity): a sampler log-probability that differs from the
  forward pass's (as bf16 numerics make it, here by 5% of a sequence's log-prob) leaves the on-policy
  gradient equal to the one with q = the forward log-prob, i.e. -mean((R - b) grad log pi); the
  off-policy loss does reweight by exp(pi - q)."""
  policy = tiny_models(CFG, ("policy",))["policy"]
  gd, params = nnx.split(policy)
  tokens, mask = jnp.asarray(SEQS[:16]), jnp.asarray(MASK[:16])
  exact = jnp.sum(token_logprobs(policy(tokens).logits, tokens) * mask[:, 1:], 1)
  batch = {"tokens": tokens, "loss_mask": mask, "proposal_logp": exact * 1.05,
           "log_score": exact + jnp.linspace(-1.0, 1.0, 16), "log_z": jnp.zeros(16), "baseline": jnp.zeros(16),
           "true_score": exact, "base_logp": exact, "alignment": jnp.ones(16), "weight": jnp.full(16, 1 / 16)}

  def grad(loss_fn, b):
    return jax.jit(jax.grad(lambda p: loss_fn({"policy": nnx.merge(gd, p)}, b, None).loss))(params)
  on = grad(make_loss_fn("fkl", on_policy=True), batch)
  ref = grad(make_loss_fn("fkl"), dict(batch, proposal_logp=exact))
  off = grad(make_loss_fn("fkl"), batch)
  for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(ref)):   # ref's own w is 1 up to float32 noise
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off))) > 1e-2
  out = make_loss_fn("fkl", on_policy=True)({"policy": policy}, batch, None)
  assert float(out.metrics["alignment"][0]) == pytest.approx(16.0, rel=1e-6)   # sum of w * 1 with w = 1


def test_fdpg_through_the_trainers_step_threads_the_method_state_through_microbatches(accum=4):
  """f-DPG through the real ``Trainer.train_step`` (rollout inside the jitted step, 8 devices): with
  grad_accum = 4 the update is the sum of four microbatch gradients (rows i, i + 4, ...), each from a
  rollout that saw log Z and the baseline as the previous microbatch left them, divided by the total
  count; written out here by hand from the method's rollout and loss (grad_accum = 1 is the case of
  one microbatch: the same code with accum = 1 passes too). The method state after the step (log Z sums and counts, the baseline window) is
  the hand-threaded one, and a second step continues from it."""
  from helpers import tiny_config
  from jaxopd import mesh as mesh_lib
  from jaxopd import train
  from jaxopd.data import batched_iterator
  from jaxopd.experiment import DataShard, Experiment
  from jaxopd.models import table
  target = Target("pointwise", token_ids=(2,))
  b = 32
  cfg = tiny_config(batch_size=b, grad_accum=accum, seq_len=1 + N, **{"optim.lr": 3e-3})
  with cfg.unlocked():
    cfg.model = table.arch_block(CFG)
    cfg.models = {"policy": table.role(), "base": table.role(trainable=False)}
  records = [{"prompt": np.zeros(1, np.int32), "prompt_len": np.int32(1), "context": np.int32(0)}] * 64
  exp = Experiment(roles={"policy": True, "base": False}, loss_fn=make_loss_fn("fkl"),
                   rollout=make_rollout(target, "fkl", SCFG), init_state=lambda: init_state(1, 16),
                   train_data=lambda shard: batched_iterator(records, shard))
  tr = train.Trainer(cfg, exp, mesh_lib.make_mesh((8, 1, 1)), mesh_lib.DEFAULT_RULES)
  with jax.set_mesh(tr.mesh):
    state, frozen = tr.init()
    it = exp.train_data(DataShard(0, 0, 1, b))
    batches = [tr.to_global(next(it), b) for _ in range(2)]
    step = tr.compiled_train_step(batches[0])

    def by_hand(state, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])
      ms, grads, count = state["method"], None, 0.0
      for i in range(accum):
        mb = jax.tree.map(lambda x: x[i::accum], batch)
        key, r_key = jax.random.split(jax.random.fold_in(rng, i) if accum > 1 else rng)
        models = tr._merge(jax.lax.stop_gradient(state["params"]), frozen)
        mb, ms = exp.rollout(models, mb, r_key, ms)

        def loss(p):
          out = exp.loss_fn(tr._merge(p, frozen), mb, key)
          return out.loss, out.count
        (_, n), g = jax.value_and_grad(loss, has_aux=True)(state["params"])
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        count += n
      grads = jax.tree.map(lambda g: g / count, grads)
      upd, _ = tr.tx.update(grads, state["opt_state"], state["params"])
      return optax.apply_updates(state["params"], upd), ms

    for batch in batches:
      want_params, want_ms = jax.jit(by_hand)(jax.tree.map(jnp.copy, state), batch)
      state, metrics = step(state, frozen, batch)
      assert bool(metrics["finite"])
      for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
      for x, y in zip(jax.tree.leaves(state["method"]), jax.tree.leaves(want_ms)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
  assert float(state["method"]["log_z"].count[0]) == 2 * b


def test_grouped_rollout_prefills_each_context_once_and_draws_what_row_sampling_draws():
  """``group = k``: the batch's k copies of a context's prompt are sampled from one prefill
  (``sample(..., repeats=k)``); the draws equal sampling every row on its own (same key, same
  logits), and the k samples of a context differ."""
  from jaxopd.sampling import sample
  target = Target("distributional", feature_ids=((3,),), lambdas=(1.5,))
  base, policy = tiny_models(CFG, ("base", "policy"), (0, 0)).values()   # f-DPG starts from the base
  scfg = SamplingConfig(max_new_tokens=4, eos_id=V + 10, pad_id=0)
  prompt = jnp.asarray(np.repeat([[1, 2, 0], [3, 0, 0], [4, 1, 2]], 4, axis=0), jnp.int32)   # 3 contexts x 4
  batch = {"prompt": prompt, "prompt_len": jnp.asarray(np.repeat([2, 1, 3], 4), jnp.int32),
           "context": jnp.asarray(np.repeat([0, 1, 2], 4), jnp.int32)}
  rng = jax.random.PRNGKey(5)
  rollout = jax.jit(make_rollout(target, "fkl", scfg, group=4))
  out, _ = rollout({"policy": policy, "base": base}, batch, rng, init_state(3, 16))
  rows = jax.jit(lambda p, l: sample(policy, p, l, rng, scfg))(batch["prompt"], batch["prompt_len"])
  np.testing.assert_array_equal(out["tokens"], rows.tokens)
  np.testing.assert_allclose(out["proposal_logp"], jnp.sum(rows.logprobs, 1), rtol=1e-6)
  assert len({tuple(np.asarray(r).tolist()) for r in out["tokens"][:4]}) > 1
