"""A loopback HTTP file server for tests: Range requests, and connections cut on demand.

  with FileServer(tmp_path / "www", cuts={"/124M/model.ckpt.index": [100]}) as server:
    fetch(server.url + "/124M/model.ckpt.index", ...)   # the first GET of that path dies after 100 bytes
    server.log                                          # [(path, Range header or None, status), ...]

Runs http.server's ThreadingHTTPServer on 127.0.0.1 with a free port, in a daemon thread.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FileServer:
  """Serves the files under `root`; state (cuts, log) belongs to the instance, not the module."""

  def __init__(self, root: str | Path, cuts: dict[str, list[int]] | None = None,
               ignore_range: bool = False, extra_length: dict[str, int] | None = None,
               headers: dict[str, dict[str, str]] | None = None):
    """`cuts[path]`: per request of `path`, in turn, how many body bytes to send before closing.
    `ignore_range`: answer every GET with 200 and the whole file, as some servers do.
    `extra_length[path]`: announce a Content-Length this much larger than what is sent (a lying
    server or proxy; negative: a Content-Length shorter than the file, which is sent whole).
    `headers[path]`: extra response headers for `path` (Content-Type, checksums, ...)."""
    self.root = Path(root).resolve()
    self.cuts = {k: list(v) for k, v in (cuts or {}).items()}
    self.ignore_range = ignore_range
    self.extra_length = dict(extra_length or {})
    self.headers = {k: dict(v) for k, v in (headers or {}).items()}
    self.log: list[tuple[str, str | None, int]] = []
    self._lock = threading.Lock()
    self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self._httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

  def __enter__(self) -> "FileServer":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join()

  def requests_for(self, path: str) -> list[tuple[str | None, int]]:
    """(Range header, status) of every request of `path` so far."""
    with self._lock:
      return [(rng, status) for p, rng, status in self.log if p == path]

  def _record(self, path: str, rng: str | None, status: int) -> None:
    with self._lock:
      self.log.append((path, rng, status))

  def _next_cut(self, path: str) -> int | None:
    with self._lock:
      queue = self.cuts.get(path)
      return queue.pop(0) if queue else None

  def _handler(self) -> type[BaseHTTPRequestHandler]:
    server = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args) -> None:  # keep test output clean
        pass

      def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        rng = self.headers.get("Range")
        file = (server.root / path.lstrip("/")).resolve()
        if server.root not in file.parents or not file.is_file():
          return self._reply(path, rng, 404, b"not found", {})
        data = file.read_bytes()
        start = _range_start(rng) if rng and not server.ignore_range else None
        if start is not None and start >= len(data):
          return self._reply(path, rng, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
        if start is None:
          return self._reply(path, rng, 200, data, {})
        return self._reply(path, rng, 206, data[start:],
                           {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})

      def _reply(self, path: str, rng: str | None, status: int, body: bytes, headers: dict) -> None:
        server._record(path, rng, status)
        cut = server._next_cut(path) if status in (200, 206) else None
        self.send_response(status)
        for k, v in {**server.headers.get(path, {}), **headers}.items():
          self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) + server.extra_length.get(path, 0)))
        self.send_header("Accept-Ranges", "bytes")
        if cut is not None or path in server.extra_length:
          self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        if cut is not None or path in server.extra_length:
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


def _range_start(header: str) -> int | None:
  """First byte of an open or closed 'bytes=N-[M]' range (the only form the downloader sends)."""
  if not header.startswith("bytes=") or "," in header:
    return None
  first = header[len("bytes="):].split("-", 1)[0]
  return int(first) if first.isdigit() else None


def closed_port_url() -> str:
  """An http URL on 127.0.0.1 where nothing listens (connections are refused: 'offline')."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}"
