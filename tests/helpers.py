"""Small configs and experiments shared by the trainer tests."""

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopd.data import batched_iterator, toy
from jaxopd.experiment import Experiment, LossOutput, load_module
from jaxopd.losses import sft_loss
from jaxopd.models import ModelConfig, Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = load_module(os.path.join(REPO, "experiments", "sft.py"))


def tiny_config(**overrides):
  """The SFT smoke config, quiet, with no periodic eval or checkpoint."""
  c = SFT.get_config("smoke,sort")
  c.progress = False
  c.log_every = 1
  c.eval_every = 0
  c.eval_batches = 0
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.total_steps = 4
  c.optim.warmup_steps = 1
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def two_model_experiment(config):
  """SFT on a policy plus an 'aux' model whose logits are added: two optimizer groups."""
  mcfg = ModelConfig.from_config(config.model)
  recs = toy.sort_task(256, config.seq_len, mcfg.vocab_size, config.seed, max_len=config.data.sort.max_symbols)

  def init_models(rng):
    a, b = jax.random.split(rng)
    return {"policy": Transformer(mcfg, nnx.Rngs(params=a)), "aux": Transformer(mcfg, nnx.Rngs(params=b))}, {}

  def loss_fn(params, frozen, batch, rng):
    logits = params["policy"](batch["tokens"]).logits + params["aux"](batch["tokens"]).logits
    nll, n, _ = sft_loss(logits, batch["tokens"], batch["loss_mask"])
    return LossOutput(nll, n, {})

  return Experiment(init_models=init_models, loss_fn=loss_fn,
                    train_data=lambda shard: batched_iterator(recs, shard))


def params_of(summary, name="policy"):
  return jax.device_get(nnx.to_pure_dict(summary["state"]["params"][name]))
