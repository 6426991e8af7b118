"""The one sharded train step: mesh invariance, gradient accumulation,
parameter groups, non-finite stop, the model table (sources, pinning, dtypes), the rollout hook."""

import dataclasses
import json
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import SFT, params_of, tiny_config, two_model_experiment
from jaxopd import checkpoint as ckpt_lib
from jaxopd import errors, logs, runtime, train
from jaxopd import mesh as mesh_lib
from jaxopd.errors import ConfigError
from jaxopd.models import table
from jaxopd.data import toy
from jaxopd.experiment import Experiment


def _losses(workdir):
  return np.array([r["loss"] for r in logs.read_metrics(str(workdir), "train")])


def _assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_mesh_2x2x2_matches_one_device(tmp_path):
  """data=2, fsdp=2, tensor=2 over 8 simulated devices vs one device: same
  losses and parameters after 4 AdamW steps (float32; reductions are reordered
  across devices, so equality is to 1e-5 relative)."""
  assert len(jax.devices()) == 8
  one = train.run(tiny_config(**{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1}), tmp_path / "one",
                  SFT.build(tiny_config()))
  cfg = tiny_config(**{"mesh.shape": (2, 2, 2)})
  eight = train.run(cfg, tmp_path / "eight", SFT.build(cfg))
  # The state really is sharded on all three axes.
  wq = eight.state["params"]["policy"]["blocks"][0]["attn"]["wq"]
  assert wq[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(wq[...].sharding.device_set) == 8
  np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"), rtol=1e-5)
  assert len(_losses(tmp_path / "one")) == 4
  _assert_trees_close(params_of(eight), params_of(one), rtol=1e-4, atol=1e-5)


def test_grad_accumulation_matches_full_batch(tmp_path):
  """Token-normalised over the global batch: 4 microbatches == 1 (tolerance 1e-5), in training and
  in evaluation (which runs in the same microbatches, so it needs no more memory than a step)."""
  a = train.run(tiny_config(eval_batches=2), tmp_path / "a", SFT.build(tiny_config()))
  cfg = tiny_config(grad_accum=4, eval_batches=2, **{"mesh.shape": (2, 1, 1), "mesh.num_devices": 2})
  b = train.run(cfg, tmp_path / "b", SFT.build(cfg))
  np.testing.assert_allclose(_losses(tmp_path / "b"), _losses(tmp_path / "a"), rtol=1e-5)
  _assert_trees_close(params_of(b), params_of(a), rtol=1e-4, atol=1e-5)
  assert set(a.eval) == set(b.eval) >= {"loss", "accuracy"}
  for k in a.eval:
    np.testing.assert_allclose(b.eval[k], a.eval[k], rtol=1e-5)


def test_param_groups_have_their_own_lr_and_decay(tmp_path):
  cfg = tiny_config(**{"optim.weight_decay": 0.1})
  cfg.optim.groups.aux = dict(lr=1e-9, weight_decay=0.0)
  exp = two_model_experiment(cfg)
  init_state, _ = train.Trainer(cfg, exp, train.mesh_lib.make_mesh((8, 1, 1)),
                                train.mesh_lib.rules_from_config(cfg.mesh.rules)).init()
  init = {k: jax.device_get(nnx.to_pure_dict(v)) for k, v in init_state["params"].items()}
  out = train.run(cfg, tmp_path / "g", exp)
  moved = lambda name: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                           for x, y in zip(jax.tree.leaves(params_of(out, name)), jax.tree.leaves(init[name])))
  assert moved("policy") > 1e-3
  assert moved("aux") < 1e-6
  recs = logs.read_metrics(str(tmp_path / "g"), "train")
  assert recs[-1]["lr/aux"] == pytest.approx(1e-9 * recs[-1]["lr/policy"] / cfg.optim.lr, rel=1e-4)


