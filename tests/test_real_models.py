"""Real formats end to end: tiny bfloat16 Qwen2 / Llama / GPT-2 checkpoint directories with
family-like tokenizers (tests/hf_fixtures.py) and TRL-format JSONL files go through SFT, DPO,
TDPO and SparsePO by config fields alone (no jaxopd SFT stage), on 8 simulated devices; the
trained policy exports to a directory transformers loads with the same logits."""

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

import hf_fixtures  # noqa: E402
from helpers import REPO, quiet  # noqa: E402
from jaxopd import logs, stages, train  # noqa: E402
from jaxopd import methods  # noqa: E402
from jaxopd.experiment import load_config  # noqa: E402
from jaxopd.data.tokenizer import hf_tokenizer
from jaxopd.models import export, hf, table  # noqa: E402
from jaxopd.errors import ConfigError  # noqa: E402

EXP = {n: methods.get(n) for n in methods.NAMES}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
  return hf_fixtures.family_dirs(str(tmp_path_factory.mktemp("families")))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("jsonl")
  w = hf_fixtures.write_jsonl
  return {
      "pairs": w(str(root / "pairs.jsonl"), hf_fixtures.preference_records(48)),
      "pairs_eval": w(str(root / "pairs_eval.jsonl"), hf_fixtures.preference_records(16, seed=1)),
      "chat_pairs": w(str(root / "chat.jsonl"), hf_fixtures.preference_records(48, conversational=True)),
      "sft": w(str(root / "sft.jsonl"), [{"prompt": r["prompt"], "completion": r["chosen"]}
                                          for r in hf_fixtures.preference_records(48, seed=2)]),
  }


def _quiet(c, steps=3):
  return quiet(c, steps, **{"batch_size": 8, "seq_len": 64, "eval_batches": 1, "optim.lr": 1e-3,
                            "mesh.shape": (2, 2, 2)})


def _run(module, c, workdir):
  m = EXP[module]
  c = m.prepare(c, str(workdir))
  return c, train.run(c, str(workdir), m.build(c))


@pytest.mark.pipeline
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tdpo_from_hf_dir_and_jsonl_then_export(families, files, family, tmp_path, capsys):
  """TDPO2 with policy and a bfloat16 frozen reference from a bf16 HF directory, on JSONL pairs
  (conversational with Qwen2's chat template); the tokenizer defaults to the policy's
  directory. The first step's loss is log 2 (policy == reference), training moves it; the
  exported policy reloads in transformers with logits within 1e-4 of jaxopd's."""
  path = families[family]
  c = _quiet(load_config("tdpo.py:tdpo2"))
  c.data.task = "files"
  c.data.files.train = files["chat_pairs" if family == "qwen2" else "pairs"]
  c.data.files.eval = files["pairs_eval"] if family == "llama" else ""
  c.models.policy.init = f"hf:{path}"
  c.models.reference.init = f"hf:{path}"
  c.models.reference.param_dtype = "bfloat16"
  c, out = _run("tdpo", c, tmp_path / "tdpo")
  printed = capsys.readouterr().out
  assert f"tokenizer: {path}" in printed and "48 records: 48 kept, 0 truncated, 0 dropped" in printed, printed
  losses = [r["loss"] for r in logs.read_metrics(str(tmp_path / "tdpo"), "train")]
  assert losses[0] == pytest.approx(np.log(2), abs=1e-4)
  assert abs(losses[-1] - losses[0]) > 1e-3, losses
  assert {x.dtype for x in jax.tree.leaves(out.frozen["reference"])} == {np.dtype("bfloat16")}
  rec = json.load(open(tmp_path / "tdpo" / "models.json"))
  assert rec["reference"]["source"] == f"hf:{path}" and rec["reference"]["arch"]["param_dtype"] == "bfloat16"
  if family == "llama":
    assert "rewards/accuracies" in out.eval

  assert export.main(["--workdir", str(tmp_path / "tdpo"), "--out", str(tmp_path / "exp"),
                  "--tokenizer", path]) == 0
  tokens = np.random.RandomState(0).randint(0, 320, (2, 16))
  policy = out.trainer.models(out.state, out.frozen)["policy"]
  ours = np.asarray(jax.jit(lambda t: policy(t).logits)(tokens))
  diff = np.abs(hf_fixtures.torch_logits(str(tmp_path / "exp"), tokens) - ours).max()
  print(f"{family}: trained policy exported (float32): max |logits diff| {diff:.2e}")
  assert diff < 1e-4
  # bf16 export: the weights rounded to bf16, so the logits move by about bf16's relative precision.
  hf.export(policy, policy.cfg, str(tmp_path / "exp16"), dtype="bfloat16")
  diff16 = np.abs(hf_fixtures.torch_logits(str(tmp_path / "exp16"), tokens) - ours).max()
  print(f"{family}: bf16 export: max |logits diff| {diff16:.2e} (logits up to {np.abs(ours).max():.1f})")
  assert diff16 < 0.05 * np.abs(ours).max()


