"""AlignDistil: the per-token teacher and loss against an independent NumPy float64
implementation (values and gradients), the paper's identities, the chunked loss of the
method on padded batches of unequal lengths against the same reference on full logits, and a
smoke run of the whole pipeline (SFT, pairs, DPO and reverse DPO stages, AlignDistil) on 8
simulated devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopd.losses import aligndistil as AD

V = 11


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_terms(variant, z_pi, z_ref, z_dpo, z_rdpo, targets, beta0, beta2, T=1.0):
  """float64 reference, written from the paper's formulas."""
  z_pi, z_ref, z_dpo = (np.asarray(z, np.float64) for z in (z_pi, z_ref, z_dpo))
  z_rdpo = None if z_rdpo is None else np.asarray(z_rdpo, np.float64)
  if variant == "gkd":
    zs, c = z_dpo, np.ones(z_pi.shape[:-1])
  elif variant == "theorem1":
    w = beta0 / beta2
    zs, c = w * z_dpo + (1 - w) * z_ref, np.full(z_pi.shape[:-1], beta2)
  elif variant == "contrast":
    zs, c = z_dpo + beta0 / beta2 * (z_dpo - z_rdpo), np.full(z_pi.shape[:-1], beta2)
  else:
    p_d, p_r = np.exp(_np_log_softmax(z_dpo)), np.exp(_np_log_softmax(z_rdpo))
    w = beta2 * np.abs(p_d - p_r).sum(-1) + 1e-3
    zs, c = z_dpo + w[..., None] * (z_dpo - z_rdpo), beta0 / w
  lq, ls = _np_log_softmax(z_pi / T), _np_log_softmax(zs / T)
  kl = (np.exp(lq) * (lq - ls)).sum(-1)
  grad = c[..., None] * np.exp(lq) * (lq - ls - kl[..., None]) / T     # d(c KL) / d z_pi
  l1, lr, ld = _np_log_softmax(z_pi), _np_log_softmax(z_ref), _np_log_softmax(z_dpo)
  r = beta0 * (ld - lr)
  return {"loss": c * kl, "kl_teacher": kl, "coef": c, "kl_reference": (np.exp(l1) * (l1 - lr)).sum(-1),
          "reward_token": np.take_along_axis(r, targets[..., None], -1)[..., 0],
          "reward_expected": (np.exp(l1) * r).sum(-1)}, grad


def _logits(seed, shape=(3, 5, V), scale=2.0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32) * scale


