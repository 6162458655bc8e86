"""Downloads a released GPT-2: OpenAI's seven-file TF folder or a Hugging Face repo.

  python -m gpt.download 124M [--models_dir models] [--source openai|hf] [--base_url URL]

Each file goes to `<file>.part` first and is renamed into place only once it checks out, so a file
without `.part` is always complete and is never fetched again. An interrupted download resumes from
the `.part` with an HTTP Range request (retried a few times within one run, and again on the next
run). urllib only: no extra dependency.

"Checks out" means more than a 200 status. Every finished `.part` must have the size every response
announced, must not be an HTML page (by Content-Type and by its first bytes), must match any
checksum the caller or the server gives (`sha256=`, Content-MD5, x-ms-blob-content-md5,
X-Linked-Etag, Digest/Repr-Digest), and must pass the format checks of gpt.download_checks (what
its name says it is; for a model's files, what GPT-2 ships). A `validate` callable adds checks of
the caller's own (gpt.data and the eval task sources use it). A file that fails is deleted, and the
error says what was wrong in one line. `download_model` also rechecks the small files already in
place, so running it again repairs a folder an older downloader left with, say, an HTML hparams.json.

This module is the HTTP side (requests, resuming, sizes, checksums) and the released models' file
lists; what a file must contain is gpt.download_checks' business.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from gpt.config import HF_REPOS, canonical_model_name
from gpt.download_checks import (InvalidDownload, Validator, check_format, html_evidence,
                                 model_file_check, one_line)
from gpt.errors import GPTError, print_error
from gpt.hashing import hash_file

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


MODEL_HINT = "download the folder elsewhere and pass --config.init=/path/to/folder"


class Unreachable(GPTError):
  """No route to the server (refused, DNS failure, timeout): callers may offer another way."""

  def __init__(self, message: str, url: str, reason: object):
    super().__init__(message)
    self.url, self.reason = url, reason


def _offline(url: str, reason: object, hint: str = MODEL_HINT) -> GPTError:
  return Unreachable(f"cannot reach {url} (offline?): {reason}; {hint}", url, reason)


def _open(url: str, part: Path, timeout: float, hint: str):
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
      return _open(url, part, timeout, hint)
    raise GPTError(f"{url}: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:  # refused, DNS failure, timeout
    raise _offline(url, getattr(e, "reason", e), hint) from None


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


def _refuse_html(resp, first: bytes, name: str) -> None:
  """InvalidDownload if a response meant to be `name` is an HTML page (by type or first bytes)."""
  kind = resp.headers.get_content_type() if resp.headers.get("Content-Type") else ""
  if how := html_evidence(first, name, kind):
    raise InvalidDownload(f"the server sent an HTML page ({how}), not {name}: a proxy's, login or "
                          f"error page?")


def server_checksums(resp) -> dict[str, str]:
  """{'md5' | 'sha256': hex digest of the whole file} from the checksum headers servers send.

  Content-MD5 describes the body, so only a 200's counts; Azure's x-ms-blob-content-md5, the Hugging
  Face hub's X-Linked-Etag (the sha256 of an LFS file) and Digest / Repr-Digest describe the file.
  """
  headers, out = resp.headers, {}

  def b64hex(value: str | None, n: int) -> str | None:
    try:
      raw = base64.b64decode((value or "").strip().strip(":"), validate=True)
    except ValueError:
      return None
    return raw.hex() if len(raw) == n else None

  if resp.status == 200 and (md5 := b64hex(headers.get("Content-MD5"), 16)):
    out["md5"] = md5
  if md5 := b64hex(headers.get("x-ms-blob-content-md5"), 16):
    out["md5"] = md5
  etag = (headers.get("X-Linked-Etag") or "").strip().removeprefix("W/").strip('"').lower()
  if re.fullmatch(r"[0-9a-f]{64}", etag):
    out["sha256"] = etag
  for header in ("Digest", "Repr-Digest"):
    for item in (headers.get(header) or "").split(","):
      algo, _, value = item.strip().partition("=")
      algo = {"sha-256": "sha256", "md5": "md5"}.get(algo.strip().lower())
      if algo and (digest := b64hex(value, 32 if algo == "sha256" else 16)):
        out[algo] = digest
  return out


def _fetch_once(url: str, part: Path, timeout: float, announced: int | None,
                checksums: dict[str, str], name: str, hint: str) -> None:
  """Appends the rest of `url` to `part`; raises _Interrupted if the body ends early."""
  resp, have = _open(url, part, timeout, hint)
  total = have
  if resp is not None:
    with resp:
      start, total = _expected_range(url, resp, have)
      _check_total(url, part, announced, total)
      for algo, digest in server_checksums(resp).items():
        checksums.setdefault(algo, digest)  # a caller's sha256 wins over the server's
      try:
        chunk = resp.read(_CHUNK)
      except (OSError, http.client.HTTPException):
        chunk = b""
      if start == 0:
        _refuse_html(resp, chunk, name)  # before `part` is touched: an earlier .part stays as it was
      with open(part, "ab" if start else "wb") as f, tqdm(
          total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
          desc=name, leave=True) as bar:
        try:
          while chunk:
            f.write(chunk)
            bar.update(len(chunk))
            chunk = resp.read(_CHUNK)
        except (OSError, http.client.HTTPException):  # reset, timeout, IncompleteRead
          pass  # the size check below reports it
  _check_total(url, part, announced, total)
  size = part.stat().st_size
  if total is not None and size < total:
    raise _Interrupted(size, total)
  if total is not None and size > total:
    raise GPTError(f"{url}: received {size} bytes but the server announced {total}; delete {part} "
                   f"and retry")


def _check_part(part: Path, name: str, size: int | None, checksums: dict[str, str],
                validate: Validator | None) -> None:
  """Raises InvalidDownload unless the finished file is good (a validator's error becomes one)."""
  have = part.stat().st_size
  if size is not None and have != size:
    raise InvalidDownload(f"it has {have} bytes, {size} expected")
  for algo, want in sorted(checksums.items()):
    got = hash_file(part, algo)
    if got != want.lower():
      raise InvalidDownload(f"its {algo} is {got}, {want.lower()} expected (corrupted or truncated)")
  check_format(part, name)
  if validate is not None:
    try:
      validate(part)
    except InvalidDownload:
      raise
    except (ValueError, GPTError) as e:
      raise InvalidDownload(f"it is not a valid {name} ({one_line(e)})") from None


def fetch(url: str, dest: str | os.PathLike, retries: int = 3, timeout: float = 60.0, *,
          validate: Validator | None = None, sha256: str | None = None, size: int | None = None,
          offline_hint: str = MODEL_HINT) -> bool:
  """Downloads `url` to `dest` via `dest.part` (resumed with HTTP Range); False if already there.

  Before the rename into place the file must pass, in order: the size checks (each body matches its
  Content-Length/Content-Range, all responses agree on the file's total size, the finished .part has
  exactly that size, and `size` bytes if given), no HTML page where something else was asked for,
  the checksums (`sha256` if given, and those the server's headers state: `server_checksums`), the
  format its name implies (`check_format`), and `validate(part)` if given. A file that fails is
  deleted and a GPTError says why in one line. `offline_hint` ends the "cannot reach" message.
  """
  dest = Path(dest)
  if dest.is_file():
    return False
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + ".part")
  announced = None
  checksums = {"sha256": sha256.lower()} if sha256 else {}
  advice = "check the URL and the network (proxy, login) and run again"
  try:
    for attempt in range(retries + 1):
      try:
        _fetch_once(url, part, timeout, announced, checksums, dest.name, offline_hint)
        break
      except _Interrupted as e:
        announced = e.total
        if attempt == retries:
          raise GPTError(f"{url}: the connection kept dropping ({e.got} of {e.total} bytes after "
                         f"{retries + 1} tries); run the same command again to resume from {part}") from None
  except InvalidDownload as e:  # an HTML page, refused before a byte of it was written
    kept = f" (kept the earlier {part.name})" if part.is_file() else ""
    raise GPTError(f"{url}: {e}; deleted the download{kept}; {advice}") from None
  try:
    _check_part(part, dest.name, size, checksums, validate)
  except InvalidDownload as e:
    part.unlink(missing_ok=True)
    raise GPTError(f"{url}: {e}; deleted the download; {advice}") from None
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
      validate = model_file_check(folder, file)
      recheck(folder / file, validate)
      fetch(f"{base}/{file}", folder / file, retries=retries, validate=validate)
  except BaseException:
    for d in created:  # a first download that failed before any byte came leaves no empty folders
      try:
        d.rmdir()
      except OSError:  # holds a .part to resume from
        break
    raise
  return folder


def recheck(path: Path, validate: Validator | None, max_bytes: int = 16 << 20) -> bool:
  """Moves a small file that is already in place but fails its checks (an HTML page saved by a
  downloader without them) aside to `<file>.invalid`, with one line on stderr, so it is fetched
  again; True if it did. Big files and the TF index (whose check reads the whole data file) are
  left to the loader, which checks them anyway."""
  if not path.is_file() or path.stat().st_size > max_bytes or path.name == "model.ckpt.index":
    return False
  try:
    with open(path, "rb") as f:
      head = f.read(4096)
    if html_evidence(head, path.name):
      raise InvalidDownload("it is an HTML page")
    check_format(path)
    if validate is not None:
      validate(path)
  except (ValueError, GPTError) as e:
    aside = path.with_name(path.name + ".invalid")
    os.replace(path, aside)
    print(f"{path}: {one_line(e)}; moved it to {aside.name} and downloading it again",
          file=sys.stderr)
    return True
  return False


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
    return print_error(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