def test_first_moment_in_bfloat16():
  """optim.mu_dtype=bfloat16: AdamW's mu (RMSprop's momentum) is stored in bf16, the second
  moment in float32, and three updates match the float32 optimizer's to bf16 rounding (1e-2)."""
  from jaxopd import config as config_lib, optim
  rng = np.random.RandomState(0)
  params = {"policy": {"w": jnp.asarray(rng.randn(8, 8), jnp.float32), "b": jnp.zeros((8,), jnp.float32)}}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), params) for _ in range(3)]
  for name in ("adamw", "rmsprop"):
    o = config_lib.base_config().optim
    o.name = name
    updates = {}
    for dt in ("float32", "bfloat16"):
      o.mu_dtype = dt
      tx, _ = optim.make_optimizer(o, 10, ["policy"])
      st = tx.init(params)
      dts = {str(x.dtype) for x in jax.tree.leaves(st) if getattr(x, "ndim", 0) == 2}
      assert dts == ({"float32"} if dt == "float32" else {"float32", "bfloat16"}), (name, dt, dts)
      for g in grads:
        u, st = tx.update(g, st, params)
      updates[dt] = u
    _assert_trees_close(updates["bfloat16"], updates["float32"], rtol=1e-2, atol=1e-4)


def test_unknown_optimizer_group_is_an_error(tmp_path):
  cfg = tiny_config()
  cfg.optim.groups.mask = dict(lr=1e-3)
  with pytest.raises(ValueError, match="config.optim.groups.*mask"):
    train.run(cfg, tmp_path / "x", SFT.build(cfg))


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(total_steps=8, **{"checkpoint.every": 2})
  base = SFT.build(cfg)
  recs = toy.sort_task(64, cfg.seq_len, cfg.model.vocab_size, 0, max_len=cfg.data.sort.max_symbols)

  def poisoned(poison_at):
    def train_data(shard):   # batch number poison_at (1-based) carries a poison flag
      ds = grain.MapDataset.source(recs).repeat(None).batch(shard.local_batch).map_with_index(
          lambda i, b: {**b, "poison": np.full((shard.local_batch,), float(i + 1 == poison_at), np.float32)})
      return iter(ds.to_iter_dataset())

    def loss_fn(models, batch, rng):
      out = base.loss_fn(models, batch, rng)
      return out._replace(loss=jnp.where(jnp.sum(batch["poison"]) > 0, jnp.nan, out.loss))
    return Experiment(roles=base.roles, loss_fn=loss_fn, train_data=train_data)

  nan_dir = tmp_path / "nan"
  with pytest.raises(errors.TrainingError, match=f"step 5: non-finite loss.* Last good checkpoint: step 4 in "
                                                f"{nan_dir}/checkpoints$"):
    train.run(cfg, nan_dir, poisoned(5))
  c = ckpt_lib.Checkpointer(str(nan_dir / "checkpoints"))
  assert c.latest_step() == 4
  assert [r["step"] for r in logs.read_metrics(str(nan_dir), "train")] == [1, 2, 3, 4]
  # Before the first checkpoint, the message says there is none (it once said "step None").
  with pytest.raises(errors.TrainingError, match=r"step 1: non-finite loss.* No checkpoint was written before it$"):
    train.run(cfg, tmp_path / "nan1", poisoned(1))


