"""DistillSpec: the rollout's data sources, the loss, on-policy TVD training on a
toy pair raising the measured acceptance, and the pipeline on smoke sizes."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config, tiny_models
from jaxopd import stages, train
from jaxopd.data import batched_iterator
from jaxopd.experiment import Experiment, load_config
from jaxopd import mesh as mesh_lib
from jaxopd.methods import distillspec as DS
from jaxopd.models import ModelConfig, hf, table
from jaxopd.sampling import SamplingConfig, sample


V, P, N = 24, 4, 8
SCFG = SamplingConfig(max_new_tokens=N, eos_id=2, pad_id=0)
TARGET = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, max_len=32, init_std=1.0)
DRAFT = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_len=32)


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(rng.integers(1, P + 1))
    prompt = np.zeros(P, np.int32)
    prompt[0] = 1
    prompt[1:k] = rng.integers(4, V, k - 1)
    tokens = rng.integers(4, V, P + N).astype(np.int32)
    mask = np.zeros(P + N, np.int32)
    mask[P:] = 1
    out.append({"prompt": prompt, "prompt_len": np.int32(k), "tokens": tokens, "loss_mask": mask})
  return out


ARCHS = {"draft": DRAFT, "target": TARGET}
SEEDS = tuple(jax.random.split(jax.random.PRNGKey(0)))   # the draft's and the target's parameters


def _batch(n=4):
  recs = _records(n)
  return {k: jnp.asarray(np.stack([r[k] for r in recs])) for k in recs[0]}


def _rollout_fn(data, **kw):
  models = tiny_models(ARCHS, tuple(ARCHS), SEEDS)
  return jax.jit(lambda b, k: DS.make_rollout(data, SCFG, **kw)(models, b, k))


def test_each_data_source():
  batch, key = _batch(), jax.random.PRNGKey(3)
  models = tiny_models(ARCHS, tuple(ARCHS), SEEDS)
  draw = jax.jit(lambda model, k: sample(model, batch["prompt"], batch["prompt_len"], k, SCFG).tokens,
                 static_argnums=0)
  out = _rollout_fn("fixed")(batch, key)
  np.testing.assert_array_equal(out["tokens"], batch["tokens"])
  assert float(out["student"].sum()) == 0
  teacher = _rollout_fn("teacher")
  np.testing.assert_array_equal(teacher(batch, key)["tokens"], draw(models["target"], key))
  student = _rollout_fn("student")
  out = student(batch, key)
  np.testing.assert_array_equal(out["tokens"], draw(models["draft"], key))
  assert float(out["student"].min()) == 1 and out["loss_mask"][:, P:].sum() > 0
  # mixed: a coin per batch from the key (reproducible): the draft's samples with the generation
  # half of the key, or the other source.
  for other, ref in (("fixed", lambda k: batch["tokens"]), ("teacher", lambda k: teacher(batch, k)["tokens"])):
    mixed = _rollout_fn("mixed", mix_lambda=0.5, mix_with=other)
    coins = []
    for i in range(40 if other == "fixed" else 4):
      k = jax.random.PRNGKey(i)
      out = mixed(batch, k)
      coins.append(float(out["student"][0]))
      want = student(batch, jax.random.split(k)[1])["tokens"] if coins[-1] else ref(jax.random.split(k)[1])
      np.testing.assert_array_equal(out["tokens"], want)
    assert other == "teacher" or 8 <= sum(coins) <= 32


def test_loss_is_token_sum_of_divergence_against_numpy_and_zero_at_equal_models():
  """The loss against a NumPy float64 divergence of the two models' logits at temperature 2 (both
  divided by it), with and without classic distillation's T^2 scaling; zero at equal models."""
  from test_loss_references import np_div
  models = tiny_models(ARCHS, tuple(ARCHS), SEEDS)
  batch = _batch()
  p = np.asarray(models["target"](batch["tokens"]).logits[:, :-1])
  q = np.asarray(models["draft"](batch["tokens"]).logits[:, :-1])
  m = np.asarray(batch["loss_mask"][:, 1:], np.float64)
  for name in ("fkl", "rkl", "jsd", "tvd"):
    want = float(np.sum(np_div(name, p, q, beta=0.5, temperature=2.0) * m))
    out = DS.make_loss_fn(name, 0.5, 2.0)(models, batch, None)
    np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)
    assert float(out.count) == float(m.sum())
    scaled = DS.make_loss_fn(name, 0.5, 2.0, t2_scale=True)(models, batch, None)
    np.testing.assert_allclose(float(scaled.loss), 4.0 * want, rtol=1e-5)
  same = {"draft": models["target"], "target": models["target"]}
  for name in ("fkl", "rkl", "jsd", "tvd"):
    out = DS.make_loss_fn(name)(same, batch, None)
    assert abs(float(out.loss)) < 1e-5
    assert float(out.metrics["acceptance/sampling"]) == pytest.approx(float(out.count), rel=1e-5)


