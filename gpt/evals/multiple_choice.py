"""Multiple-choice tasks: HellaSwag, PIQA, ARC-Easy, ARC-Challenge (one context, several answers)
and WinoGrande (one answer after several contexts: partial scoring).

Prompts follow lm-evaluation-harness's task files, with demonstrations "<query> <gold answer>":
  hellaswag  "<activity_label>: <ctx>" + " <ending>"           (validation; file already cleaned)
  piqa       "Question: <goal>\nAnswer:" + " <sol>"             (dev; train is not in ../shared)
  arc_*      "Question: <stem>\nAnswer:" + " <choice>"          (test; demonstrations from train)
  winogrande "<sentence up to _ with option>" + " <rest>"       (dev; demonstrations from train_s)
ARC also reports GPT-3's unconditional normalisation, acc_uncond (see metrics.py).
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

from gpt.errors import GPTError
from gpt.evals import metrics
from gpt.evals.base import (ContinuationScore, Format, Request, Task, TaskData, file_hashes,
                            require_files)

# GPT-3's answer context for unconditional normalisation ("Answer: " with its space moved into the
# continuation, as for every other prompt).
UNCONDITIONAL_CONTEXT = "Answer:"


@dataclasses.dataclass(frozen=True)
class ChoiceDoc:
  """One multiple-choice item: a query, its answers and the index of the right one."""

  query: str
  choices: tuple[str, ...]
  gold: int


def read_jsonl(path: Path) -> list[dict]:
  """The JSON objects of a .jsonl file, or one GPTError naming the bad line."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise GPTError(f"{path}:{n} is not valid JSON ({e.msg})") from None
  return rows


def read_labels(path: Path, count: int) -> list[int]:
  """The integer labels of a -labels.lst file, checked to be one per item."""
  labels = [int(x) for x in path.read_text(encoding="utf-8").split()]
  if len(labels) != count:
    raise GPTError(f"{path} has {len(labels)} labels for {count} items")
  return labels


class MultipleChoice(Task):
  """One context scored against every answer; subclasses read the data."""

  primary_metric = "acc_norm"
  unconditional = False

  def requests(self, doc: ChoiceDoc, demos: Sequence[ChoiceDoc], fmt: Format) -> list[Request]:
    conts = tuple(fmt.target_delimiter + c for c in doc.choices)
    shown = tuple(d.query + fmt.target_delimiter + d.choices[d.gold] for d in demos)
    out = [Request(doc.query, conts, shown)]
    if self.unconditional:
      out.append(Request(UNCONDITIONAL_CONTEXT, conts))
    return out

  def process(self, doc: ChoiceDoc, scores: list[list[ContinuationScore]]) -> dict[str, float]:
    out = metrics.choice_metrics(scores[0], doc.choices, doc.gold)
    if self.unconditional:
      gain = [a.logprob - b.logprob for a, b in zip(scores[0], scores[1])]
      out["acc_uncond"] = float(metrics.argmax(gain) == doc.gold)
    return out


