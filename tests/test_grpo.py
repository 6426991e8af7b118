"""GRPO / on-policy distillation through the one train step (jaxopd/methods/grpo.py): group
sampling with one prefill per prompt, mu updates per rollout equal to doing them by hand,
dynamic sampling's masks, ProRL's reset, a step with nothing to learn, resume, config errors,
and the smoke pipelines on 8 simulated devices. The loss math is tests/test_grpo_loss.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopd import mesh as mesh_lib
from jaxopd import errors, train
from jaxopd.errors import ConfigError
from jaxopd.experiment import DataShard, load_config
from jaxopd.methods import grpo
from jaxopd.models import ModelConfig, Transformer
from jaxopd.sampling import SamplingConfig, sample

REWARDS = '''
def ones(prompts, completions):
  """The fraction of a completion's words that are "1" (a reward with spread on random samples)."""
  return [c.split().count("1") / max(len(c.split()), 1) for c in completions]


def constant(prompts, completions):
  return [0.5] * len(completions)


CALLS = [0]


def nan_on_some(prompts, completions):
  """Finite on the startup probe (empty completions), NaN for every 4th sampled completion."""
  if not any(completions):
    return [1.0] * len(completions)
  return [float("nan") if i % 4 == 0 else 1.0 for i in range(len(completions))]


def fails_at_step_2(prompts, completions):
  CALLS[0] += 1
  if CALLS[0] == 3:     # the probe, step 1, then step 2
    raise KeyError("no answer for this prompt")
  return [1.0] * len(completions)


