"""What a downloaded file must be before it is given its name: the format checks.

A 200 status proves nothing: a proxy's or login page's HTML, or a body cut short under a
Content-Length that lies, arrives with one too. So every file gpt.download fetches is parsed as what
its name says (`check_format`: .json, .jsonl, .safetensors), refused when it is an HTML page
(`html_evidence`), and a released model's files are checked against what GPT-2 ships
(`model_file_check`: its exact vocabulary and merges, a TF index whose per-tensor crc32c's match
the data file, hparams/config with integer shape fields).

These checks live apart from the HTTP fetching (gpt.download) because they only read local files:
the same checks recheck a file already in place, and callers write their own `Validator`s
(gpt.data, the eval task sources) in the same terms. A check raises InvalidDownload with the reason
in one line, without the URL, which the caller adds.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

from gpt.errors import GPTError

# The first bytes of an HTML page (after optional whitespace, a byte-order mark or an XML prolog).
_HTML_START = re.compile(rb"\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)\b",
                         re.IGNORECASE | re.DOTALL)
_HTML_TYPES = ("text/html", "application/xhtml+xml")

Validator = Callable[[Path], None]
"""Checks a finished download (its `.part` file) before it is renamed into place: returns nothing
when the file is good, raises ValueError with the reason when it is not (json.JSONDecodeError and
UnicodeDecodeError are ValueErrors, so a bare `json.loads` is already a validator)."""


class InvalidDownload(ValueError):
  """A downloaded file is not what it should be (the message says why, without the URL)."""


def one_line(e: BaseException) -> str:
  """An exception's message folded onto one line of at most 300 characters."""
  text = " ".join(str(e).split())
  return text if len(text) <= 300 else text[:297] + "..."


def html_evidence(first: bytes, name: str, content_type: str = "") -> str | None:
  """Why a file meant to be `name` is an HTML page ('Content-Type text/html', 'it starts like
  one'), from its Content-Type and first bytes; None if it is not one or `name` is a page."""
  if name.lower().endswith((".html", ".htm")):
    return None
  if content_type in _HTML_TYPES:
    return f"Content-Type {content_type}"
  if _HTML_START.match(first.removeprefix(b"\xef\xbb\xbf")):
    return "it starts like one"
  return None


def check_format(path: Path, name: str | None = None) -> None:
  """Raises InvalidDownload unless `path` parses as its name (default: its own) says.

  .json must parse, .jsonl must parse line by line, .safetensors must have a header whose tensor
  offsets end exactly at the end of the file; other names are taken as they come (the HTML check
  happens while downloading).
  """
  name = (name or path.name).lower()
  if name.endswith(".json"):
    check_json(path)
  elif name.endswith(".jsonl"):
    check_jsonl(path)
  elif name.endswith(".safetensors"):
    check_safetensors(path)


def check_json(path: Path) -> Any:
  """The parsed JSON of `path`, or InvalidDownload (truncated, not UTF-8, not JSON)."""
  try:
    return json.loads(path.read_bytes().decode("utf-8-sig"))
  except UnicodeDecodeError as e:
    raise InvalidDownload(f"it is not UTF-8 text (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise InvalidDownload(f"it is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; "
                          f"truncated?)") from None


def check_jsonl(path: Path) -> None:
  """InvalidDownload unless every non-blank line of `path` is a JSON value."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      try:
        if line.strip():
          json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidDownload(f"line {number} is not valid JSON ({e}; truncated?)") from None


def check_safetensors(path: Path) -> None:
  """InvalidDownload unless `path` has a safetensors header whose data ends where the file ends."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise InvalidDownload(f"it has {size} bytes, too few for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise InvalidDownload(f"its header claims {n} bytes but the file has {size}: not safetensors, "
                            f"or truncated")
    try:
      header = json.loads(f.read(n))
      ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
      raise InvalidDownload("its safetensors header is not valid JSON with data_offsets") from None
  want = 8 + n + max(ends, default=0)
  if want != size:
    raise InvalidDownload(f"its header describes {want} bytes but the file has {size}"
                          f"{': truncated' if size < want else ''}")


