"""Downloads a released GPT-2: OpenAI's seven-file TF folder or a Hugging Face repo.

  python -m gpt.download 124M [--models_dir models] [--source openai|hf] [--base_url URL]

Each file goes to `<file>.part` first and is renamed into place only once its size checks out, so a
file without `.part` is always complete and is never fetched again. An interrupted download resumes
from the `.part` with an HTTP Range request (retried a few times within one run, and again on the
next run). urllib only: no extra dependency.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from gpt.config import HF_REPOS, canonical_model_name
from gpt.errors import GPTError

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
HF_URL = "https://huggingface.co"
# hparams.json and model.ckpt.index come last: gpt.weights treats a folder holding them as a
# complete OpenAI checkpoint, so they must not appear before the big data file has landed.
OPENAI_FILES = ("checkpoint", "encoder.json", "vocab.bpe", "model.ckpt.meta",
                "model.ckpt.data-00000-of-00001", "model.ckpt.index", "hparams.json")
HF_FILES = ("generation_config.json", "vocab.json", "merges.txt", "model.safetensors", "config.json")
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class _Interrupted(Exception):
  """The body ended early; the .part keeps what arrived, so the next attempt resumes from there."""

  def __init__(self, got: int, total: int):
    super().__init__(got, total)
    self.got, self.total = got, total


class Unreachable(GPTError):
  """No route to the server (refused, DNS failure, timeout): callers may offer another way."""

  def __init__(self, message: str, url: str, reason: object):
    super().__init__(message)
    self.url, self.reason = url, reason


def _offline(url: str, reason: object) -> GPTError:
  return Unreachable(f"cannot reach {url} (offline?): {reason}; download the folder elsewhere and "
                     f"pass --config.init=/path/to/folder", url, reason)


def _open(url: str, part: Path, timeout: float):
  """(response for `url` from the end of `part` on, bytes in `part`); (None, size) if `part` is whole."""
  have = part.stat().st_size if part.exists() else 0
  headers = {"Range": f"bytes={have}-"} if have else {}
  try:
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout), have
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # Range Not Satisfiable: the .part already has every byte (or more)
      total = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
      if total and int(total.group(1)) == have:
        return None, have
      part.unlink()  # longer than the file on the server: stale, start over
      return _open(url, part, timeout)
    raise GPTError(f"{url}: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:  # refused, DNS failure, timeout
    raise _offline(url, getattr(e, "reason", e)) from None


def _expected_range(url: str, resp, have: int) -> tuple[int, int | None]:
  """(first byte, total size or None) of the response body, checking its headers against `have`."""
  length = resp.headers.get("Content-Length")
  if resp.status != 206:  # the whole file (servers may ignore Range)
    return 0, int(length) if length is not None else None
  match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
  if not match:
    raise GPTError(f"{url}: partial response without a valid Content-Range header")
  start, end, total = map(int, match.groups())
  if start != have or end != total - 1 or (length is not None and int(length) != end - start + 1):
    raise GPTError(f"{url}: asked for bytes {have}- but got {resp.headers['Content-Range']} "
                   f"(Content-Length {length}); delete the .part file and retry")
  return start, total


def _check_total(url: str, part: Path, announced: int | None, total: int | None) -> None:
  """Every response for one file must agree on its size, or the pieces don't belong together."""
  if announced is not None and total is not None and total != announced:
    raise GPTError(f"{url}: the server first announced {announced} bytes, then {total}; the file "
                   f"changed or a proxy is truncating it; delete {part} and retry")


def _fetch_once(url: str, part: Path, timeout: float, announced: int | None) -> None:
  """Appends the rest of `url` to `part`; raises _Interrupted if the body ends early."""
  resp, have = _open(url, part, timeout)
  total = have
  if resp is not None:
    with resp:
      start, total = _expected_range(url, resp, have)
      _check_total(url, part, announced, total)
      with open(part, "ab" if start else "wb") as f, tqdm(
          total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
          desc=part.name.removesuffix(".part"), leave=True) as bar:
        try:
          while chunk := resp.read(_CHUNK):
            f.write(chunk)
            bar.update(len(chunk))
        except (OSError, http.client.HTTPException):  # reset, timeout, IncompleteRead
          pass  # the size check below reports it
  _check_total(url, part, announced, total)
  size = part.stat().st_size
  if total is not None and size < total:
    raise _Interrupted(size, total)
  if total is not None and size > total:
    raise GPTError(f"{url}: received {size} bytes but the server announced {total}; delete {part} "
                   f"and retry")


