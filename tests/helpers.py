"""Small configs and experiments shared by the trainer tests."""

import contextlib
import fcntl
import os
import tempfile

import jax
from flax import nnx

from jaxopd.data import batched_iterator, toy
from jaxopd.experiment import Experiment, LossOutput, load_config
from jaxopd.losses import sft_loss
from jaxopd.methods import sft as SFT  # noqa: F401  (shared by the tests)
from jaxopd.models import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_models(cfg, roles, seeds=None) -> dict:
  """Random models by role of ``ModelConfig`` ``cfg`` (or a dict of one per role), the i-th role's
  parameters seeded ``seeds[i]`` (an int or a PRNG key; default ``i``): the loss tests' models."""
  from jaxopd.models import Transformer
  seeds = range(len(roles)) if seeds is None else seeds
  return {n: Transformer(cfg[n] if isinstance(cfg, dict) else cfg, nnx.Rngs(params=s)) for n, s in zip(roles, seeds)}


def tiny_config(**overrides):
  """The SFT smoke config, quiet, with no periodic eval or checkpoint."""
  return quiet(load_config("sft.py:smoke,sort"), 4, **{"optim.warmup_steps": 1, **overrides})


def quiet(c, steps: int, **overrides):
  """``c`` for a test: ``steps`` steps, no progress bar, every step logged, no periodic evaluation
  or checkpoint (the final checkpoint written synchronously), no warm-up; then ``overrides``
  (dotted field names)."""
  c.progress = False
  c.total_steps = steps
  c.log_every = 1
  c.eval_every = 0
  c.eval_batches = 0
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.optim.warmup_steps = 0
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def two_model_experiment(config):
  """SFT on a policy plus an 'aux' model whose logits are added: two optimizer groups
  (adds the role ``aux`` to ``config.models``)."""
  config.models.aux = table.role()
  mcfg = table.arch(config, "policy")
  recs = toy.sort_task(256, config.seq_len, mcfg.vocab_size, config.seed, max_len=config.data.sort.max_symbols)

  def loss_fn(models, batch, rng):
    logits = models["policy"](batch["tokens"]).logits + models["aux"](batch["tokens"]).logits
    nll, n, _ = sft_loss(logits, batch["tokens"], batch["loss_mask"])
    return LossOutput(nll, n, {})

  return Experiment(roles={"policy": True, "aux": True}, loss_fn=loss_fn,
                    train_data=lambda shard: batched_iterator(recs, shard))


def params_of(summary, name="policy"):
  return jax.device_get(nnx.to_pure_dict(summary.state["params"][name]))


DIGITS_STAGES = {"sft": "digits_sft_base", "teacher": "digits_teacher"}   # GRPO's and REDI's smoke stages


@contextlib.contextmanager
def shared_smoke_stages(config, sft_field: str = "sft", stages: dict | None = None):
  """Points ``config`` at one data dir and SFT base shared by the smoke pipelines
  of this test session (TDPO, SparsePO, f-DPG, AlignDistil use the same smoke SFT
  stage; DistillSpec's target is the same run, ``sft_field="target"``) and holds
  a lock while the caller runs its ``prepare`` (stages are cached, so the first
  test builds them and the others reuse them). The directory is keyed by the
  pytest-xdist run id, so a new session never sees a stale base. ``stages``
  (config field -> directory name) replaces ``{sft_field: "sft_base"}`` (the digits
  task's SFT base and teacher, shared by GRPO's and REDI's smoke tests)."""
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
  root = os.path.join(tempfile.gettempdir(), f"jaxopd-smoke-{run}")
  os.makedirs(root, exist_ok=True)
  config.data.data_dir = os.path.join(root, "data")
  for field, name in (stages or {sft_field: "sft_base"}).items():
    config[field].workdir = os.path.join(root, name)
  with open(os.path.join(root, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield config
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