def first_half(prompts, completions):
  """1 for the first half of the completions, 0 for the rest: groups of a prompt-major batch of
  G rows per prompt are constant wherever a group falls in one half."""
  n = len(completions)
  return [1.0 if i < n // 2 else 0.0 for i in range(n)]
'''


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
  (tmp_path / "grpo_test_rewards.py").write_text(REWARDS)
  monkeypatch.syspath_prepend(str(tmp_path))
  return "grpo_test_rewards"


def _config(tmp_path, reward, **method):
  """grpo.py:smoke on a random tiny policy (no SFT stage), quiet."""
  c = load_config("grpo.py:smoke")
  c.progress = False
  c.data.data_dir = str(tmp_path / "data")
  c.models.policy.init = "random"
  c.eval_every = 0
  c.eval.num_prompts = 0
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.method.reward = reward
  c.batch_size = 8
  for k, v in method.items():
    c.method[k] = v
  return c


def _trainer(c):
  exp = grpo.build(c)
  tr = train.Trainer(c, exp, mesh_lib.make_mesh((8, 1, 1)), mesh_lib.DEFAULT_RULES)
  return exp, tr


def _batches(exp, tr, c, n):
  it = exp.train_data(DataShard(0, 0, 1, c.batch_size))
  return [tr.to_global(next(it), c.batch_size) for _ in range(n)]


def _close(a, b, rtol=1e-5, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kw", [dict(), dict(family="gpt2", n_kv_heads=0)])
def test_group_sampling_prefills_each_prompt_once_and_equals_sampling_repeated_prompts(kw):
  """``sample(..., repeats=G)``: row b * G + g is prompt b's; the prompt's keys and values are held
  once, as the shared prefix of its G rows' caches (which hold only the responses); greedy decoding
  equals sampling the prompts repeated G times with full caches, log-probs within 1e-5; the log-probs
  of drawn samples equal the full forward's at the response positions."""
  from jaxopd.models import heads
  cfg = ModelConfig(**{**dict(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=24), **kw})
  model = Transformer(cfg, nnx.Rngs(params=0))
  prompt = jnp.asarray([[3, 4, 5, 0, 0], [6, 0, 0, 0, 0], [7, 8, 9, 10, 11]], jnp.int32)
  plen = jnp.asarray([3, 1, 5], jnp.int32)
  greedy = SamplingConfig(max_new_tokens=6, eos_id=1, pad_id=0, greedy=True)
  rng = jax.random.PRNGKey(0)
  shared = jax.jit(lambda p, l: sample(model, p, l, rng, greedy, repeats=3))(prompt, plen)
  plain = jax.jit(lambda p, l: sample(model, p, l, rng, greedy))(jnp.repeat(prompt, 3, 0), jnp.repeat(plen, 3))
  np.testing.assert_array_equal(shared.tokens, plain.tokens)
  np.testing.assert_array_equal(shared.loss_mask, plain.loss_mask)
  np.testing.assert_allclose(shared.model_logprobs, plain.model_logprobs, atol=1e-5)
  drawn = jax.jit(lambda p, l: sample(model, p, l, rng, SamplingConfig(6, 1, 0), repeats=3))(prompt, plen)
  for b in range(3):
    for g in range(3):
      np.testing.assert_array_equal(drawn.tokens[3 * b + g, :int(plen[b])], prompt[b, :int(plen[b])])
  assert len({tuple(np.asarray(r).tolist()) for r in drawn.tokens}) > 3     # the G samples differ
  full = jnp.pad(heads.token_logprobs(model, drawn.tokens, 8), ((0, 0), (1, 0)))      # [R, T], position t's token
  np.testing.assert_allclose(np.asarray(drawn.model_logprobs), np.asarray(full * drawn.loss_mask), atol=1e-5)


@pytest.mark.parametrize("mu,accum,beta_kl,distill", [(1, 2, 0.1, False), (2, 1, 0.1, True), (2, 2, 0.0, False)])
def test_the_step_equals_its_updates_written_out_by_hand(tmp_path, rewards_module, mu, accum, beta_kl, distill):
  """``Trainer.train_step`` with ``updates_per_rollout = mu`` and ``grad_accum``: one rollout
  (mu > 1: over the whole batch; mu = 1: per microbatch), then mu optimizer updates on the
  minibatches rows i, i + mu, ..., each summing its microbatches' gradients over their count, with
  pi_old the rollout's log-probs and the reference the snapshot of the policy; written out here by
  hand from the method's rollout and loss. Two steps, so the second starts from the first's state.
  The step runs ``method.share_prompt`` (its default: the policy's, reference's and teacher's
  forwards encode a prompt once per run of rows that continue it, G / (mu x grad_accum) after the
  minibatch split, G in the rollout), the hand-written updates a full row per sample
  (``share_prompt=False``): equal to float32 rounding."""
  kw = dict(distill="reverse_kl", lambda_d=0.5) if distill else {}
  c = _config(tmp_path, f"{rewards_module}:ones", updates_per_rollout=mu, beta_kl=beta_kl, eps_high=0.1,
              eps_low=0.1, **kw)
  c.grad_accum = accum
  c.optim.lr = 3e-3
  if distill:
    c.models.teacher.init = "random"
  exp, tr = _trainer(c)
  assert c.method.share_prompt and grpo.share_group(c.method, accum) == (4 if mu == 1 else 4 // (mu * accum))
  c.method.share_prompt = False
  rows = grpo.build(c)             # the same rollout and loss, a full row per sample
  assert ("reference" in exp.snapshots) == (beta_kl > 0)
  with jax.set_mesh(tr.mesh):
    state, frozen = tr.init()
    state, frozen = tr.load_sources(state, frozen)
    step = tr.compiled_train_step(_batches(exp, tr, c, 1)[0])

    def by_hand(state, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])
      batch = {**batch, "step": jnp.full((c.batch_size,), state["step"], jnp.int32)}
      params, opt = state["params"], state["opt_state"]
      snaps = state.get("snapshots")

      def rollout(p, b, key):
        return rows.rollout(tr._merge(jax.lax.stop_gradient(p), frozen, snaps), b, key)

      def update(params, opt, mb, key, with_rollout):
        grads, count = None, 0.0
        for i in range(accum):
          micro = jax.tree.map(lambda x: x[i::accum], mb)
          k = jax.random.fold_in(key, i) if accum > 1 else key
          if with_rollout:
            k, r_key = jax.random.split(k)
            micro = rollout(params, micro, r_key)
          (_, n), g = jax.value_and_grad(lambda p: tuple(rows.loss_fn(tr._merge(p, frozen, snaps), micro, k)[:2]),
                                         has_aux=True)(params)
          grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
          count += n
        upd, opt = tr.tx.update(jax.tree.map(lambda g: g / count, grads), opt, params)
        return optax.apply_updates(params, upd), opt

      if mu == 1:
        return update(params, opt, batch, rng, True)
      rng, r_key = jax.random.split(rng)
      rolled = rollout(params, batch, r_key)
      assert "lp_old" in rolled
      for i in range(mu):
        params, opt = update(params, opt, jax.tree.map(lambda x: x[i::mu], rolled), jax.random.fold_in(rng, i),
                             False)
      return params, opt

    moved = 0.0
    for batch in _batches(exp, tr, c, 2):
      want, _ = jax.jit(by_hand)(jax.tree.map(jnp.copy, state), batch)
      before = jax.tree.map(jnp.copy, state["params"])
      state, metrics = step(state, frozen, batch)
      assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0
      _close(state["params"], want, rtol=1e-4, atol=1e-6)
      moved += sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(state["params"]),
                                                               jax.tree.leaves(before)))
      if beta_kl:
        assert float(metrics["kl"]) >= 0
    assert moved > 0
    if mu > 1:    # updates after the first see rho != 1: the ratio left 1 on some tokens
      assert 0 < float(metrics["clip_ratio/region"]) < 1 or abs(float(metrics["ratio/mean"]) - 1) > 1e-4


def test_dynamic_sampling_drops_equal_reward_groups_and_oversampling_keeps_them_first(tmp_path, rewards_module):
  """Rewards 1 on the batch's first half of rows and 0 on the rest: every group of G rows has equal
  rewards, so dynamic sampling gives every row weight 0, kept_fraction 0, and the step leaves
  the parameters and optimizer state as they were (count 0: nothing to learn, no update); with
  ``ones`` (spread) some groups are kept, their rows weigh 1 and the others 0; with
  ``train_groups`` the kept groups come first."""
  c = _config(tmp_path, f"{rewards_module}:first_half", dynamic_sampling=True)
  exp, tr = _trainer(c)
  with jax.set_mesh(tr.mesh):
    state, frozen = tr.init()
    batch = _batches(exp, tr, c, 1)[0]
    rows = jax.jit(lambda s, b: exp.rollout(tr.models(s, frozen),
                                            {**b, "step": jnp.zeros((c.batch_size,), jnp.int32)},
                                            jax.random.PRNGKey(1)))(state, batch)
    assert float(jnp.sum(rows["weight"])) == 0 and float(jnp.sum(rows["kept"])) == 0
    before = jax.tree.map(jnp.copy, state)
    state, metrics = tr.compiled_train_step(batch)(state, frozen, batch)
    assert bool(metrics["finite"]) and float(metrics["count"]) == 0 and float(metrics["kept_fraction"]) == 0
    _close(state["params"], before["params"], rtol=0, atol=0)
    _close(state["opt_state"], before["opt_state"], rtol=0, atol=0)
    assert int(state["step"]) == 1

  c = _config(tmp_path, f"{rewards_module}:ones", dynamic_sampling=True)
  exp, tr = _trainer(c)
  g = c.method.group_size
  with jax.set_mesh(tr.mesh):
    state, frozen = tr.init()
    batch = _batches(exp, tr, c, 1)[0]
    def go(e):
      return jax.device_get(jax.jit(lambda s, b: e.rollout(
          tr.models(s, frozen), {**b, "step": jnp.zeros((c.batch_size,), jnp.int32)}, jax.random.PRNGKey(1)))(
              state, batch))
    rows = go(exp)
    r = rows["reward"].reshape(-1, g)
    kept = r.max(1) > r.min(1)
    assert 0 < kept.sum() < len(kept), r
    np.testing.assert_array_equal(rows["weight"], np.repeat(kept, g).astype(np.float32))
    c2 = _config(tmp_path, f"{rewards_module}:ones", dynamic_sampling=True, train_groups=4)
    exp2 = grpo.build(c2)
    sel = go(exp2)
    assert sel["tokens"].shape[0] == 4 * g
    want = np.concatenate([np.flatnonzero(kept), np.flatnonzero(~kept)])[:4]
    np.testing.assert_array_equal(sel["tokens"].reshape(4, g, -1), rows["tokens"].reshape(-1, g, sel["tokens"].shape[1])[want])
    np.testing.assert_allclose(sel["kept"], kept.mean())


def test_prorl_reset_copies_the_policy_into_the_reference_and_reinitialises_the_optimizer(tmp_path, rewards_module):
  """reset_every = 2: after step 1 the reference is still the initial policy and the optimizer has
  moments; after step 2 the reference equals the new policy, the optimizer state equals
  ``tx.init`` of it (moments zero, count 0) and resets = 1."""
  c = _config(tmp_path, f"{rewards_module}:ones", beta_kl=0.1, reset_every=2)
  exp, tr = _trainer(c)
  with jax.set_mesh(tr.mesh):
    state, frozen = tr.init()
    state, frozen = tr.load_sources(state, frozen)
    init_policy = jax.tree.map(jnp.copy, state["params"]["policy"])
    batches = _batches(exp, tr, c, 2)
    step = tr.compiled_train_step(batches[0])
    state, m1 = step(state, frozen, batches[0])
    assert int(m1["resets"]) == 0
    _close(state["snapshots"]["reference"], init_policy, rtol=0, atol=0)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(state["opt_state"])) > 0
    state, m2 = step(state, frozen, batches[1])
    assert int(m2["resets"]) == 1 and int(state["resets"]) == 1
    _close(state["snapshots"]["reference"], state["params"]["policy"], rtol=0, atol=0)
    _close(state["opt_state"], tr.tx.init(state["params"]), rtol=0, atol=0)


@pytest.mark.pipeline
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, rewards_module):
  """4 steps with the KL, the reference (a snapshot in the train state) reset at step 3 and the
  rollout's RNG: 2 steps then a resume to 4 give the uninterrupted run's parameters, reference and
  optimizer state exactly."""
  def run(workdir, steps):
    c = _config(tmp_path, f"{rewards_module}:ones", beta_kl=0.1, reset_every=3)
    c.total_steps = steps
    c.checkpoint.every = 2
    return train.run(c, str(workdir), grpo.build(c))

  whole = run(tmp_path / "whole", 4)
  run(tmp_path / "cut", 2)
  resumed = run(tmp_path / "cut", 4)
  assert resumed.resumed_from == 2 and int(resumed.state["resets"]) == 1
  for k in ("params", "snapshots", "opt_state"):
    _close(resumed.state[k], whole.state[k], rtol=0, atol=0)


@pytest.mark.parametrize("change,match", [
    ({"reset_every": 10}, r"config\.method\.reset_every / reset_kl: a reset moves the reference"),
    ({"pg": False}, r"config\.method\.pg=False: with no RL term"),
    ({"distill": "reverse_kl", "lambda_d": 1.0}, r"config\.models\.teacher\.init='none'"),
    ({"distill": "rkl"}, r"config\.method\.distill='rkl': must be"),
    ({"aggregation": "mean"}, r"config\.method\.aggregation='mean': must be one of"),
    ({"ratio_level": "seq"}, r"config\.method\.ratio_level='seq': must be one of \('token', 'sequence'\)"),
    ({"group_size": 1}, r"config\.method\.group_size=1: must be >= 2"),
    ({"train_groups": 3}, r"config\.method\.train_groups=3: must divide batch_size=8"),
    ({"updates_per_rollout": 3}, r"config\.method\.updates_per_rollout=3: the rollout's 32 rows"),
    ({"updates_per_rollout": 8}, r"config\.method\.share_prompt: each loss call sees every 8-th rollout row"),
])
def test_config_mistakes_are_one_line_errors_before_anything_runs(tmp_path, change, match):
  c = _config(tmp_path, "check", **change)
  with pytest.raises(ConfigError, match=match):
    grpo.build(c)
  assert not os.path.exists(c.data.data_dir)      # refused before the dataset is built


def test_share_prompt_with_the_splash_kernel_is_a_one_line_error(tmp_path):
  c = _config(tmp_path, "check")
  c.models.policy.attention = "splash"
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.attention='splash' with config\.method\.share_prompt"):
    grpo.build(c)
  c.method.share_prompt = False
  grpo._check(c)


@pytest.mark.parametrize("fn,match", [
    ("nan_on_some", r"step 1: config\.method\.reward='grpo_test_rewards:nan_on_some': returned 8 non-finite "
                    r"rewards of 32 \(e\.g\. nan\) on sampled completions; this step is not saved and the run "
                    r"stops\. No checkpoint was written before it"),
    ("fails_at_step_2", r"step 2: config\.method\.reward='grpo_test_rewards:fails_at_step_2': on sampled "
                        r"completions: KeyError: 'no answer for this prompt' .*; this step is not saved and the run "
                        r"stops\. Last good checkpoint: step 1 in "),
])
def test_a_failing_or_non_finite_reward_function_stops_in_one_line(tmp_path, rewards_module, fn, match):
  """On 8 devices the function runs in a host callback: it no longer raises there (which hung the
  other devices' collectives, then aborted); the step completes, and the trainer stops naming the
  function, the step, what went wrong and the last checkpoint, before that step is saved."""
  c = _config(tmp_path, f"{rewards_module}:{fn}")
  c.total_steps = 3
  c.checkpoint.every = 1
  with pytest.raises(errors.TrainingError, match=match):
    train.run(c, str(tmp_path / "run"), grpo.build(c))


def test_reward_check_needs_the_digits_task(tmp_path):
  c = _config(tmp_path, "check")
  c.data.task = "files"
  with pytest.raises(ConfigError, match=r"config\.method\.reward='check' is the digits task's checker"):
    grpo.build(c)


@pytest.fixture(scope="module")
def smoke_stages(tmp_path_factory):
  """The digits data and the smoke SFT base and teacher (built once per session, shared with REDI's)."""
  from helpers import DIGITS_STAGES, shared_smoke_stages
  c = load_config("grpo.py:smoke,rpd")
  c.progress = False
  with shared_smoke_stages(c, stages=DIGITS_STAGES):
    c = grpo.prepare(c, str(tmp_path_factory.mktemp("grpo") / "unused"))
  return {"data": c.data.data_dir, "sft": c.models.policy.init, "teacher": c.models.teacher.init}


def _smoke(preset, stages, **method):
  c = load_config(f"grpo.py:smoke,{preset}")
  c.progress = False
  c.data.data_dir = stages["data"]
  c.models.policy.init = stages["sft"]
  if c.models.teacher.init != "none":
    c.models.teacher.init = stages["teacher"]
  for k, v in method.items():
    c.method[k] = v
  return c


@pytest.mark.pipeline
def test_smoke_prorl_pipeline_trains_by_gradient_resets_and_reports_pass_at_k(smoke_stages, tmp_path):
  """ProRL's settings (decoupled clip, k3 KL to a reference reset every 3 steps, dynamic sampling,
  temperature 1.2) from the smoke SFT base on 8 devices: the policy's parameters move (no weight
  decay: by gradient, grad_norm > 0 on the steps with kept groups), the reset is logged at step 3
  and 6, the KL is 0 at the first step and at the step after a reset (the reference is the policy
  the rollout samples from), and the evaluation reports pass@k per level for the base (before)
  and the policy (after)."""
  import json

  from helpers import params_of
  from jaxopd import logs
  c = _smoke("prorl", smoke_stages, reset_every=3)
  assert c.optim.weight_decay == 0
  workdir = str(tmp_path / "run")
  s = train.run(c, workdir, grpo.build(c))
  recs = logs.read_metrics(workdir, "train")
  assert [r["resets"] for r in recs] == [0, 0, 1, 1, 1, 2]
  assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and recs[3]["kl"] == pytest.approx(0.0, abs=1e-6)
  assert any(r["grad_norm"] > 0 for r in recs if r["kept_fraction"] > 0)
  assert any(r["kept_fraction"] > 0 for r in recs)
  for r in recs:
    assert 0 <= r["kept_fraction"] <= 1 and r["entropy"] > 0 and r["reward/mean"] == r["pass@1"]
    if r["count"] > 0:          # the clip fractions are over the kept groups' tokens (none: NaN)
      assert 0 <= r["clip_ratio/region"] <= 1
  from jaxopd.models import table
  base, _ = table.load_model(c.models.policy.init, "policy")
  moved = sum(float(np.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(params_of(s)),
                                                        jax.tree.leaves(nnx.to_pure_dict(nnx.state(base)))))
  assert moved > 0
  for k in ("sample/pass@1", "sample/pass@4", "sample/greedy", "sample/level2/pass@1", "sample/level5/pass@4"):
    assert k in s.eval and 0 <= s.eval[k] <= 1, k
  grpo.report(c, workdir, s)
  summ = json.load(open(os.path.join(workdir, "summary.json")))
  assert summ["before"]["sample/pass@4"] >= summ["before"]["sample/pass@1"]


@pytest.mark.pipeline
def test_smoke_on_policy_distillation_lowers_the_reverse_kl_to_the_teacher(smoke_stages, tmp_path):
  """VLA-OPD (no RL term; reverse KL to the teacher on the policy's own samples) from the smoke SFT
  base toward the smoke teacher (the same recipe on every level): the token-mean KL of the last
  three steps is below the first three's, by gradient; no reference model is built."""
  from jaxopd import logs
  c = _smoke("opd", smoke_stages)
  c.total_steps = 12
  c.optim.lr = 3e-3
  c.eval_every = 0
  exp = grpo.build(c)
  assert set(exp.roles) == {"policy", "teacher"} and not exp.snapshots
  workdir = str(tmp_path / "run")
  train.run(c, workdir, exp)
  recs = logs.read_metrics(workdir, "train")
  kl = [r["distill"] for r in recs]
  assert recs[0]["loss"] == pytest.approx(kl[0], rel=1e-5)      # the loss is the distillation term
  assert np.mean(kl[-3:]) < np.mean(kl[:3]), kl
  assert "clip_ratio/low" not in recs[0]


@pytest.mark.pipeline
def test_smoke_on_the_reviews_task_with_its_gold_reward(tmp_path):
  """GRPO on the reviews task (the ``reviews`` preset) from the session's shared smoke SFT base, the
  reward the gold reward on the host: continuous rewards, so groups carry a signal (grad_norm > 0
  at every step), and TDPO's sampled evaluation (gold reward,
  entropy; no KL without a reference) is reported before and after."""
  import json

  from helpers import shared_smoke_stages
  from jaxopd import logs
  c = load_config("grpo.py:smoke,reviews")
  c.progress = False
  c.eval_every = 0
  with shared_smoke_stages(c):
    c = grpo.prepare(c, str(tmp_path / "run"))
  assert c.method.reward == "gold" and "max_level" not in c.data
  workdir = str(tmp_path / "run")
  s = train.run(c, workdir, grpo.build(c))
  recs = logs.read_metrics(workdir, "train")
  assert np.mean([r["kept_fraction"] for r in recs]) > 0.5 and all(r["grad_norm"] > 0 for r in recs), recs
  assert "sample/reward" in s.eval and "sample/kl_ref" not in s.eval
  grpo.report(c, workdir, s)
  summ = json.load(open(os.path.join(workdir, "summary.json")))
  assert 0 <= summ["before"]["sample/reward"] <= 1 and "sample/entropy" in summ["after"]


def test_a_bf16_sampler_has_a_measured_mismatch_and_the_corrections_apply(tmp_path, rewards_module):
  """The sampler at the policy's own precision agrees with the trainer's log-probs to float32
  rounding (a KV-cache decode against a full forward); in bfloat16 the step logs the mismatch
  (mean and per-response max |d log p|, the sampler-to-trainer KL), and TIS / MIS report what they
  truncated or masked; with bfloat16 operands of the matmuls only the mismatch is smaller."""
  seen = {}
  for dtype, corr in (("", "none"), ("bfloat16", "none"), ("bfloat16", "tis"), ("bfloat16", "mis"),
                      ("bfloat16_matmul", "none")):
    c = _config(tmp_path, f"{rewards_module}:first_half", sampler_dtype=dtype, rollout_correction=corr,
                rollout_cap=1.0003)   # the tiny model's bf16 mismatch is ~4e-4 nats per token
    exp, tr = _trainer(c)
    with jax.set_mesh(tr.mesh):
      state, frozen = tr.init()
      batch = _batches(exp, tr, c, 1)[0]
      _, metrics = tr.compiled_train_step(batch)(state, frozen, batch)
    seen[dtype, corr] = {k: float(v) for k, v in metrics.items() if k.startswith("rollout/")}
    assert bool(metrics["finite"])
  print(seen)
  assert seen["", "none"]["rollout/logp_diff_seqmax"] < 1e-4
  bf16 = seen["bfloat16", "none"]
  assert bf16["rollout/logp_diff"] > 1e-4 and bf16["rollout/logp_diff_seqmax"] > bf16["rollout/logp_diff"]
  assert 0 < seen["bfloat16", "tis"]["rollout/tis_truncated"] < 1
  assert 0 < seen["bfloat16", "mis"]["rollout/mis_masked"] <= 1
  mm = seen["bfloat16_matmul", "none"]     # bf16 operands only: a mismatch, measured, below full bf16's
  assert seen["", "none"]["rollout/logp_diff"] < mm["rollout/logp_diff"] < bf16["rollout/logp_diff"]
  with pytest.raises(ConfigError, match=r"config\.method\.sampler_dtype='float16': must be one of"):
    grpo.build(_config(tmp_path, f"{rewards_module}:ones", sampler_dtype="float16"))