@pytest.mark.pipeline
def test_sft_and_sparsepo_from_hf_dirs(families, files, tmp_path):
  """SFT (prompt/completion JSONL) from the bf16 GPT-2 directory (bos = eos = pad) and
  SparsePO (learned masks, initialised at 1) from the Qwen2 one, by fields only; each trains (its loss
  leaves the starting value)."""
  c = _quiet(load_config("sft.py"))
  c.data.task = "files"
  c.data.files.train = files["sft"]
  c.eval.num_prompts = 0
  c.models.policy.init = f"hf:{families['gpt2']}"
  c, out = _run("sft", c, tmp_path / "sft")
  losses = [r["loss"] for r in logs.read_metrics(str(tmp_path / "sft"), "train")]
  assert losses[-1] < losses[0] - 1e-3, losses

  s = _quiet(load_config("sparsepo.py"))
  s.data.task = "files"
  s.data.files.train = files["pairs"]
  s.models.policy.init = s.models.reference.init = f"hf:{families['qwen2']}"
  # "ones" starts the mask at 1 (= TDPO1); the default "positive" init is tested in test_sparsepo.
  s.method.mask_init = "ones"
  s, out = _run("sparsepo", s, tmp_path / "sparsepo")
  losses = [r["loss"] for r in logs.read_metrics(str(tmp_path / "sparsepo"), "train")]
  assert abs(losses[-1] - losses[0]) > 1e-4, losses
  assert set(out.state["params"]) == {"policy", "mask"}


@pytest.mark.pipeline
def test_gkd_from_hf_dirs_on_a_prompt_file(families, tmp_path):
  """GKD (JSD(0.5), mixed student/teacher batches) with a bf16 Qwen2-style target and a smaller
  draft of the same tokenizer, both HF directories, on a JSONL file of conversational prompts (chat
  template, no BOS, pad != eos), by fields only on (2, 2, 2). Distillation brings the draft closer
  to the target on held-out prompts: the sampled sequence KL(draft || target) falls."""
  from jaxopd.methods import distillspec
  draft_dir = hf_fixtures.make_family_dir(str(tmp_path / "draft"), "qwen2", seed=5, d_model=16, n_layers=1)
  chat = lambda recs: [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in recs]
  c = _quiet(load_config("distillspec.py:gkd"), steps=30)
  c.data.task = "files"
  c.data.files.train = hf_fixtures.write_jsonl(str(tmp_path / "p.jsonl"), chat(hf_fixtures.prompt_records(64)))
  c.data.files.eval = hf_fixtures.write_jsonl(str(tmp_path / "pe.jsonl"), chat(hf_fixtures.prompt_records(16, 1)))
  c.models.draft.init = f"hf:{draft_dir}"
  c.models.target.init = f"hf:{families['qwen2']}"
  c.method.mix_with = "teacher"             # prompts only: the other source is the teacher's samples
  c.method.prompt_len, c.method.max_new_tokens, c.seq_len = 40, 16, 56
  c.data.over_length = "truncate"           # a longer prompt keeps its end (counted in the log)
  c.eval.max_new_tokens, c.eval.num_prompts, c.eval.sd_gammas = 16, 16, (2,)
  c.optim.lr = 1e-2
  with pytest.raises(Exception, match=r"config\.models\.draft\.init='stage:draft_sft': with task=files"):
    bad = c.copy_and_resolve_references()
    bad.models.draft.init = "stage:draft_sft"
    distillspec.prepare(bad, str(tmp_path / "bad"))
  data = distillspec.load_data(c)
  assert data.tokenizer.bos_token is None and data.tokenizer.eos_token == "<|im_end|>"
  assert data.prompt.shape == (16, 40) and len(data.train) == 64
  before_models = {n: table.load_model(c.models[n].init, n)[0] for n in ("draft", "target")}
  before = distillspec.make_evaluate(c, data)(before_models, 0)
  c, out = _run("distillspec", c, tmp_path / "gkd")
  after = out.eval
  print(f"GKD on files: KL(draft||target) {before['sample/kl_ref']:.3f} -> {after['sample/kl_ref']:.3f}, "
        f"entropy {before['sample/entropy']:.3f} -> {after['sample/entropy']:.3f}")
  assert after["sample/kl_ref"] < 0.8 * before["sample/kl_ref"], (before, after)
  assert "sample/reward" not in after and "alpha/greedy" not in after      # no gold reward; quality mode
  recs = logs.read_metrics(str(tmp_path / "gkd"), "train")
  assert {r["data/student"] for r in recs} == {0.0, 1.0}     # one coin per step: both sources were drawn
  distillspec.report(c, str(tmp_path / "gkd"), out)
  summ = json.load(open(tmp_path / "gkd" / "summary.json"))
  assert summ["eval"]["sample/kl_ref"] == pytest.approx(after["sample/kl_ref"])


