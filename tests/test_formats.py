"""Real-data import: TRL formats from JSONL / Parquet, validation errors with
file, line and field, over-length policies with counts."""

import json

import numpy as np
import pytest

from jaxopd.data import formats

WORDS = "hello world the movie was good bad great awful plot music why what is it user assistant".split()


@pytest.fixture(scope="module")
def tok():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"] + WORDS)}
  t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                 unk_token="<unk>")
  fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|> {% endif %}")
  return fast


def _write(tmp_path, rows, name="d.jsonl"):
  p = tmp_path / name
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(p)


def test_preference_strings_encode_chosen_and_rejected(tmp_path, tok):
  path = _write(tmp_path, [{"prompt": "the movie was", "chosen": "great", "rejected": "awful plot"}])
  recs, stats = formats.load(path, "preference", tok, seq_len=8)
  assert stats.kept == 1 and stats.dropped == 0
  ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  r = recs[0]
  assert r["tokens"].shape == (2, 8)
  np.testing.assert_array_equal(r["tokens"][0], [1] + ids("the movie was great") + [2, 0, 0])
  np.testing.assert_array_equal(r["loss_mask"][0], [0, 0, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(r["tokens"][1], [1] + ids("the movie was awful plot") + [2, 0])
  np.testing.assert_array_equal(r["loss_mask"][1], [0, 0, 0, 0, 1, 1, 1, 0])


def test_conversational_preference_uses_chat_template(tmp_path, tok):
  row = {"prompt": [{"role": "user", "content": "what is it"}],
         "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad movie"}]}
  recs, _ = formats.load(_write(tmp_path, [row]), "preference", tok, seq_len=10)
  t, m = recs[0]["tokens"], recs[0]["loss_mask"]
  words = tok.convert_ids_to_tokens(t[1][m[1] == 1].tolist())
  assert words == ["bad", "movie"]
  assert tok.convert_ids_to_tokens(t[1][:5].tolist()) == ["<|user|>", "what", "is", "it", "<|assistant|>"]


