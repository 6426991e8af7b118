"""Your own files (``task=files``, :func:`jaxopd.data.suite.file_records`): TRL-format records
encoded by the policy's tokenizer (or ``config.data.files.tokenizer``); no gold reward, so no
sampled evaluation."""

from __future__ import annotations

from jaxopd.errors import ConfigError
from jaxopd.data import suite as suite_lib
from jaxopd.models import table
from jaxopd.tasks import Prompts, SftData


def sft_data(config, arch) -> SftData:
  """``text``, prompt-completion or messages records, the loss on the completions."""
  tok, train, evals = suite_lib.file_records(config.data, "lm", config.seq_len,
                                             default_tokenizer=table.tokenizer_dir(config))
  if len(tok) > arch.vocab_size:
    raise ConfigError(f"config.models.policy: its vocab_size={arch.vocab_size} is smaller than the "
                      f"tokenizer's {len(tok)} tokens")
  if config.eval.num_prompts:
    raise ConfigError("config.eval.num_prompts: sampled evaluation needs the reviews task's gold reward; "
                      "set it to 0 with task=files")
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0   # as jaxopd.data.formats pads
  return SftData(train, evals or [], pad_id)


def pair_data(config):
  """``(train_records, test_records, None)``: your preference pair files."""
  _, train, test = suite_lib.file_records(config.data, "preference", config.seq_len,
                                          default_tokenizer=table.tokenizer_dir(config))
  return train, test, None


def prompts(config) -> Prompts:
  """Your prompt files, encoded to ``config.rollout.prompt_len`` tokens (the tokenizer: the first
  role's, in the config's order, whose directory holds one)."""
  f = config.data.files
  if f.get("max_prompt_len", 0) and f.max_prompt_len != config.rollout.prompt_len:
    raise ConfigError(f"config.data.files.max_prompt_len={f.max_prompt_len}: prompts for rollouts are encoded to "
                      f"config.rollout.prompt_len={config.rollout.prompt_len} (leave the files field at 0)")
  default = next((d for d in (table.tokenizer_dir(config, n) for n in config.models) if d), "")
  tok, train, test = suite_lib.file_records(config.data, "prompt", config.seq_len,
                                            max_prompt_len=config.rollout.prompt_len, default_tokenizer=default)
  return Prompts(tok, train, test)
