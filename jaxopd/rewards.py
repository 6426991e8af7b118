"""Reward sources for on-policy methods: a Python function named ``module:function``, or a
reward model (``model``: the run's ``reward`` role, a Hugging Face sequence-classification
directory run on device by :func:`score`). Usage: experiments/design.md, "Bring your own model and data".

The function is the user's (a verifier, a heuristic, a call to a scorer), in TRL's convention
``fn(prompts=list[str], completions=list[str]) -> sequence of floats`` on the decoded texts
(:func:`decode`). :func:`load` imports it and calls it once on a probe batch, so a wrong name, a
wrong signature or a wrong return shape is a one-line :class:`ConfigError` before anything is
compiled. A reward model reads the policy's token ids, so it must share the policy's tokenizer
(:func:`check_model`); one with another tokenizer is a ``module:function`` reward that re-tokenizes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.errors import ConfigError

MODEL = "model"       # config.method.reward: the reward role of the model table


def is_function(spec: str) -> bool:
  """``"pkg.module:function"``."""
  mod, sep, fn = spec.partition(":")
  return bool(sep and mod and fn and "/" not in mod)


def fingerprint(spec: str) -> str:
  """A hash of the source file of ``spec``'s module (cached fits that depend on the reward
  are refitted when its code changes); "" when the module has no source file."""
  found = importlib.util.find_spec(spec.partition(":")[0])
  path = getattr(found, "origin", None)
  if not path or not path.endswith(".py"):
    return ""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def score(model, tokens: jax.Array, loss_mask: jax.Array, pad_id: int) -> jax.Array:
  """``[B]`` float32 rewards of a ``head="score"`` model on sampled rows ``tokens [B, T]``
  (the sampler's layout: prompt, response, then padding; ``loss_mask`` 1 on the response).

  The row's real tokens are those up to its last response token; the reward is the score
  at the last of them that is not ``pad_id`` (transformers' rule; with ``pad == eos`` the EOS is not
  scored; ``pad_id=-1``: the last)."""
  idx = jnp.arange(tokens.shape[1])
  end = jnp.max(jnp.where(loss_mask.astype(bool), idx, -1), axis=1) + 1     # one past the response
  real = idx[None, :] < end[:, None]
  out = model(tokens, attention_mask=real).logits[..., 0].astype(jnp.float32)
  at = jnp.max(jnp.where(real & (tokens != pad_id), idx, 0), axis=1)
  return jnp.take_along_axis(out, at[:, None], axis=1)[:, 0]


def check_model(policy_tokenizer, reward_dir: str, arch, field: str = "config.models.reward"):
  """A reward role's architecture and tokenizer against the run's: a score head, and the
  policy's vocabulary (the reward model reads the policy's token ids)."""
  if arch.head != "score":
    raise ConfigError(f"{field}: {reward_dir or 'its source'} is a language model, not a reward model "
                      f"(config.json architectures: *ForSequenceClassification with num_labels=1)")
  if arch.vocab_size < len(policy_tokenizer):
    raise ConfigError(f"{field}: its vocab_size={arch.vocab_size} is smaller than the policy tokenizer's "
                      f"{len(policy_tokenizer)} tokens")
  if reward_dir:
    from jaxopd.data.tokenizer import hf_tokenizer
    theirs = hf_tokenizer(reward_dir)
    if theirs is not None and theirs.get_vocab() != policy_tokenizer.get_vocab():
      raise ConfigError(f"{field}: the tokenizer in {reward_dir} differs from the policy's: a reward model run "
                        f"on device reads the policy's token ids (score with another tokenizer through a "
                        f"module:function reward)")


def check_config(c, builtin: str, what: str) -> None:
  """``config.method.reward`` against the model table: ``builtin`` (the task's own reward,
  described by ``what``; None: the task has none), ``module:function``, or ``model`` with a ``reward`` role that has a
  source; a reward role that nothing uses is refused too. One-line :class:`ConfigError`s."""
  from jaxopd.models import table
  r = c.method.reward
  if r not in (builtin, MODEL) and not is_function(r):
    raise ConfigError(f"config.method.reward={r!r}: must be " + (f"{builtin} ({what}), " if builtin else "") +
                      "module:function or model (the reward role: --config.models.reward.init=hf:DIR)")
  if r == MODEL and not table.built(c, "reward"):
    raise ConfigError("config.method.reward='model': give the reward model's source, "
                      "--config.models.reward.init=hf:DIR (a *ForSequenceClassification directory)")
  if r != MODEL and table.built(c, "reward"):
    raise ConfigError(f"config.models.reward.init={c.models.reward.init!r}: only config.method.reward=model uses "
                      f"the reward role (config.method.reward={r!r}; leave the init at none)")


def pad_id(hf_dir: str) -> int:
  """The pad id a reward model's ``config.json`` gives (-1: none; then :func:`score` scores the
  last token)."""
  if not hf_dir:
    return -1
  with open(os.path.join(hf_dir, "config.json")) as f:
    pad = json.load(f).get("pad_token_id")
  return -1 if pad is None else int(pad)


def decode(tokenizer, tokens, loss_mask) -> tuple[list[str], list[str]]:
  """Texts of sampled rows ``tokens [B, T]`` (prompt, response, padding): the completion is the
  tokens where ``loss_mask`` is 1, the prompt the tokens before it; special tokens (chat-template
  markers, EOS, padding) removed."""
  tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
  prompts, completions = [], []
  for row, m in zip(tokens.tolist(), loss_mask.tolist()):
    start = m.index(1) if 1 in m else len(row)
    prompts.append(tokenizer.decode(row[:start], skip_special_tokens=True))
    completions.append(tokenizer.decode([t for t, k in zip(row, m) if k], skip_special_tokens=True))
  return prompts, completions


def load(spec: str, tokenizer, probe_prompts: list[str], field: str = "config.method.reward"):
  """``(tokens [B, T], loss_mask [B, T]) -> float32 [B]`` from the function ``spec`` names,
  checked on ``probe_prompts`` (with empty completions). It is called once per sampled batch, on
  the host (inside a jitted step through ``jax.pure_callback``, which hands it the whole batch on
  one device)."""
  if not is_function(spec):
    raise ConfigError(f"{field}={spec!r}: must be 'module:function' (a module on the Python path)")
  mod_name, _, fn_name = spec.partition(":")
  try:
    module = importlib.import_module(mod_name)
  except Exception as e:   # the user's module: any import-time error is theirs to see, in one line
    raise ConfigError(f"{field}={spec!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ConfigError(f"{field}={spec!r}: {mod_name} has no function {fn_name!r}")

  def call(prompts, completions, where, finite=True):
    try:
      out = np.asarray(fn(prompts=prompts, completions=completions), np.float64)
    except Exception as e:
      raise ConfigError(f"{field}={spec!r}: {where}: {type(e).__name__}: {e} (it is called as "
                        f"fn(prompts=list[str], completions=list[str]) -> floats)") from None
    if out.shape != (len(prompts),):
      raise ConfigError(f"{field}={spec!r}: {where}: returned shape {out.shape} for {len(prompts)} completions "
                        f"(one float each)")
    if finite and not np.all(np.isfinite(out)):
      raise ConfigError(f"{field}={spec!r}: {where}: returned non-finite rewards {out[~np.isfinite(out)][:4]}")
    return out.astype(np.float32)

  call(list(probe_prompts), [""] * len(probe_prompts), "on a probe batch")
  faults: list[str] = []

  def reward(tokens, loss_mask):
    """Inside a step (a host callback): a failure or a non-finite reward is recorded for
    :attr:`reward.fault` and zeros are returned, so the step completes on every device."""
    try:
      prompts, completions = decode(tokenizer, tokens, loss_mask)
      out = call(prompts, completions, "on sampled completions", finite=False)
    except ConfigError as e:
      faults.append(str(e))
      return np.zeros((len(np.asarray(tokens)),), np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
      faults.append(f"{field}={spec!r}: returned {int(bad.sum())} non-finite rewards of {bad.size} "
                    f"(e.g. {out[bad][0]}) on sampled completions")
      out = np.where(bad, 0.0, out).astype(np.float32)
    return out

  reward.fault = lambda: faults[0] if faults else None
  return reward
