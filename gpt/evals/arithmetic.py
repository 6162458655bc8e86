"""GPT-3's arithmetic tasks (Brown et al. 2020, section 3.9.1), generated from their definitions.

  arithmetic_2da .. 5da   n-digit addition:    "Q: What is 48 plus 76?\\n\\nA:" -> "124"
  arithmetic_2ds .. 5ds   n-digit subtraction: "Q: What is 34 minus 53?\\n\\nA:" -> "-19"
  arithmetic_2dm          2-digit multiplication: "Q: What is 24 times 42?\\n\\nA:" -> "1008"
  arithmetic_1dc          1-digit composite:   "Q: What is (2 * 4) * 6?\\n\\nA:" -> "48"

Rules, from the paper's text: for n digits both operands are drawn uniformly from [0, 10^n); a
subtraction's answer may be negative; 1DC draws three numbers uniformly from [0, 10) and its two
operations uniformly from {+, -, *}. The paper's text says 1DC puts "parentheses around the last
two" numbers, but its appendix G figure and the data it released (openai/gpt-3, data/
single_digit_three_ops.jsonl, which lm-eval's arithmetic_1dc reads) bracket the first two, with
spaces ("(2 * 4) * 6"): we follow the released data, i.e. what was measured. The frame is the released
data's too: "\\n\\nQ: What is 98 plus 45?\\n\\nA:" with the completion " 143" (the appendix G figure
shows Q and A on separate lines); the leading blank line is the separator between demonstrations,
the example separator here. lm-eval's loglikelihood variants rewrite it to "Question: ...\\nAnswer:".

The paper draws 2,000 problems per task. So do we, with a fixed seed per task (numpy's PCG64 seeded
by [SEED, crc32(task name), split]), so every run scores the same problems. Demonstrations come from
a second draw of 2,000 (split 1) with every problem that is also in the scored set removed, so a
demonstration is never the scored problem.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np

from gpt.evals.base import TaskData
from gpt.evals.generative import Example, GenerativeTask

SEED = 2020
N_ITEMS = 2000
# name -> (digits, operation word) for the two-operand tasks.
TWO_OPERAND = {
    **{f"arithmetic_{n}da": (n, "plus") for n in (2, 3, 4, 5)},
    **{f"arithmetic_{n}ds": (n, "minus") for n in (2, 3, 4, 5)},
    "arithmetic_2dm": (2, "times"),
}
NAMES = (*TWO_OPERAND, "arithmetic_1dc")
_APPLY = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b,
          "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str  # "What is 48 plus 76?"
  answer: str  # "124"


def rng_for(name: str, split: int) -> np.random.Generator:
  """The fixed random stream of task `name`'s scored set (split 0) or demonstration pool (1)."""
  return np.random.default_rng([SEED, zlib.crc32(name.encode()), split])


def draw(name: str, n: int, split: int = 0) -> list[Problem]:
  """`n` problems of task `name` drawn as the module docstring says."""
  rng = rng_for(name, split)
  if name == "arithmetic_1dc":
    numbers = rng.integers(0, 10, size=(n, 3))
    ops = rng.choice(np.array(["+", "-", "*"]), size=(n, 2))
    return [Problem(f"What is ({a} {o1} {b}) {o2} {c}?",
                    str(_APPLY[o2](_APPLY[o1](int(a), int(b)), int(c))))
            for (a, b, c), (o1, o2) in zip(numbers.tolist(), ops.tolist())]
  digits, op = TWO_OPERAND[name]
  pairs = rng.integers(0, 10 ** digits, size=(n, 2))
  return [Problem(f"What is {a} {op} {b}?", str(_APPLY[op](a, b))) for a, b in pairs.tolist()]


class Arithmetic(GenerativeTask):
  """One of the arithmetic tasks, by lm-eval's name (see module docstring)."""

  # The longest answers ("199998", "-99999") are 2-4 BPE tokens; the rest is room for the newline.
  max_new_tokens = 8

  def __init__(self, name: str):
    if name not in NAMES:
      raise ValueError(f"unknown arithmetic task {name!r}")
    self.name = name

  def load(self, data_dir: Path) -> TaskData:
    del data_dir  # generated, no files
    docs = draw(self.name, N_ITEMS, split=0)
    scored = {p.question for p in docs}
    pool = [p for p in draw(self.name, N_ITEMS, split=1) if p.question not in scored]
    return TaskData(docs, pool, {}, fewshot_source=f"a separate seeded draw ({len(pool)} problems)")

  def example(self, doc: Problem, shots: int) -> Example:
    return Example(f"Q: {doc.question}\n\nA:", doc.answer)
