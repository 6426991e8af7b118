"""Real formats end to end: tiny bfloat16 Qwen2 / Llama / GPT-2 checkpoint directories with
family-like tokenizers (tests/hf_fixtures.py) and TRL-format JSONL files go through SFT, DPO,
TDPO and SparsePO by config fields alone (no jaxopd SFT stage), on 8 simulated devices; the
trained policy exports to a directory transformers loads with the same logits."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

import hf_fixtures  # noqa: E402
from jaxopd import logs, train  # noqa: E402
from jaxopd import methods  # noqa: E402
from jaxopd.experiment import load_config  # noqa: E402
from jaxopd.models import hf  # noqa: E402

EXP = {n: methods.get(n) for n in ("sft", "tdpo", "sparsepo")}


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
  c.progress = False
  c.total_steps = steps
  c.batch_size = 8
  c.seq_len = 64
  c.log_every = 1
  c.eval_every = 0
  c.eval_batches = 1
  c.checkpoint.every = 0
  c.checkpoint.async_save = False
  c.optim.warmup_steps = 0
  c.optim.lr = 1e-3
  c.mesh.shape = (2, 2, 2)
  return c


def _run(module, c, workdir):
  m = EXP[module]
  if hasattr(m, "prepare"):
    c = m.prepare(c, str(workdir))
  return c, train.run(c, str(workdir), m.build(c))


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
  assert {x.dtype for x in jax.tree.leaves(out["frozen"]["reference"])} == {np.dtype("bfloat16")}
  rec = json.load(open(tmp_path / "tdpo" / "models.json"))
  assert rec["reference"]["source"] == f"hf:{path}" and rec["reference"]["arch"]["param_dtype"] == "bfloat16"
  if family == "llama":
    assert "rewards/accuracies" in out["eval"]

  assert hf.main(["export", "--workdir", str(tmp_path / "tdpo"), "--out", str(tmp_path / "exp"),
                  "--tokenizer", path]) == 0
  tokens = np.random.RandomState(0).randint(0, 320, (2, 16))
  policy = out["trainer"].models(out["state"], out["frozen"])["policy"]
  ours = np.asarray(jax.jit(lambda t: policy(t).logits)(tokens))
  diff = np.abs(hf_fixtures.torch_logits(str(tmp_path / "exp"), tokens) - ours).max()
  print(f"{family}: trained policy exported (float32): max |logits diff| {diff:.2e}")
  assert diff < 1e-4
  # bf16 export: the weights rounded to bf16, so the logits move by about bf16's relative precision.
  hf.export(policy, policy.cfg, str(tmp_path / "exp16"), dtype="bfloat16")
  diff16 = np.abs(hf_fixtures.torch_logits(str(tmp_path / "exp16"), tokens) - ours).max()
  print(f"{family}: bf16 export: max |logits diff| {diff16:.2e} (logits up to {np.abs(ours).max():.1f})")
  assert diff16 < 0.05 * np.abs(ours).max()


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
  # The official uniform init gives an all-zero mask here (loss stuck at log 2: issue #18's dead
  # mask, not fixed yet); "ones" starts the mask at 1 (= TDPO1).
  s.method.mask_init = "ones"
  s, out = _run("sparsepo", s, tmp_path / "sparsepo")
  losses = [r["loss"] for r in logs.read_metrics(str(tmp_path / "sparsepo"), "train")]
  assert abs(losses[-1] - losses[0]) > 1e-4, losses
  assert set(out["state"]["params"]) == {"policy", "mask"}
