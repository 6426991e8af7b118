"""The digits task: deterministic builds, exact answers, the Qwen2-like tokenizer, record layouts, the verifier.

Expected answers are computed here from the stored strings with ``sorted`` and Python ints, and
expected records from the tokenizer's vocabulary, not with jaxopd.data.digits' own helpers.
"""
import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from transformers import AutoTokenizer

from jaxopd.data import digits as D
from jaxopd.errors import ConfigError

EOT = "<|endoftext|>"
SIZES = dict(num_train=600, num_test=100, min_level=2, max_level=10)


def data(data_dir, **kw):
  d = D.data_config(smoke=True)
  d.data_dir = str(data_dir)
  d.update({**SIZES, **kw})
  return d


def built(data_dir, **kw):
  """``(suite, printed)``: the suite of ``data(data_dir, **kw)`` and what building it printed."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    suite = D.ensure(data(data_dir, **kw))
  return suite, out.getvalue()


def stored(suite, split):
  """The split as stored, read with tfds directly: ``[(prompt words, answer words, level)]``."""
  src = tfds.data_source("digits_tasks", split=split, data_dir=suite.data_dir,
                         builder_kwargs={"config": suite.builder_config, "file_format": "array_record"})
  return [(src[i]["prompt"].decode().split(), src[i]["answer"].decode().split(), int(src[i]["level"]))
          for i in range(len(src))]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits")
  return {"sort": built(root / "a"), "sort_again": built(root / "b"), "sort_seed1": built(root / "c", seed=1),
          "add": built(root / "a", op="add")}


@pytest.fixture(scope="module")
def sort_suite(builds):
  return builds["sort"][0]


@pytest.fixture(scope="module")
def add_suite(builds):
  return builds["add"][0]


def ids(tok, words):
  vocab = tok.get_vocab()
  return [vocab[w] for w in words]


# -- config and building --------------------------------------------------------------


def test_data_config_fields():
  d = D.data_config()
  assert (d.task, d.data_dir, d.op, d.seed, d.num_train, d.num_test) == ("digits", "data", "sort", 0, 20000, 1000)
  assert (d.min_level, d.max_level, d.sft_max_level) == (2, 10, 5)
  s = D.data_config(smoke=True)
  assert (s.num_train, s.num_test) == (256, 64)


@pytest.mark.parametrize("field, value", [
    ("op", "mul"), ("seed", -1), ("num_train", 0), ("num_test", -3), ("min_level", 0), ("max_level", 65),
    ("min_level", 7), ("sft_max_level", 11), ("sft_max_level", 1),
])
def test_bad_field_is_a_config_error_naming_it(tmp_path, field, value):
  d = data(tmp_path / "data", min_level=2, max_level=6 if field == "min_level" and value == 7 else 10)
  d[field] = value
  with pytest.raises(ConfigError, match=rf"config\.data\.{field}\b"):
    D.ensure(d, verbose=False)
  assert not os.path.exists(tmp_path / "data")          # checked before anything is written


def test_builds_once_then_cached(builds, sort_suite, add_suite):
  for key in ("sort", "add"):
    lines = builds[key][1].splitlines()
    assert sum(line.startswith("building digits_tasks/") for line in lines) == 1
  cfg = sort_suite.builder_config
  assert cfg.name == "sort_seed0_n600-100_l2-10"
  assert add_suite.builder_config.name == "add_seed0_n600-100_l2-10"
  assert os.path.isdir(os.path.join(sort_suite.data_dir, "digits_tasks", cfg.name))
  again, printed = built(sort_suite.data_dir)
  assert printed == "" and again.builder_config.name == cfg.name
  assert stored(again, "test") == stored(sort_suite, "test")


def test_default_sizes_use_the_predefined_config():
  assert D.digits_config() is D.DigitsTasks.BUILDER_CONFIGS[0]
  assert D.digits_config(op="add") is D.DigitsTasks.BUILDER_CONFIGS[1]


def test_builds_are_deterministic(builds):
  for split in ("train", "test"):
    a, b, c = (stored(builds[k][0], split) for k in ("sort", "sort_again", "sort_seed1"))
    assert a == b
    assert a != c
  assert stored(builds["sort"][0], "train")[:100] != stored(builds["sort"][0], "test")


# -- the examples ---------------------------------------------------------------------------


def test_sort_answers(sort_suite):
  for split in ("train", "test"):
    for prompt, answer, level in stored(sort_suite, split):
      assert prompt[0] == "sort" and prompt[-1] == "="
      digits = prompt[1:-1]
      assert len(digits) == level and all(len(x) == 1 and x.isdigit() for x in digits)
      assert answer == sorted(digits)


def test_add_answers(add_suite):
  for split in ("train", "test"):
    for prompt, answer, level in stored(add_suite, split):
      assert prompt[0] == "add" and prompt[-1] == "=" and prompt.count("+") == 1
      plus = prompt.index("+")
      a, b = prompt[1:plus], prompt[plus + 1:-1]
      for x in (a, b):
        assert len(x) == level and x[0] != "0" and all(len(c) == 1 and c.isdigit() for c in x)
      assert answer == list(str(int("".join(a)) + int("".join(b))))


@pytest.mark.parametrize("key", ["sort", "add"])
def test_levels_in_range_and_all_present(builds, key):
  lv = np.array([level for _, _, level in stored(builds[key][0], "train")])
  assert lv.min() >= 2 and lv.max() <= 10
  counts = np.bincount(lv, minlength=11)[2:]
  assert counts.min() > 600 / 9 / 2                  # roughly uniform over the 9 levels


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_is_qwen2_like(sort_suite):
  tok = AutoTokenizer.from_pretrained(os.path.join(sort_suite.data_dir, "digits_tokenizer"))
  assert len(tok) == 15 == len(sort_suite.tokenizer)
  assert tok.bos_token is None and tok.bos_token_id is None
  assert tok.eos_token == tok.pad_token == EOT and tok.eos_token_id == tok.pad_token_id
  words = [*"0123456789", "sort", "add", "+", "="]
  assert len(set(ids(tok, words))) == len(words) and tok.eos_token_id not in ids(tok, words)
  enc = tok("sort 3 1 =")["input_ids"]                 # add_special_tokens=True adds nothing either
  assert enc == tok("sort 3 1 =", add_special_tokens=False)["input_ids"] == ids(tok, ["sort", "3", "1", "="])
  text = "add 9 0 + 1 2 = 1 0 2"
  assert tok.decode(tok(text)["input_ids"]) == text
  assert tok.decode(tok(text)["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == text
  for prompt, answer, _ in stored(sort_suite, "test"):
    assert len(tok(" ".join(prompt + answer))["input_ids"]) == len(prompt) + len(answer)


# -- records -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sort", "add"])
def test_sft_records_layout(builds, key):
  suite = builds[key][0]
  tok = suite.tokenizer
  eos = tok.eos_token_id
  examples = stored(suite, "train")
  recs, stats = D.sft_records(suite, "train", 40)
  assert stats.dropped == stats.over_level == 0 and stats.examples == stats.records == len(recs) == len(examples)
  for r, (prompt, answer, _) in zip(recs, examples):
    assert r["tokens"].dtype == r["loss_mask"].dtype == np.int32 and r["tokens"].shape == r["loss_mask"].shape == (40,)
    seq = ids(tok, prompt) + ids(tok, answer) + [eos]
    assert r["tokens"].tolist() == seq + [eos] * (40 - len(seq))
    assert r["loss_mask"].tolist() == [0] * len(prompt) + [1] * (len(answer) + 1) + [0] * (40 - len(seq))


def test_sft_records_max_level_and_dropped(sort_suite, capsys):
  examples = stored(sort_suite, "train")
  easy = [e for e in examples if e[2] <= 5]
  recs, stats = D.sft_records(sort_suite, "train", 40, max_level=5)
  assert len(recs) == stats.records == len(easy) and stats.over_level == len(examples) - len(easy)
  assert [int(r["loss_mask"].sum()) - 1 for r in recs] == [len(a) for _, a, _ in easy]
  capsys.readouterr()
  # sort rows take 2L + 3 tokens: seq_len 12 holds levels <= 4.
  recs, stats = D.sft_records(sort_suite, "train", 12, max_level=8)
  too_long = sum(5 <= lv <= 8 for _, _, lv in examples)
  assert stats.dropped == too_long > 0 and stats.over_level == sum(lv > 8 for _, _, lv in examples)
  assert stats.records == len(recs) == sum(lv <= 4 for _, _, lv in examples)
  assert stats.records + stats.dropped + stats.over_level == stats.examples == len(examples)
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and f"{too_long} of" in out[0] and "seq_len=12" in out[0]


def test_prompt_records_layout(add_suite, capsys):
  tok = add_suite.tokenizer
  pad = tok.pad_token_id
  examples = stored(add_suite, "test")
  recs = D.prompt_records(add_suite, "test", 24, 12)
  assert capsys.readouterr().out == "" and len(recs) == len(examples)
  for r, (prompt, answer, level) in zip(recs, examples):
    assert set(r) == {"prompt", "prompt_len", "answer", "answer_len", "level"}
    assert all(np.asarray(v).dtype == np.int32 for v in r.values())
    assert r["prompt"].tolist() == ids(tok, prompt) + [pad] * (24 - len(prompt)) and r["prompt_len"] == len(prompt)
    assert r["answer"].tolist() == ids(tok, answer) + [pad] * (12 - len(answer)) and r["answer_len"] == len(answer)
    assert r["level"] == level
  assert D.levels(recs).tolist() == [lv for _, _, lv in examples]
  # add prompts take 2L + 3 tokens: prompt_len 13 holds levels <= 5; answers of level 5 may have 6 digits.
  recs = D.prompt_records(add_suite, "test", 13, 5)
  long_prompt = sum(len(p) > 13 for p, _, _ in examples)
  long_answer = sum(len(p) <= 13 and len(a) > 5 for p, a, _ in examples)
  assert len(recs) == len(examples) - long_prompt - long_answer and long_prompt > 0 and long_answer > 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and f"{long_prompt} with a prompt" in out[0] and f"{long_answer} more" in out[0]


# -- the verifier ---------------------------------------------------------------------------------

EOS = 0
T, A = 12, 4


def row(prompt, response):
  """A sampled row: prompt, response, then padding (pad == eos); the mask is on the response."""
  tokens = prompt + response
  assert len(tokens) <= T
  return tokens + [EOS] * (T - len(tokens)), [0] * len(prompt) + [1] * len(response) + [0] * (T - len(tokens))


CASES = [   # (prompt, response, answer, expected)
    ([11, 4, 2, 14], [2, 4, EOS], [2, 4], 1.0),                        # correct
    ([12, 2, 13, 3, 14], [2, 4, EOS], [2, 4], 1.0),                    # correct, longer prompt
    ([11, 4, 2, 14], [2, 5, EOS], [2, 4], 0.0),                        # wrong digit
    ([11, 4, 2, 14], [2, 4], [2, 4], 0.0),                             # cut: no EOS (the pad after it is eos-valued)
    ([11, 4, 2, 14], [2, 4, 4, EOS], [2, 4], 0.0),                     # extra token before EOS
    ([11, 4, 2, 14], [2, EOS], [2, 4], 0.0),                           # short answer
    ([11, 4, 2, 14], [EOS], [2, 4], 0.0),                              # EOS only
    ([11, 4, 2, 14], [], [2, 4], 0.0),                                 # no response at all
    ([11, 4, 2, 14], [EOS, 2, 4], [2, 4], 0.0),                        # EOS first (not a valid sample, still 0)
    ([11, 5, 4, 3, 2, 14], [2, 3, 4, 5, EOS], [2, 3, 4, 5], 1.0),      # answer fills A, row fills T exactly
    ([11, 5, 4, 3, 2, 14, 11], [2, 3, 4, 5, 5], [2, 3, 4, 5], 0.0),    # cut at the end of the row
    ([12, 9, 13, 9, 14, 11, 1], [1, 8, EOS], [1, 8], 1.0),             # longest prompt
]


def test_check_on_hand_made_rows():
  tokens, mask = zip(*(row(p, r) for p, r, _, _ in CASES))
  answer = [a + [EOS] * (A - len(a)) for _, _, a, _ in CASES]
  answer_len = [len(a) for _, _, a, _ in CASES]
  got = jax.jit(D.check)(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
                         jnp.asarray(answer, jnp.int32), jnp.asarray(answer_len, jnp.int32), EOS)
  assert got.dtype == jnp.float32 and got.shape == (len(CASES),)
  assert got.tolist() == [e for _, _, _, e in CASES]


def test_check_reads_the_response_from_the_mask_only():
  """Masks no sampler makes, but the mask is the truth: a token after the EOS inside it, and a gap in it."""
  tokens = [[11, 4, 2, 14, 2, 4, EOS, 4, EOS, EOS],
            [11, 4, 2, 14, 2, 4, EOS, 7, EOS, EOS]]
  mask = [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
          [0, 0, 0, 0, 1, 0, 1, 1, 0, 0]]       # response 2 EOS 7: not "2 4 EOS" though those tokens follow 2
  got = jax.jit(D.check)(np.array(tokens), np.array(mask), np.array([[2, 4, EOS]] * 2), np.array([2, 2]), EOS)
  assert np.asarray(got).tolist() == [0.0, 0.0]


def test_check_scores_the_sft_rows(add_suite):
  """SFT rows are correct responses to the prompt records of the same examples; one changed digit is not."""
  recs, _ = D.sft_records(add_suite, "test", 40)
  prompts = D.prompt_records(add_suite, "test", 24, 12)
  tokens = np.stack([r["tokens"] for r in recs])
  mask = np.stack([r["loss_mask"] for r in recs])
  answer = np.stack([p["answer"] for p in prompts])
  answer_len = np.array([p["answer_len"] for p in prompts])
  eos = add_suite.tokenizer.eos_token_id
  assert np.all(np.asarray(D.check(tokens, mask, answer, answer_len, eos)) == 1.0)
  first = np.argmax(mask, axis=1)
  digit_1, digit_2 = add_suite.tokenizer.get_vocab()["1"], add_suite.tokenizer.get_vocab()["2"]
  rows = np.arange(len(recs))
  tokens[rows, first] = np.where(tokens[rows, first] == digit_1, digit_2, digit_1)
  assert np.all(np.asarray(jax.jit(D.check)(tokens, mask, answer, answer_len, eos)) == 0.0)


def test_check_matches_a_python_reference_on_random_rows():
  """Random prompts and responses near the answer (right, cut, extended, changed, shortened)."""
  rng = np.random.default_rng(0)
  t, a, b = 16, 5, 400
  tokens, mask, answer, answer_len, want = [], [], [], [], []
  for _ in range(b):
    ans = rng.integers(1, 11, size=int(rng.integers(1, a + 1))).tolist()
    resp = ans + [EOS]
    kind = rng.integers(5)
    if kind == 1:
      resp = resp[:int(rng.integers(0, len(resp)))]
    elif kind == 2:
      resp.insert(int(rng.integers(0, len(resp) + 1)), int(rng.integers(0, 15)))
    elif kind == 3:
      resp[int(rng.integers(0, len(resp)))] = int(rng.integers(0, 15))
    elif kind == 4:
      del resp[int(rng.integers(0, len(resp)))]
    prompt = rng.integers(1, 15, size=int(rng.integers(1, t - len(resp) + 1))).tolist()
    tok_row = prompt + resp + [EOS] * (t - len(prompt) - len(resp))
    mask_row = [0] * len(prompt) + [1] * len(resp) + [0] * (t - len(prompt) - len(resp))
    tokens.append(tok_row)
    mask.append(mask_row)
    answer.append(ans + [EOS] * (a - len(ans)))
    answer_len.append(len(ans))
    want.append(float(resp == ans + [EOS]))
  got = jax.jit(D.check)(np.array(tokens), np.array(mask), np.array(answer), np.array(answer_len), EOS)
  assert 0.1 < np.mean(want) < 0.9
  assert np.asarray(got).tolist() == want
