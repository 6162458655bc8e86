"""A remote file read a block at a time with HTTP Range requests.

Some releases ship a handful of small files inside a large zip (ARC: 681 MB, nearly all of it a
corpus the tasks never read). zipfile needs only a seekable file: its end record, its central
directory and the members' bytes. RangedFile is that file over HTTP, so a member comes out of the
zip without the rest being downloaded; zipfile checks each member's CRC-32 as it reads it.

It lives apart from gpt.download, which fetches whole files to disk (resumable, atomic, checked),
because it writes nothing: it is a read-only view of a remote file, kept in memory block by block.
"""

from __future__ import annotations

import http.client
import io
import re
import urllib.error
import urllib.request

from gpt.download import Unreachable
from gpt.errors import GPTError


class NoRanges(Exception):
  """The server answers Range requests with the whole file."""


class RangedFile(io.RawIOBase):
  """A remote file read a block at a time with HTTP Range requests (seekable, read-only, each
  block fetched once); NoRanges if the server answers a Range request with the whole file."""

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
      raise Unreachable(f"cannot reach {self.url} (offline?): {reason}", self.url, reason) from None
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
