"""Reward sources for on-policy methods: a Python function named ``module:function``.

The function is the user's (a verifier, a heuristic, a call to a scorer), TRL's
reward-function convention: called with keyword arguments

  ``fn(prompts=list[str], completions=list[str]) -> sequence of floats``

one call per sampled batch, on the host (inside a jitted step through
``jax.pure_callback``, which hands the callback the whole batch on one device).
Prompts and completions are decoded with the run's tokenizer, special tokens
(chat-template markers, EOS, padding) removed. :func:`load` imports the
function and calls it once on a probe batch, so a wrong name, a wrong signature
or a wrong return shape is a one-line :class:`ConfigError` before anything is
compiled. At training time a non-finite reward is passed on, so the step is
non-finite and the trainer stops with its one-line error naming the step.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util

import numpy as np

from jaxopd.errors import ConfigError


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


def decode(tokenizer, tokens, loss_mask, prompt_width: int) -> tuple[list[str], list[str]]:
  """Texts of sampled rows ``tokens [B, T]``: the prompt is the first ``prompt_width`` columns
  (left-padded by the sampler), the completion the tokens where ``loss_mask`` is 1."""
  tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
  prompts, completions = [], []
  for row, m in zip(tokens.tolist(), loss_mask.tolist()):
    prompts.append(tokenizer.decode(row[:prompt_width], skip_special_tokens=True))
    completions.append(tokenizer.decode([t for t, k in zip(row, m) if k], skip_special_tokens=True))
  return prompts, completions


def load(spec: str, tokenizer, prompt_width: int, probe_prompts: list[str], field: str = "config.method.reward"):
  """``(tokens [B, T], loss_mask [B, T]) -> float32 [B]`` from the function ``spec`` names,
  checked on ``probe_prompts`` (with empty completions)."""
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

  def reward(tokens, loss_mask):
    prompts, completions = decode(tokenizer, tokens, loss_mask, prompt_width)
    return call(prompts, completions, "on sampled completions", finite=False)
  return reward