def test_on_policy_tvd_raises_measured_acceptance(tmp_path):
  """A random peaked target and a small random draft; 60 steps of on-policy TVD."""
  from jaxopd.sampling import speculative_sample
  c = tiny_config(total_steps=60, batch_size=16, seq_len=P + N, **{"optim.lr": 1e-2, "optim.warmup_steps": 5})
  # a random peaked target (init_std 1) and a small draft, as HF dirs
  models = tiny_models(ARCHS, tuple(ARCHS), SEEDS)
  hf.export(models["draft"], DRAFT, str(tmp_path / "draft"))
  hf.export(models["target"], TARGET, str(tmp_path / "target"))
  c.models = ml_collections.ConfigDict({"draft": table.role(init=f"hf:{tmp_path / 'draft'}"),
                                        "target": table.role(init=f"hf:{tmp_path / 'target'}", trainable=False)})
  recs = _records(256)
  exp = Experiment(roles={"draft": True, "target": False}, loss_fn=DS.make_loss_fn("tvd"),
                   train_data=lambda shard: batched_iterator(recs, shard),
                   rollout=DS.make_rollout("student", SCFG))
  eval_b = {k: jnp.asarray(np.stack([r[k] for r in _records(64, 1)])) for k in recs[0]}
  key = jax.random.PRNGKey(7)

  def measured(draft, target):
    draft, target = DS.on_one_device(draft), DS.on_one_device(target)
    prefix = DS.prefix_acceptance(target, draft, eval_b["prompt"], eval_b["prompt_len"], key, SCFG)
    sd = jax.jit(lambda: speculative_sample(target, draft, eval_b["prompt"], eval_b["prompt_len"], key, SCFG, 3))()
    return prefix, float(sd.acceptance_rate)

  before = measured(models["draft"], models["target"])
  s = train.run(c, str(tmp_path / "toy"), exp)
  models = s.trainer.models(s.state, s.frozen)
  after = measured(models["draft"], models["target"])
  print("acceptance before", before, "after", after)
  assert after[0] > before[0] + 0.1, (before, after)      # 1 - TVD on draft prefixes
  assert after[1] > before[1] + 0.1, (before, after)      # speculative sampling's acceptance rate