def test_model_table_run_source_pinned_and_resume_checks(tmp_path):
  """config.models: a role starts from another run's checkpoint (run:WORKDIR:MODEL@STEP); the
  step of an unpinned source is pinned in models.json, so a resume reloads that step even
  after the source trained on; a resume whose source changed is refused in one line naming
  the role; a missing or extra role is a ConfigError before compile."""
  src_cfg = tiny_config(total_steps=4, **{"checkpoint.every": 2})
  src = train.run(src_cfg, tmp_path / "src", SFT.build(src_cfg))
  rec = json.load(open(tmp_path / "src" / "models.json"))
  assert rec["policy"]["source"] == "random" and rec["policy"]["arch"]["vocab_size"] == 32
  cfg = tiny_config(total_steps=1, **{"optim.lr": 1e-12})
  cfg.models.policy.init = f"run:{tmp_path / 'src'}"
  dst = train.run(cfg, tmp_path / "dst", SFT.build(cfg))
  _assert_trees_close(params_of(dst), params_of(src), rtol=0, atol=1e-8)
  rec = json.load(open(tmp_path / "dst" / "models.json"))["policy"]
  assert rec["source"] == f"run:{tmp_path / 'src'}:policy@4" and rec["init"] == cfg.models.policy.init

  # An explicit older step.
  cfg2 = tiny_config(total_steps=1, **{"optim.lr": 1e-12})
  cfg2.models.policy.init = f"run:{tmp_path / 'src'}:policy@2"
  at2 = train.run(cfg2, tmp_path / "at2", SFT.build(cfg2))
  assert not np.allclose(jax.tree.leaves(params_of(at2))[0], jax.tree.leaves(params_of(src))[0])

  # Resume with a different source: refused before anything is written.
  cfg.total_steps = 2
  cfg.models.policy.init = f"run:{tmp_path / 'src'}:policy@2"
  with pytest.raises(ConfigError, match=r"config\.models\.policy: cannot resume .*dst: its source differs"):
    train.run(cfg, tmp_path / "dst", SFT.build(cfg))
  # The source's weights rewritten at the pinned step: refused too.
  cfg.models.policy.init = f"run:{tmp_path / 'src'}"
  victim = next(p for p in (tmp_path / "src" / "checkpoints" / "4" / "params").rglob("*") if p.is_file()
                and p.stat().st_size > 100)
  victim.write_bytes(b"x" * victim.stat().st_size)
  with pytest.raises(ConfigError, match=r"config\.models\.policy: cannot resume .*its weight files changed"):
    train.run(cfg, tmp_path / "dst", SFT.build(cfg))

  bad = tiny_config()
  bad.models.reference = table.role(trainable=False)
  with pytest.raises(ConfigError, match=r"config\.models\.reference: this experiment uses no role 'reference'"):
    train.run(bad, tmp_path / "x", SFT.build(bad))
  bad = tiny_config()
  bad.models.policy.init = f"run:{tmp_path / 'nowhere'}"
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.init=.*nowhere.*has no checkpoints"):
    SFT.build(bad)
  bad.models.policy.init = "stage:sft"
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.init='stage:sft': a pipeline stage not filled"):
    SFT.build(bad)
  bad.models.policy.init = "random"
  bad.models.policy.param_dtype = "float16"
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.param_dtype='float16': must be one of"):
    SFT.build(bad)
  bad.models.policy.param_dtype = "float32"
  bad.models.policy.matmul_dtype = "float16"
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.matmul_dtype='float16': must be empty"):
    SFT.build(bad)
  bad.models.policy.matmul_dtype = "bfloat16"
  assert table.arch(bad, "policy").matmul_dtype == "bfloat16"


def test_frozen_role_in_bfloat16_halves_its_bytes(tmp_path):
  """A frozen role with param_dtype=bfloat16 is held in bf16 (half the bytes per device of
  float32) and loads the float32 source rounded to bf16."""
  src_cfg = tiny_config(total_steps=1)
  train.run(src_cfg, tmp_path / "src", SFT.build(src_cfg))
  cfg = tiny_config(total_steps=1, **{"mesh.shape": (2, 4, 1)})
  exp = two_model_experiment(cfg)
  for dt in ("float32", "bfloat16"):
    cfg.models.aux = table.role(init=f"run:{tmp_path / 'src'}", trainable=False, param_dtype=dt)
    trainer = train.Trainer(cfg, dataclasses.replace(exp, roles={"policy": True, "aux": False}),
                            mesh_lib.make_mesh((2, 4, 1)), mesh_lib.DEFAULT_RULES)
    with jax.set_mesh(trainer.mesh):
      state, frozen = trainer.init()
      state, frozen = trainer.load_sources(state, frozen)
    leaves = jax.tree.leaves(frozen["aux"])
    assert {x.dtype for x in leaves} == {np.dtype(dt)}
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    if dt == "float32":
      f32_bytes, f32 = per_device, [np.asarray(x) for x in leaves]
    else:
      assert per_device * 2 == f32_bytes
      for a, b in zip(leaves, f32):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b.astype("bfloat16").astype(np.float32))