def test_parquet_reads_like_jsonl(tmp_path, tok):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"prompt": "the", "chosen": "good", "rejected": "bad"}, {"prompt": "it", "chosen": "great", "rejected": "awful"}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
  a, _ = formats.load(str(tmp_path / "d.parquet"), "preference", tok, seq_len=6)
  b, _ = formats.load(_write(tmp_path, rows), "preference", tok, seq_len=6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_over_length_policies_are_counted(tmp_path, tok):
  rows = [{"text": "the movie was good"}, {"text": "the movie was good the plot was great music"}]
  path = _write(tmp_path, rows)
  recs, stats = formats.load(path, "lm", tok, seq_len=8, policy="drop")
  assert (stats.seen, stats.kept, stats.dropped, stats.truncated) == (2, 1, 1, 0)
  assert "1 dropped" in str(stats)
  recs, stats = formats.load(path, "lm", tok, seq_len=8, policy="truncate")
  assert (stats.kept, stats.dropped, stats.truncated) == (2, 0, 1)
  assert recs[1]["tokens"].shape == (8,) and recs[1]["loss_mask"].sum() == 7


def test_prompt_only_records(tmp_path, tok):
  recs, stats = formats.load(_write(tmp_path, [{"prompt": "the movie"}, {"prompt": "the movie was good plot"}]),
                             "prompt", tok, seq_len=16, max_prompt_len=4, policy="truncate")
  assert [int(r["prompt_len"]) for r in recs] == [3, 4] and stats.truncated == 1
  # Truncation keeps the prompt's end (nearest the response).
  assert tok.convert_ids_to_tokens(recs[1]["prompt"].tolist()) == ["movie", "was", "good", "plot"]
  assert tok.convert_ids_to_tokens(recs[0]["prompt"].tolist()) == ["<bos>", "the", "movie", "<pad>"]


@pytest.mark.parametrize("line,fmt,message", [
    ('{"prompt": "the", "chosen": "good"}', "preference", r"d.jsonl:2: missing field 'rejected'"),
    ('{"prompt": "the", "chosen": 3, "rejected": "bad"}', "preference", r"d.jsonl:2: field 'chosen' must be a string"),
    ('{"prompt": "the", "chosen": "good", "rejected": [{"role": "assistant", "content": "bad"}]}', "preference",
     r"d.jsonl:2: fields 'chosen' and 'rejected' must both be strings or both message lists"),
    ('{"chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "x"}]}', "preference",
     r"d.jsonl:2: field 'chosen'\[0\] must be"),
    ('{"prompt": "the", ', "preference", r"d.jsonl:2: not valid JSON \(Expecting property name enclosed in double "
     r"quotes at column 19\)"),
    ('[1, 2]', "lm", r"d.jsonl:2: a record must be a JSON object"),
    ('{"txt": "hello"}', "lm", r"d.jsonl:2: unknown key 'txt' - did you mean 'text'\?"),
    ('{"promt": "the", "chosen": "good", "rejected": "bad"}', "preference",
     r"d.jsonl:2: unknown key 'promt' - did you mean 'prompt'\?; preference records have \['prompt', 'chosen', "
     r"'rejected'\] \(list keys to skip in config.data.files.ignore_keys\)"),
    ('{"prompt": "the", "chosen": "good", "rejected": null}', "preference", r"d.jsonl:2: field 'rejected' is null$"),
    ('{"chosen": "good", "rejected": "bad"}', "preference",
     r"d.jsonl:2: missing field 'prompt'; set config.data.files.allow_no_prompt"),
    ('{"prompt": [{"role": "user", "content": "the"}], "chosen": [{"role": "assistant", "content": "good"}], '
     '"rejected": [{"role": "assistant", "content": "bad"}]}', "preference",
     r"d.jsonl:2: this record is message lists with a prompt, but the first record \(.*d.jsonl:1\) is strings "
     r"with a prompt: one file holds records of one shape"),
    ('{"prompt": "the", "completion": "good"}', "lm",
     r"d.jsonl:2: this record is completion\+prompt, but the first record \(.*d.jsonl:1\) is text"),
    ('{"text": "the", "completion": "good"}', "lm", r"d.jsonl:2: an lm record has 'text', 'prompt' and 'completion'"),
    ('{"completion": "good"}', "lm", r"d.jsonl:2: missing field 'prompt' for 'completion'"),
    ('{"messages": "hello"}', "lm", r"d.jsonl:2: field 'messages' must be a non-empty list of messages"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, tok, line, fmt, message):
  good = {"preference": '{"prompt": "the", "chosen": "good", "rejected": "bad"}', "lm": '{"text": "hello"}'}[fmt]
  p = tmp_path / "d.jsonl"
  p.write_text(good + "\n" + line + "\n")
  with pytest.raises(formats.DataFormatError, match=message):
    formats.load(str(p), fmt, tok, seq_len=8)


def test_listed_keys_are_skipped_and_counted(tmp_path, tok):
  rows = [{"id": i, "prompt": "the", "chosen": "good", "rejected": "bad"} for i in range(3)]
  recs, stats = formats.load(_write(tmp_path, rows), "preference", tok, seq_len=8, ignore_keys=("id", "source"))
  assert stats.kept == 3 and stats.ignored == {"id": 3, "source": 0}
  assert "keys skipped: id (3 records), source (0 records)" in str(stats)


def test_degenerate_pairs_and_empty_responses_are_dropped_and_counted(tmp_path, tok):
  rows = [{"prompt": "the", "chosen": "good", "rejected": "bad"},
          {"prompt": "the", "chosen": "good", "rejected": "good"},     # no gradient: dropped
          {"prompt": "the", "chosen": " ", "rejected": "bad"},         # empty chosen: dropped
          {"prompt": "it", "chosen": "great", "rejected": ""}]         # empty rejected: dropped
  recs, stats = formats.load(_write(tmp_path, rows), "preference", tok, seq_len=8)
  assert (stats.seen, stats.kept, stats.same, stats.empty) == (4, 1, 1, 2) and len(recs) == 1
  assert str(stats) == ("4 records: 1 kept, 0 truncated, 0 dropped (over-long), 2 dropped (empty), "
                        "1 dropped (chosen == rejected)")
  recs, stats = formats.load(_write(tmp_path, [{"text": "hello"}, {"text": ""}]), "lm", tok, seq_len=8)
  assert (stats.kept, stats.empty) == (1, 1)
  recs, stats = formats.load(_write(tmp_path, [{"prompt": "the"}, {"prompt": ""}]), "prompt", tok, seq_len=8)
  assert (stats.kept, stats.empty) == (1, 1)


def test_pairs_without_prompt(tmp_path, tok):
  """Strings: refused unless allow_no_prompt. Message lists: the messages both sides share are the
  prompt (TRL's implicit prompt), so the loss covers the assistant's reply only."""
  path = _write(tmp_path, [{"chosen": "good", "rejected": "bad"}])
  recs, _ = formats.load(path, "preference", tok, seq_len=8, allow_no_prompt=True)
  assert tok.convert_ids_to_tokens(recs[0]["tokens"][0][recs[0]["loss_mask"][0] == 1].tolist()) == ["good", "<eos>"]
  user = {"role": "user", "content": "what is it"}
  row = {"chosen": [user, {"role": "assistant", "content": "good"}],
         "rejected": [user, {"role": "assistant", "content": "bad movie"}]}
  implicit, _ = formats.load(_write(tmp_path, [row]), "preference", tok, seq_len=10)
  explicit, _ = formats.load(_write(tmp_path, [{"prompt": [user], "chosen": row["chosen"][1:],
                                                 "rejected": row["rejected"][1:]}]), "preference", tok, seq_len=10)
  for k in ("tokens", "loss_mask"):
    np.testing.assert_array_equal(implicit[0][k], explicit[0][k])
  with pytest.raises(formats.DataFormatError, match="share no first message"):
    formats.load(_write(tmp_path, [{"chosen": [{"role": "assistant", "content": "good"}],
                                    "rejected": [{"role": "assistant", "content": "bad"}]}]), "preference", tok, 10)


def test_missing_file_and_bad_options(tmp_path, tok):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    formats.load(str(tmp_path / "nope.jsonl"), "lm", tok, seq_len=8)
  path = _write(tmp_path, [{"text": "hello"}])
  with pytest.raises(ValueError, match="format='pairs'"):
    formats.load(path, "pairs", tok, seq_len=8)
  with pytest.raises(ValueError, match="policy='cut'"):
    formats.load(path, "lm", tok, seq_len=8, policy="cut")


def test_tfds_dataset_by_name_from_a_local_data_dir(tmp_path, tok):
  """A TFDS dataset written to a local data_dir is read by name through the same encoder."""
  from jaxopd.data import preferences
  # Reuse the preference builder's format: any array_record TFDS dataset with prompt/chosen/rejected works.
  import tensorflow_datasets as tfds

  class TinyPrefs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = preferences._code_path_override

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"prompt": tfds.features.Text(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {"prompt": "the movie", "chosen": "good", "rejected": "bad"}
      yield 1, {"prompt": "the plot", "chosen": "great music", "rejected": "awful"}

  TinyPrefs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  recs, stats = formats.load_tfds("tiny_prefs", "train", str(tmp_path), "preference", tok, seq_len=8)
  assert stats.kept == 2
  ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  assert sorted(r["tokens"][0][r["loss_mask"][0] == 1].tolist() for r in recs) == sorted(
      [ids("good") + [2], ids("great music") + [2]])
  with pytest.raises(FileNotFoundError, match="nope"):
    formats.load_tfds("nope", "train", str(tmp_path), "preference", tok, seq_len=8)
