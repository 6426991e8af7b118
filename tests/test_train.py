"""The one sharded train step: mesh invariance, gradient accumulation,
parameter groups, non-finite stop, init_from, the rollout hook."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import SFT, params_of, tiny_config, two_model_experiment
from jaxopd import checkpoint as ckpt_lib
from jaxopd import logs, train
from jaxopd.data import batched_iterator, toy
from jaxopd.experiment import Experiment, LossOutput
from jaxopd.losses import sft_loss


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
  wq = eight["state"]["params"]["policy"]["blocks"][0]["attn"]["wq"]
  assert wq[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(wq[...].sharding.device_set) == 8
  np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"), rtol=1e-5)
  assert len(_losses(tmp_path / "one")) == 4
  _assert_trees_close(params_of(eight), params_of(one), rtol=1e-4, atol=1e-5)


def test_grad_accumulation_matches_full_batch(tmp_path):
  """Token-normalised over the global batch: 4 microbatches == 1 (tolerance 1e-5)."""
  a = train.run(tiny_config(), tmp_path / "a", SFT.build(tiny_config()))
  cfg = tiny_config(grad_accum=4, **{"mesh.shape": (2, 1, 1), "mesh.num_devices": 2})
  b = train.run(cfg, tmp_path / "b", SFT.build(cfg))
  np.testing.assert_allclose(_losses(tmp_path / "b"), _losses(tmp_path / "a"), rtol=1e-5)
  _assert_trees_close(params_of(b), params_of(a), rtol=1e-4, atol=1e-5)


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


def test_unknown_optimizer_group_is_an_error(tmp_path):
  cfg = tiny_config()
  cfg.optim.groups.mask = dict(lr=1e-3)
  with pytest.raises(ValueError, match="config.optim.groups.*mask"):
    train.run(cfg, tmp_path / "x", SFT.build(cfg))


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(total_steps=8, **{"checkpoint.every": 2})
  base = SFT.build(cfg)
  poison_at = 5

  recs = toy.sort_task(64, cfg.seq_len, cfg.model.vocab_size, 0, max_len=cfg.data.sort.max_symbols)

  def train_data(shard):   # batch number poison_at (1-based) carries a poison flag
    ds = grain.MapDataset.source(recs).repeat(None).batch(shard.local_batch).map_with_index(
        lambda i, b: {**b, "poison": np.full((shard.local_batch,), float(i + 1 == poison_at), np.float32)})
    return iter(ds.to_iter_dataset())

  def loss_fn(params, frozen, batch, rng):
    out = base.loss_fn(params, frozen, batch, rng)
    return out._replace(loss=jnp.where(jnp.sum(batch["poison"]) > 0, jnp.nan, out.loss))

  exp = Experiment(init_models=base.init_models, loss_fn=loss_fn, train_data=train_data)
  with pytest.raises(train.TrainingError, match=f"step {poison_at}: non-finite loss"):
    train.run(cfg, tmp_path / "nan", exp)
  c = ckpt_lib.Checkpointer(str(tmp_path / "nan" / "checkpoints"))
  assert c.latest_step() == 4
  assert [r["step"] for r in logs.read_metrics(str(tmp_path / "nan"), "train")] == [1, 2, 3, 4]


def test_init_from_loads_another_runs_policy(tmp_path):
  src = train.run(tiny_config(), tmp_path / "src", SFT.build(tiny_config()))
  cfg = tiny_config(total_steps=1, **{"init_from.workdir": str(tmp_path / "src"), "optim.lr": 1e-12})
  dst = train.run(cfg, tmp_path / "dst", SFT.build(cfg))
  _assert_trees_close(params_of(dst), params_of(src), rtol=0, atol=1e-8)
  cfg.init_from.targets = ("reference",)
  with pytest.raises(ValueError, match="init_from.targets.*reference"):
    train.run(cfg, tmp_path / "dst2", SFT.build(cfg))


def test_rollout_hook_feeds_the_loss(tmp_path):
  """An on-policy hook runs inside the step before the loss, without gradient."""
  cfg = tiny_config(total_steps=1)
  base = SFT.build(cfg)

  def rollout(params, frozen, batch, rng):
    assert isinstance(params["policy"], nnx.Module)
    return {**batch, "loss_mask": jnp.ones_like(batch["loss_mask"])}

  exp = Experiment(init_models=base.init_models, loss_fn=base.loss_fn, train_data=base.train_data,
                   rollout=rollout)
  out = train.run(cfg, tmp_path / "r", exp)
  assert out["train"]["weight"] == cfg.batch_size * (cfg.seq_len - 1)
