"""LAMBADA scored by generation: greedy decoding of the last word, compared by exact match.

The likelihood-based `lambada` task (gpt/evals/lambada.py) asks whether the last word is the greedy
continuation token by token; here the model writes its answer and it is cut at the end of the
first word: at the first character that is not a letter, digit, underscore, apostrophe or hyphen
after one that is (so " cat." and " cat and" both answer "cat"), or at a newline. `exact_match`
compares that word with the passage's last word. Data, prompts and demonstrations are `lambada`'s:
the plain passage zero-shot, GPT-3's " ____. ->" frame with shots, demonstrations drawn from the
same file without the scored passage.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpt.evals.base import TaskData
from gpt.evals.generative import Example, GenerativeTask
from gpt.evals.lambada import BLANK, Lambada, split_passage

END_OF_WORD = re.compile(r"(?<=\w)[^\w'\-]")


class LambadaGenerate(GenerativeTask):
  name = "lambada_generate"
  stops = ("\n", END_OF_WORD)
  # LAMBADA's last words are ordinary words: a few BPE tokens each.
  max_new_tokens = 10

  def data_files(self) -> list[tuple[str, ...]]:
    return Lambada().data_files()

  def load(self, data_dir: Path) -> TaskData:
    data = Lambada().load(data_dir)
    data.fewshot_source = "test (minus the item)"
    return data

  def example(self, doc: str, shots: int) -> Example:
    context, word = split_passage(doc)
    return Example(context + BLANK if shots else context, word)
