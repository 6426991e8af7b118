"""The arithmetic chat task: its checker; train / held-out questions that never overlap; pairs whose
chosen side the checker accepts and rejected side it refuses."""

import json

import pytest

from jaxopd.tasks import arithmetic


def test_checker_reads_the_last_number_of_the_completion():
  p = "<|im_start|>user\nWhat is 12 + 30? Reply with the number only.<|im_end|>\n<|im_start|>assistant\n"
  assert arithmetic.check(p, "42") == 1.0
  assert arithmetic.check(p, "The answer is 42.") == 1.0
  assert arithmetic.check(p, "12 + 30 = 42") == 1.0
  assert arithmetic.check(p, "42? No: 41") == 0.0
  assert arithmetic.check(p, "forty-two") == 0.0
  assert arithmetic.reward([p, p], ["42", ""]) == [1.0, 0.0]
  with pytest.raises(ValueError, match="no 'What is A \\+ B\\?' question"):
    arithmetic.check("hello", "42")


def test_data_files_are_disjoint_chat_prompts(tmp_path):
  train, held, pairs = arithmetic.write_data(str(tmp_path), train=200, eval_n=50)
  read = lambda f: [json.loads(line)["prompt"][0]["content"] for line in open(f)]
  a, b = read(train), read(held)
  assert len(a) == len(set(a)) == 200 and len(b) == len(set(b)) == 50 and not set(a) & set(b)
  assert a[0].startswith("What is ") and a[0].endswith("? Reply with the number only.")
  for line in open(pairs):
    r = json.loads(line)
    prompt = r["prompt"][0]["content"]
    assert arithmetic.check(prompt, r["chosen"][0]["content"]) == 1.0
    assert arithmetic.check(prompt, r["rejected"][0]["content"]) == 0.0
