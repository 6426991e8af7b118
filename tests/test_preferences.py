"""Preference construction from a (tiny) SFT policy on the reviews suite."""

import pytest

from helpers import SFT
from jaxopd import train
from jaxopd.experiment import load_config
from jaxopd.data import preferences, reviews, suite as suite_lib


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("prefs")
  cfg = load_config("sft.py:smoke")
  cfg.data.data_dir = str(root / "data")
  cfg.progress = False
  cfg.eval.num_prompts = 0
  train.run(cfg, str(root / "sft"), SFT.build(cfg))
  return root, cfg


@pytest.mark.parametrize("mode", ["best_worst", "bradley_terry"])
def test_pairs_are_labelled_by_the_gold_reward(sft_run, mode):
  root, cfg = sft_run
  d = cfg.data
  pc = preferences.make_config(policy_workdir=str(root / "sft"), policy_step=cfg.total_steps,
                               world_seed=d.world_seed, prompts_num_train=d.num_prompts_train,
                               prompts_num_test=d.num_prompts_test, prompt_min_words=d.prompt_min_words,
                               prompt_max_words=d.prompt_max_words, num_train=24, num_test=8, k=3, mode=mode,
                               max_new_tokens=12, batch_size=32, bt_temperature=0.05)
  data_dir = str(root / "data")
  preferences.prepare(pc, data_dir)
  src = preferences.load(pc, "train", data_dir)
  assert 0 < len(src) <= 24
  for i in range(len(src)):
    ex = src[i]
    dec = lambda k: ex[k].decode()
    prompt = dec("prompt").split()
    for side in ("chosen", "rejected"):
      r = reviews.gold_reward(prompt + dec(side).split())
      assert r == pytest.approx(float(ex[f"{side}_reward"]), abs=1e-6)
    if mode == "best_worst":
      assert ex["chosen_reward"] > ex["rejected_reward"]
  stats = preferences.statistics(pc, "train", data_dir)
  assert stats["pairs"] == len(src)
  if mode == "best_worst":
    assert stats["label_accuracy"] == 1.0
  suite = suite_lib.ensure(cfg.data, verbose=False)
  recs, enc = preferences.records(pc, "train", data_dir, suite.tokenizer, seq_len=32)
  assert enc.kept + enc.dropped == len(src) and len(recs) == enc.kept
  r0 = recs[0]
  assert r0["tokens"].shape == (2, 32)
  tok = suite.tokenizer
  words = tok.convert_ids_to_tokens(r0["tokens"][0][r0["loss_mask"][0] == 1].tolist())
  ex = src[0]
  assert words == ex["chosen"].decode().split() + ["<eos>"]
  # A second prepare reuses the cache (same config name, same examples).
  again = preferences.load(pc, "train", data_dir)
  assert len(again) == len(src) and again[0]["chosen"] == src[0]["chosen"]


def test_bad_preference_options_are_errors():
  with pytest.raises(ValueError, match="mode='pairs'"):
    preferences.make_config(mode="pairs")
  with pytest.raises(ValueError, match="k=1"):
    preferences.make_config(k=1)
