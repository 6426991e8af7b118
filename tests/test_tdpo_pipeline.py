"""The TDPO/DPO pipeline end to end on the smoke preset: data, SFT base,
preferences, training, report; stages are cached on re-run."""

import json
import os

import numpy as np
import pytest

from helpers import shared_smoke_stages
from jaxopd import stages, train
from jaxopd.errors import ConfigError
from jaxopd.experiment import load_config
from jaxopd.methods import sft, tdpo as TDPO
from jaxopd.models import table


def _config(root, arg="smoke"):
  c = load_config(f"tdpo.py:{arg}")
  c.data.data_dir = str(root / "data")
  c.sft.workdir = str(root / "sft_base")
  c.progress = False
  return c


def _run(module, cfg, workdir):
  with shared_smoke_stages(cfg):
    cfg = module.prepare(cfg, str(workdir))
  summary = train.run(cfg, str(workdir), module.build(cfg))
  module.report(cfg, str(workdir), summary)
  return summary, table.parse_init("reference", cfg.models.reference.init).path   # and the SFT stage used


@pytest.mark.pipeline
def test_tdpo_then_dpo_pipeline(tmp_path, capsys):
  s, sft_dir = _run(TDPO, _config(tmp_path), tmp_path / "tdpo")
  sft = stages.record(sft_dir)      # the SFT base may come from another smoke test of this session
  assert sft["done"] and sft["kind"] == "sft"
  ev = s.eval
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "kl/chosen", "kl/rejected", "kl/margin", "sample/reward", "sample/kl_ref",
            "sample/entropy", "sample/distinct2"):
    assert k in ev, k
  assert 0.0 <= ev["sample/reward"] <= 1.0 and ev["rewards/accuracies"] <= 1.0
  # Policy == reference at step 0, so the loss starts at exactly log 2; training lowers it.
  from jaxopd import logs
  losses = [r["loss"] for r in logs.read_metrics(str(tmp_path / "tdpo"), "train")]
  assert losses[-1] < np.log(2) - 1e-3, losses
  summ = json.load(open(tmp_path / "tdpo" / "summary.json"))
  assert summ["loss"] == "tdpo2" and summ["before"]["sample/kl_ref"] == pytest.approx(0.0, abs=1e-5)
  assert os.path.getsize(tmp_path / "tdpo" / "summary.png") > 1000

  # DPO reuses the cached SFT base and pairs, and the report compares with TDPO.
  cfg = _config(tmp_path, "smoke,dpo")
  cfg.compare_with = str(tmp_path / "tdpo")
  s2, sft_dir2 = _run(TDPO, cfg, tmp_path / "dpo")
  out = capsys.readouterr().out
  assert sft_dir2 == sft_dir and stages.record(sft_dir) == sft   # reused, not trained again
  assert "tdpo2 (" in out and "dpo (after)" in out
  assert "kl/rejected" in s2.eval          # DPO logs the (detached) sequential KL too
  losses = [r["loss"] for r in logs.read_metrics(str(tmp_path / "dpo"), "train")]
  assert losses[-1] < np.log(2) - 1e-3, losses   # DPO's loss left log 2 too


def test_bad_method_fields_are_config_errors(tmp_path):
  from jaxopd.errors import ConfigError
  for field, value, msg in [("loss", "orpo", "config.method.loss='orpo'"), ("beta", 0.0, "config.method.beta=0.0"),
                            ("alpha", 0.3, "only tdpo2 uses alpha")]:
    c = _config(tmp_path, "smoke,tdpo1" if field == "alpha" else "smoke")
    c.method[field] = value
    with pytest.raises(ConfigError, match=msg):
      TDPO.prepare(c, str(tmp_path / "w"))


@pytest.mark.pipeline
def test_tdpo_on_your_own_preference_file(tmp_path):
  """task=files: TRL-format JSONL pairs and an HF tokenizer dir, policy and reference from an
  existing SFT run (run:WORKDIR); without an init for them the SFT stage is refused."""
  from jaxopd.data import reviews
  from jaxopd.data.tokenizer import build_tokenizer
  tok_dir = str(tmp_path / "tok")
  build_tokenizer(reviews.World(0), tok_dir)
  rows = [{"prompt": "the movie was", "chosen": "great .", "rejected": "awful ."},
          {"prompt": "i", "chosen": "loved it .", "rejected": "hated it ."}] * 8
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  s = load_config("sft.py:smoke")
  s.data.task = "files"
  s.data.files.train = str(tmp_path / "lm.jsonl")
  (tmp_path / "lm.jsonl").write_text("".join(json.dumps({"text": r["prompt"] + " " + r["chosen"]}) + "\n"
                                             for r in rows))
  s.data.files.tokenizer = tok_dir
  s.eval.num_prompts = 0
  s.progress = False
  train.run(s, str(tmp_path / "sft"), sft.build(s))
  c = load_config("tdpo.py:smoke")
  c.data.task = "files"
  c.data.files.train = str(path)
  c.data.files.eval = str(path)
  c.data.files.tokenizer = tok_dir
  c.progress = False
  with pytest.raises(ConfigError, match=r"config\.models\.policy\.init='stage:sft': with task=files no SFT stage"):
    TDPO.prepare(c, str(tmp_path / "tdpo"))
  c.models.policy.init = c.models.reference.init = f"run:{tmp_path / 'sft'}"
  summary, _ = _run(TDPO, c, tmp_path / "tdpo")
  assert "rewards/accuracies" in summary.eval and "sample/reward" not in summary.eval


def test_log_kl_is_refused_where_it_would_do_nothing(tmp_path):
  """method.log_kl switches DPO's detached KL metrics; TDPO's loss is made of that KL, so turning it
  off there would be silently ignored: refused in one line before anything is built."""
  c = _config(tmp_path)
  c.method.log_kl = False
  with pytest.raises(ConfigError, match=r"config.method.log_kl=False: tdpo2's loss is made of the sequential KL"):
    TDPO.prepare(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
  c.method.loss = "dpo"
  TDPO._check(c)    # valid for DPO
