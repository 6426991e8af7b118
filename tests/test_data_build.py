"""Tokenizer round trip, TFDS builders (array_record, no TensorFlow), SFT records, build CLI."""
import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxopd.data import build, reviews as R, tfds_builders as B, tokenizer as T
from jaxopd.errors import ConfigError

SEED = 3
SIZES = dict(num_train=24, num_validation=6, num_test=5)


@pytest.fixture(scope="module")
def world():
  return R.World(SEED)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, world):
  path = tmp_path_factory.mktemp("tok")
  T.build_tokenizer(world, path)
  return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  B.prepare("reviews_corpus", B.corpus_config(SEED, **SIZES), path)
  B.prepare("reviews_prompts", B.prompts_config(SEED, num_train=12, num_test=4), path)
  return path


# -- tokenizer --------------------------------------------------------------------


def test_tokenizer_round_trip_through_auto_tokenizer(tok_dir, world):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(tok_dir))
  assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert len(tok) == len(world.vocabulary) + 4
  # The saved vocabulary is the world's, in sorted order after the specials.
  vocab = json.load(open(os.path.join(tok_dir, "tokenizer.json")))["model"]["vocab"]
  assert [k for k, _ in sorted(vocab.items(), key=lambda kv: kv[1])][4:] == sorted(world.vocabulary)
  for words in world.sample(0, 30):
    text = " ".join(words)
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and len(ids) == len(words) + 1          # BOS + one token per word
    assert tok.convert_ids_to_tokens(ids[1:]) == words
    assert 3 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<bos> " + text
  assert tok("zzz the")["input_ids"] == [1, 3, vocab["the"]]


def test_word_to_token_positions(tok_dir, world):
  tok = T.load_tokenizer(tok_dir)
  for words in world.sample(1, 20):
    ids, word_ids = T.encode_words(tok, words)
    assert word_ids == list(range(len(words))) and len(ids) == len(words)
    pos = R.reward_positions(words)
    token_pos = T.word_token_positions(tok, words, pos)
    assert token_pos == [p + 1 for p in pos]
    full = tok(" ".join(words))["input_ids"]
    assert [full[t] for t in token_pos] == [vocab_id(tok, words[p]) for p in pos]


def vocab_id(tok, word):
  return tok.convert_tokens_to_ids(word)


def test_tokenizer_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="entry 1 .*duplicate"):
    T.build_tokenizer(["good", "good"], tmp_path / "a")
  with pytest.raises(ValueError, match="entry 0 .*without whitespace"):
    T.build_tokenizer(["not good"], tmp_path / "b")
  with pytest.raises(ValueError, match="entry 0 .*reserved"):
    T.build_tokenizer(["<pad>"], tmp_path / "c")
  with pytest.raises(ConfigError, match="not a directory"):
    T.load_tokenizer(tmp_path / "missing")
  with pytest.raises(IndexError, match="word index 5"):
    T.word_token_positions(T.build_tokenizer(["a"], tmp_path / "d"), ["a"], [5])


# -- TFDS builders ------------------------------------------------------------------


def test_corpus_reads_back_equal_to_the_generator(data_dir, world):
  cfg = B.corpus_config(SEED, **SIZES)
  for split, n in (("train", 24), ("validation", 6), ("test", 5)):
    # Read with tfds.data_source directly: the path any other TFDS dataset takes.
    source = tfds.data_source("reviews_corpus", split=split, data_dir=str(data_dir),
                              builder_kwargs={"config": cfg, "file_format": "array_record"}, download=False)
    assert len(source) == n
    expected = world.sample_detailed(B.split_rng(SEED, "reviews_corpus", split), n)
    for i, s in enumerate(expected):
      ex = source[i]
      assert ex["text"].decode() == " ".join(s.words)
      assert ex["num_words"] == len(s.words)
      assert ex["polarity"] == s.polarity
      assert ex["gold_reward"] == pytest.approx(R.gold_reward(s.words), rel=1e-6)
      assert list(ex["reward_positions"]) == R.reward_positions(s.words)
      assert ex["log_prob"] == pytest.approx(world.log_prob(s.words), rel=1e-6)
  # Splits are independent draws.
  train = B.load("reviews_corpus", "train", cfg, data_dir)
  test = B.load("reviews_corpus", "test", cfg, data_dir)
  assert train[0]["text"] != test[0]["text"]


def test_prompts_read_back_equal_to_the_generator(data_dir, world):
  cfg = B.prompts_config(SEED, num_train=12, num_test=4)
  for split, n in (("train", 12), ("test", 4)):
    source = B.load("reviews_prompts", split, cfg, data_dir)
    expected = world.prompts(B.split_rng(SEED, "reviews_prompts", split), n, 2, 8)
    assert [source[i]["prompt"].decode().split() for i in range(n)] == expected
    assert [source[i]["num_words"] for i in range(n)] == [len(p) for p in expected]


