"""Pattern-verbalizer pairs (PET, Schick & Schuetze 2020) for BoolQ and SST-2.

A pattern turns an item into a cloze prompt; a verbalizer maps each label to a word. The label
whose word (after the target delimiter) is likeliest wins. Every pattern is scored and reported
(acc_p0, acc_p1, ...) and so is their ensemble, `acc`: the label with the highest mean probability,
where each pattern's probabilities are its verbalizer likelihoods renormalised over the labels.
Demonstrations are rendered with the same pattern and the gold label's word. GPT-2 is a left-to-
right model, so unlike PET's masked-LM patterns the blank is always at the end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gpt.errors import GPTError
from gpt.evals import metrics
from gpt.evals.base import (ContinuationScore, Format, Request, Task, TaskData, file_hashes,
                            require_files)
from gpt.evals.multiple_choice import read_jsonl


@dataclasses.dataclass(frozen=True)
class LabeledText:
  """An item with text fields and an integer label (an index into every verbalizer)."""

  fields: tuple[tuple[str, str], ...]
  label: int

  def __getitem__(self, key: str) -> str:
    return dict(self.fields)[key]


@dataclasses.dataclass(frozen=True)
class Pattern:
  """A prompt template and the word for each label, with where it comes from."""

  render: Callable[[LabeledText], str]
  verbalizer: tuple[str, ...]
  source: str


class Cloze(Task):
  """Scores every pattern of `patterns`; subclasses read the data and define the patterns."""

  patterns: tuple[Pattern, ...] = ()
  field_names: tuple[str, ...] = ()  # the text fields the patterns use
  primary_metric = "acc"

  def requests(self, doc: LabeledText, demos: Sequence[LabeledText], fmt: Format) -> list[Request]:
    out = []
    for p in self.patterns:
      shown = tuple(p.render(d) + fmt.target_delimiter + p.verbalizer[d.label] for d in demos)
      out.append(Request(p.render(doc), tuple(fmt.target_delimiter + w for w in p.verbalizer), shown))
    return out

  def process(self, doc: LabeledText, scores: list[list[ContinuationScore]]) -> dict[str, float]:
    probs = np.stack([metrics.label_probabilities(s) for s in scores])
    out = {"acc": float(metrics.argmax(probs.mean(0)) == doc.label)}
    for i, p in enumerate(probs):
      out[f"acc_p{i}"] = float(metrics.argmax(p) == doc.label)
    return out

  def describe(self) -> dict[str, Any]:
    """Each pattern's rendering of a sample item and its verbalizer, for the result file."""
    sample = LabeledText(tuple((k, f"<{k}>") for k in self.field_names), 0)
    return {f"p{i}": {"prompt": p.render(sample), "verbalizer": list(p.verbalizer),
                      "source": p.source} for i, p in enumerate(self.patterns)}


class BoolQ(Cloze):
  """BoolQ dev: Google's original dev.jsonl, or SuperGLUE's val.jsonl (the same 3270 items, each
  passage led by "<title> -- ", `label` for `answer`: what lm-eval's boolq reads) when only it is
  present."""

  name = "boolq"
  FILE = "boolq/dev.jsonl"
  SUPERGLUE = "boolq/val.jsonl"
  field_names = ("passage", "question")
  patterns = (
      Pattern(lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ("no", "yes"),
              "lm-evaluation-harness boolq"),
      Pattern(lambda d: f"{d['passage']} Question: {d['question']}? Answer:", ("No", "Yes"),
              "PET BoolQ pattern 1"),
      Pattern(lambda d: f"{d['passage']} Based on the previous passage, {d['question']}?",
              ("No", "Yes"), "PET BoolQ pattern 2"),
  )

  def data_files(self) -> list[tuple[str, ...]]:
    return [(self.FILE,), (self.SUPERGLUE,)]

  def load(self, data_dir: Path) -> TaskData:
    superglue = Path(data_dir) / self.SUPERGLUE
    if not (Path(data_dir) / self.FILE).is_file() and superglue.is_file():
      docs = [self.to_doc({**r, "answer": r.get("label")}, superglue) for r in read_jsonl(superglue)]
      return TaskData(docs, None, file_hashes(superglue), "dev (minus the item)")
    path = require_files(data_dir, self.name, self.FILE)[self.FILE]
    docs = [self.to_doc(r, path) for r in read_jsonl(path)]
    return TaskData(docs, None, file_hashes(path), "dev (minus the item)")

  @staticmethod
  def to_doc(row: dict, where: Any) -> LabeledText:
    """One record of BoolQ's dev.jsonl ({question, passage, answer: bool}); `where` for errors."""
    if not isinstance(row.get("answer"), (bool,)):
      raise GPTError(f"{where}: item {row.get('question')!r} has no true/false 'answer'")
    return LabeledText((("passage", row["passage"]), ("question", row["question"])),
                       int(row["answer"]))


class SST2(Cloze):
  name = "sst2"
  FILES = ("sst2/stsa.binary.dev", "sst2/stsa.binary.train")
  field_names = ("sentence",)
  patterns = (
      Pattern(lambda d: f"Review: {d['sentence']}\nSentiment:", ("Negative", "Positive"),
              "Zhao et al. 2021 (Calibrate Before Use)"),
      Pattern(lambda d: f"{d['sentence']} It was", ("terrible", "great"), "LM-BFF (Gao et al. 2021)"),
      Pattern(lambda d: f"{d['sentence']} All in all, it was", ("bad", "good"), "PET Yelp pattern"),
      Pattern(lambda d: f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
              ("negative", "positive"), "lm-evaluation-harness sst2"),
  )

  def data_files(self) -> list[tuple[str, ...]]:
    return [self.FILES]

  def load(self, data_dir: Path) -> TaskData:
    paths = require_files(data_dir, self.name, *self.FILES)
    dev, train = (self._read(paths[f]) for f in self.FILES)
    return TaskData(dev, train, file_hashes(*paths.values()), "train")

  @staticmethod
  def _read(path: Path) -> list[LabeledText]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      label, _, sentence = line.partition(" ")
      if label not in ("0", "1") or not sentence:
        raise GPTError(f"{path}:{n} is not '<0|1> <sentence>'")
      docs.append(SST2.to_doc(sentence, int(label)))
    return docs

  @staticmethod
  def to_doc(sentence: str, label: int) -> LabeledText:
    """A sentence and its label (0 negative, 1 positive)."""
    return LabeledText((("sentence", sentence),), int(label))