@pytest.mark.parametrize("variant", AD.VARIANTS)
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_token_terms_and_gradient_match_numpy(variant, T):
  z_pi, z_ref, z_dpo, z_rdpo = (_logits(s) for s in range(4))
  targets = np.random.RandomState(9).randint(0, V, size=(3, 5))
  want, want_grad = np_terms(variant, z_pi, z_ref, z_dpo, z_rdpo, targets, 0.1, 10.0, T)
  got = AD.token_terms(variant, jnp.asarray(z_pi), jnp.asarray(z_ref), jnp.asarray(z_dpo), jnp.asarray(z_rdpo),
                       jnp.asarray(targets), 0.1, 10.0, T)
  for k, v in want.items():
    np.testing.assert_allclose(np.asarray(got[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)
  grads = jax.grad(lambda z: jnp.sum(AD.token_terms(variant, z, z_ref, z_dpo, z_rdpo, targets, 0.1, 10.0, T)["loss"]),
                   argnums=0)(jnp.asarray(z_pi))
  np.testing.assert_allclose(np.asarray(grads), want_grad, rtol=1e-4, atol=1e-6 * np.abs(want_grad).max())
  # the teacher's models get no gradient
  for i, z in ((1, z_ref), (2, z_dpo), (3, z_rdpo)):
    args = [jnp.asarray(x) for x in (z_pi, z_ref, z_dpo, z_rdpo)]
    g = jax.grad(lambda a: jnp.sum(AD.token_terms(variant, *[a if j == i else args[j] for j in range(4)],
                                                  targets, 0.1, 10.0, T)["loss"]))(args[i])
    assert np.all(np.asarray(g) == 0), (variant, i)


def test_identities_of_methods_md():
  z_pi, z_ref, z_dpo = (jnp.asarray(_logits(s)) for s in range(3))
  t = jnp.zeros((3, 5), jnp.int32)
  # adaptive with z_dpo == z_rdpo distils into z_dpo with c = 1000 beta0
  a = AD.token_terms("adaptive", z_pi, z_ref, z_dpo, z_dpo, t, 0.1, 15.0)
  g = AD.token_terms("gkd", z_pi, z_ref, z_dpo, None, t, 0.1, 15.0)
  np.testing.assert_allclose(np.asarray(a["coef"]), 100.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(a["loss"]), 100.0 * np.asarray(g["loss"]), rtol=1e-5)
  # theorem1 with beta2 = beta0 (w = 1) is gkd scaled by beta0
  th = AD.token_terms("theorem1", z_pi, z_ref, z_dpo, None, t, 0.1, 0.1)
  np.testing.assert_allclose(np.asarray(th["loss"]), 0.1 * np.asarray(g["loss"]), rtol=1e-5)
  # policy == teacher: loss 0 and gradient 0
  zs, _ = AD.teacher("contrast", z_dpo, z_ref, None, 0.1, 10.0)
  f = lambda z: jnp.sum(AD.token_terms("contrast", z, z_ref, z_dpo, z_ref, t, 0.1, 10.0)["loss"])
  assert abs(float(f(zs))) < 1e-4 and float(jnp.max(jnp.abs(jax.grad(f)(zs)))) < 1e-5
  # the adaptive weight is unclipped: c in (0, beta0 / 1e-3]
  c = np.asarray(AD.token_terms("adaptive", z_pi, z_ref, z_dpo, z_ref, t, 0.1, 15.0)["coef"])
  assert np.all(c > 0) and np.all(c <= 100.0 + 1e-4)


def _tiny_models(vocab=V):
  from helpers import tiny_models
  from jaxopd.models import ModelConfig
  return tiny_models(ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, max_len=32),
                     ("policy", "reference", "dpo", "rdpo"))


@pytest.mark.parametrize("len_norm", [True, False])
def test_method_loss_chunked_on_padded_batch_matches_numpy(len_norm):
  """The method's loss (hidden states, LM heads inside chunks of 3 positions that do not divide
  T - 1 = 8) on a batch of unequal response lengths equals the NumPy reference on the models'
  full logits: mean over sequences of sum_t m c KL (divided by sum_t m with len_norm); the
  chosen side of a pair batch is what is trained; the metrics are token means."""
  from jaxopd.methods.aligndistil import make_loss_fn
  models = _tiny_models()
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, V, size=(4, 9)).astype(np.int32)
  mask = np.zeros((4, 9), np.int32)
  for b, (s, e) in enumerate(((2, 9), (3, 5), (1, 2), (4, 8))):
    mask[b, s:e] = 1
  logits = {n: np.asarray(m(jnp.asarray(tokens)).logits) for n, m in models.items()}
  terms, _ = np_terms("adaptive", *(logits[n][:, :-1] for n in ("policy", "reference", "dpo", "rdpo")),
                      tokens[:, 1:], 0.1, 15.0)
  m = mask[:, 1:].astype(np.float64)
  per_seq = (m * terms["loss"]).sum(1) / (m.sum(1) if len_norm else 1.0)
  fn = make_loss_fn("adaptive", 0.1, 15.0, chunk=3, len_norm=len_norm)
  pairs = {"tokens": np.stack([tokens, tokens[::-1]], 1), "loss_mask": np.stack([mask, mask[::-1]], 1)}
  out = nnx.jit(lambda ms: fn(ms, pairs, None))(models)
  assert float(out.count) == 4
  np.testing.assert_allclose(float(out.loss), per_seq.sum(), rtol=1e-5)
  for key, ref in (("kl/teacher", "kl_teacher"), ("coef/mean", "coef"), ("reward/token", "reward_token")):
    num, den = out.metrics[key]
    np.testing.assert_allclose(float(num) / float(den), (m * terms[ref]).sum() / m.sum(), rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(float(out.metrics["coef/max"][0]), terms["coef"][m > 0].max(), rtol=1e-5)
  # gradient into the policy only
  gd, st = nnx.split(models["policy"])

  def loss_of(params):
    return fn({**models, "policy": nnx.merge(gd, params)}, pairs, None).loss
  g = jax.jit(jax.grad(loss_of))(st)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) > 0


