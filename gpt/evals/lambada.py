"""LAMBADA (OpenAI's detokenized test set): predict the last word of a passage.

Two accuracies, because the literature uses both (eval-protocols.md, lm-eval #356/#2159):
  acc             the whole last word is the greedy continuation (lm-eval's `lambada_openai`)
  acc_last_token  the word's last BPE token is the argmax given everything before it (OpenAI)
and `ppl`, exp(-mean log P(word | passage)), as lm-eval reports it.

Zero-shot scores the plain passage. With shots, every prompt uses GPT-3's fill-in-the-blank frame
(lm-eval's `lambada_openai_cloze`): "<passage without its last word> ____. ->" + " <word>", with
demonstrations drawn from the same file, never the scored passage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from gpt.errors import GPTError
from gpt.evals import metrics
from gpt.evals.base import (ContinuationScore, Format, Request, Task, TaskData, file_hashes,
                            require_files)

FILE = "lambada/lambada_test.jsonl"
BLANK = " ____. ->"


def split_passage(text: str) -> tuple[str, str]:
  """(passage without its last word, the last word); words are split on single spaces."""
  context, _, word = text.rpartition(" ")
  return context, word


class Lambada(Task):
  name = "lambada"
  primary_metric = "acc"

  def data_files(self) -> list[tuple[str, ...]]:
    return [(FILE,)]

  def load(self, data_dir: Path) -> TaskData:
    path = require_files(data_dir, self.name, FILE)[FILE]
    docs = []
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        try:
          docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
          raise GPTError(f"{path}:{n} is not a JSON object with a 'text' field") from None
    return TaskData(docs, None, file_hashes(path), fewshot_source="test (minus the item)")

  def requests(self, doc: str, demos: Sequence[str], fmt: Format) -> list[Request]:
    context, word = split_passage(doc)
    if not demos:
      return [Request(context, (fmt.target_delimiter + word,))]
    shown = tuple(split_passage(d)[0] + BLANK + fmt.target_delimiter + split_passage(d)[1]
                  for d in demos)
    return [Request(context + BLANK, (fmt.target_delimiter + word,), shown)]

  def process(self, doc: str, scores: list[list[ContinuationScore]]) -> dict[str, float]:
    score = scores[0][0]
    return {"acc": float(score.greedy), "acc_last_token": float(score.last_greedy),
            "logprob": score.logprob}

  def aggregate(self, results: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    logprobs = np.array([r["logprob"] for r in results])
    out = {k: metrics.mean_stderr([r[k] for r in results]) for k in ("acc", "acc_last_token")}
    out["ppl"] = (metrics.perplexity(logprobs), metrics.bootstrap_stderr(metrics.perplexity, logprobs))
    return out
