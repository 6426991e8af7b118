"""Reward sources (jaxopd/rewards.py): a reward model directory run on device gives transformers'
rewards; a reward function sees the prompts and completions that were sampled; mistakes in
either are one-line ConfigErrors before compile."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

import hf_fixtures  # noqa: E402
from jaxopd import rewards  # noqa: E402
from jaxopd.errors import ConfigError  # noqa: E402
from jaxopd.experiment import load_config  # noqa: E402
from jaxopd.data.tokenizer import hf_tokenizer
from jaxopd.models import Transformer, hf, table  # noqa: E402
from jaxopd.sampling import SamplingConfig, sample  # noqa: E402


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("reward_models")
  return {f: hf_fixtures.make_reward_dir(str(root / f), f, seed=3 + i) for i, f in enumerate(("qwen2", "gpt2",
                                                                                                "llama"))}


def _rows(tok, n=6, width=20, seed=0):
  """Sampler-layout rows (prompt, response, padding) with prompts and responses of unequal
  lengths, half of them ending in EOS; and the same rows unpadded."""
  rng = np.random.RandomState(seed)
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  toks, mask, rows = np.full((n, width), pad, np.int32), np.zeros((n, width), np.int32), []
  for b in range(n):
    pl, rl = rng.randint(2, 9), rng.randint(1, 9)
    r = rng.randint(5, 300, size=pl + rl).tolist()
    if b % 2 == 0:
      r[-1] = tok.eos_token_id
    toks[b, :pl + rl], mask[b, pl:pl + rl] = r, 1
    rows.append(r)
  return toks, mask, rows


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama"])
def test_reward_model_scores_as_transformers_and_exports(reward_dirs, family, tmp_path):
  """A bf16 *ForSequenceClassification directory loads as a head="score" Transformer whose reward
  on padded sampler rows equals transformers' on each row alone (float32 compute from the same bf16
  weights: within 2e-5), with transformers' pad rule: the last non-pad token is scored (Qwen2: pad
  is not EOS, so an EOS is scored; GPT-2: pad == EOS, so it is not; Llama: no pad, the last token).
  Exported, it reloads in transformers with the same rewards."""
  path = reward_dirs[family]
  model, role = table.load_model(f"hf:{path}", "reward", param_dtype="bfloat16")
  assert role.arch.head == "score" and model.lm_head is None and model.score[...].shape == (role.arch.d_model, 1)
  assert model.score[...].dtype == jnp.bfloat16
  tok = hf_tokenizer(path)
  pad = json.load(open(os.path.join(path, "config.json"))).get("pad_token_id")
  assert pad == (None if family == "llama" else tok.pad_token_id)   # jaxopd pads Llama rows with its EOS
  toks, mask, rows = _rows(tok)
  ours = np.asarray(jax.jit(lambda t, m: rewards.score(model, t, m, -1 if pad is None else pad))(toks, mask))
  theirs = hf_fixtures.torch_rewards(path, rows)
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  assert np.std(theirs) > 1e-3                     # rewards that differ between rows
  from transformers import AutoTokenizer    # as saved (jaxopd's loader gives Llama a pad, which export would write)
  out = hf.export(model, role.arch, str(tmp_path / "rm"), tokenizer=AutoTokenizer.from_pretrained(path))
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["architectures"][0].endswith("ForSequenceClassification") and len(cfg["id2label"]) == 1
  np.testing.assert_allclose(hf_fixtures.torch_rewards(out, rows), theirs, atol=1e-6)   # same bf16 weights


def test_reward_function_sees_the_sampled_prompt_and_completion(monkeypatch, tmp_path):
  """decode() of sampler rows: prompts of unequal lengths come back whole, with no response token
  in them, and the completion is the response (a user function receives exactly these)."""
  from jaxopd.models import ModelConfig
  tok = hf_fixtures.make_tokenizer("qwen2")
  texts = ["good movie", "the plot was really very boring and the ending terrible", "fun"]
  ids = [tok(t)["input_ids"] for t in texts]
  p = max(map(len, ids))
  prompt = np.full((3, p), tok.pad_token_id, np.int32)
  for i, x in enumerate(ids):
    prompt[i, :len(x)] = x
  model = Transformer(ModelConfig(vocab_size=len(tok), max_len=64), __import__("flax").nnx.Rngs(params=0))
  cfg = SamplingConfig(max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
  out = sample(model, jnp.asarray(prompt), jnp.asarray([len(x) for x in ids]), jax.random.PRNGKey(0), cfg)
  prompts, completions = rewards.decode(tok, out.tokens, out.loss_mask)
  assert prompts == texts
  toks, m = np.asarray(out.tokens), np.asarray(out.loss_mask)
  for i in range(3):
    want = tok.decode(toks[i][m[i] == 1].tolist(), skip_special_tokens=True)
    assert completions[i] == want and want != ""


def _fdpg_files_config(tmp_path, policy_dir):
  c = load_config("fdpg.py:rlhf,fkl,conditional")
  c.data.task = "files"
  c.data.files.train = hf_fixtures.write_jsonl(str(tmp_path / "p.jsonl"), hf_fixtures.prompt_records(8))
  c.data.files.eval = hf_fixtures.write_jsonl(str(tmp_path / "pe.jsonl"), hf_fixtures.prompt_records(4, 1))
  c.models.policy.init = c.models.base.init = f"hf:{policy_dir}"
  c.rollout.prompt_len, c.rollout.max_new_tokens, c.seq_len = 24, 16, 40
  return c


def test_reward_model_mistakes_are_one_line(reward_dirs, tmp_path):
  """reward=model without a reward role, a reward role the method does not use, a language model
  given as the reward model, a two-label classifier, another tokenizer: ConfigErrors naming the field."""
  from jaxopd.methods import fdpg
  lm = hf_fixtures.make_family_dir(str(tmp_path / "lm"), "qwen2")
  c = _fdpg_files_config(tmp_path, lm)
  c.method.reward = "model"
  with pytest.raises(ConfigError, match=r"config\.method\.reward='model': give the reward model's source, "
                                        r"--config\.models\.reward\.init=hf:DIR"):
    fdpg.prepare(c.copy_and_resolve_references(), str(tmp_path / "a"))
  c2 = _fdpg_files_config(tmp_path, lm)
  c2.models.reward.init = f"hf:{reward_dirs['qwen2']}"
  with pytest.raises(ConfigError, match=r"config\.models\.reward\.init='hf:.*': only config\.method\.reward=model "
                                        r"uses the reward role \(config\.method\.reward='gold'"):
    fdpg.prepare(c2, str(tmp_path / "b"))
  c.models.reward.init = f"hf:{lm}"
  with pytest.raises(ConfigError, match=r"config\.models\.reward: .*/lm is a language model, not a reward model"):
    fdpg.make_target(c, fdpg.load_data(c))
  c.models.reward.init = f"hf:{reward_dirs['gpt2']}"
  with pytest.raises(ConfigError, match=r"config\.models\.reward: the tokenizer in .*/gpt2 differs from the "
                                        r"policy's"):
    fdpg.make_target(c, fdpg.load_data(c))
  two = hf_fixtures.make_reward_dir(str(tmp_path / "two"), "qwen2")
  cfg_path = os.path.join(two, "config.json")
  hc = json.load(open(cfg_path))
  hc["id2label"], hc["label2id"] = {"0": "bad", "1": "good"}, {"bad": 0, "good": 1}
  json.dump(hc, open(cfg_path, "w"))
  with pytest.raises(ConfigError, match=r"two/config\.json: id2label has 2 labels: a reward model "
                                        r"\(Qwen2ForSequenceClassification\) has one output"):
    hf.config_from_hf(two)


@pytest.mark.parametrize("task,reward,match", [
    ("reviews", "check", r"config\.method\.reward='check' is the digits task's checker \(config\.data\.task="
                         r"'reviews'\)"),
    ("digits", "gold", r"config\.method\.reward='gold' is the reviews task's gold reward \(config\.data\.task="
                       r"'digits'\)"),
    ("files", "gold", r"config\.method\.reward='gold' is the reviews task's gold reward"),
    ("files", "bleu", r"config\.method\.reward='bleu': must be module:function or model \(the reward role"),
    ("digits", "bleu", r"config\.method\.reward='bleu': must be check \(the digits task's checker\), "
                       r"module:function or model")])
def test_a_builtin_reward_belongs_to_its_task(task, reward, match):
  """The built-in rewards are the tasks' (``jaxopd.tasks.Task.reward``): another task's is refused,
  and your files have none."""
  from jaxopd import tasks
  c = load_config("grpo.py:smoke")
  c.data.task, c.method.reward = task, reward
  with pytest.raises(ConfigError, match=match):
    tasks.check_reward(c)
  c.method.reward = "jaxopd.tasks.arithmetic:reward"
  tasks.check_reward(c)