@pytest.mark.pipeline
def test_smoke_pipeline_stages_and_report(tmp_path):
  """On-policy AlignDistil (adaptive) after the cached stages SFT, pairs, DPO and reverse DPO (both
  trained here, each recorded with its inputs): every metric logged, the loss and the KL to the
  teacher fall by gradient; a re-run reuses every stage, a changed input re-runs its stage only; the
  two DPO stages under one root are two directories; off_policy + gkd builds without a reverse DPO
  model and trains on chosen responses."""
  from helpers import shared_smoke_stages
  from jaxopd import logs, stages, train
  from jaxopd.experiment import load_config
  from jaxopd.methods import aligndistil as M
  from jaxopd.models import table

  def config(arg="smoke"):
    c = load_config(f"aligndistil.py:{arg}")
    c.progress = False
    c.dpo.workdir, c.rdpo.workdir = str(tmp_path / "dpo"), str(tmp_path / "rdpo")
    return c

  c = config()
  with shared_smoke_stages(c):
    c = M.prepare(c, str(tmp_path / "run"))
  dirs = {n: table.parse_init(n, c.models[n].init).path for n in ("reference", "dpo", "rdpo")}
  assert [os.path.dirname(dirs[n]) for n in ("dpo", "rdpo")] == [str(tmp_path / "dpo"), str(tmp_path / "rdpo")]
  done = {n: stages.record(d) for n, d in dirs.items()}
  assert all(r["done"] for r in done.values())
  assert done["dpo"]["inputs"]["method"]["swap"] is False and done["rdpo"]["inputs"]["method"]["swap"] is True
  assert done["dpo"]["inputs"]["models"]["policy"]["init"] == c.models.reference.init   # from the SFT stage
  s = train.run(c, str(tmp_path / "run"), M.build(c))
  M.report(c, str(tmp_path / "run"), s)
  recs = logs.read_metrics(str(tmp_path / "run"), "train")
  for k in ("kl/teacher", "kl/reference", "coef/mean", "coef/max", "coef/above_10", "reward/token",
            "reward/expected", "kl/teacher_seq", "length"):
    assert k in recs[-1], k
  assert recs[0]["coef/max"] <= 100.0 + 1e-3 and 0.0 <= recs[0]["coef/above_10"] <= 1.0
  assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["kl/teacher"] < recs[0]["kl/teacher"], recs
  summ = json.load(open(tmp_path / "run" / "summary.json"))
  assert {"before", "dpo", "after"} <= set(summ) and "sample/reward" in summ["after"]
  assert summ["before"]["sample/kl_ref"] == pytest.approx(0.0, abs=1e-5)

  # A re-run reuses every stage (their records untouched); a changed input of the reverse stage
  # makes a new reverse-DPO directory and re-runs that stage only.
  again = config()
  again.rdpo.total_steps += 1
  with shared_smoke_stages(again):
    again = M.prepare(again, str(tmp_path / "run2"))
  assert {n: stages.record(d) for n, d in dirs.items()} == done
  assert again.models.dpo.init == c.models.dpo.init and again.models.reference.init == c.models.reference.init
  new = table.parse_init("rdpo", again.models.rdpo.init).path
  assert new != dirs["rdpo"] and stages.record(new)["inputs"]["total_steps"] == c.rdpo.total_steps + 1
  assert sorted(os.listdir(tmp_path / "rdpo")) == sorted([os.path.basename(dirs["rdpo"]), os.path.basename(new)])
  # Both stages under one root: two directories (the pair order is an input), not one run reused.
  same = config()
  same.rdpo.workdir = same.dpo.workdir
  assert len({stages.directory(same[n].workdir, "dpo", stages.train_inputs(stages.dpo_config(same, n)))
              for n in ("dpo", "rdpo")}) == 2

  g = config("smoke,gkd,off_policy")
  assert g.models.rdpo.init == "none" and g.method.beta2 == 10.0
  with shared_smoke_stages(g):
    g = M.prepare(g, str(tmp_path / "gkd"))
  exp = M.build(g)
  assert exp.rollout is None and set(exp.roles) == {"policy", "reference", "dpo"}
  batch = next(iter(exp.eval_data(train.DataShard(0, 0, 1, 4))))
  assert batch["tokens"].shape == (4, 2, g.seq_len)      # pairs: the loss trains their chosen side
