"""Is a task data file the release's data? Its format, record count and pinned sha256.

Every file the eval tasks read from a download is checked before it gets its name in data_dir
(gpt.evals.fetch), so an HTML error page, a truncated body or another version of the data set is
deleted and reported in one line, never read. A check knows a format (jsonl with given keys, one
label per line, SST-2's labeled sentences, HellaSwag's bz2 text) and returns the file's record
count, which `verify` compares with the release's (gpt.evals.sources' table), as it does the sha256
where the original file's hash is known.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gpt.hashing import hash_file

if TYPE_CHECKING:
  from gpt.evals.sources import Source


class BadFile(Exception):
  """A downloaded file is not the data it should be (the message says why)."""


def _lines(path: Path) -> list[str]:
  """The file's lines as UTF-8 text (BadFile for binary junk or an HTML page)."""
  raw = path.read_bytes()
  head = raw[:512].lstrip().lower()
  if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
    raise BadFile("an HTML/XML page, not the data (an error page or a login redirect?)")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadFile(f"not UTF-8 text (byte {e.start})") from None
  return text.splitlines()


def jsonl(*keys: str) -> Callable[[Path], int]:
  """A .jsonl of objects that have `keys`."""
  def count(path: Path) -> int:
    n = 0
    for i, line in enumerate(_lines(path), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadFile(f"line {i} is not JSON ({e.msg}); truncated?") from None
      if not isinstance(row, dict) or any(k not in row for k in keys):
        raise BadFile(f"line {i} is not a JSON object with {', '.join(keys)}")
      n += 1
    return n
  return count


def labels(*allowed: str) -> Callable[[Path], int]:
  """One label per line, each one of `allowed`."""
  def count(path: Path) -> int:
    lines = [l.strip() for l in _lines(path) if l.strip()]
    for i, label in enumerate(lines, 1):
      if label not in allowed:
        raise BadFile(f"line {i} is {label[:20]!r}, not one of {', '.join(allowed)}")
    return len(lines)
  return count


def labeled_sentences(path: Path) -> int:
  """SST-2's '<0|1> <sentence>' lines."""
  lines = _lines(path)
  for i, line in enumerate(lines, 1):
    label, _, sentence = line.partition(" ")
    if label not in ("0", "1") or not sentence:
      raise BadFile(f"line {i} is not '<0|1> <sentence>'")
  return len(lines)


def text_lines(path: Path) -> int:
  """Plain UTF-8 text; its line count."""
  return len(_lines(path))


def hellaswag_text(path: Path) -> int:
  """The bz2 text form of HellaSwag: 6 lines per item (context, label, 4 endings)."""
  try:
    with bz2.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise BadFile(f"not a complete bz2 text file ({e})") from None
  if lines and lines[-1] == "":
    lines.pop()
  if len(lines) % 6 or any(lines[i + 1] not in ("0", "1", "2", "3") for i in range(0, len(lines), 6)):
    raise BadFile(f"{len(lines)} lines are not 6 per item (context, label 0-3, 4 endings)")
  return len(lines) // 6


def verify(source: Source, path: Path) -> None:
  """Raises BadFile unless `path` is `source`'s file: format, record count and pinned sha256."""
  n = source.count(path)
  if n != source.records:
    raise BadFile(f"{n} records where the release has {source.records}; truncated?")
  if source.sha256:
    digest = hash_file(path)
    if digest != source.sha256:
      raise BadFile(f"sha256 {digest[:12]}... is not the release's {source.sha256[:12]}... "
                    f"({path.stat().st_size} bytes)")