def test_builders_are_versioned_and_cached(data_dir):
  cfg = B.corpus_config(SEED, **SIZES)
  assert B.is_prepared("reviews_corpus", cfg, data_dir)
  builder = B.ReviewsCorpus(data_dir=str(data_dir), config=cfg, file_format="array_record")
  assert str(builder.version) in builder.RELEASE_NOTES
  info = os.path.join(builder.data_dir, "dataset_info.json")
  before = os.path.getmtime(info)
  B.prepare("reviews_corpus", cfg, data_dir)
  assert os.path.getmtime(info) == before
  assert not B.is_prepared("reviews_corpus", B.corpus_config(SEED + 1, **SIZES), data_dir)
  # The predefined default config is reused, not shadowed by an equal custom one.
  assert B.corpus_config(0) is B.ReviewsCorpus.BUILDER_CONFIGS[0]


# -- SFT records ----------------------------------------------------------------------


def test_records_for_sft_format_and_over_length_counts(data_dir, tok_dir):
  tok = T.load_tokenizer(tok_dir)
  source = B.load("reviews_corpus", "train", B.corpus_config(SEED, **SIZES), data_dir)
  lengths = [source[i]["num_words"] + 2 for i in range(len(source))]   # BOS + words + EOS
  seq_len = int(np.median(lengths))
  long = sum(n > seq_len for n in lengths)
  assert 0 < long < len(lengths)

  kept, stats = B.records_for_sft(source, tok, seq_len, over_length="drop")
  assert stats == B.RecordStats(len(lengths), len(lengths) - long, 0, long, 0)
  assert len(kept) == len(lengths) - long
  short = [i for i, n in enumerate(lengths) if n <= seq_len]
  for rec, i in zip(kept, short):
    words = source[i]["text"].decode().split()
    n = len(words) + 2
    assert rec["tokens"].shape == rec["loss_mask"].shape == (seq_len,)
    assert rec["tokens"].dtype == rec["loss_mask"].dtype == np.int32
    assert list(rec["tokens"][:n]) == [1] + tok.convert_tokens_to_ids(words) + [2]
    assert not rec["tokens"][n:].any()
    assert list(rec["loss_mask"]) == [0] + [1] * (n - 1) + [0] * (seq_len - n)

  cut, stats = B.records_for_sft(source, tok, seq_len, over_length="truncate")
  assert stats == B.RecordStats(len(lengths), len(lengths), long, 0, 0)
  for rec, n, i in zip(cut, lengths, range(len(lengths))):
    if n > seq_len:
      words = source[i]["text"].decode().split()
      assert list(rec["tokens"]) == [1] + tok.convert_tokens_to_ids(words[:seq_len - 1])
      assert list(rec["loss_mask"]) == [0] + [1] * (seq_len - 1)


def test_records_for_sft_bad_inputs(tok_dir):
  tok = T.load_tokenizer(tok_dir)
  good = [{"text": "the plot was good ."}]
  with pytest.raises(ValueError, match="over_length='pad'"):
    B.records_for_sft(good, tok, 16, over_length="pad")
  with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
    B.records_for_sft(good, tok, 1)
  with pytest.raises(KeyError, match="example 1 has no 'text'"):
    B.records_for_sft(good + [{"prompt": "x"}], tok, 16)
  with pytest.raises(TypeError, match="example 0 field 'text' is int"):
    B.records_for_sft([{"text": 3}], tok, 16)
  _, stats = B.records_for_sft([{"text": b"the zzz was ."}], tok, 16)
  assert stats.unknown_tokens == 1


def test_config_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="num_train must be a positive int"):
    B.corpus_config(0, num_train=0)
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    B.corpus_config(-2)
  with pytest.raises(ValueError, match="min_words=5 > max_words=3"):
    B.prompts_config(0, min_words=5, max_words=3)
  with pytest.raises(TypeError, match="reviews_corpus needs a CorpusConfig"):
    B.prepare("reviews_corpus", B.prompts_config(0), tmp_path)
  with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
    B.load("imdb", "train", None, tmp_path)


# -- build CLI --------------------------------------------------------------------------


def test_build_cli(tmp_path, capsys):
  args = ["--data_dir", str(tmp_path), "--seed", "1", "--num_train", "40", "--num_validation", "10",
          "--num_test", "10", "--num_prompts_train", "8", "--num_prompts_test", "4", "--seq_len", "32"]
  assert build.main(args) == 0
  out = capsys.readouterr().out
  assert "(built;" in out and "built in" in out
  for token in ("train", "validation", "test", "H nats/token", "reward-bearing", "prompts: mean"):
    assert token in out
  assert os.path.exists(os.path.join(tmp_path, "tokenizers", "reviews_seed1", "tokenizer.json"))
  assert build.main(args) == 0
  out = capsys.readouterr().out
  assert "(cached;" in out and out.count("(cached)") == 2
  # A tokenizer from another world in the expected place is an error, never reused.
  T.build_tokenizer(R.World(2), os.path.join(tmp_path, "tokenizers", "reviews_seed1"))
  with pytest.raises(RuntimeError, match="delete the directory"):
    build.main(args)
  with pytest.raises(SystemExit):
    build.main(["--data_dir", str(tmp_path), "--num_train", "0"])
