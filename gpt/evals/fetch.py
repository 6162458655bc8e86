"""Fetches a task's missing data files into eval.data_dir, checked, before the task reads them.

A task names the files it reads, relative to `eval.data_dir`; one that is missing is downloaded on
first use, from where gpt.evals.sources' table says its original lives (a member of a release zip
is read out of the zip, which is then deleted; ARC's 681 MB zip is read remotely with Range
requests: gpt.ranged_file), or, with `eval.mirror=<base URL>`, from `<base URL>/<path in data_dir>`:
a mirror is any web server holding a copy of a data_dir (a cluster without internet).

Every download goes through gpt.download.fetch (resumable, atomic) to `<data_dir>/.incoming/<file>`
and is checked (gpt.evals.data_checks.verify) before it moves to its place, so an HTML error page
or a truncated body is deleted and reported in one line naming the URL, and never read. Files
already in data_dir are the user's: used as they are, never replaced.

Offline (no route to the host) every missing file is listed, one line each, with the two ways out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from gpt import download
from gpt.errors import GPTError
from gpt.evals.data_checks import BadFile, verify
from gpt.evals.sources import SOURCES, Archive, Source
from gpt.hashing import hash_file
from gpt.ranged_file import NoRanges, RangedFile

# Release archives are fetched here (inside data_dir) and deleted once their members are out.
ARCHIVE_DIR = ".archives"
# Downloads land here (same names, inside data_dir) and move to their place once checked.
INCOMING = ".incoming"


class NotWritable(GPTError):
  """data_dir cannot take the download (no other source helps)."""


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
    if archive.sha256 and hash_file(path) != archive.sha256:
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