@functools.lru_cache(maxsize=1)
def _gpt2_vocabulary() -> tuple[dict, tuple[str, ...]]:
  """GPT-2's encoder and merge lines as shipped in gpt/assets/gpt2 (every release uses them)."""
  assets = importlib.resources.files("gpt").joinpath("assets", "gpt2")
  encoder = json.loads(assets.joinpath("encoder.json").read_text(encoding="utf-8"))
  return encoder, _merge_lines(assets.joinpath("vocab.bpe").read_text(encoding="utf-8"))


def _merge_lines(text: str) -> tuple[str, ...]:
  """The merges of a BPE file, without blank lines and the '#version' header (whose wording varies)."""
  lines = [line for line in text.splitlines() if line.strip()]
  return tuple(lines[1:] if lines and lines[0].startswith("#version") else lines)


def check_gpt2_vocab(path: Path) -> None:
  """InvalidDownload unless `path` (encoder.json / vocab.json) is GPT-2's vocabulary."""
  encoder, _ = _gpt2_vocabulary()
  got = check_json(path)
  if got != encoder:
    n = len(got) if isinstance(got, dict) else 0
    raise InvalidDownload(f"it is not GPT-2's vocabulary ({n} entries, {len(encoder)} expected, or "
                          f"different ids)")


def check_gpt2_merges(path: Path) -> None:
  """InvalidDownload unless `path` (vocab.bpe / merges.txt) holds GPT-2's merges."""
  _, merges = _gpt2_vocabulary()
  try:
    got = _merge_lines(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise InvalidDownload(f"it is not UTF-8 text (byte {e.start})") from None
  if got != merges:
    raise InvalidDownload(f"it is not GPT-2's merges file ({len(got)} merges, {len(merges)} "
                          f"expected, or different ones; truncated?)")


def check_json_ints(*keys: str) -> Validator:
  """A validator: the file is a JSON object with an integer value for each of `keys`."""

  def validate(path: Path) -> None:
    value = check_json(path)
    missing = [k for k in keys if not isinstance(value, dict) or type(value.get(k)) is not int]
    if missing:
      raise InvalidDownload(f"it is not a JSON object with integer {', '.join(missing)}")

  return validate


def check_checkpoint_state(path: Path) -> None:
  """InvalidDownload unless `path` is TF's `checkpoint` text naming a model_checkpoint_path."""
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError:
    raise InvalidDownload("it is not text") from None
  if not re.search(r'^model_checkpoint_path:\s*"', text, re.M):
    raise InvalidDownload("it has no model_checkpoint_path line")


def check_tf_index(path: Path, data: Path) -> None:
  """InvalidDownload unless `path` is a TF bundle index and every tensor's bytes in `data` (the
  single data shard, downloaded before the index) have the crc32c the index records. A data file
  that does not match is deleted too: it is the one that was truncated or corrupted."""
  from gpt.formats import tf_checkpoint, tf_table

  try:
    header, entries = tf_checkpoint.read_index(path)
  except GPTError as e:
    reason = one_line(e).split(": ", 1)[-1]
    raise InvalidDownload(f"it is not a TensorFlow checkpoint index ({reason})") from None
  if header["num_shards"] != 1 or not data.is_file():
    return  # a layout the downloader does not fetch; the loader checks it
  size = data.stat().st_size
  end = max((e["offset"] + e["size"] for e in entries.values()), default=0)
  problem = f"it has {size} bytes but the index needs {end} (truncated?)" if size < end else None
  if problem is None:
    with open(data, "rb") as f:
      for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["offset"]):
        f.seek(entry["offset"])
        if tf_table.masked_crc(f.read(entry["size"])) != entry["crc32c"]:
          problem = f"tensor {name!r} fails its crc32c checksum (corrupted)"
          break
  if problem:
    data.unlink()
    raise InvalidDownload(f"the data file {data.name} does not match the index: {problem}; deleted "
                          f"it too")


def model_file_check(folder: Path, file: str) -> Validator | None:
  """What a released model's `file` must be, beyond check_format (None: nothing more is known)."""
  if file in ("encoder.json", "vocab.json"):
    return check_gpt2_vocab
  if file in ("vocab.bpe", "merges.txt"):
    return check_gpt2_merges
  if file == "checkpoint":
    return check_checkpoint_state
  if file == "hparams.json":
    return check_json_ints("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
  if file == "config.json":
    return check_json_ints("vocab_size", "n_embd", "n_head", "n_layer")
  if file == "model.ckpt.index":
    return functools.partial(check_tf_index, data=folder / "model.ckpt.data-00000-of-00001")
  return None
