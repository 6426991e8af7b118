"""The reviews world: a seeded stochastic grammar of short movie reviews (:class:`World`).

Why a synthetic world: the papers' tasks (IMDb sentiment, HH, TL;DR) cannot be
downloaded or trained on a laptop CPU, but their *structure* can be rebuilt
with everything known exactly: the generating distribution (:meth:`World.log_prob`:
a model's loss has a known floor, the grammar's entropy rate), the reward
(:func:`gold_reward`, rules in :func:`parse_reward`: preference labels, reward hacking
and KL-regularised optima are measurable against the truth), and which words carry
that reward (:func:`reward_positions`: SparsePO's token masks can be scored against
ground truth).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

# ----------------------------------------------------------------------------
# The fixed lexicon: meanings (polarity, strength, topic) do not depend on the
# seed; a world picks a subset of each class and its own word frequencies.
# ----------------------------------------------------------------------------

CONTRAST_WEIGHT = 0.5   # weight of a sentiment word bound by a contrast word
REWARD_SCALE = 2.0      # gold_reward = sigmoid(gold_score / REWARD_SCALE)

NEGATIONS = ("not", "never")
CONTRASTS = ("but", "yet", "however")
SENTENCE_END = "."
CLAUSE_BREAKS = frozenset((",", "and", SENTENCE_END) + CONTRASTS)

_POS_ADJ = {
    "good": 1, "nice": 1, "fine": 1, "enjoyable": 1, "solid": 1, "pleasant": 1,
    "decent": 1, "lovely": 1, "charming": 1, "entertaining": 1, "impressive": 1,
    "memorable": 1, "effective": 1, "engaging": 1, "great": 2, "excellent": 2,
    "wonderful": 2, "brilliant": 2, "superb": 2, "outstanding": 2, "fantastic": 2,
    "amazing": 2, "terrific": 2, "magnificent": 2, "stunning": 2, "flawless": 2,
    "exceptional": 2, "marvelous": 2,
}
_NEG_ADJ = {
    "bad": -1, "weak": -1, "dull": -1, "boring": -1, "bland": -1, "mediocre": -1,
    "forgettable": -1, "messy": -1, "clumsy": -1, "tedious": -1, "flat": -1,
    "uninspired": -1, "disappointing": -1, "lazy": -1, "awful": -2, "terrible": -2,
    "horrible": -2, "dreadful": -2, "atrocious": -2, "abysmal": -2, "painful": -2,
    "unbearable": -2, "laughable": -2, "pathetic": -2, "appalling": -2, "dismal": -2,
    "hopeless": -2, "woeful": -2,
}
_POS_ADV = {
    "well": 1, "nicely": 1, "smoothly": 1, "gracefully": 1, "effectively": 1,
    "convincingly": 1, "elegantly": 1, "beautifully": 2, "brilliantly": 2,
    "wonderfully": 2, "superbly": 2, "perfectly": 2,
}
_NEG_ADV = {
    "poorly": -1, "badly": -1, "awkwardly": -1, "clumsily": -1, "sloppily": -1,
    "lamely": -1, "flatly": -1, "horribly": -2, "dreadfully": -2, "miserably": -2,
    "disastrously": -2,
}
# (base form, past form) -> strength: "did not like" / "never liked" / "liked".
_VERBS = {
    ("love", "loved"): 2, ("adore", "adored"): 2, ("cherish", "cherished"): 2,
    ("enjoy", "enjoyed"): 1, ("like", "liked"): 1, ("appreciate", "appreciated"): 1,
    ("admire", "admired"): 1,
    ("hate", "hated"): -2, ("loathe", "loathed"): -2, ("despise", "despised"): -2,
    ("dislike", "disliked"): -1, ("resent", "resented"): -1,
}
_RECOMMEND = {"recommend": 1}
_NOUNS = {  # "it is a masterpiece"
    "masterpiece": 2, "triumph": 2, "gem": 2, "marvel": 2, "revelation": 2,
    "delight": 1, "joy": 1, "treat": 1, "success": 1, "achievement": 1,
    "mess": -2, "disaster": -2, "failure": -2, "embarrassment": -2, "travesty": -2,
    "catastrophe": -2, "letdown": -1, "bore": -1, "chore": -1, "disappointment": -1,
    "misfire": -1, "dud": -1, "slog": -1,
}

# Topic -> nouns (word -> plural?), verbs for "the cast performed well",
# neutral noun modifiers, and topic-specific sentiment adjectives.
_TOPICS = {
    "acting": dict(
        nouns={"acting": False, "performances": True, "cast": False, "actors": True, "lead": False},
        verbs=("performed", "played", "acted"), mods=("whole", "supporting", "young"),
        adjs={"convincing": 1, "natural": 1, "nuanced": 2, "moving": 2,
              "wooden": -1, "stiff": -1, "hammy": -1, "unconvincing": -1}),
    "music": dict(
        nouns={"music": False, "score": False, "soundtrack": False, "songs": True},
        verbs=("sounded", "worked", "played"), mods=("orchestral", "background", "piano"),
        adjs={"catchy": 1, "haunting": 2, "soaring": 2, "lush": 1,
              "grating": -1, "shrill": -1, "intrusive": -1, "repetitive": -1}),
    "plot": dict(
        nouns={"plot": False, "story": False, "storyline": False, "script": False, "twists": True},
        verbs=("unfolded", "developed", "worked"), mods=("main", "central", "basic"),
        adjs={"gripping": 2, "clever": 1, "original": 1, "intriguing": 1,
              "predictable": -1, "convoluted": -1, "contrived": -1, "absurd": -1}),
    "visuals": dict(
        nouns={"visuals": True, "cinematography": False, "photography": False, "effects": True,
               "camerawork": False},
        verbs=("looked", "worked"), mods=("digital", "practical", "visual"),
        adjs={"gorgeous": 2, "breathtaking": 2, "vivid": 1, "polished": 1,
              "murky": -1, "ugly": -1, "cheap": -1, "garish": -1}),
    "dialogue": dict(
        nouns={"dialogue": False, "writing": False, "lines": True, "jokes": True,
               "conversations": True},
        verbs=("landed", "flowed", "worked"), mods=("spoken", "improvised"),
        adjs={"witty": 1, "sharp": 1, "funny": 1, "heartfelt": 1,
              "stilted": -1, "clunky": -1, "cheesy": -1, "awkward": -1}),
    "pacing": dict(
        nouns={"pacing": False, "editing": False, "tempo": False, "rhythm": False},
        verbs=("moved", "flowed", "worked"), mods=("overall", "general"),
        adjs={"tight": 1, "brisk": 1, "swift": 1, "assured": 1,
              "sluggish": -1, "slow": -1, "plodding": -1, "rushed": -1}),
    "characters": dict(
        nouns={"characters": True, "heroine": False, "hero": False, "villain": False,
               "protagonist": False, "sidekick": False},
        verbs=("developed", "behaved", "worked"), mods=("main", "central", "secondary"),
        adjs={"likable": 1, "compelling": 2, "relatable": 1, "layered": 1,
              "shallow": -1, "annoying": -1, "thin": -1, "unlikable": -1}),
    "ending": dict(
        nouns={"ending": False, "finale": False, "climax": False, "conclusion": False,
               "resolution": False},
        verbs=("landed", "worked", "resolved"), mods=("final", "eventual"),
        adjs={"satisfying": 1, "powerful": 2, "touching": 1, "surprising": 1,
              "abrupt": -1, "confusing": -1, "unsatisfying": -1, "silly": -1}),
}
TOPIC_NAMES = tuple(_TOPICS)
TOPIC_NOUNS = {t: tuple(spec["nouns"]) for t, spec in _TOPICS.items()}

_ADJ_INT = {"very": 1.5, "really": 1.5, "truly": 2.0, "extremely": 2.0, "incredibly": 2.0,
            "remarkably": 2.0, "so": 1.5, "pretty": 0.75, "fairly": 0.75, "rather": 0.75,
            "somewhat": 0.5, "slightly": 0.5}
_VERB_INT = {"really": 1.5, "truly": 2.0, "genuinely": 1.5, "absolutely": 2.0,
             "thoroughly": 2.0, "somewhat": 0.5}
_ADV_INT = {"very": 1.5, "really": 1.5, "so": 1.5, "remarkably": 2.0, "quite": 1.5,
            "rather": 0.75}
_REC_INT = {"highly": 2.0, "strongly": 2.0, "really": 1.5}
_NOUN_INT = {"real": 1.5, "true": 1.5, "genuine": 1.5, "complete": 2.0, "total": 2.0,
             "absolute": 2.0, "utter": 2.0, "minor": 0.5}

SENTIMENT: dict[str, int] = {
    **_POS_ADJ, **_NEG_ADJ, **_POS_ADV, **_NEG_ADV, **_RECOMMEND, **_NOUNS,
    **{w: s for forms, s in _VERBS.items() for w in forms},
    **{w: s for spec in _TOPICS.values() for w, s in spec["adjs"].items()},
}
INTENSIFIERS: dict[str, float] = {**_ADJ_INT, **_VERB_INT, **_ADV_INT, **_REC_INT, **_NOUN_INT}

_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_FIRST = ("anna", "marco", "lena", "david", "sofia", "omar", "julia", "kenji", "priya", "tomas",
          "elena", "samuel", "mira", "lucas", "nadia", "felix", "ruth", "victor", "ines", "paul",
          "greta", "hugo", "alma", "ivan", "clara", "rafael", "yuki", "oscar", "nina", "leo")
_LAST = ("kovacs", "bellamy", "okafor", "lindqvist", "moreau", "tanaka", "haddad", "ferreira",
         "novak", "whitfield", "castillo", "brennan", "ivanova", "mendes", "sato", "fischer",
         "adeyemi", "romano", "larsen", "quinn", "duval", "petrov", "hale", "morales", "becker",
         "nakamura", "silva", "osei", "keller", "varga")
_ROLES = ("detective", "mother", "soldier", "king", "queen", "doctor", "teacher", "pilot",
          "thief", "lawyer", "journalist", "priest", "captain", "singer", "boxer", "spy",
          "farmer", "scientist", "widow", "stranger")
_GENRES = ("thriller", "comedy", "drama", "western", "musical", "romance", "horror",
           "documentary", "mystery", "fantasy", "adventure", "biopic", "epic", "animation")
_WHEN = ("last night", "last week", "on sunday", "on saturday", "at the cinema", "at home",
         "on a plane", "yesterday", "twice", "with my sister", "with my brother",
         "with my friends", "with my parents", "with my kids", "at a festival", "on television")
_OPENERS = ("honestly ,", "frankly ,", "to be fair ,", "in my opinion ,", "for me ,",
            "admittedly ,", "overall ,", "in the end ,")
_AUDIENCE = ("to anyone", "to everyone", "to families", "to teenagers", "to fans of the genre",
             "to my friends")
_SUBJECTS = ("it", "this film", "this movie", "the film", "the movie")

_VOWELS = frozenset("aeiou")


def _check_lexicon():
  """The reward rules assume disjoint word categories; a word in two would be ambiguous."""
  cats = {"sentiment": set(SENTIMENT), "intensifier": set(INTENSIFIERS), "negation": set(NEGATIONS),
          "contrast": set(CONTRASTS), "break": {",", "and", SENTENCE_END}}
  for (a, sa), (b, sb) in itertools.combinations(cats.items(), 2):
    if sa & sb:
      raise AssertionError(f"lexicon: words {sorted(sa & sb)} are both {a} and {b}")
  scored = set().union(*cats.values())
  neutral = set(_NUMBERS) | set(_FIRST) | set(_LAST) | set(_ROLES) | set(_GENRES)
  for phrases in (_WHEN, _OPENERS, _AUDIENCE, _SUBJECTS):
    neutral |= {w for p in phrases for w in p.split()}
  for spec in _TOPICS.values():
    neutral |= set(spec["nouns"]) | set(spec["verbs"]) | set(spec["mods"])
  neutral -= {",", "and", SENTENCE_END}
  if neutral & scored:
    raise AssertionError(f"lexicon: neutral words {sorted(neutral & scored)} also carry reward")
  if any(s == 0 for s in SENTIMENT.values()) or any(f <= 0 or f == 1 for f in INTENSIFIERS.values()):
    raise AssertionError("lexicon: strengths must be non-zero and intensifier factors positive and != 1")


_check_lexicon()

# ----------------------------------------------------------------------------
# Gold reward
# ----------------------------------------------------------------------------


def _as_words(words, fn: str) -> list[str]:
  if isinstance(words, (str, bytes)):
    raise TypeError(f"{fn}: expected a list of words, got a {type(words).__name__}; "
                    f"split the text first (text.split())")
  words = list(words)
  for i, w in enumerate(words):
    if not isinstance(w, str):
      raise TypeError(f"{fn}: word {i} is {w!r} ({type(w).__name__}), expected str")
  return words


@dataclasses.dataclass(frozen=True)
class RewardParse:
  """How the gold-reward rules apply to one text.

  contributions: sentiment word index -> c_i (see :func:`parse_reward`).
  binds: operator (negation / intensifier / contrast) index -> the sentiment
    word index it binds; operators that bind nothing are absent.
  """
  contributions: dict[int, float]
  binds: dict[int, int]


def parse_reward(words: Sequence[str]) -> RewardParse:
  """Applies the gold-reward rules; the one place they are implemented.

  The rules (exact, from the fixed lexicon; the same for every world). Word categories are
  disjoint: sentiment words ``SENTIMENT`` (signed strength s != 0), negations ``NEGATIONS``,
  intensifiers ``INTENSIFIERS`` (factor f > 0, f != 1: "very" 1.5, "somewhat" 0.5, ...), contrast
  words ``CONTRASTS``, boundaries "," "and" "." and everything else, neutral (unknown words too).

  * A *clause* is a maximal span without a clause break (",", "and", ".", the contrast words);
    a *sentence* ends at ".".
  * A negation or intensifier *binds* the first sentiment word after it in its clause
    (skipping neutral words and other negations/intensifiers; nothing if the clause ends first).
  * A contrast word binds the last sentiment word before it in its sentence (looking back
    across "," and "and" but not across ".").
  * Sentiment word i contributes
    ``c_i = s_i * prod(f bound to i) * (-1)^(#negations bound) * CONTRAST_WEIGHT^(#contrasts bound)``,
    so in "X , but Y" the last sentiment word of X counts half and Y counts fully.
  * ``gold_score = sum_i c_i``; ``gold_reward = sigmoid(gold_score / REWARD_SCALE)`` in (0, 1).
  """
  words = _as_words(words, "parse_reward")
  binds: dict[int, int] = {}
  pending: list[int] = []           # negations/intensifiers waiting in this clause
  last_sent = None                  # last sentiment word of this sentence
  for i, w in enumerate(words):
    if w in SENTIMENT:
      for j in pending:
        binds[j] = i
      pending = []
      last_sent = i
    elif w in INTENSIFIERS or w in NEGATIONS:
      pending.append(i)
    elif w in CLAUSE_BREAKS:
      pending = []
      if w in CONTRASTS and last_sent is not None:
        binds[i] = last_sent
      if w == SENTENCE_END:
        last_sent = None
  contributions = {i: float(SENTIMENT[w]) for i, w in enumerate(words) if w in SENTIMENT}
  for j, i in binds.items():
    w = words[j]
    if w in NEGATIONS:
      contributions[i] = -contributions[i]
    elif w in CONTRASTS:
      contributions[i] *= CONTRAST_WEIGHT
    else:
      contributions[i] *= INTENSIFIERS[w]
  return RewardParse(contributions, binds)


def gold_score(words: Sequence[str]) -> float:
  """Raw sentiment score: sum of contributions, in word order (deterministic rounding)."""
  parse = parse_reward(words)
  return float(sum(parse.contributions[i] for i in sorted(parse.contributions)))


def gold_reward(words: Sequence[str]) -> float:
  """``sigmoid(gold_score(words) / REWARD_SCALE)`` in (0, 1); 0.5 for neutral text."""
  return 1.0 / (1.0 + math.exp(-gold_score(words) / REWARD_SCALE))


def reward_positions(words: Sequence[str]) -> list[int]:
  """Sorted word indices that carry reward: every sentiment word plus every negation,
  intensifier or contrast word that binds one (:func:`parse_reward`).

  When :func:`reward_is_local` holds (always, on grammar samples), index i is in the result
  iff deleting word i changes ``gold_score`` (and, away from float saturation at
  |score| > ~70, ``gold_reward``): deleting a word then changes at most one contribution,
  by a factor != 1 or to zero, and no binding re-routes (neutral words never matter:
  bindings skip them and no rule counts distances). Free text (e.g. a policy's samples)
  may not be local: deleting a sentiment word can hand its negation to the next sentiment
  word of the clause, and the two sets can differ; the positions then still say which
  words the rules apply to.
  """
  parse = parse_reward(words)
  return sorted(set(parse.contributions) | set(parse.binds))


def reward_is_local(words: Sequence[str]) -> bool:
  """Whether ``reward_positions`` provably equals the deletion-sensitive words.

  True iff every negation/intensifier/contrast binds a sentiment word, no
  clause holds two sentiment words, and each contrast word's target is the
  only sentiment word between the previous "." and the contrast word.
  """
  words = _as_words(words, "reward_is_local")
  parse = parse_reward(words)
  for i, w in enumerate(words):
    if (w in NEGATIONS or w in INTENSIFIERS or w in CONTRASTS) and i not in parse.binds:
      return False
  in_clause = 0
  for w in words:
    if w in CLAUSE_BREAKS:
      in_clause = 0
    elif w in SENTIMENT:
      in_clause += 1
      if in_clause > 1:
        return False
  for j, target in parse.binds.items():
    if words[j] in CONTRASTS:
      k = j - 1
      while k >= 0 and words[k] != SENTENCE_END:
        if words[k] in SENTIMENT and k != target:
          return False
        k -= 1
  return True


def contains(words: Sequence[str], word: str) -> bool:
  """Pointwise constraint for f-DPG: the review uses ``word``."""
  return word in _as_words(words, "contains")


def mentions_topic(words: Sequence[str], topic: str) -> bool:
  """Pointwise constraint: the review names one of ``topic``'s nouns."""
  if topic not in TOPIC_NOUNS:
    raise ValueError(f"mentions_topic: unknown topic {topic!r}; known: {list(TOPIC_NAMES)}")
  nouns = set(TOPIC_NOUNS[topic])
  return any(w in nouns for w in _as_words(words, "mentions_topic"))


# ----------------------------------------------------------------------------
# The grammar as a program of choices, run by a sampler or an exact scorer.
# ----------------------------------------------------------------------------


class _Cat:
  """A categorical over ``items`` (zero weights dropped so every branch is live)."""
  __slots__ = ("items", "probs", "logs", "cum", "prob_of", "log_of")

  def __init__(self, items: Sequence, weights: Sequence[float]):
    pairs = [(x, float(w)) for x, w in zip(items, weights) if w > 0]
    if not pairs:
      raise ValueError("categorical with no positive weight")
    total = sum(w for _, w in pairs)
    self.items = tuple(x for x, _ in pairs)
    self.probs = tuple(w / total for _, w in pairs)
    self.cum = list(itertools.accumulate(self.probs))
    self.cum[-1] = 1.0
    self.logs = tuple(math.log(p) for p in self.probs)
    self.prob_of = {}
    for x, p in zip(self.items, self.probs):
      self.prob_of[x] = self.prob_of.get(x, 0.0) + p
    self.log_of = {x: math.log(p) for x, p in self.prob_of.items()}

  def restrict(self, keep: Callable) -> "_Cat | None":
    pairs = [(x, p) for x, p in zip(self.items, self.probs) if keep(x)]
    return _Cat(*zip(*pairs)) if pairs else None

  def mass(self, keep: Callable) -> float:
    return sum(p for x, p in zip(self.items, self.probs) if keep(x))


class _Sampler:
  """Runs the program forward, drawing every choice from ``rng``.

  ``logp`` accumulates the probability of the drawn derivation, log p(words, z)
  when the grammar is unambiguous given z (a cross-check on the scorer).
  """

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self.out: list[str] = []
    self.logp = 0.0

  def choose(self, cat: _Cat):
    i = bisect.bisect_left(cat.cum, self.rng.random())
    self.logp += cat.logs[i]
    return cat.items[i]

  def word(self, cat: _Cat) -> str:
    w = self.choose(cat)
    self.out.append(w)
    return w

  def emit(self, text: str):
    self.out.extend(text.split())

  def call(self, fn, *args):
    return fn(self, *args)


class _Branch(Exception):
  def __init__(self, n: int):
    self.n = n


class _Mismatch(Exception):
  pass


class _Done(Exception):
  """Prefix mode: the words ran out, so every continuation counts."""


_DONE = object()   # a sub-program parse that ran past the end of a prefix


class _Replay:
  """Runs (part of) the program against fixed words, first structural choices forced.

  A structural choice past the forced prefix raises ``_Branch`` (the driver
  retries each option); a word the program could not emit raises
  ``_Mismatch``. Word choices are not branched: the text says which it was.
  ``call(fn, *args)`` runs a sub-program (a sentence, a clause) through the
  shared ``memo``: all its parses from this position are found once, and the
  caller branches over them like over a choice -- a chart parser's reuse, so
  a branch does not replay the words before it.
  """

  def __init__(self, target: list[str], forced: tuple[int, ...], start: int, memo: dict,
               prefix: bool):
    self.target, self.forced, self.memo, self.prefix = target, forced, memo, prefix
    self.k = 0
    self.pos = start
    self.logp = 0.0

  def _next(self, n: int) -> int:
    if self.k == len(self.forced):
      raise _Branch(n)
    self.k += 1
    return self.forced[self.k - 1]

  def choose(self, cat: _Cat):
    if self.k == len(self.forced):
      raise _Branch(len(cat.items))
    i = self.forced[self.k]
    self.k += 1
    self.logp += cat.logs[i]
    return cat.items[i]

  def _past_end(self):
    raise _Done if self.prefix else _Mismatch

  def word(self, cat: _Cat) -> str:
    if self.pos >= len(self.target):
      self._past_end()
    w = self.target[self.pos]
    lp = cat.log_of.get(w)
    if lp is None:
      raise _Mismatch
    self.logp += lp
    self.pos += 1
    return w

  def emit(self, text: str):
    for w in text.split():
      if self.pos >= len(self.target):
        self._past_end()
      if self.target[self.pos] != w:
        raise _Mismatch
      self.pos += 1

  def call(self, fn, *args):
    key = (fn.__name__, args, self.pos)
    parses = self.memo.get(key)
    if parses is None:
      parses = self.memo[key] = _parses(self.target, self.pos, self.memo, lambda t: fn(t, *args),
                                        prefix=self.prefix)
    if not parses:
      raise _Mismatch
    self.pos, logp, result = parses[self._next(len(parses))]
    self.logp += logp
    if result is _DONE:
      raise _Done
    return result


def _parses(target: list[str], start: int, memo: dict, run, root: tuple[int, ...] = (),
            prefix: bool = False) -> list[tuple[int, float, object]]:
  """Every derivation of ``run`` reading ``target`` from ``start``: (end, log p, result).

  Depth-first over structural choices; each retry replays ``run`` from
  ``start`` with one more choice forced (sub-programs come from the memo).
  ``root`` forces the first choices (only derivations that make them).
  With ``prefix``, a derivation that wants a word after the last one is
  complete (result ``_DONE``): the choices made after the end then sum to
  one, so the total is the probability that the text *starts* with target.
  """
  found = []
  stack: list[tuple[int, ...]] = [root]
  while stack:
    forced = stack.pop()
    replay = _Replay(target, forced, start, memo, prefix)
    try:
      result = run(replay)
    except _Branch as b:
      stack.extend(forced + (i,) for i in range(b.n))
      continue
    except _Mismatch:
      continue
    except _Done:
      result = _DONE
    found.append((replay.pos, replay.logp, result))
  return found


def _zipf(rng: np.random.Generator, items: Sequence, keep_frac: float, min_keep: int = 2) -> _Cat:
  """A world's version of a word class: a seeded subset with Zipf-like frequencies."""
  items = list(items)
  keep = min(len(items), max(min_keep, int(round(keep_frac * len(items)))))
  order = rng.permutation(len(items))[:keep]
  exponent = rng.uniform(0.5, 1.2)
  weights = 1.0 / np.arange(1, keep + 1) ** exponent
  return _Cat([items[i] for i in order], weights)


def _dirichlet(rng: np.random.Generator, items: Sequence, base: Sequence[float],
               concentration: float = 40.0) -> _Cat:
  """Seeded perturbation of hand-set probabilities, so worlds differ in style."""
  base = np.asarray(base, float)
  return _Cat(items, rng.dirichlet(concentration * base / base.sum()))


def _bernoulli(p: float) -> _Cat:
  return _Cat((False, True), (1.0 - p, p))


_ALWAYS = _Cat((True,), (1.0,))   # a choice with one outcome (log-prob 0)


_GENRE = ("genre",)   # film_word label: "this <genre word>" instead of "this film"
# Text the program emits verbatim (World._reachable_words adds the chosen words).
_LITERALS = ("i", "this", "directed this", "stars", "the", "were", "was", "did not", "never", ",",
             ", however ,", "and", ".", "not", "as the", "overall ,", "i would", "recommend it",
             "i give it", "out of ten .", "a", "an")

class Sample(NamedTuple):
  """One draw: the words, the latent review polarity z, and log p(words, z)."""
  words: list[str]
  polarity: int
  joint_log_prob: float


MAX_CONTENT_SENTENCES = 4
MAX_INTENSIFIERS = 2


class World:
  """One seeded reviews world: word subsets, frequencies and grammar probabilities.

  ``World(seed)`` is a pure function of ``seed``: same seed, same world, and
  ``sample(s, n)`` is a pure function of (world seed, ``s``). A review is a list of words
  ("," and "." are words too), e.g. ``i watched this thriller last night . the score was not
  very catchy , but the cast performed brilliantly . i give it seven out of ten .``

  Structure a model has to learn (all stochastic, all seeded):

  * a latent review polarity ``z`` in {+1, -1} that each clause, and the closing
    rating/recommendation, follows with a world-specific probability (sentiment consistency);
  * topics (acting, music, plot, ...) drawn without replacement within a review, each with
    its own nouns, verbs, neutral modifiers and sentiment adjectives (topic agreement);
  * agreement: was/were with the noun's number, a/an with the next word, "did not like" vs
    "never liked" (verb form after negation);
  * negation, intensifiers/downtoners and contrast clauses ("X , but Y");
  * neutral sentences (who directed it, where it was watched) and a rating ("i give it seven
    out of ten") that correlates with the reward without carrying it.
  """

  def __init__(self, seed: int):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"World: seed must be a non-negative int, got {seed!r}")
    self.seed = int(seed)
    rng = np.random.default_rng([0x5EED, self.seed])
    keep = 0.8
    u = lambda lo, hi: float(rng.uniform(lo, hi))

    # Review-level latent and how strongly the text follows it.
    q = u(0.4, 0.6)
    self.p_polarity = _Cat((1, -1), (q, 1.0 - q))
    self.p_follow = _bernoulli(u(0.75, 0.9))      # a clause takes the review's polarity
    self.p_contrast_final = _bernoulli(u(0.85, 0.95))  # "X but Y": Y takes it
    self.p_contrast_same = _bernoulli(1.0 - u(0.75, 0.9))  # X agrees with Y (usually opposes)
    self.p_conj_same = _bernoulli(u(0.75, 0.9))        # "X and Y": same polarity
    self.p_rec_follow = _bernoulli(u(0.85, 0.97))

    # Review shape.
    self.p_intro = _bernoulli(u(0.3, 0.6))
    self.p_more = [_bernoulli(p) for p in (u(0.6, 0.8), u(0.45, 0.65), u(0.25, 0.45))]
    self.p_closing = _dirichlet(rng, ("none", "recommend", "rating", "both"), (0.3, 0.3, 0.25, 0.15))
    self.p_sentence = _dirichlet(rng, ("simple", "conj", "contrast", "verdict", "name"),
                                 (0.35, 0.15, 0.2, 0.15, 0.15))
    self.p_opener = _bernoulli(u(0.1, 0.3))
    self.openers = _zipf(rng, _OPENERS, keep)
    self.p_clause = _dirichlet(rng, ("copula", "verb", "adverb"), (0.5, 0.3, 0.2))
    self.p_topic_weight = dict(zip(TOPIC_NAMES, rng.dirichlet(np.full(len(TOPIC_NAMES), 5.0))))

    # Operators.
    self.p_negate = _bernoulli(u(0.15, 0.3))
    self.p_more_int = [_bernoulli(u(0.25, 0.4)), _bernoulli(u(0.05, 0.15))]
    self.negations = _zipf(rng, NEGATIONS, 1.0)
    self.p_did_not = _bernoulli(u(0.5, 0.8))      # "did not like" vs "never liked"
    self.adj_int = _zipf(rng, _ADJ_INT, keep)
    self.verb_int = _zipf(rng, _VERB_INT, keep)
    # After a negation only amplifiers ("not very good"; "not somewhat good" reads badly).
    amplifier = lambda w: INTENSIFIERS[w] > 1
    self.adj_amp = self.adj_int.restrict(amplifier)
    self.verb_amp = self.verb_int.restrict(amplifier)
    self.adv_int = _zipf(rng, _ADV_INT, keep)
    self.rec_int = _zipf(rng, _REC_INT, 1.0)
    self.noun_int = _zipf(rng, _NOUN_INT, keep)
    self.p_rec_int = _bernoulli(u(0.2, 0.4))
    self.p_noun_int = _bernoulli(u(0.25, 0.45))
    self.contrasts = _zipf(rng, CONTRASTS, 1.0)
    self.p_comma = _bernoulli(u(0.3, 0.7))

    # Sentiment words by polarity (and, for adjectives, topic).
    def split(d):
      return {+1: [w for w, s in d.items() if s > 0], -1: [w for w, s in d.items() if s < 0]}
    adj = split({**_POS_ADJ, **_NEG_ADJ})
    self.adv = {p: _zipf(rng, ws, keep) for p, ws in split({**_POS_ADV, **_NEG_ADV}).items()}
    self.noun = {p: _zipf(rng, ws, keep) for p, ws in split(_NOUNS).items()}
    verbs = {+1: [f for f, s in _VERBS.items() if s > 0], -1: [f for f, s in _VERBS.items() if s < 0]}
    self.verb = {p: _zipf(rng, fs, keep) for p, fs in verbs.items()}
    self.verb_base = {p: _Cat([f[0] for f in c.items], c.probs) for p, c in self.verb.items()}
    self.verb_past = {p: _Cat([f[1] for f in c.items], c.probs) for p, c in self.verb.items()}
    generic = {p: _zipf(rng, ws, keep) for p, ws in adj.items()}
    self.p_topic_adj = u(0.3, 0.5)   # share of a clause's adjective mass on topic words
    self.topic_nouns, self.topic_verbs, self.topic_mods, self.topic_adj = {}, {}, {}, {}
    for t in TOPIC_NAMES:
      spec = _TOPICS[t]
      self.topic_nouns[t] = _zipf(rng, spec["nouns"], keep)
      self.topic_verbs[t] = _zipf(rng, spec["verbs"], 1.0, 1)
      self.topic_mods[t] = _zipf(rng, spec["mods"], 1.0, 1)
      for p, ws in split(spec["adjs"]).items():
        own = _zipf(rng, ws, keep)
        items = own.items + generic[p].items
        weights = [self.p_topic_adj * q for q in own.probs] + \
                  [(1 - self.p_topic_adj) * q for q in generic[p].probs]
        self.topic_adj[t, p] = _Cat(items, weights)
    self.plural = {w: pl for spec in _TOPICS.values() for w, pl in spec["nouns"].items()}
    self.p_mod = _bernoulli(u(0.1, 0.25))

    # Neutral material.
    self.first = _zipf(rng, _FIRST, keep)
    self.last = _zipf(rng, _LAST, keep)
    self.roles = _zipf(rng, _ROLES, keep)
    self.genres = _zipf(rng, _GENRES, keep)
    self.when = _zipf(rng, _WHEN, keep)
    self.subjects = _zipf(rng, _SUBJECTS, 1.0)
    self.audience = _zipf(rng, _AUDIENCE, 1.0)
    self.p_audience = _bernoulli(u(0.3, 0.6))
    self.p_overall = _bernoulli(u(0.2, 0.4))
    self.intro_kind = _dirichlet(rng, ("watched", "directed", "stars"), (0.5, 0.3, 0.2))
    self.watched = _zipf(rng, ("watched", "saw"), 1.0)
    self.film_word = _zipf(rng, ("film", "movie", _GENRE), 1.0)
    self.copula = _zipf(rng, ("is", "was"), 1.0)
    self.p_short_rating = _bernoulli(u(0.2, 0.4))
    # Ratings: a noisy, polarity-dependent score; neutral words, so they
    # correlate with the reward without carrying it.
    peak = {1: rng.uniform(7, 9), -1: rng.uniform(2, 4)}
    self.rating = {p: _Cat(_NUMBERS, np.exp(-0.5 * ((np.arange(1, 11) - peak[p]) / 1.5) ** 2))
                   for p in (1, -1)}

    # Articles before "a/an X": choose the article first, then X from the
    # matching half, so the article never needs look-ahead when scoring.
    vowel = lambda w: w[0] in _VOWELS
    self.article = {}
    for key, cat in [(("int",), self.noun_int)] + [(("noun", p), self.noun[p]) for p in (1, -1)]:
      m = cat.mass(vowel)
      self.article[key] = (_Cat(("a", "an"), (1 - m, m)), cat.restrict(lambda w: not vowel(w)),
                           cat.restrict(vowel))

    self._topic_cats: dict = {}
    self.vocabulary = self._reachable_words()

  # -- the program -----------------------------------------------------------

  def _review(self, t) -> int:
    z = t.choose(self.p_polarity)
    if t.choose(self.p_intro):
      t.call(self._intro)
    used: tuple[str, ...] = ()
    for k in range(MAX_CONTENT_SENTENCES):
      used = t.call(self._content, z, used)
      if k == MAX_CONTENT_SENTENCES - 1 or not t.choose(self.p_more[k]):
        break
    closing = t.choose(self.p_closing)
    if closing in ("recommend", "both"):
      t.call(self._recommend, z)
    if closing in ("rating", "both"):
      t.call(self._rating, z)
    return z

  def _intro(self, t):
    kind = t.choose(self.intro_kind)
    if kind == "watched":
      t.emit("i")
      t.word(self.watched)
      t.emit("this")
      what = t.choose(self.film_word)
      if what is _GENRE:
        t.word(self.genres)
      else:
        t.emit(what)
      t.emit(t.choose(self.when))
    elif kind == "directed":
      self._name(t)
      t.emit("directed this")
      t.word(self.genres)
    else:
      t.emit("this")
      t.word(self.genres)
      t.emit("stars")
      self._name(t)
    t.emit(".")

  def _name(self, t):
    t.word(self.first)
    t.word(self.last)

  def _topic(self, t, used: list[str]) -> str:
    """A topic not yet used in this review (appended to ``used``)."""
    key = tuple(sorted(used))
    cat = self._topic_cats.get(key)
    if cat is None:
      free = [x for x in TOPIC_NAMES if x not in used]
      cat = self._topic_cats[key] = _Cat(free, [self.p_topic_weight[x] for x in free])
    topic = t.choose(cat)
    used.append(topic)
    return topic

  def _polarity(self, t, follow: _Cat, z: int) -> int:
    return z if t.choose(follow) else -z

  def _content(self, t, z: int, used: tuple[str, ...]) -> tuple[str, ...]:
    """One content sentence; returns the topics used so far (a pure function for the memo).

    Choices that only the next words can tell apart (opener, polarity,
    topic) live in sub-programs so that scoring does not multiply them.
    """
    kind = t.choose(self.p_sentence)
    if kind in ("conj", "contrast") and len(TOPIC_NAMES) - len(used) < 2:
      kind = "simple"
    t.call(self._opener)
    if kind == "simple":
      _, used = t.call(self._topic_clause, self.p_follow, z, used)
    elif kind == "conj":
      p1, used = t.call(self._topic_clause, self.p_follow, z, used)
      t.emit("and")
      _, used = t.call(self._topic_clause, self.p_conj_same, p1, used)
    elif kind == "contrast":
      p2 = self._polarity(t, self.p_contrast_final, z)
      _, used = t.call(self._topic_clause, self.p_contrast_same, p2, used)
      word = t.choose(self.contrasts)
      if word == "however":
        t.emit(", however ,")
      else:
        if t.choose(self.p_comma):
          t.emit(",")
        t.emit(word)
      _, used = t.call(self._topic_clause, _ALWAYS, p2, used)
    elif kind == "verdict":
      t.call(self._verdict, self._polarity(t, self.p_follow, z))
    else:
      t.call(self._name_clause, self._polarity(t, self.p_follow, z))
    t.emit(".")
    return used

  def _opener(self, t):
    if t.choose(self.p_opener):
      t.emit(t.choose(self.openers))

  def _topic_clause(self, t, same: _Cat, ref: int, used: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    """A clause on a fresh topic with polarity ``ref`` (if ``same`` says so) or ``-ref``."""
    pol = self._polarity(t, same, ref)
    topics = list(used)
    topic = self._topic(t, topics)
    t.call(self._clause, pol, topic)
    return pol, tuple(topics)

  def _negation(self, t, pol: int) -> int:
    """Maybe emits a negation; returns the polarity the sentiment word must have."""
    if t.choose(self.p_negate):
      t.word(self.negations)
      return -pol
    return pol

  def _intensifiers(self, t, cat: _Cat):
    for k in range(MAX_INTENSIFIERS):
      if not t.choose(self.p_more_int[k]):
        return
      t.word(cat)

  def _noun_phrase(self, t, topic: str) -> str:
    t.emit("the")
    if t.choose(self.p_mod):
      t.word(self.topic_mods[topic])
    return t.word(self.topic_nouns[topic])

  def _clause(self, t, pol: int, topic: str):
    form = t.choose(self.p_clause)
    if form == "copula":
      noun = self._noun_phrase(t, topic)
      t.emit("were" if self.plural[noun] else "was")
      s = self._negation(t, pol)
      self._intensifiers(t, self.adj_int if s == pol else self.adj_amp)
      t.word(self.topic_adj[topic, s])
    elif form == "verb":
      t.emit("i")
      if t.choose(self.p_negate):
        if t.choose(self.p_did_not):
          t.emit("did not")
          self._intensifiers(t, self.verb_amp)
          t.word(self.verb_base[-pol])
        else:
          t.emit("never")
          self._intensifiers(t, self.verb_amp)
          t.word(self.verb_past[-pol])
      else:
        self._intensifiers(t, self.verb_int)
        t.word(self.verb_past[pol])
      self._noun_phrase(t, topic)
    else:
      self._noun_phrase(t, topic)
      t.word(self.topic_verbs[topic])
      self._intensifiers(t, self.adv_int)
      t.word(self.adv[pol])

  def _a_an(self, t, key):
    article, consonant, vowel = self.article[key]
    return consonant if t.word(article) == "a" else vowel

  def _verdict(self, t, pol: int):
    t.emit(t.choose(self.subjects))
    t.word(self.copula)
    s = -pol if t.choose(self.p_negate) else pol
    if s != pol:
      t.emit("not")
    if t.choose(self.p_noun_int):
      t.word(self._a_an(t, ("int",)))
      t.word(self.noun[s])
    else:
      t.word(self._a_an(t, ("noun", s)))

  def _name_clause(self, t, pol: int):
    self._name(t)
    t.emit("was")
    s = self._negation(t, pol)
    self._intensifiers(t, self.adj_int if s == pol else self.adj_amp)
    t.word(self.topic_adj["acting", s])
    t.emit("as the")
    t.word(self.roles)

  def _recommend(self, t, z: int):
    pol = self._polarity(t, self.p_rec_follow, z)
    if t.choose(self.p_overall):
      t.emit("overall ,")
    t.emit("i would")
    if pol < 0:
      t.emit("not")
    if t.choose(self.p_rec_int):
      t.word(self.rec_int)
    t.emit("recommend it")
    if t.choose(self.p_audience):
      t.emit(t.choose(self.audience))
    t.emit(".")

  def _rating(self, t, z: int):
    if not t.choose(self.p_short_rating):
      t.emit("i give it")
    t.word(self.rating[z])
    t.emit("out of ten .")

  # -- public API --------------------------------------------------------------

  def sample_detailed(self, rng_or_seed, n: int) -> list[Sample]:
    """``n`` reviews with their latent polarity and derivation log-probability."""
    rng = _rng(rng_or_seed, "sample_detailed")
    _check_count(n, "n")
    out = []
    for _ in range(n):
      s = _Sampler(rng)
      z = self._review(s)
      out.append(Sample(s.out, z, s.logp))
    return out

  def sample(self, rng_or_seed, n: int) -> list[list[str]]:
    """``n`` reviews, each a list of words ending with "."."""
    return [x.words for x in self.sample_detailed(rng_or_seed, n)]

  def prompts(self, rng_or_seed, n: int, min_words: int = 2, max_words: int = 8) -> list[list[str]]:
    """``n`` review prefixes of ``min_words..max_words`` words (uniform length).

    The length is capped at ``len(review) - 1`` so every prompt has a
    continuation in the grammar.
    """
    rng = _rng(rng_or_seed, "prompts")
    _check_count(n, "n")
    if not 1 <= min_words <= max_words:
      raise ValueError(f"prompts: need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    out = []
    for _ in range(n):
      s = _Sampler(rng)
      self._review(s)
      hi = min(max_words, len(s.out) - 1)
      lo = min(min_words, hi)
      out.append(s.out[:int(rng.integers(lo, hi + 1))])
    return out

  def log_prob(self, words: Sequence[str], polarity: int | None = None) -> float:
    """Exact log p(review) in nats, end of review included; -inf off support.

    With ``polarity`` (+1/-1): the joint log p(review, z=polarity). Sums over
    every derivation, so it is exact even where two derivations give the
    same words: the grammar is a program of categorical choices, replayed with
    forced choices, depth first, pruning a derivation at the first word it could
    not have produced; word choices are read straight off the text, so only
    structural choices branch. Cost: a few ms per review.
    """
    words = _as_words(words, "log_prob")
    if polarity not in (None, 1, -1):
      raise ValueError(f"log_prob: polarity must be None, 1 or -1, got {polarity!r}")
    # z is the program's first choice: forcing it skips the other half of the search.
    root = () if polarity is None else (self.p_polarity.items.index(polarity),)
    parses = _parses(words, 0, {}, self._review, root)
    logps = [lp for end, lp, z in parses if end == len(words) and polarity in (None, z)]
    return float(np.logaddexp.reduce(logps)) if logps else -math.inf

  def prefix_log_prob(self, words: Sequence[str]) -> float:
    """Exact log P(a review starts with ``words``); 0 for no words, -inf if impossible.

    Gives the true conditional of a continuation,
    ``log_prob(prompt + rest) - prefix_log_prob(prompt)``, and the true
    next-word distribution, ``prefix_log_prob(prefix + [w]) - prefix_log_prob(prefix)``.
    """
    words = _as_words(words, "prefix_log_prob")
    parses = _parses(words, 0, {}, self._review, prefix=True)
    logps = [lp for end, lp, _ in parses if end == len(words)]
    return float(np.logaddexp.reduce(logps)) if logps else -math.inf

  def entropy_rate(self, rng_or_seed, n: int = 1000) -> tuple[float, float]:
    """(nats per token, its standard error) from ``n`` samples.

    Tokens are the words plus the end-of-review token, as an LM with an EOS
    predicts them; the estimate is mean(-log p) / mean(#words + 1) (a ratio
    estimator; its standard error comes from the delta method): the floor of an
    SFT model's per-token loss on this corpus.
    """
    _check_count(n, "n")
    if n < 2:
      raise ValueError(f"entropy_rate: n={n}; need at least 2 samples for a standard error")
    samples = self.sample(rng_or_seed, n)
    nll = np.array([-self.log_prob(w) for w in samples])
    toks = np.array([len(w) + 1 for w in samples], float)
    rate = nll.mean() / toks.mean()
    resid = nll - rate * toks
    stderr = resid.std(ddof=1) / math.sqrt(n) / toks.mean()
    return float(rate), float(stderr)

  def _reachable_words(self) -> tuple[str, ...]:
    """Every word this world can emit, sorted (the tokenizer's vocabulary)."""
    phrases = set(_LITERALS)
    cats = [self.openers, self.negations, self.adj_int, self.verb_int, self.adv_int, self.rec_int,
            self.noun_int, self.contrasts, self.first, self.last, self.roles, self.genres, self.when,
            self.subjects, self.audience, self.watched, self.film_word, self.copula]
    for d in (self.adv, self.noun, self.verb_base, self.verb_past, self.topic_nouns, self.topic_verbs,
              self.topic_mods, self.topic_adj, self.rating):
      cats.extend(d.values())
    for c in cats:
      phrases.update(x for x in c.items if isinstance(x, str))
    return tuple(sorted({w for p in phrases for w in p.split()}))


def _rng(rng_or_seed, fn: str) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool) and rng_or_seed >= 0:
    return np.random.default_rng(int(rng_or_seed))
  raise TypeError(f"{fn}: rng_or_seed must be a numpy Generator or a non-negative int, got {rng_or_seed!r}")


def _check_count(n, name: str):
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"{name} must be a non-negative int, got {n!r}")


def join(words: Iterable[str]) -> str:
  """Review text as stored on disk: words joined by single spaces."""
  return " ".join(words)
