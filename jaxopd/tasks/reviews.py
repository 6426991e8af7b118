"""The reviews task (the controlled suite of :mod:`jaxopd.data.reviews`): its sampled evaluation
with the gold reward, shared by every method that trains on it."""

from __future__ import annotations

import jax
import numpy as np

from jaxopd.data import suite as suite_lib
from jaxopd.evaluation import evaluate_policy
from jaxopd.sampling import SamplingConfig


def evaluate(config, suite):
  """``evaluate(models, step)``: samples of the policy on held-out prompts (``config.eval``), their
  gold reward, KL to the reference (when there is one), entropy and distinct-n (``sample/...``)."""
  e = config.eval
  prompts = suite_lib.prompt_records(suite, "test", e.prompt_len, verbose=False)[:e.num_prompts]
  prompt = np.stack([p["prompt"] for p in prompts])
  plen = np.stack([p["prompt_len"] for p in prompts])
  scfg = SamplingConfig(max_new_tokens=e.max_new_tokens, eos_id=suite.tokenizer.eos_token_id,
                        pad_id=suite.tokenizer.pad_token_id, temperature=e.temperature)
  reward_fn = suite_lib.gold_reward_fn(suite)
  rng = jax.random.PRNGKey(config.seed + 1)   # the same samples' randomness at every eval

  def run(models, step):
    res = evaluate_policy(models["policy"], models.get("reference"), prompt, plen, rng, scfg, reward_fn)
    return {f"sample/{k}": v for k, v in res.items()}
  return run
