"""REDI: the loss of the method on padded pairs of unequal lengths against an independent NumPy
float64 implementation (value and gradient direction), the paper's identity (alpha = 0 is
the per-sequence token-normalised SFT loss on the positives), and a smoke run of the pipeline
on 8 simulated devices whose loss leaves its start by gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_models
from jaxopd.losses import sft_loss
from jaxopd.methods import redi as R
from jaxopd.models import ModelConfig, Transformer

V = 13


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _pairs(seed=0, b=4, t=10):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, V, size=(b, 2, t)).astype(np.int32)
  mask = np.zeros((b, 2, t), np.int32)
  for i in range(b):
    for j in range(2):
      s = rng.randint(1, 4)
      mask[i, j, s:rng.randint(s + 1, t + 1)] = 1
  return {"tokens": tokens, "loss_mask": mask}


CFG = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_len=32)


def np_redi(logits, tokens, mask, alpha):
  """float64: per pair -lp(y+)/|y+| + alpha lp(y-)/|y-| from the full logits [B, 2, T, V]."""
  lp = np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64))[:, :, :-1], tokens[:, :, 1:, None],
                          -1)[..., 0]
  m = mask[:, :, 1:].astype(np.float64)
  s, n = (m * lp).sum(-1), m.sum(-1)
  return -s[:, 0] / n[:, 0] + alpha * s[:, 1] / n[:, 1], s / n


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_loss_matches_numpy_on_padded_pairs(alpha):
  models, batch = tiny_models(CFG, ("policy", "reference")), _pairs()
  b, _, t = batch["tokens"].shape
  logits = np.asarray(models["policy"](jnp.asarray(batch["tokens"].reshape(b * 2, t))).logits).reshape(b, 2, t, V)
  want, norm = np_redi(logits, batch["tokens"], batch["loss_mask"], alpha)
  out = nnx.jit(lambda ms: R.make_loss_fn(alpha, True)(ms, batch, None))(models)
  assert float(out.count) == b
  np.testing.assert_allclose(float(out.loss), want.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(out.metrics["logps/chosen_norm"]), norm[:, 0].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(out.metrics["logps/margin_norm"]), (norm[:, 0] - norm[:, 1]).sum(), rtol=1e-5)
  # the reference only enters the metric: the loss's gradient does not depend on it
  gd, st = nnx.split(models["reference"])
  g = jax.jit(jax.grad(lambda p: R.make_loss_fn(alpha, True)({**models, "reference": nnx.merge(gd, p)}, batch,
                                                               None).loss))(st)
  assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(g))


def test_alpha_zero_is_token_normalised_sft_on_the_positives():
  """Identity: alpha = 0 equals the SFT loss on y+, normalised per sequence, then the mean over pairs."""
  models, batch = tiny_models(CFG, ("policy", "reference")), _pairs(seed=3)
  pos, pos_m = batch["tokens"][:, 0], batch["loss_mask"][:, 0]
  logits = models["policy"](jnp.asarray(pos)).logits
  per_seq = []
  for i in range(pos.shape[0]):
    nll, n, _ = sft_loss(logits[i:i + 1], jnp.asarray(pos[i:i + 1]), jnp.asarray(pos_m[i:i + 1]))
    per_seq.append(float(nll) / float(n))
  out = R.make_loss_fn(0.0, False)(models, batch, None)
  np.testing.assert_allclose(float(out.loss) / float(out.count), np.mean(per_seq), rtol=1e-5)
  assert "logps/chosen_change" not in out.metrics


@pytest.mark.pipeline
def test_smoke_pipeline(tmp_path):
  """REDI after TDPO's cached stages (the session's shared smoke SFT base and pairs): the loss
  falls, the positives' log-likelihood change is logged from step 1 (0 at the start: policy ==
  reference), and with reference=none the method builds without it."""
  from helpers import shared_smoke_stages
  from jaxopd import logs, train
  from jaxopd.experiment import load_config
  c = load_config("redi.py:smoke")
  c.progress = False
  with shared_smoke_stages(c):
    c = R.prepare(c, str(tmp_path / "run"))
  s = train.run(c, str(tmp_path / "run"), R.build(c))
  recs = logs.read_metrics(str(tmp_path / "run"), "train")
  assert abs(recs[0]["logps/chosen_change"]) < 0.05 and recs[-1]["loss"] < recs[0]["loss"], recs
  for k in ("logps/chosen_norm", "logps/rejected_norm", "logps/margin_norm", "rewards/accuracies",
            "sample/reward", "sample/kl_ref"):
    assert k in s.eval, k
  c.models.reference.init = "none"
  assert set(R.build(c).roles) == {"policy"}


def _np_logps(logits, tokens, mask):
  lp = np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64))[:, :, :-1], tokens[:, :, 1:, None],
                          -1)[..., 0]
  m = mask[:, :, 1:].astype(np.float64)
  return (m * lp).sum(-1), m.sum(-1)


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("loss,beta,gamma", [("simpo", 2.0, 1.0), ("simpo", 2.5, 0.3), ("dpo", 0.1, 1.0)])
def test_the_baselines_simpo_and_dpo_match_numpy_on_padded_pairs(loss, beta, gamma):
  """SimPO: -log sigmoid(beta (lp+/|y+| - lp-/|y-|) - gamma), no reference gradient; DPO: -log
  sigmoid(beta ((lp+ - ref+) - (lp- - ref-))) with sums over each response; both in float64 here."""
  models, batch = tiny_models(CFG, ("policy", "reference")), _pairs(seed=5)
  b, _, t = batch["tokens"].shape
  run = lambda ms: ms(jnp.asarray(batch["tokens"].reshape(b * 2, t))).logits
  s, n = _np_logps(np.asarray(run(models["policy"])).reshape(b, 2, t, V), batch["tokens"], batch["loss_mask"])
  r, _ = _np_logps(np.asarray(run(models["reference"])).reshape(b, 2, t, V), batch["tokens"], batch["loss_mask"])
  if loss == "simpo":
    want = -_np_log_sigmoid(beta * (s[:, 0] / n[:, 0] - s[:, 1] / n[:, 1]) - gamma)
  else:
    want = -_np_log_sigmoid(beta * ((s[:, 0] - r[:, 0]) - (s[:, 1] - r[:, 1])))
  fn = R.make_loss_fn(0.8, True, loss, beta, gamma)
  out = nnx.jit(lambda ms: fn(ms, batch, None))(models)
  np.testing.assert_allclose(float(out.loss), want.sum(), rtol=1e-5)
  gd, st = nnx.split(models["reference"])
  g = jax.jit(jax.grad(lambda p: fn({**models, "reference": nnx.merge(gd, p)}, batch, None).loss))(st)
  ref_grad = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g))
  assert ref_grad == 0    # the reference is detached (DPO) or unused (SimPO)
  if loss == "simpo":     # reference-free: the loss does not change when the reference does
    other = {**models, "reference": Transformer(models["reference"].cfg, nnx.Rngs(params=7))}
    np.testing.assert_allclose(float(fn(other, batch, None).loss), float(out.loss), rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    ({"loss": "ipo"}, r"config\.method\.loss='ipo': must be one of"),
    ({"loss": "simpo", "alpha": 0.5}, r"config\.method\.alpha=0\.5: only loss=redi uses alpha"),
    ({"beta": 0.1}, r"config\.method\.beta: loss=redi uses neither beta nor gamma"),
    ({"loss": "dpo", "beta": 0.1, "gamma": 0.5}, r"config\.method\.gamma=0\.5: only loss=simpo"),
])
def test_loss_options_that_would_be_ignored_are_refused(change, match):
  from jaxopd.errors import ConfigError
  from jaxopd.experiment import load_config
  c = load_config("redi.py:smoke")
  for k, v in change.items():
    c.method[k] = v
  with pytest.raises(ConfigError, match=match):
    R._check(c)