def test_rollout_hook_feeds_the_loss(tmp_path):
  """An on-policy hook runs inside the step before the loss, without gradient."""
  cfg = tiny_config(total_steps=1)
  base = SFT.build(cfg)

  def rollout(models, batch, rng):
    assert isinstance(models["policy"], nnx.Module)
    return {**batch, "loss_mask": jnp.ones_like(batch["loss_mask"])}

  exp = Experiment(roles=base.roles, loss_fn=base.loss_fn, train_data=base.train_data,
                   rollout=rollout)
  out = train.run(cfg, tmp_path / "r", exp)
  assert out.train["count"] == cfg.batch_size * (cfg.seq_len - 1)


def test_workdir_lock_is_exclusive_and_reports_a_stale_lock_file(tmp_path, capsys):
  """The lock is held until released (a second taker gets WorkdirBusy naming the holder); a lock
  file left by a dead run (non-empty, lock free) is reported and taken over."""
  first = runtime.WorkdirLock(str(tmp_path))
  with pytest.raises(runtime.WorkdirBusy, match=rf'{tmp_path} is in use by another run \(.*"pid": {os.getpid()}'):
    runtime.WorkdirLock(str(tmp_path))
  first.release()
  assert (tmp_path / ".lock").read_text() == ""            # a clean exit leaves it empty
  runtime.WorkdirLock(str(tmp_path)).release()
  assert "did not exit cleanly" not in capsys.readouterr().out
  (tmp_path / ".lock").write_text('{"pid": 1, "host": "gone"}')   # as a SIGKILLed run leaves it
  again = runtime.WorkdirLock(str(tmp_path))
  assert 'was left by a run that did not exit cleanly ({"pid": 1, "host": "gone"})' in capsys.readouterr().out
  again.release()


def test_resume_refuses_changed_training_fields_unless_allowed(tmp_path):
  """Resuming with a field that changes what is trained (here the learning rate) is refused in one
  line naming the field and both values, with nothing written; length and cadence may change, and
  config.resume_changes allows a named field explicitly."""
  w = tmp_path / "w"
  cfg = tiny_config(total_steps=2)
  cfg.checkpoint.every = 2
  train.run(cfg, w, SFT.build(cfg))
  before = (w / "config.json").read_text()
  bad = tiny_config(total_steps=3, **{"optim.lr": cfg.optim.lr * 2})
  with pytest.raises(ConfigError, match=rf"cannot resume {w}: fields that change what is trained differ from its "
                                        rf"config.json: optim.lr \({cfg.optim.lr!r} -> {cfg.optim.lr * 2!r}\); use a "
                                        rf"new --workdir, or allow them with --config.resume_changes="):
    train.run(bad, w, SFT.build(bad))
  assert (w / "config.json").read_text() == before and not (w / "checkpoints" / "3").exists()
  longer = tiny_config(total_steps=3, **{"log_every": 2})       # length and cadence may change
  assert train.run(longer, w, SFT.build(longer)).step == 3
  bad.total_steps = 4
  bad.resume_changes = ("optim.lr",)
  assert train.run(bad, w, SFT.build(bad)).step == 4


def test_resume_with_another_method_is_refused_and_not_offered(tmp_path):
  """A workdir of one method never resumes as another: the message offers no resume_changes, and
  ``('*',)`` does not let it through."""
  w = tmp_path / "w"
  cfg = tiny_config(total_steps=1)
  train.run(cfg, w, SFT.build(cfg))
  other = tiny_config(total_steps=2, **{"method.name": "redi", "resume_changes": ("*",)})
  with pytest.raises(ConfigError, match=rf"cannot resume {w}: it is a sft run and config\.method\.name='redi'; a "
                                        rf"run resumes only with its own method \(no resume_changes allows") as e:
    logs.check_resume_config(str(w), other)
  assert "--config.resume_changes=" not in str(e.value)