class HellaSwag(MultipleChoice):
  """HellaSwag validation: the official hellaswag_val.jsonl when the data folder has it (lm-eval's
  exact query, with ctx_b capitalised), else the cleaned text form in ../shared (whose context line
  keeps ctx_b as written)."""

  name = "hellaswag"
  FILE = "hellaswag/hellaswag_val_full.txt.bz2"
  JSONL = "hellaswag/hellaswag_val.jsonl"

  def data_files(self) -> list[tuple[str, ...]]:
    return [(self.JSONL,), (self.FILE,)]  # the official form first (a mirror may have the other)

  def load(self, data_dir: Path) -> TaskData:
    jsonl = Path(data_dir) / self.JSONL
    if jsonl.is_file():
      docs = [self.from_official(r) for r in read_jsonl(jsonl)]
      return TaskData(docs, None, file_hashes(jsonl), "validation (minus the item)")
    path = require_files(data_dir, self.name, self.FILE)[self.FILE]
    with bz2.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    if lines and lines[-1] == "":
      lines.pop()
    if len(lines) % 6:
      raise GPTError(f"{path}: {len(lines)} lines is not 6 per item (context, label, 4 endings)")
    docs = [ChoiceDoc(lines[i], tuple(lines[i + 2:i + 6]), int(lines[i + 1]))
            for i in range(0, len(lines), 6)]
    return TaskData(docs, None, file_hashes(path), "validation (minus the item)")

  @staticmethod
  def from_official(row: dict) -> ChoiceDoc:
    """lm-eval's hellaswag `process_docs` for one record of rowanz/hellaswag's jsonl."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return ChoiceDoc(clean_wikihow(row["activity_label"] + ": " + ctx),
                     tuple(clean_wikihow(e) for e in row["endings"]), int(row["label"]))

  @staticmethod
  def from_context(activity_label: str, context: str, endings: Sequence[str], label: int) -> ChoiceDoc:
    """An item whose context comes joined (TFDS's `context` is the jsonl's `ctx`, ctx_b as written,
    like the text form's context line)."""
    return ChoiceDoc(clean_wikihow(activity_label + ": " + context),
                     tuple(clean_wikihow(e) for e in endings), int(label))


def clean_wikihow(text: str) -> str:
  """lm-eval's hellaswag `preprocess`: drops WikiHow's [title]/[step]/... markers."""
  text = text.strip().replace(" [title]", ". ")
  return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


class PIQA(MultipleChoice):
  name = "piqa"
  FILES = ("piqa/valid.jsonl", "piqa/valid-labels.lst")

  def data_files(self) -> list[tuple[str, ...]]:
    return [self.FILES]

  def load(self, data_dir: Path) -> TaskData:
    paths = require_files(data_dir, self.name, *self.FILES)
    rows = read_jsonl(paths[self.FILES[0]])
    labels = read_labels(paths[self.FILES[1]], len(rows))
    docs = [self.to_doc(r, y) for r, y in zip(rows, labels)]
    return TaskData(docs, None, file_hashes(*paths.values()), "dev (minus the item)")

  @staticmethod
  def to_doc(row: dict, label: int) -> ChoiceDoc:
    """A {goal, sol1, sol2} record and its label (0: sol1, 1: sol2)."""
    return ChoiceDoc(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(label))


class ARC(MultipleChoice):
  """ARC-Easy or ARC-Challenge: scored on test, demonstrations from train."""

  def __init__(self, subset: str, unconditional: bool = True):
    self.subset = subset  # "Easy" | "Challenge"
    self.name = f"arc_{subset.lower()}"
    self.unconditional = unconditional

  def data_files(self) -> list[tuple[str, ...]]:
    return [(f"arc/ARC-{self.subset}-Test.jsonl", f"arc/ARC-{self.subset}-Train.jsonl")]

  def load(self, data_dir: Path) -> TaskData:
    test, train = self.data_files()[0]
    paths = require_files(data_dir, self.name, test, train)
    return TaskData([self.to_doc(r) for r in read_jsonl(paths[test])],
                    [self.to_doc(r) for r in read_jsonl(paths[train])],
                    file_hashes(*paths.values()), "train")

  @staticmethod
  def to_doc(row: dict) -> ChoiceDoc:
    choices = row["question"]["choices"]
    labels = [c["label"] for c in choices]
    if row["answerKey"] not in labels:
      raise GPTError(f"ARC item {row.get('id')}: answerKey {row['answerKey']!r} not in {labels}")
    return ChoiceDoc(f"Question: {row['question']['stem']}\nAnswer:",
                     tuple(c["text"] for c in choices), labels.index(row["answerKey"]))


@dataclasses.dataclass(frozen=True)
class WinograndeDoc:
  sentence: str  # contains one "_"
  options: tuple[str, str]
  gold: int

  def prefix(self, option: int) -> str:
    """The sentence up to the blank, with `option` filled in."""
    return self.sentence[:self.sentence.index("_")] + self.options[option]

  @property
  def rest(self) -> str:
    """The sentence after the blank (the scored continuation), without surrounding spaces."""
    return self.sentence[self.sentence.index("_") + 1:].strip()


class Winogrande(Task):
  """Partial scoring (Trinh & Le; GPT-3; lm-eval): which filled-in prefix makes the rest likelier."""

  name = "winogrande"
  primary_metric = "acc"
  FILES = ("winogrande/dev.jsonl", "winogrande/train_s.jsonl")

  def data_files(self) -> list[tuple[str, ...]]:
    return [self.FILES]

  def load(self, data_dir: Path) -> TaskData:
    paths = require_files(data_dir, self.name, *self.FILES)
    dev, train = ([self.to_doc(r, p) for r in read_jsonl(p)] for p in (paths[f] for f in self.FILES))
    return TaskData(dev, train, file_hashes(*paths.values()), "train_s")

  @staticmethod
  def to_doc(row: dict, where: Any) -> WinograndeDoc:
    """One {sentence, option1, option2, answer: '1'|'2'} record; `where` names the file in errors."""
    if row["sentence"].count("_") != 1 or row["answer"] not in ("1", "2"):
      raise GPTError(f"{where}: item {row.get('qID')} needs one '_' and answer '1' or '2'")
    return WinograndeDoc(row["sentence"], (row["option1"], row["option2"]), int(row["answer"]) - 1)

  def requests(self, doc: WinograndeDoc, demos: Sequence[WinograndeDoc],
               fmt: Format) -> list[Request]:
    shown = tuple(d.prefix(d.gold) + fmt.target_delimiter + d.rest for d in demos)
    cont = (fmt.target_delimiter + doc.rest,)
    return [Request(doc.prefix(i), cont, shown) for i in range(2)]

  def process(self, doc: WinograndeDoc, scores: list[list[ContinuationScore]]) -> dict[str, float]:
    return {"acc": float(metrics.argmax([s[0].logprob for s in scores]) == doc.gold)}
