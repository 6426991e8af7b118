"""Builds the reviews task's tokenizer and datasets, then prints their statistics.

  python -m jaxopd.data.build --data_dir /tmp/reviews_data [--seed 0 --num_train 20000 ...]

Layout under DATA_DIR (what is already there is reused, never rebuilt):
  tokenizers/reviews_seed{SEED}/            HF tokenizer dir (AutoTokenizer.from_pretrained)
  reviews_corpus/{config}/{version}/        TFDS array_record dataset
  reviews_prompts/{config}/{version}/       TFDS array_record dataset

The statistics are what experiments are checked against: the entropy rate floors an SFT model's
per-token loss, the mean gold reward is the base policy's, and the reward-bearing fraction is the
density SparsePO's masks should find.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from jaxopd.data import reviews, tfds_builders, tokenizer as tokenizer_lib


def tokenizer_dir(data_dir: str, seed: int) -> str:
  return os.path.join(data_dir, "tokenizers", f"reviews_seed{seed}")


def ensure_tokenizer(data_dir: str, world: reviews.World):
  """Builds the world's tokenizer unless present; a stale one is an error, not reused."""
  path = tokenizer_dir(data_dir, world.seed)
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    tok = tokenizer_lib.load_tokenizer(path)
    expected = set(world.vocabulary) | set(tokenizer_lib.SPECIAL_TOKENS)
    if set(tok.get_vocab()) != expected:
      raise RuntimeError(f"{path}: tokenizer vocabulary differs from World(seed={world.seed})'s "
                         f"(grammar changed?); delete the directory to rebuild it")
    return tok, False
  return tokenizer_lib.build_tokenizer(world, path), True


def _corpus_stats(source, seq_len: int) -> dict:
  n = len(source)
  words = np.empty(n, np.int64)
  bearing = np.empty(n, np.int64)
  reward = np.empty(n, np.float64)
  logp = np.empty(n, np.float64)
  for i in range(n):
    ex = source[i]
    words[i] = ex["num_words"]
    bearing[i] = len(ex["reward_positions"])
    reward[i] = ex["gold_reward"]
    logp[i] = ex["log_prob"]
  tokens = words + 1        # the LM predicts every word and the end of review
  rate = -logp.sum() / tokens.sum()
  resid = -logp - rate * tokens
  return {
      "n": n,
      "mean_words": words.mean(),
      "p5_p50_p95_max_words": (*np.percentile(words, [5, 50, 95]).astype(int), int(words.max())),
      "mean_gold_reward": reward.mean(),
      "std_gold_reward": reward.std(),
      "reward_bearing_word_fraction": bearing.sum() / words.sum(),
      "entropy_rate": rate,
      "entropy_rate_stderr": resid.std(ddof=1) / math.sqrt(n) / tokens.mean() if n > 1 else float("nan"),
      "over_seq_len_fraction": float(np.mean(words + 2 > seq_len)),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxopd.data.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True, help="where the tokenizer and datasets go")
  parser.add_argument("--seed", type=int, default=0, help="reviews world seed")
  parser.add_argument("--num_train", type=int, default=20000, help="corpus train reviews")
  parser.add_argument("--num_validation", type=int, default=2000, help="corpus validation reviews")
  parser.add_argument("--num_test", type=int, default=2000, help="corpus test reviews")
  parser.add_argument("--num_prompts_train", type=int, default=10000, help="train prompts")
  parser.add_argument("--num_prompts_test", type=int, default=1000, help="test prompts")
  parser.add_argument("--prompt_min_words", type=int, default=2, help="shortest prompt, in words")
  parser.add_argument("--prompt_max_words", type=int, default=8, help="longest prompt, in words")
  parser.add_argument("--seq_len", type=int, default=64,
                      help="only for the report: share of reviews longer than seq_len tokens with BOS/EOS")
  args = parser.parse_args(argv)
  try:
    corpus_cfg = tfds_builders.corpus_config(args.seed, args.num_train, args.num_validation, args.num_test)
    prompts_cfg = tfds_builders.prompts_config(args.seed, args.num_prompts_train, args.num_prompts_test,
                                               args.prompt_min_words, args.prompt_max_words)
  except ValueError as e:
    parser.error(str(e))
  os.makedirs(args.data_dir, exist_ok=True)
  world = reviews.World(args.seed)

  t0 = time.time()
  tok, built = ensure_tokenizer(args.data_dir, world)
  print(f"tokenizer  {tokenizer_dir(args.data_dir, args.seed)}  "
        f"({'built' if built else 'cached'}; vocab {len(tok)} incl. {len(tokenizer_lib.SPECIAL_TOKENS)} "
        f"special, pad={tok.pad_token_id} bos={tok.bos_token_id} eos={tok.eos_token_id})")
  for name, cfg in (("reviews_corpus", corpus_cfg), ("reviews_prompts", prompts_cfg)):
    cached = tfds_builders.is_prepared(name, cfg, args.data_dir)
    t = time.time()
    builder = tfds_builders.prepare(name, cfg, args.data_dir)
    sizes = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    print(f"{name}/{cfg.name}:{builder.version}  ({'cached' if cached else f'built in {time.time() - t:.1f}s'})"
          f"  {sizes}\n  -> {builder.data_dir}")

  print(f"\ncorpus statistics (world seed {args.seed}):")
  print(f"  {'split':<11}{'n':>7}{'words':>8}{'p5/p50/p95/max':>17}{'gold reward':>16}"
        f"{'reward-bearing':>16}{'H nats/token':>18}{f'>{args.seq_len} tok':>10}")
  for split in ("train", "validation", "test"):
    s = _corpus_stats(tfds_builders.load("reviews_corpus", split, corpus_cfg, args.data_dir), args.seq_len)
    pct = "/".join(str(x) for x in s["p5_p50_p95_max_words"])
    print(f"  {split:<11}{s['n']:>7}{s['mean_words']:>8.2f}{pct:>17}"
          f"{s['mean_gold_reward']:>9.4f} ±{s['std_gold_reward']:.3f}"
          f"{s['reward_bearing_word_fraction']:>16.4f}"
          f"{s['entropy_rate']:>11.4f} ±{s['entropy_rate_stderr']:.4f}{s['over_seq_len_fraction']:>10.4f}")
  prompts = tfds_builders.load("reviews_prompts", "train", prompts_cfg, args.data_dir)
  plen = np.array([prompts[i]["num_words"] for i in range(len(prompts))])
  print(f"\nprompts: mean {plen.mean():.2f} words (min {plen.min()}, max {plen.max()})")
  print("notes: gold reward is mean ± std over reviews; reward-bearing = reward_positions per word;\n"
        "  H = exact entropy rate, -sum log p(review) / sum (words + 1), nats per LM token (words + EOS),\n"
        "  i.e. the floor of an SFT model's per-token loss; ± is the standard error.")
  print(f"done in {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