def test_sft_with_packed_rows_trains(tmp_path, capsys):
  """config.method.pack: the sort task's examples packed several per row (printed with the fill);
  the loss falls; evaluation stays one example per row (the same eval records as unpacked)."""
  cfg = tiny_config(total_steps=30, **{"method.pack": True, "eval_batches": 2, "optim.lr": 3e-3})
  s = train.run(cfg, tmp_path / "packed", SFT.build(cfg))
  out = capsys.readouterr().out
  m = re.search(r"packing: (\d+) examples into (\d+) rows of 16 tokens \(([\d.]+)% filled\)", out)
  assert m and int(m[2]) < int(m[1]), out
  losses = [r["loss"] for r in logs.read_metrics(str(tmp_path / "packed"), "train")]
  assert losses[-1] < losses[0] - 0.2, losses
  assert "loss" in s.eval


def test_evaluation_runs_in_training_microbatches():
  """The compiled eval step of a 32-row batch with grad_accum 4 needs a fraction of the temporary
  memory of the whole batch at once (XLA's memory analysis of the compiled step; 688 -> 177 KB
  when measured)."""
  from jaxopd.experiment import DataShard
  temp = {}
  for accum in (1, 4):
    cfg = tiny_config(grad_accum=accum, batch_size=32, **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
    exp = SFT.build(cfg)
    tr = train.Trainer(cfg, exp, train.mesh_lib.make_mesh((1, 1, 1), 1), train.mesh_lib.DEFAULT_RULES)
    with jax.set_mesh(tr.mesh):
      state, frozen = tr.init()
      b = tr.to_global(next(exp.eval_data(DataShard(0, 0, 1, 32))), 32)
      temp[accum] = tr.compiled_eval_step(b).lower(state, frozen, b).compile().memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.5 * temp[1], temp


def test_an_eval_set_smaller_than_one_batch_is_a_config_error_before_anything_compiles(tmp_path, monkeypatch):
  """Three eval records and a batch of 8: one line naming the source and config.batch_size, before the
  state is initialised (it used to be a traceback at the first evaluation, after training)."""
  from jaxopd.data.pipeline import batched_iterator
  cfg = tiny_config(eval_every=2, eval_batches=1)
  base = SFT.build(cfg)
  few = toy.sort_task(3, cfg.seq_len, table.arch(cfg, "policy").vocab_size, cfg.seed, max_len=cfg.data.sort.max_symbols)
  exp = Experiment(roles=base.roles, loss_fn=base.loss_fn, train_data=base.train_data,
                   eval_data=lambda shard: batched_iterator(few, shard, shuffle=False, repeat=False))
  monkeypatch.setattr(train.Trainer, "init", lambda self: pytest.fail("the state was initialised"))
  with pytest.raises(ConfigError, match=r"^the evaluation set: dataset of 3 records is smaller than one batch "
                                        rf"\(1 x {cfg.batch_size}\), config.batch_size={cfg.batch_size}: "):
    train.run(cfg, tmp_path / "r", exp)
  cfg.data.task, cfg.data.files.eval = "files", "pairs_eval.jsonl"    # a user's file is named
  with pytest.raises(ConfigError, match=r"^config.data.files.eval='pairs_eval.jsonl': dataset of 3 records"):
    train.run(cfg, tmp_path / "r2", exp)


def test_a_second_ctrl_c_during_a_checkpoint_says_what_was_saved(tmp_path, monkeypatch):
  """Python raises KeyboardInterrupt where a second Ctrl-C lands; in the checkpoint of step 4 (after
  step 2's completed) the run stops with Interrupted naming step 2 as the latest complete checkpoint,
  not "nothing of this run was saved"."""
  cfg = tiny_config(total_steps=6)
  cfg.checkpoint.every = 2
  save = ckpt_lib.Checkpointer.save

  def interrupted_at_4(self, state, *a, **kw):
    if int(jax.device_get(state["step"])) == 4:
      raise KeyboardInterrupt
    return save(self, state, *a, **kw)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", interrupted_at_4)
  with pytest.raises(runtime.Interrupted, match=rf"interrupted \(a second Ctrl-C\) at step 4; the latest complete "
                                              rf"checkpoint is step 2 in {tmp_path / 'w'}/checkpoints: re-run"):
    train.run(cfg, tmp_path / "w", SFT.build(cfg))
