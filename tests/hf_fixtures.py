"""Tiny Hugging Face checkpoints set up like the real families, made in code.

Each :func:`make_family_dir` directory holds a random ``transformers`` model
saved in **bfloat16** safetensors and a byte-level BPE tokenizer trained here,
with the special tokens of its family:

* ``qwen2``: no BOS, ``eos = <|im_end|>``, ``pad = <|endoftext|>``, the ChatML
  chat template, q/k/v biases, tied embeddings (as Qwen2-0.5B);
* ``llama``: ``bos = <s>`` prepended, ``eos = </s>``, no pad token, a chat
  template, untied head, GQA;
* ``gpt2``: ``bos = eos = pad = <|endoftext|>``, learned positions, no chat
  template.

Plus :func:`write_jsonl` for TRL-format records.
"""

from __future__ import annotations

import json
import os

import numpy as np

WORDS = ("the a good bad movie film plot actor was is great terrible boring fun story ending music scene "
         "really very not quite and but with love hate liked it this that one two three").split()
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA_CHAT = ("{% for message in messages %}{{ '[' + message['role'] + '] ' + message['content'] + ' </s>' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "llama": ["<unk>", "<s>", "</s>"],
            "gpt2": ["<|endoftext|>"]}


def sentences(n: int, seed: int = 0) -> list[str]:
  rng = np.random.RandomState(seed)
  return [" ".join(rng.choice(WORDS, rng.randint(3, 9))) for _ in range(n)]


def make_tokenizer(family: str, vocab_size: int = 320):
  """A byte-level BPE ``PreTrainedTokenizerFast`` with ``family``'s special tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS[family],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(sentences(400), trainer)
  kw = {}
  if family == "qwen2":
    kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
  elif family == "llama":
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAMA_CHAT)
  else:
    kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)


def hf_config(family: str, vocab_size: int, d_model: int = 32, n_layers: int = 2, max_len: int = 64):
  import transformers
  if family == "gpt2":
    return transformers.GPT2Config(vocab_size=vocab_size, n_positions=max_len, n_embd=d_model, n_layer=n_layers,
                                   n_head=4, bos_token_id=None, eos_token_id=None)
  common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                bos_token_id=None, eos_token_id=None)
  if family == "qwen2":
    return transformers.Qwen2Config(tie_word_embeddings=True, **common)
  return transformers.LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, **common)


def make_family_dir(path: str, family: str, seed: int = 0, dtype: str = "bfloat16", **arch) -> str:
  """A checkpoint directory of ``family`` (model in ``dtype`` + tokenizer); returns ``path``."""
  import torch
  import transformers
  tok = make_tokenizer(family)
  config = hf_config(family, len(tok), **arch)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
  model.to(getattr(torch, dtype)).save_pretrained(path)
  tok.save_pretrained(path)
  return path


def make_reward_dir(path: str, family: str, seed: int = 0, dtype: str = "bfloat16", pooled: bool = False,
                    **arch) -> str:
  """A reward model of ``family`` (``*ForSequenceClassification``, one label, the family's
  pad id in its config, random weights in ``dtype``) with the family's tokenizer; returns ``path``.

  ``pooled`` (llama/qwen2): query and key projections zero and the output projections scaled
  up, so every layer attends uniformly to the tokens so far and the score at the last token is
  mostly a function of their average: a reward a policy can raise within a few steps by
  changing which tokens it writes, as a trained reward model's often is."""
  import torch
  import transformers
  tok = make_tokenizer(family)
  config = hf_config(family, len(tok), **arch)
  config.num_labels = 1
  config.pad_token_id = tok.pad_token_id
  torch.manual_seed(seed)
  model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
    if pooled:
      for name, p in model.named_parameters():
        if ".q_proj." in name or ".k_proj." in name:
          p.zero_()
        elif ".o_proj." in name:
          p.mul_(10.0)
  model.to(getattr(torch, dtype)).save_pretrained(path)
  tok.save_pretrained(path)
  return path


def torch_rewards(path: str, rows: list[list[int]]) -> np.ndarray:
  """transformers' float32 rewards of the reward model in ``path`` on each unpadded row alone."""
  import torch
  import transformers
  model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return np.array([model(torch.tensor([r])).logits[0, 0].item() for r in rows])


def torch_logits(path: str, tokens: np.ndarray) -> np.ndarray:
  """transformers' float32 logits of the checkpoint in ``path`` (its weights upcast)."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def write_jsonl(path: str, records: list[dict]) -> str:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return path


def preference_records(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
  s = sentences(3 * n, seed)
  out = []
  for i in range(n):
    p, c, r = s[3 * i], s[3 * i + 1], s[3 * i + 2]
    if conversational:
      out.append({"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                  "rejected": [{"role": "assistant", "content": r}]})
    else:
      out.append({"prompt": p, "chosen": " " + c, "rejected": " " + r})
  return out


def prompt_records(n: int, seed: int = 0) -> list[dict]:
  return [{"prompt": p} for p in sentences(n, seed)]


def family_dirs(root: str) -> dict[str, str]:
  """One directory per family under ``root`` (made once)."""
  out = {}
  for i, family in enumerate(("gpt2", "llama", "qwen2")):
    path = os.path.join(root, family)
    if not os.path.isfile(os.path.join(path, "config.json")):
      make_family_dir(path, family, seed=i)
    out[family] = path
  return out


def shorter_is_better(prompts, completions, **_):
  """A ``module:function`` reward for tests: shorter completions score higher."""
  return [-len(c) / 10 for c in completions]
