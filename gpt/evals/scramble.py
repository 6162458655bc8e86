"""GPT-3's word scrambling tasks (Brown et al. 2020, section 3.9.2), generated from a word list.

  cycle_letters     letters rotated:                      "lyinevitab =" -> "inevitably"
  anagrams1         all but the first and last letter shuffled:   "criroptuon =" -> "corruption"
  anagrams2         all but the first two and last two shuffled:  "opoepnnt =" -> "opponent"
  random_insertion  a punctuation or space character between every two letters:
                                                          "s.u!c/c!e.s s i/o/n =" -> "succession"
  reversed_words    letters reversed:                     "stcejbo =" -> "objects"

Prompts are the paper's: the task description once, then one line per demonstration and the
query (section 2, figure 2.1: "Please unscramble the letters into a word, and write that word:\\n
skicts = sticks\\npciinc = picnic\\nasinol ="); zero-shot that is exactly the context of the data
it released, which lm-eval's unscramble tasks read. The answer is the word.

The word list ships with the package: the paper took "the top 10,000 most frequent words ... of
length more than 4 characters and less than 15"; we take the word-initial tokens of GPT-2's
vocabulary ("Ġword" in gpt/assets/gpt2/encoder.json) made of 4 to 15 lowercase letters, in token id
order (BPE merges are learned most-frequent first, so that order follows frequency in WebText).
A task only uses the words it can change (anagrams2 needs two different letters between the first
two and the last two, reversed_words no palindromes, ...), and a scramble that gives the word back
is redrawn, so no item shows its own answer. The first 10,000 usable words are the scored items, as
in the paper; the rest are the demonstration pool, so a demonstration is never the scored word.
Scrambles are drawn with a fixed seed per task.
"""

from __future__ import annotations

import functools
import json
import re
import string
import zlib
from pathlib import Path

import numpy as np

from gpt.evals.base import TaskData
from gpt.evals.generative import Example, GenerativeTask
from gpt.hashing import hash_file

SEED = 2020
N_ITEMS = 10_000
VOCAB = Path(__file__).resolve().parent.parent / "assets" / "gpt2" / "encoder.json"
INSTRUCTION = "Please unscramble the letters into a word, and write that word:\n"
# Inserted between letters by random_insertion: punctuation or a space, but not "=", which ends
# the scrambled word in the prompt.
INSERTS = "".join(c for c in string.punctuation if c != "=") + " "
NAMES = ("cycle_letters", "anagrams1", "anagrams2", "random_insertion", "reversed_words")
_WORD = re.compile(r"[a-z]{4,15}")


@functools.lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
  """GPT-2's word-initial tokens of 4 to 15 lowercase letters, in token id order."""
  encoder = json.loads(VOCAB.read_text(encoding="utf-8"))
  tokens = sorted(encoder.items(), key=lambda kv: kv[1])
  return tuple(t[1:] for t, _ in tokens if t.startswith("\u0120") and _WORD.fullmatch(t[1:]))


def _shuffle_middle(word: str, keep: int, rng: np.random.Generator) -> str:
  middle = list(word[keep:len(word) - keep])
  rng.shuffle(middle)
  return word[:keep] + "".join(middle) + word[len(word) - keep:]


def _transform(name: str, word: str, rng: np.random.Generator) -> str:
  if name == "cycle_letters":
    k = int(rng.integers(1, len(word)))
    return word[k:] + word[:k]
  if name == "anagrams1":
    return _shuffle_middle(word, 1, rng)
  if name == "anagrams2":
    return _shuffle_middle(word, 2, rng)
  if name == "random_insertion":
    picks = rng.integers(0, len(INSERTS), size=len(word) - 1)
    return word[0] + "".join(INSERTS[p] + c for p, c in zip(picks.tolist(), word[1:]))
  if name == "reversed_words":
    return word[::-1]
  raise ValueError(f"unknown scrambling task {name!r}")


def usable(name: str, word: str) -> bool:
  """Whether task `name` can turn `word` into something else."""
  if name == "anagrams1":
    return len(set(word[1:-1])) > 1
  if name == "anagrams2":
    return len(set(word[2:-2])) > 1
  if name == "cycle_letters":
    return any(word[k:] + word[:k] != word for k in range(1, len(word)))
  if name == "reversed_words":
    return word != word[::-1]
  return True


def scramble(name: str, word: str, rng: np.random.Generator) -> str:
  """`word` transformed as task `name` does, redrawn until it differs (the word must be `usable`)."""
  while True:
    out = _transform(name, word, rng)
    if out != word:
      return out


@functools.lru_cache(maxsize=len(NAMES))
def items(name: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
  """(scored, pool) (scrambled, word) pairs of task `name`, the same in every run."""
  words = [w for w in word_list() if usable(name, w)]
  rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
  pairs = tuple((scramble(name, w, rng), w) for w in words)
  return pairs[:N_ITEMS], pairs[N_ITEMS:]


class Scramble(GenerativeTask):
  """One of the word scrambling tasks, by lm-eval's name (see module docstring)."""

  # Words have at most 15 letters, a few BPE tokens; the rest is room for the newline.
  max_new_tokens = 10
  description = INSTRUCTION
  separator = "\n"  # one line per demonstration, as in the paper

  def __init__(self, name: str):
    if name not in NAMES:
      raise ValueError(f"unknown scrambling task {name!r}")
    self.name = name

  def load(self, data_dir: Path) -> TaskData:
    del data_dir  # generated from the packaged vocabulary
    docs, pool = items(self.name)
    return TaskData(list(docs), list(pool), {str(VOCAB): hash_file(VOCAB)},
                    fewshot_source=f"the usable words after the first {N_ITEMS} ({len(pool)})")

  def example(self, doc: tuple[str, str], shots: int) -> Example:
    scrambled, word = doc
    return Example(f"{scrambled} =", word)
