"""The reviews world: determinism, gold-reward identities, reward positions, exact likelihood.

Expected rewards are worked out by hand from the documented lexicon values
(good +1, great +2, dull -1, very x1.5, contrast x0.5, scale 2), not by
calling the code under test.
"""
import itertools
import math

import numpy as np
import pytest

from jaxopd.data import reviews as R


def sig(x):
  return 1.0 / (1.0 + math.exp(-x / 2.0))


def w(text):
  return text.split()


@pytest.fixture(scope="module")
def world():
  return R.World(0)


@pytest.fixture(scope="module")
def samples(world):
  return world.sample_detailed(123, 300) + R.World(7).sample_detailed(5, 100)


# -- determinism --------------------------------------------------------------


def test_same_seed_same_world_and_samples():
  a, b = R.World(11), R.World(11)
  assert a.vocabulary == b.vocabulary
  assert a.sample(3, 50) == b.sample(3, 50)
  assert a.sample(np.random.default_rng(4), 20) == b.sample(np.random.default_rng(4), 20)
  assert a.prompts(9, 30) == b.prompts(9, 30)
  assert a.sample(3, 50) != a.sample(4, 50)
  c = R.World(12)
  assert c.vocabulary != a.vocabulary or c.sample(3, 50) != a.sample(3, 50)


def test_samples_look_like_reviews(samples, world):
  lengths = [len(s.words) for s in samples]
  assert 4 <= min(lengths) and max(lengths) <= 90
  assert 20 <= np.mean(lengths) <= 40
  for s in samples[:300]:
    assert s.words[-1] == "." and s.polarity in (1, -1)
    assert set(s.words) <= set(world.vocabulary)
  # The latent polarity shows through the reward but does not fix it.
  reward = np.array([R.gold_reward(s.words) for s in samples])
  z = np.array([s.polarity for s in samples])
  assert reward[z > 0].mean() > 0.65 and reward[z < 0].mean() < 0.35
  assert 0.05 < np.mean((reward > 0.5) != (z > 0)) < 0.35


def test_lexicon_is_large_and_consistent():
  words = set(R.SENTIMENT) | set(R.INTENSIFIERS) | set(R.NEGATIONS) | set(R.CONTRASTS)
  assert len(words) > 200
  assert len(R.World(0).vocabulary) > 300
  for topic in R.TOPIC_NAMES:
    assert R.TOPIC_NOUNS[topic]


# -- gold reward: hand-computed identities ---------------------------------------


@pytest.mark.parametrize("text, score", [
    ("the plot was good .", 1.0),
    ("the plot was great .", 2.0),
    ("the plot was not good .", -1.0),
    ("the plot was never good .", -1.0),
    ("the plot was very good .", 1.5),
    ("the plot was not very good .", -1.5),
    ("the plot was not at all good .", -1.0),            # neutral words are skipped
    ("i did not like the plot .", -1.0),
    ("the plot was dull .", -1.0),
    ("the plot was not dull .", 1.0),
    ("the plot was great , but the music was dull .", 0.5 * 2 - 1),
    ("the plot was dull , but the music was great .", 0.5 * -1 + 2),
    ("the plot was dull but the music was great .", 0.5 * -1 + 2),
    ("the plot was good , however , the music was dull .", 0.5 * 1 - 1),
    ("the plot was good . but the music was dull .", 1 - 1),   # contrast does not cross "."
    ("the plot was not , the music was good .", 1.0),          # negation scope ends at ","
    ("the plot was not . good .", 1.0),
    ("the cast was good and the music was not dull .", 1 + 1),
    ("it is a real masterpiece .", 1.5 * 2),
    ("it is not an utter disaster .", -(2 * -2)),
    ("i give it ten out of ten .", 0.0),
    ("", 0.0),
    ("zzz qqq .", 0.0),
])
def test_gold_reward_hand_examples(text, score):
  assert R.gold_score(w(text)) == pytest.approx(score)
  assert R.gold_reward(w(text)) == pytest.approx(sig(score))


def test_negating_a_positive_word_lowers_the_reward():
  for adj in ("good", "great", "brilliant", "catchy"):
    assert R.gold_reward(w(f"the music was not {adj} .")) < 0.5 < R.gold_reward(w(f"the music was {adj} ."))


def test_contrast_weights_the_second_half_fully():
  a, b = w("the acting was great"), w("the plot was dull")
  joined = a + [",", "but"] + b + ["."]
  assert R.gold_score(joined) == pytest.approx(0.5 * R.gold_score(a) + R.gold_score(b))
  swapped = b + [",", "but"] + a + ["."]
  assert R.gold_reward(swapped) > R.gold_reward(joined)


def test_reward_positions_hand_example():
  text = w("honestly , the score was not very catchy , but i really liked the plot . "
           "i give it seven out of ten .")
  # not(5) very(6) catchy(7) but(9) really(11) liked(12)
  assert R.reward_positions(text) == [5, 6, 7, 9, 11, 12]
  assert R.reward_is_local(text)


# -- reward positions == words whose deletion changes the reward ----------------------


def deletion_sensitive(words):
  """Independent check: brute-force deletions of single words."""
  base = R.gold_reward(words)
  return [i for i in range(len(words)) if R.gold_reward(words[:i] + words[i + 1:]) != base]


def test_reward_positions_are_exactly_deletion_sensitive_on_samples(samples):
  bearing = 0
  for s in samples:
    assert R.reward_is_local(s.words), " ".join(s.words)
    assert R.reward_positions(s.words) == deletion_sensitive(s.words), " ".join(s.words)
    bearing += len(R.reward_positions(s.words))
  assert bearing > 0.1 * sum(len(s.words) for s in samples)