def fetch(url: str, dest: str | os.PathLike, retries: int = 3, timeout: float = 60.0) -> bool:
  """Downloads `url` to `dest` via `dest.part` (resumed with HTTP Range); False if already there.

  Size checks: each body must match its Content-Length/Content-Range, all responses must agree on
  the file's total size, and the finished .part must have exactly that size.
  """
  dest = Path(dest)
  if dest.is_file():
    return False
  part = dest.with_name(dest.name + ".part")
  announced = None
  for attempt in range(retries + 1):
    try:
      _fetch_once(url, part, timeout, announced)
      break
    except _Interrupted as e:
      announced = e.total
      if attempt == retries:
        raise GPTError(f"{url}: the connection kept dropping ({e.got} of {e.total} bytes after "
                       f"{retries + 1} tries); run the same command again to resume from {part}") from None
  os.replace(part, dest)
  return True


def model_source(name: str, models_dir: str | os.PathLike = "models", source: str = "openai",
                 base_url: str | None = None) -> tuple[Path, str, tuple[str, ...]]:
  """(local folder, base URL of its files, file names) for a released GPT-2 name."""
  try:
    size = canonical_model_name(name)
  except KeyError as e:
    raise GPTError(e.args[0]) from None
  if source == "openai":
    return Path(models_dir) / size, f"{(base_url or OPENAI_URL).rstrip('/')}/{size}", OPENAI_FILES
  if source == "hf":
    repo = HF_REPOS[size]
    return (Path(models_dir) / repo, f"{(base_url or HF_URL).rstrip('/')}/{repo}/resolve/main",
            HF_FILES)
  raise GPTError(f"unknown download source {source!r}; choose 'openai' or 'hf'")


def download_model(name: str, models_dir: str | os.PathLike = "models", source: str = "openai",
                   base_url: str | None = None, retries: int = 3) -> Path:
  """Makes sure `<models_dir>/<124M|gpt2|...>` holds every file of the model; returns the folder.

  `name` is any accepted spelling (117M, 124M, gpt2-medium, ...); `source` is 'openai' (the TF
  checkpoint folder) or 'hf' (config.json + model.safetensors); `base_url` overrides the server.
  """
  folder, base, files = model_source(name, models_dir, source, base_url)
  created = [d for d in (folder, *folder.parents) if not d.exists()]  # innermost first
  folder.mkdir(parents=True, exist_ok=True)
  try:
    for file in files:
      fetch(f"{base}/{file}", folder / file, retries=retries)
  except BaseException:
    for d in created:  # a first download that failed before any byte came leaves no empty folders
      try:
        d.rmdir()
      except OSError:  # holds a .part to resume from
        break
    raise
  return folder


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt.download", description=__doc__.split("\n")[0])
  parser.add_argument("models", nargs="+", help="117M/124M, 345M/355M, 762M/774M, 1542M/1558M or "
                      "gpt2, gpt2-medium, gpt2-large, gpt2-xl")
  parser.add_argument("--models_dir", default="models", help="parent folder of the model folders")
  parser.add_argument("--source", choices=("openai", "hf"), default="openai",
                      help="OpenAI's TF checkpoint (default) or the Hugging Face repo")
  parser.add_argument("--base_url", default=None,
                      help=f"server to fetch from (default {OPENAI_URL} or {HF_URL})")
  args = parser.parse_args(argv)
  try:
    for name in args.models:
      folder = download_model(name, args.models_dir, args.source, args.base_url)
      print(f"{name}: {folder}")
  except GPTError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