REWARD_MODULE = '''
def vowels(prompts, completions):
  """The fraction of a completion's characters that are vowels (a user's host-side reward)."""
  assert len(prompts) == len(completions)
  return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def wrong_length(prompts, completions):
  return [0.0]
'''


@pytest.mark.pipeline
def test_fdpg_rlhf_from_hf_dir_with_a_reward_function(families, tmp_path, monkeypatch):
  """f-DPG toward P = a exp(r / beta) with r a user function named module:function (called on the
  decoded prompts and completions), policy and base from the bf16 Qwen2-style directory, one context
  per prompt of a JSONL file, by fields only on (2, 2, 2): the reward of held-out samples rises. A
  function that returns the wrong shape is a one-line error before compile."""
  from jaxopd import errors
  from jaxopd.methods import fdpg
  (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  c = _quiet(load_config("fdpg.py:rlhf,fkl,conditional"), steps=30)
  c.data.task = "files"
  c.data.files.train = hf_fixtures.write_jsonl(str(tmp_path / "p.jsonl"), hf_fixtures.prompt_records(32))
  c.data.files.eval = hf_fixtures.write_jsonl(str(tmp_path / "pe.jsonl"), hf_fixtures.prompt_records(8, 1))
  c.data.data_dir = str(tmp_path / "data")       # the target fit's cache
  c.models.policy.init = c.models.base.init = f"hf:{families['qwen2']}"
  c.method.reward = "my_rewards:vowels"
  c.method.reward_beta = 0.05
  c.method.fit_samples = 256
  c.rollout.prompt_len, c.rollout.max_new_tokens, c.seq_len = 24, 16, 40
  c.eval.contexts, c.eval.num_samples = 4, 64
  c.optim.lr = 3e-3
  bad = c.copy_and_resolve_references()
  bad.method.reward = "my_rewards:wrong_length"
  with pytest.raises(errors.ConfigError, match=r"config\.method\.reward='my_rewards:wrong_length': on a probe "
                                               r"batch: returned shape \(1,\) for 2 completions"):
    fdpg.make_target(bad, fdpg.load_data(bad))
  c, out = _run("fdpg", c, tmp_path / "fdpg")
  base_reward = json.load(open(tmp_path / "fdpg" / "target.json"))["base_reward"]
  after = out.eval["sample/alignment"]
  print(f"f-DPG with a reward function: reward of base samples {base_reward:.4f} -> policy {after:.4f}")
  assert after > base_reward + 0.02, (base_reward, after)


@pytest.mark.pipeline
def test_fdpg_rlhf_with_a_reward_model_directory(families, tmp_path):
  """f-DPG toward P = a exp(r / beta) with r a bf16 Qwen2ForSequenceClassification directory (the
  frozen reward role, run on device inside the step, the policy's tokenizer) by fields only on
  (2, 2, 2): the reward of held-out samples goes from the base's toward the target's own (its
  importance-sampled estimate from the fit); the target fit's cache key holds the reward model's
  fingerprint."""
  rm = hf_fixtures.make_reward_dir(str(tmp_path / "rm"), "qwen2", seed=5, pooled=True)
  c = _quiet(load_config("fdpg.py:rlhf,fkl,conditional"), steps=30)
  c.data.task = "files"
  c.data.files.train = hf_fixtures.write_jsonl(str(tmp_path / "p.jsonl"), hf_fixtures.prompt_records(32))
  c.data.files.eval = hf_fixtures.write_jsonl(str(tmp_path / "pe.jsonl"), hf_fixtures.prompt_records(8, 1))
  c.data.data_dir = str(tmp_path / "data")
  c.models.policy.init = c.models.base.init = f"hf:{families['qwen2']}"
  c.method.reward = "model"
  c.models.reward.init = f"hf:{rm}"
  c.models.reward.param_dtype = "bfloat16"
  c.method.reward_beta = 0.03
  c.method.fit_samples = 256
  c.rollout.prompt_len, c.rollout.max_new_tokens, c.seq_len = 24, 16, 40
  c.eval.contexts, c.eval.num_samples = 4, 64
  c.optim.lr = 3e-3
  c, out = _run("fdpg", c, tmp_path / "fdpg")
  fit = json.load(open(tmp_path / "fdpg" / "target.json"))
  assert stages.record(fit["stage"])["inputs"]["reward_source"] == table.fingerprint(table.parse_init("reward", f"hf:{rm}"))
  rec = json.load(open(tmp_path / "fdpg" / "models.json"))
  assert rec["reward"]["trainable"] is False and rec["reward"]["arch"]["head"] == "score"
  after, base, target = out.eval["sample/alignment"], fit["base_reward"], fit["target_reward"]
  print(f"f-DPG with a reward model: reward of base samples {base:.4f} -> policy {after:.4f} "
        f"(the target's {target:.4f})")
  # the policy went a good part of the way to the target's reward, well beyond the noise of 64 samples
  assert target > base and after - base > 0.4 * (target - base), (base, after, target)
  assert after - base > 3 * fit["base_reward_std"] / np.sqrt(c.eval.num_samples), (base, after, fit)


def test_hf_model_id_resolves_offline_to_the_local_cache(families, tmp_path, monkeypatch):
  """``hf:org/name`` is the snapshot of that id in the local Hugging Face cache (the hub's
  layout: models--org--name/refs/main -> snapshots/<commit>/); an id not in the cache is one line."""
  import shutil
  from huggingface_hub import constants
  from jaxopd.errors import ConfigError
  cache = tmp_path / "hub"
  commit = "0123456789abcdef0123456789abcdef01234567"
  snap = cache / "models--acme--tiny-qwen" / "snapshots" / commit
  shutil.copytree(families["qwen2"], snap)
  (cache / "models--acme--tiny-qwen" / "refs").mkdir()
  (cache / "models--acme--tiny-qwen" / "refs" / "main").write_text(commit)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.chdir(tmp_path)                    # no directory named acme/ here
  src = table.parse_init("policy", "hf:acme/tiny-qwen")
  assert src.path == str(snap.resolve()) and src.spec() == f"hf:{snap.resolve()}"   # the record pins the commit
  model, role = table.load_model("hf:acme/tiny-qwen", "policy")
  assert role.arch.vocab_size == 320
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.init='hf:acme/missing': no directory "
                                        r"'acme/missing', and the model id has no snapshot in the local Hugging "
                                        r"Face cache"):
    table.parse_init("policy", "hf:acme/missing")