def random_soups(n, seed):
  """Word lists mixing every category, including texts the grammar never writes."""
  rng = np.random.default_rng(seed)
  pool = ["good", "great", "dull", "awful", "loved", "masterpiece", "not", "never", "very",
          "somewhat", "real", "but", "however", "yet", ",", "and", ".", "the", "plot", "was", "zzz"]
  return [[pool[i] for i in rng.integers(0, len(pool), size=rng.integers(0, 14))] for _ in range(n)]


def test_deleting_a_neutral_word_never_changes_the_reward():
  for words in random_soups(3000, 0):
    for i, x in enumerate(words):
      if x in ("the", "plot", "was", "zzz"):
        assert R.gold_reward(words[:i] + words[i + 1:]) == R.gold_reward(words), words


def test_property_holds_on_every_local_text():
  local = [ws for ws in random_soups(20000, 1) if R.reward_is_local(ws)]
  assert len(local) > 500
  for words in local:
    assert R.reward_positions(words) == deletion_sensitive(words), words


def test_non_local_text_is_flagged():
  # Deleting "great" hands the negation to "good": -2 + 1 == -1 either way.
  words = w("the film was not great good .")
  assert not R.reward_is_local(words)
  assert 4 in R.reward_positions(words) and 4 not in deletion_sensitive(words)
  assert not R.reward_is_local(w("the film was not ."))          # dangling negation
  assert not R.reward_is_local(w("good , bad but great ."))      # contrast target not alone


# -- constraints and prompts ------------------------------------------------------------


def test_constraints():
  text = w("the score was catchy .")
  assert R.contains(text, "catchy") and not R.contains(text, "dull")
  assert R.mentions_topic(text, "music") and not R.mentions_topic(text, "plot")
  with pytest.raises(ValueError, match="unknown topic 'sound'"):
    R.mentions_topic(text, "sound")


def test_prompts(world):
  prompts = world.prompts(1, 200, min_words=2, max_words=8)
  lengths = [len(p) for p in prompts]
  assert min(lengths) == 2 and max(lengths) == 8
  # A prompt is a review prefix: the grammar can continue it.
  assert all(world.prefix_log_prob(p) > -math.inf for p in prompts[:50])


# -- exact likelihood -------------------------------------------------------------------


def test_log_prob_matches_the_sampled_derivation(samples, world):
  for s in samples[:150]:
    joint = world.log_prob(s.words, s.polarity)
    assert joint == pytest.approx(s.joint_log_prob, abs=1e-9)
    other = world.log_prob(s.words, -s.polarity)
    assert world.log_prob(s.words) == pytest.approx(np.logaddexp(joint, other), abs=1e-9)
    assert world.log_prob(s.words) < 0


def test_log_prob_is_normalised_on_enumerable_subprograms(world):
  """Sums p over every closing sentence the grammar can write: must be 1."""
  def total(run, sentences):
    return sum(math.exp(lp) for s in sentences for end, lp, _ in R._parses(s, 0, {}, run) if end == len(s))

  numbers = "one two three four five six seven eight nine ten".split()
  ratings = [w(f"{pre}{n} out of ten .") for pre in ("", "i give it ") for n in numbers]
  for z in (1, -1):
    assert total(lambda t: world._rating(t, z), ratings) == pytest.approx(1.0, abs=1e-12)
  audience = ["", " to anyone", " to everyone", " to families", " to teenagers",
              " to fans of the genre", " to my friends"]
  recs = [w(f"{o}i would{n}{i} recommend it{a} .")
          for o, n, i, a in itertools.product(("", "overall , "), ("", " not"),
                                              ("", " highly", " strongly", " really"), audience)]
  for z in (1, -1):
    assert total(lambda t: world._recommend(t, z), recs) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("prefix", ["", "i", "the plot was not", "i watched this thriller last night ."])
def test_prefix_probabilities_are_normalised(world, prefix):
  """P(prefix) = P(review == prefix) + sum over the vocabulary of P(prefix + word)."""
  p = w(prefix)
  extended = sum(math.exp(world.prefix_log_prob(p + [x])) for x in world.vocabulary)
  assert extended + math.exp(world.log_prob(p)) == pytest.approx(math.exp(world.prefix_log_prob(p)),
                                                                 rel=1e-9)
  assert world.prefix_log_prob(w("zzz")) == -math.inf


def test_log_prob_off_support(world, samples):
  words = samples[0].words
  assert world.log_prob(words[:-1]) == -math.inf
  assert world.log_prob(words + ["."]) == -math.inf
  assert world.log_prob([]) == -math.inf
  assert world.log_prob(w("zzz .")) == -math.inf


def test_entropy_rate(world):
  rate, stderr = world.entropy_rate(0, 100)
  assert 0.5 < rate < 3.0 and 0 < stderr < 0.2
  with pytest.raises(ValueError, match="at least 2 samples"):
    world.entropy_rate(0, 1)


# -- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs(world):
  with pytest.raises(TypeError, match="split the text first"):
    R.gold_reward("the plot was good .")
  with pytest.raises(TypeError, match="word 1 is 3"):
    R.reward_positions(["good", 3])
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    R.World(-1)
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    R.World("0")
  with pytest.raises(ValueError, match="n must be a non-negative int"):
    world.sample(0, -1)
  with pytest.raises(TypeError, match="rng_or_seed"):
    world.sample(1.5, 2)
  with pytest.raises(ValueError, match="min_words <= max_words"):
    world.prompts(0, 2, min_words=5, max_words=3)
  with pytest.raises(ValueError, match="polarity must be None, 1 or -1"):
    world.log_prob(w("the plot was good ."), polarity=0)