@pytest.mark.pipeline
def test_smoke_pipeline_and_report(tmp_path, capsys):
  from helpers import shared_smoke_stages
  c = load_config("distillspec.py:smoke,mixed")
  c.target.config = "sft.py"     # the target is the smoke SFT base the other pipelines share (its recipe)
  c.draft_sft.workdir = str(tmp_path / "draft")
  c.progress = False
  with shared_smoke_stages(c, sft_field="target"):
    c = DS.prepare(c, str(tmp_path / "run"))
  s = train.run(c, str(tmp_path / "run"), DS.build(c))
  DS.report(c, str(tmp_path / "run"), s)
  draft = table.parse_init("draft", c.models.draft.init).path   # the target stage may come from another test
  assert os.path.dirname(draft) == str(tmp_path / "draft") and stages.record(draft)["done"]
  ev = s.eval
  for k in ("loss", "acceptance/greedy", "acceptance/sampling", "nll/draft", "nll/target", "alpha/greedy",
            "alpha/sampling", "sample/reward", "sample/kl_ref"):
    assert k in ev, k
  assert 0 <= ev["alpha/sampling"] <= 1 and 0 <= s.train["data/student"] <= 1
  from jaxopd import logs
  train_recs = logs.read_metrics(str(tmp_path / "run"), "train")
  assert train_recs[-1]["loss"] < train_recs[0]["loss"], train_recs   # distillation moved the draft
  summ = json.load(open(tmp_path / "run" / "summary.json"))
  assert set(summ["quality"]) == {"target", "draft_sft", "distilled"}
  assert summ["quality"]["target"]["kl_ref"] == pytest.approx(0.0, abs=1e-5)
  sd = summ["drafts"]["distilled"]["greedy"]
  assert len(sd["tau_formula"]) == c.eval.max_gamma and set(sd["sd"]) == {"2"}
  run = sd["sd"]["2"]
  assert 1.0 <= run["tau"] <= 3.0 and run["ms_per_token"] > 0 and summ["timing"]["cost_ratio"] > 0
  assert os.path.getsize(tmp_path / "run" / "summary.png") > 1000

  # The GKD baseline's switch: quality evaluation only (no acceptance, SD runs or timings).
  g = load_config("distillspec.py:smoke,gkd")
  assert (g.method.divergence, g.method.data, g.eval.mode) == ("jsd", "mixed", "quality")
  c.eval.mode = "quality"
  models = s.trainer.models(s.state, s.frozen)
  ev = DS.make_evaluate(c, DS.load_data(c))(models, 0)
  assert "sample/reward" in ev and "alpha/greedy" not in ev

  # Distil the target first: this run's distilled draft is the next run's frozen target (no SFT stage).
  t = load_config("distillspec.py:smoke")
  t.data.data_dir, t.draft_sft.workdir, t.progress = c.data.data_dir, c.draft_sft.workdir, False
  t.target.workdir, t.target.source = str(tmp_path / "run"), "draft"
  for k, v in c.model.items():
    t.target.model[k] = v
  t = DS.prepare(t, str(tmp_path / "run2"))
  assert t.models.target.init == f"run:{tmp_path / 'run'}:draft"
  tr = train.Trainer(t, DS.build(t), mesh_lib.make_mesh((8, 1, 1)), mesh_lib.DEFAULT_RULES)
  with jax.set_mesh(tr.mesh):
    state, frozen2 = tr.load_sources(*tr.init())
  got = jax.tree.leaves(frozen2["target"])
  want = jax.tree.leaves(nnx.state(models["draft"], nnx.Param))
  assert len(got) == len(want) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))


def test_bad_fields_are_config_errors(tmp_path):
  from jaxopd.errors import ConfigError
  for field, value, msg in [("divergence", "kl", "config.method.divergence='kl'"),
                            ("data", "web", "config.method.data='web'"),
                            ("beta", 0.3, "only divergence=jsd uses beta"),
                            ("mix_lambda", 0.2, "only data=mixed"),
                            ("max_new_tokens", 10, "must equal seq_len")]:
    c = load_config("distillspec.py:smoke")
    c.method[field] = value
    with pytest.raises(ConfigError, match=msg):
      DS.prepare(c, str(tmp_path / "w"))
  c = load_config("distillspec.py:smoke")
  c.target.source = "teacher"
  with pytest.raises(ConfigError, match="config.target.source='teacher'"):
    DS.prepare(c, str(tmp_path / "w"))
  c.target.source, c.target.workdir = "draft", str(tmp_path / "none")
  with pytest.raises(ConfigError, match="config.target.workdir=.*no checkpoint"):
    DS.prepare(c, str(tmp_path / "w"))