@pytest.mark.pipeline
def test_grpo_from_hf_dir_with_prompt_file_and_a_reward_function(families, tmp_path, monkeypatch):
  """GRPO by fields only on (2, 2, 2): the policy from the bf16 Qwen2-style directory (its tokenizer:
  no BOS, its own pad), prompts from a JSONL file, the reward a user function named module:function
  on the decoded completions, G = 4 with the prompt prefilled once per group, no reference model
  (beta_kl = 0): the mean reward of the last five steps is above the first five's."""
  from jaxopd.methods import grpo
  (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  c = _quiet(load_config("grpo.py"), steps=30)
  c.data.task = "files"
  c.data.files.train = hf_fixtures.write_jsonl(str(tmp_path / "p.jsonl"), hf_fixtures.prompt_records(64))
  c.data.data_dir = str(tmp_path / "data")
  c.models.policy.init = f"hf:{families['qwen2']}"
  c.method.reward = "my_rewards:vowels"
  c.method.group_size = 4
  c.rollout.prompt_len, c.rollout.max_new_tokens, c.seq_len = 24, 12, 36
  c.optim.lr = 3e-3
  exp = grpo.build(c)
  assert set(exp.roles) == {"policy"} and not exp.snapshots
  c, out = _run("grpo", c, tmp_path / "grpo")
  recs = logs.read_metrics(str(tmp_path / "grpo"), "train")
  r = [x["reward/mean"] for x in recs]
  print(f"GRPO with a reward function: reward {np.mean(r[:5]):.4f} (steps 1-5) -> {np.mean(r[-5:]):.4f} "
        f"(steps 26-30)")
  assert np.mean(r[-5:]) > np.mean(r[:5]) + 0.02, r


@pytest.mark.pipeline
def test_redi_with_shared_prompts_and_aligndistil_from_hf_dirs(families, files, tmp_path):
  """REDI (the paper's alpha 0.8) on conversational JSONL pairs from the bf16 Qwen2 directory (no
  BOS, pad == eos, chat template) with each pair's prompt shared, and off-policy AlignDistil (the
  adaptive teacher) with the policy, the SFT reference and user-given DPO and reverse-DPO
  directories, by config fields alone: no stage is trained; each loss leaves its start by gradient."""
  r = _quiet(load_config("redi.py"))
  r.data.task = "files"
  r.data.files.train = files["chat_pairs"]
  r.models.policy.init = r.models.reference.init = f"hf:{families['qwen2']}"
  r.method.share_prompt = True
  r, out = _run("redi", r, tmp_path / "redi")
  losses = [x["loss"] for x in logs.read_metrics(str(tmp_path / "redi"), "train")]
  assert abs(losses[-1] - losses[0]) > 1e-3, losses
  assert "logps/chosen_change" in out.train

  teachers = {n: hf_fixtures.make_family_dir(str(tmp_path / n), "qwen2", seed=s) for n, s in (("dpo", 5), ("rdpo", 6))}
  a = _quiet(load_config("aligndistil.py:off_policy"))
  a.data.task = "files"
  a.data.files.train = files["chat_pairs"]
  a.models.policy.init = a.models.reference.init = f"hf:{families['qwen2']}"
  a.models.dpo.init, a.models.rdpo.init = f"hf:{teachers['dpo']}", f"hf:{teachers['rdpo']}"
  a, out = _run("aligndistil", a, tmp_path / "aligndistil")
  losses = [x["loss"] for x in logs.read_metrics(str(tmp_path / "aligndistil"), "train")]
  assert abs(losses[-1] - losses[0]) > 1e-4, losses
  rec = json.load(open(tmp_path / "aligndistil" / "models.json"))
  assert rec["rdpo"]["source"] == f"hf:{teachers['rdpo']}" and not rec["dpo"]["trainable"]


def test_a_model_is_never_fed_another_vocabulary(families, files, tmp_path):
  """An hf: policy on a task whose ids are its own (sort) or whose tokenizer is another (a
  data.files.tokenizer of the same size as the model's but another vocabulary) is one line
  before anything is built."""
  c = _quiet(load_config("sft.py:smoke,sort"))
  c.models.policy.init = f"hf:{families['llama']}"
  with pytest.raises(ConfigError, match=rf"config\.models\.policy\.init='hf:{families['llama']}': the sort task "
                                        rf"tokenizes with ids of its own than {families['llama']}'s tokenizer"):
    EXP["sft"].build(c)
  s = _quiet(load_config("sft.py"))
  s.data.task = "files"
  s.data.files.train = files["sft"]
  s.data.files.tokenizer = families["llama"]
  s.eval.num_prompts = 0
  s.models.policy.init = f"hf:{families['qwen2']}"
  assert len(hf_tokenizer(families["llama"])) == len(hf_tokenizer(families["qwen2"]))
  with pytest.raises(ConfigError, match=rf"config\.data\.files\.tokenizer='{families['llama']}': its vocabulary "
                                        rf"differs from the tokenizer of the model's hf: directory"):
    EXP["sft"].build(s)


@pytest.mark.parametrize("damage", ["cut", "json"])
def test_a_damaged_model_directory_is_one_line_from_the_cli(families, files, tmp_path, damage):
  """A reference's model.safetensors cut short, or a policy's config.json with trailing garbage:
  one line naming the file (exit 2), no traceback."""
  import shutil
  import subprocess
  import sys
  bad = str(tmp_path / "bad")
  shutil.copytree(families["llama"], bad)
  if damage == "cut":
    path = f"{bad}/model.safetensors"
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    roles = [f"--config.models.policy.init=hf:{families['llama']}", f"--config.models.reference.init=hf:{bad}"]
    want = f"error: {path}: tensor "
  else:
    with open(f"{bad}/config.json", "a") as f:
      f.write("garbage}")
    roles = [f"--config.models.policy.init=hf:{bad}", f"--config.models.reference.init=hf:{families['llama']}"]
    want = f"{bad}/config.json"   # read first by the tokenizer loader or by the model's config reader
  p = subprocess.run([sys.executable, "-m", "jaxopd.main", "--config", "experiments/tdpo.py:dpo", "--workdir",
                      str(tmp_path / "w"), *roles, "--config.data.task=files",
                      f"--config.data.files.train={files['pairs']}", "--config.total_steps=1",
                      "--config.optim.warmup_steps=0", "--config.batch_size=8", "--config.seq_len=64"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and (errors[0].startswith(want) or want in errors[0]), p.stderr[-3000:]
  assert "Traceback" not in p.stderr
