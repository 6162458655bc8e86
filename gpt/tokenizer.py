"""GPT-2's byte-level BPE tokenizer: OpenAI's vocabulary on tiktoken's engine.

`get_tokenizer()` loads the vocabulary shipped inside the package (so it works offline), an OpenAI
model folder (`encoder.json` + `vocab.bpe`) or a Hugging Face folder (`vocab.json` + `merges.txt`).
The files are turned into tiktoken's mergeable ranks (token bytes -> id) after checking that they
have GPT-2's layout: 256 byte tokens, merge k of the merges file making token id 256 + k, then
`<|endoftext|>`. tiktoken merges by the rank of the merged token, so it needs ids in merge order to
follow OpenAI's `encoder.py` (for GPT-2's files the tests compare ids with tiktoken on whole corpora).

Long texts are cut where the cut provably cannot change the tokens (`split_for_parallel`) and the
pieces are encoded on threads; tiktoken's Rust core releases the GIL while it encodes.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken

from gpt.errors import GPTError

# GPT-2's pre-tokenizer pattern as tiktoken's own `gpt2` encoding has it (a test checks the copy).
_PATTERN_COPY = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
try:
  from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN
except ImportError:  # tiktoken_ext is a namespace package that repackagings may drop.
  GPT2_PATTERN = _PATTERN_COPY

EOT_TEXT = "<|endoftext|>"
OPENAI_FILES = ("encoder.json", "vocab.bpe")
HF_FILES = ("vocab.json", "merges.txt")
BPE_HEADER = "#version: 0.2"
# Texts longer than this (in characters) are cut into pieces and encoded on several threads.
SPLIT_CHARS = 1 << 18
# Target length of one piece of a long text.
CHUNK_CHARS = 1 << 16
# A cut right after a non-whitespace character that is followed by a space, tab or newline.
_SAFE_CUT = re.compile(r"\S(?=[ \t\n])")
_WHERE_TO = ("pass a folder with encoder.json + vocab.bpe (OpenAI) or vocab.json + merges.txt "
             "(Hugging Face), or no path for GPT-2's vocabulary shipped with gpt")


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI's byte -> printable character table that encoder.json and vocab.bpe are written in."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:  # Unprintable bytes are shifted past 255, in byte order.
      table[b] = chr(256 + extra)
      extra += 1
  return table


def split_for_parallel(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
  """Cuts `text` into pieces of about `chunk_chars` whose GPT-2 encodings concatenate to its own.

  Cuts fall only between a non-whitespace character and a following space, tab or newline, and
  there the pre-tokens (the pattern's matches, which BPE never merges across) are unchanged:
  - GPT-2's pattern has no look-behind, so the pre-tokens from the cut on are found alike whether
    the scan starts at the cut or earlier, provided one pre-token ends exactly at the cut. One does:
    the character before it is non-whitespace, so it lies in a letter, number, symbol or
    contraction pre-token (at most led by one space), and those never contain whitespace.
  - The pre-tokens before the cut are found alike in the prefix alone: the pattern looks past a
    match only with `(?!\\S)` and `$`, inside whitespace runs, and every such run ends before the
    non-whitespace character before the cut, which both texts share; the pre-token ending at the
    cut stops there in both, at the whitespace or at the end of the prefix.
  Python's `\\s` covers Unicode White_Space, which is the Rust regex's `\\s` (a test checks), so the
  character before a cut is non-whitespace for tiktoken too.
  """
  if chunk_chars < 1:
    raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
  pieces, start = [], 0
  while len(text) - start > chunk_chars:
    match = _SAFE_CUT.search(text, start + chunk_chars - 1)
    if match is None:  # No safe cut in the rest of the text: keep it whole.
      break
    pieces.append(text[start:match.end()])
    start = match.end()
  pieces.append(text[start:])
  return pieces


class Tokenizer:
  """GPT-2's tokenizer. Build it with `get_tokenizer`; ids are identical to tiktoken's `gpt2`."""

  def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], source: str,
               files: tuple[str, str] = OPENAI_FILES):
    """`encoder` maps byte-encoded token strings to ids, `merges` lists BPE merges in rank order;
    `files` names the two files they came from, for error messages."""
    self._encoder = encoder
    self._merges = merges
    self._source = source
    ranks, eot_id = _mergeable_ranks(encoder, merges, source, files)
    self._enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={EOT_TEXT: eot_id}, explicit_n_vocab=len(encoder))
    self._eot_id = eot_id
    self._workers, self._workers_pid, self._workers_lock = None, None, threading.Lock()

  @property
  def eot_id(self) -> int:
    """Id of `<|endoftext|>` (50256 for GPT-2)."""
    return self._eot_id

  @property
  def eot_text(self) -> str:
    """The text `<|endoftext|>`."""
    return EOT_TEXT

  @property
  def n_vocab(self) -> int:
    """Number of token ids, special token included (50257 for GPT-2)."""
    return self._enc.n_vocab

  @property
  def source(self) -> str:
    """Where the vocabulary was loaded from."""
    return self._source

  def __repr__(self) -> str:
    return f"Tokenizer(n_vocab={self.n_vocab}, source={self._source!r})"

  def encode(self, text: str, allow_special: bool = False) -> list[int]:
    """Token ids of `text`. `<|endoftext|>` in the text becomes `eot_id` only if `allow_special`;
    otherwise it is encoded as ordinary text."""
    if len(text) <= SPLIT_CHARS:
      if allow_special:
        return self._enc.encode(text, allowed_special={EOT_TEXT}, disallowed_special=())
      return self._enc.encode_ordinary(text)
    return self.encode_batch([text], allow_special)[0]

  def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
    """`[encode(t, allow_special) for t in texts]`, on several threads when there is enough text."""
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a list of strings; use encode for one string")
    pieces, layout = [], []
    for text in texts:
      # tiktoken's special-token handling is exactly this: ordinary text between the specials.
      parts = text.split(EOT_TEXT) if allow_special else [text]
      counts = []
      for part in parts:
        chunks = split_for_parallel(part) if len(part) > SPLIT_CHARS else [part]
        pieces.extend(chunks)
        counts.append(len(chunks))
      layout.append(counts)
    encoded = iter(self._encode_pieces(pieces))
    out = []
    for counts in layout:
      ids = []
      for k, n_chunks in enumerate(counts):
        if k:
          ids.append(self._eot_id)
        for _ in range(n_chunks):
          ids.extend(next(encoded))
      out.append(ids)
    return out

  def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
    """encode_ordinary of each piece; one contiguous group of pieces per thread, so that many short
    pieces do not pay a thread hand-off each (tiktoken's encode_ordinary_batch does)."""
    total = sum(map(len, pieces))
    n_threads = min(free_cpus(), len(pieces), total // CHUNK_CHARS)
    if n_threads < 2:
      return [self._enc.encode_ordinary(p) for p in pieces]
    groups, group, size = [], [], 0
    for piece in pieces:  # Contiguous groups of about total / n_threads characters.
      group.append(piece)
      size += len(piece)
      if size * n_threads >= total * (len(groups) + 1):
        groups.append(group)
        group = []
    if group:
      groups.append(group)
    encode_group = lambda group: [self._enc.encode_ordinary(p) for p in group]
    pool = self._worker_pool()
    futures = [pool.submit(encode_group, g) for g in groups[1:]]
    first = encode_group(groups[0])  # The calling thread takes a share too.
    return first + [ids for future in futures for ids in future.result()]

  def _worker_pool(self) -> ThreadPoolExecutor:
    """This tokenizer's long-lived worker threads. Fresh threads would cost ~20% more CPU: tiktoken
    keeps one regex (and its lazily built automaton) per thread. A forked child gets a new pool,
    since the parent's threads do not exist in it."""
    with self._workers_lock:
      if self._workers is None or self._workers_pid != os.getpid():
        self._workers = ThreadPoolExecutor(max(1, cpu_count() - 1), thread_name_prefix="tokenizer")
        self._workers_pid = os.getpid()
      return self._workers

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    """The bytes the ids stand for (they need not be valid UTF-8 at a cut)."""
    ids = _as_id_list(ids)
    try:
      return self._enc.decode_bytes(ids)
    except (KeyError, OverflowError, TypeError):
      bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < self.n_vocab)), None)
      raise ValueError(f"token id {bad!r} is not in the vocabulary (ids are 0..{self.n_vocab - 1})")

  def decode(self, ids: Iterable[int]) -> str:
    """The text of the ids; invalid UTF-8 (a character cut between tokens) becomes U+FFFD, as in
    OpenAI's encoder.py (errors="replace")."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def save(self, folder: str | os.PathLike, fmt: str = "openai") -> Path:
    """Writes encoder.json + vocab.bpe (fmt="openai") or vocab.json + merges.txt (fmt="hf") into
    `folder`, byte-identical to OpenAI's files for GPT-2; returns the folder."""
    formats = {"openai": OPENAI_FILES, "hf": HF_FILES}
    if fmt not in formats:
      raise GPTError(f"unknown tokenizer format {fmt!r}; use one of {sorted(formats)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_name, merges_name = formats[fmt]
    # json.dumps' defaults (", ", ": ", ASCII escapes) are the format of OpenAI's encoder.json.
    (folder / vocab_name).write_text(json.dumps(self._encoder), encoding="utf-8")
    lines = [BPE_HEADER] + [f"{a} {b}" for a, b in self._merges]
    (folder / merges_name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def cpu_count() -> int:
  """CPUs this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def free_cpus() -> int:
  """CPUs not already busy by the 1-minute load average, counting the caller's own (at least 1).

  On a saturated machine a second thread buys nothing and costs ~15% (measured on 2 loaded cores),
  so the pieces are then encoded one after the other, which is as fast as tiktoken's single call.
  """
  cpus = cpu_count()
  try:
    load = os.getloadavg()[0]
  except (AttributeError, OSError):  # No load average on this platform.
    return cpus
  return max(1, min(cpus, int(cpus - load + 1)))


def _as_id_list(ids: Iterable[int]) -> list[int]:
  """A list of Python ints from a list, tuple, numpy or jax array of ids (1-D)."""
  if isinstance(ids, list):
    return ids
  array = np.asarray(ids)
  if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"expected a 1-D sequence of integer token ids, got shape {array.shape} "
                     f"and dtype {array.dtype}")
  return array.astype(np.int64).tolist()


def _mergeable_ranks(encoder: dict[str, int], merges: list[tuple[str, str]], source: str,
                     files: tuple[str, str]) -> tuple[dict[bytes, int], int]:
  """tiktoken's ranks (token bytes -> id) and the id of <|endoftext|>, after checking the files."""
  vocab_file, merges_file = (f"{source}/{name}" for name in files)
  if EOT_TEXT not in encoder:
    raise GPTError(f"{vocab_file} has no {EOT_TEXT} entry, so it is not GPT-2's vocabulary; {_WHERE_TO}")
  # str.translate + latin-1 is the C-speed inverse of bytes_to_unicode; characters outside GPT-2's
  # byte alphabet become U+FFFF, which latin-1 cannot encode.
  to_bytes = {ord(char): b for b, char in bytes_to_unicode().items()}
  to_bytes.update({c: 0xFFFF for c in range(256) if c not in to_bytes})
  ranks = {}
  for token, rank in encoder.items():
    if token == EOT_TEXT:
      continue
    try:
      ranks[token.translate(to_bytes).encode("latin-1")] = rank
    except UnicodeEncodeError:
      raise GPTError(f"{vocab_file}: token {token!r} has a character outside GPT-2's byte alphabet; "
                     f"the file is corrupt or not a GPT-2 vocabulary") from None
  if sorted(r for t, r in ranks.items() if len(t) == 1) != list(range(256)):
    raise GPTError(f"{vocab_file}: the 256 single-byte tokens must have ids 0..255; the file is "
                   f"corrupt or not a GPT-2 vocabulary")
  expected_size = 256 + len(merges) + 1
  if len(encoder) != expected_size or encoder[EOT_TEXT] != expected_size - 1:
    raise GPTError(f"{vocab_file} has {len(encoder)} tokens ({EOT_TEXT} = {encoder[EOT_TEXT]}) but "
                   f"{merges_file} has {len(merges)} merges, which need 256 + {len(merges)} + 1 tokens "
                   f"with {EOT_TEXT} last; the two files do not belong together")
  absent = len(encoder)  # Larger than any id a merge makes: stands for a part missing from the encoder.
  for k, (a, b) in enumerate(merges):
    made, got = 256 + k, encoder.get(a + b)
    if got != made or encoder.get(a, absent) >= made or encoder.get(b, absent) >= made:
      what = f"it makes {got}" if got != made else "one of its parts has no lower id"
      raise GPTError(f"{merges_file}: merge {k + 1} '{a} {b}' must make token id {made} of {vocab_file} "
                     f"from two lower ids, but {what}; the two files do not belong together")
  return ranks, encoder[EOT_TEXT]


def _read(read_text, file: str, hint: str = _WHERE_TO) -> str:
  """The text of one vocabulary file, or a GPTError naming it."""
  try:
    return read_text()
  except FileNotFoundError:
    raise GPTError(f"{file} is missing; {hint}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise GPTError(f"cannot read {file} ({e}); {hint}") from None


def _parse(vocab_text: str, merges_text: str, where: str, files: tuple[str, str]) -> Tokenizer:
  """A Tokenizer from the texts of a vocabulary JSON and a merges file."""
  vocab_file, merges_file = (f"{where}/{name}" for name in files)
  try:
    encoder = json.loads(vocab_text)
  except json.JSONDecodeError as e:
    raise GPTError(f"{vocab_file} is not valid JSON ({e}); the file is corrupt; {_WHERE_TO}") from None
  if not (isinstance(encoder, dict) and all(type(v) is int for v in encoder.values())):
    raise GPTError(f"{vocab_file} must be a JSON object mapping token strings to integer ids")
  lines = merges_text.splitlines()  # Also \r\n; no GPT-2 token has a line-break character.
  first = 1 if lines and lines[0].startswith("#version") else 0
  merges = []
  for number, line in enumerate(lines[first:], start=first + 1):
    if not line:  # Tolerate blank lines.
      continue
    parts = line.split(" ")
    if len(parts) != 2 or not all(parts):
      raise GPTError(f"{merges_file} line {number}: expected two tokens separated by one space, got "
                     f"{line[:60]!r}; the file is corrupt")
    merges.append((parts[0], parts[1]))
  return Tokenizer(encoder, merges, where, files)


@functools.lru_cache(maxsize=None)
def _load_packaged() -> Tokenizer:
  """GPT-2's vocabulary from gpt/assets/gpt2 (importlib.resources, so zipped installs work too)."""
  assets = importlib.resources.files("gpt").joinpath("assets", "gpt2")
  hint = "the package is damaged: reinstall it (pip install -e .), or pass a vocabulary folder"
  texts = [_read(lambda n=n: assets.joinpath(n).read_text(encoding="utf-8"),
                 f"gpt/assets/gpt2/{n}", hint) for n in OPENAI_FILES]
  return _parse(*texts, "gpt/assets/gpt2", OPENAI_FILES)


@functools.lru_cache(maxsize=16)
def _load_folder(folder: Path) -> Tokenizer:
  """A Tokenizer from an OpenAI or Hugging Face folder (absolute path; cached per folder)."""
  if not folder.exists():
    raise GPTError(f"tokenizer folder {folder} does not exist; {_WHERE_TO}")
  if not folder.is_dir():
    raise GPTError(f"{folder} is a file, not a folder; {_WHERE_TO}")
  for files in (OPENAI_FILES, HF_FILES):
    if all((folder / name).is_file() for name in files):
      texts = [_read(lambda n=n: (folder / n).read_text(encoding="utf-8"), f"{folder}/{n}")
               for n in files]
      return _parse(*texts, str(folder), files)
  for files in (OPENAI_FILES, HF_FILES):
    present = [(folder / name).is_file() for name in files]
    if any(present):
      have, missing = files if present[0] else files[::-1]
      raise GPTError(f"{folder} has {have} but not {missing}; {_WHERE_TO}")
  raise GPTError(f"{folder} has no tokenizer files; {_WHERE_TO}")


def get_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
  """GPT-2's tokenizer: from `path` (a folder with encoder.json + vocab.bpe, or vocab.json +
  merges.txt) or, when None, from the vocabulary shipped in the package. Loaded once per folder."""
  if path is None:
    return _load_packaged()
  return _load_folder(Path(path).expanduser().resolve())
