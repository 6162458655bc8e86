"""Training data: `config.data` -> train/val token arrays -> seeded, resumable windows.

`data.path` may be a text file, a directory, a glob, a token file (.bin/.npz from `gpt.encode`),
an http(s) URL (fetched once into `data.cache_dir` by gpt.download's checked, resumable
downloader, cached under a hash of the whole URL; Project Gutenberg's licence header and footer are
cut off) or `tfds:<name>` (a TensorFlow Datasets text dataset; needs the `[tfds]` extra).
Text is encoded once into `<cache_dir>/<name>-<hash>.bin`, keyed by the sources' paths, sizes and
modification times, the encoding options and the tokenizer, and memory-mapped from then on.

Windows: the batch of step s is a pure function of (seed, s), so the data order after a resume is
exactly the order an uninterrupted run sees, and every host of a multi-host run computes the same
global batch and reads only its own rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import numpy as np

from gpt import encode
from gpt.errors import GPTError

TFDS_PREFIX = "tfds:"
LOCAL_HINT = "e.g. ../shared/data/kant/critique_of_pure_reason.txt"
# Project Gutenberg wraps every e-book in a licence header and footer; these lines delimit the text.
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)[^\n]*\n",
                              re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)", re.MULTILINE)


@dataclasses.dataclass
class Dataset:
  """Flat token arrays (memmaps for .bin files) and where they came from."""

  train: np.ndarray
  val: np.ndarray | None
  source: str


def is_url(path: str) -> bool:
  return path.startswith(("http://", "https://"))


def strip_gutenberg(text: str) -> str:
  """The book between Project Gutenberg's START and END lines (the text unchanged without them)."""
  start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
  if start is None or end is None or end.start() < start.end():
    return text
  return text[start.end():end.start()].strip() + "\n"


def url_cache_path(url: str, cache_dir: str) -> Path:
  """Where `url` is cached: its file name plus a hash of the whole URL, so two URLs that end in the
  same name (two servers' corpus.txt, or ?query variants) never share a cached file."""
  name = Path(unquote(Path(urlsplit(url).path).name) or "download.txt")
  stem = re.sub(r"[^A-Za-z0-9._-]", "_", name.stem)[:80] or "download"
  suffix = re.sub(r"[^A-Za-z0-9.]", "_", name.suffix)[:16]
  digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]
  return Path(cache_dir).expanduser() / f"{stem}-{digest}{suffix}"


def fetch(url: str, cache_dir: str, timeout: float = 30.0, retries: int = 3) -> Path:
  """Downloads `url` into `cache_dir` once and returns the local file.

  Uses gpt.download.fetch (Range resume across retries and runs, atomic rename, and no HTML page,
  truncated body or bad checksum ever lands in the cache), then cuts Project Gutenberg's licence
  header and footer from text.
  """
  from gpt import download

  dest = url_cache_path(url, cache_dir)
  if dest.is_file():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  raw = dest.with_name(f".{dest.stem}.download{dest.suffix}")
  hint = (f"cannot download the data; pass --config.data.path=<a local text or token file> "
          f"({LOCAL_HINT})")
  download.fetch(url, raw, retries=retries, timeout=timeout, offline_hint=hint)
  if dest.suffix in encode.TOKEN_SUFFIXES:
    try:
      encode.read_token_chunks(raw)  # a damaged token file is not cached
    except GPTError as e:
      raw.unlink()
      what = str(e).replace(str(raw), "the download").rsplit("; ", 1)[0]  # not its how-to-fix
      raise GPTError(f"{url}: {what}; deleted it; check the URL") from None
    raw.replace(dest)
    return dest
  body = raw.read_bytes()
  try:
    text = body.decode("utf-8-sig")
    stripped = strip_gutenberg(text)
    if stripped is not text:
      body = stripped.encode("utf-8")
  except UnicodeDecodeError:
    pass  # not UTF-8 text: keep the bytes as they are; data.encoding decides later
  tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
  tmp.write_bytes(body)
  tmp.replace(dest)
  raw.unlink()
  return dest


def _cache_key(parts: dict) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _tokenizer_id(tokenizer: Any) -> dict:
  return {"tokenizer": str(getattr(tokenizer, "source", "")), "n_vocab": int(tokenizer.n_vocab)}


def resolve_tokens(spec: str, tokenizer: Any, data_cfg: Any) -> tuple[np.ndarray, str]:
  """A flat token array for `spec` (see the module docstring), and a description of it."""
  spec = spec.strip()
  if not spec:
    raise GPTError(f"config.data.path is empty; pass --config.data.path=... ({LOCAL_HINT})")
  if spec.startswith(TFDS_PREFIX):
    return _tfds_tokens(spec[len(TFDS_PREFIX):], tokenizer, data_cfg)
  if is_url(spec):
    spec = str(fetch(spec, data_cfg.cache_dir))
  elif not any(ch in spec for ch in "*?[") and not Path(spec).expanduser().exists():
    raise GPTError(f"data path {spec} does not exist; pass --config.data.path=<a text file, folder, "
                   f"glob or .bin/.npz token file> ({LOCAL_HINT})")
  paths = encode.expand_paths(spec)
  if len(paths) == 1 and paths[0].suffix in encode.TOKEN_SUFFIXES:
    return encode.load_token_file(paths[0], tokenizer.eot_id), str(paths[0])
  key = _cache_key({
      "sources": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths],
      "encoding": data_cfg.encoding, "errors": data_cfg.errors, **_tokenizer_id(tokenizer)})
  out = Path(data_cfg.cache_dir).expanduser() / f"{paths[0].stem}-{key}.bin"
  if not out.is_file():
    encode.encode_paths(paths, tokenizer, out, encoding=data_cfg.encoding, errors=data_cfg.errors,
                        combine=data_cfg.combine)
  return encode.load_token_file(out, tokenizer.eot_id), f"{spec} (tokens cached in {out})"


def _tfds_texts(name: str, split: str, field: str, data_dir: str) -> Iterator[str]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise GPTError("data.path=tfds:... needs TensorFlow Datasets: pip install -e '.[tfds]'") from None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, ValueError, ...)
    raise GPTError(f"cannot open TFDS dataset {name!r} split {split!r}: {str(e).splitlines()[0]}") from None
  for i in range(len(source)):
    record = source[i]
    if field not in record:
      raise GPTError(f"TFDS dataset {name!r} has no text field {field!r} (fields: "
                     f"{', '.join(sorted(record))}); pass --config.data.tfds_field=...")
    value = record[field]
    yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_tokens(name: str, tokenizer: Any, data_cfg: Any, split: str | None = None):
  """Encodes one split of a TFDS text dataset (records joined by <|endoftext|>) into a cached .bin."""
  split = split or data_cfg.tfds_split
  key = _cache_key({"tfds": name, "split": split, "field": data_cfg.tfds_field,
                    "data_dir": data_cfg.tfds_data_dir, **_tokenizer_id(tokenizer)})
  out = Path(data_cfg.cache_dir).expanduser() / f"tfds-{name.replace('/', '_')}-{split}-{key}.bin"
  if not out.is_file():
    dtype = encode.token_dtype(tokenizer.n_vocab)

    def pieces() -> Iterator[encode.Piece]:
      for text in _tfds_texts(name, split, data_cfg.tfds_field, data_cfg.tfds_data_dir):
        yield encode.Piece(np.asarray(tokenizer.encode(text), dtype), chunk_end=True)

    encode.write_tokens(pieces(), out, eot_id=tokenizer.eot_id, dtype=dtype,
                        sources=[f"tfds:{name}/{split}"])
  return encode.load_token_file(out, tokenizer.eot_id), f"tfds:{name} split {split} ({out})"


def load_dataset(data_cfg: Any, tokenizer: Any, seq_len: int, n_vocab: int | None = None) -> Dataset:
  """Train and validation tokens for `config.data`; validation is `val_path` or the last
  `val_fraction` of the training tokens (None when both are off). Token ids must be below
  `n_vocab` (the model's vocabulary; default the tokenizer's)."""
  n_vocab = tokenizer.n_vocab if n_vocab is None else n_vocab
  tokens, source = resolve_tokens(data_cfg.path, tokenizer, data_cfg)
  val = None
  if data_cfg.path.startswith(TFDS_PREFIX) and data_cfg.tfds_val_split:
    val, _ = _tfds_tokens(data_cfg.path[len(TFDS_PREFIX):], tokenizer, data_cfg,
                          split=data_cfg.tfds_val_split)
  elif data_cfg.val_path:
    val, _ = resolve_tokens(data_cfg.val_path, tokenizer, data_cfg)
  elif data_cfg.val_fraction > 0:
    n_val = int(round(len(tokens) * data_cfg.val_fraction))
    if n_val < seq_len + 1:
      raise GPTError(f"val_fraction={data_cfg.val_fraction} of {len(tokens)} tokens is {n_val}, fewer "
                     f"than one window of {seq_len + 1}; raise --config.data.val_fraction or set it "
                     f"to 0 (and --config.train.val_every=0)")
    tokens, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
  for name, arr in (("training", tokens), ("validation", val)):
    if arr is not None and len(arr) < seq_len + 1:
      raise GPTError(f"the {name} data has {len(arr)} tokens, fewer than one window of seq_len+1 = "
                     f"{seq_len + 1}; use more text or a smaller --config.train.seq_len")
  for arr in (tokens, val):
    if arr is not None:
      encode.check_token_ids(arr, n_vocab, source)
  return Dataset(tokens, val, source)


class Windows:
  """Random `seq_len + 1`-token windows of a flat token array, seeded and resumable.

  `starts(step)` depends only on (seed, step), never on what was drawn before.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
    if len(tokens) < seq_len + 1:
      raise GPTError(f"{len(tokens)} tokens cannot hold a window of {seq_len + 1}")
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

  def starts(self, step: int) -> np.ndarray:
    """Start offsets [batch_size] of the windows of `step`."""
    rng = np.random.default_rng([self.seed, step])
    return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

  def batch(self, step: int) -> np.ndarray:
    """The windows [batch_size, seq_len + 1] of `step`."""
    return window_rows(self.tokens, self.starts(step), self.seq_len)


def window_rows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  """The windows [len(starts), seq_len + 1] (int32) of `tokens` starting at `starts`."""
  idx = np.asarray(starts)[:, None] + np.arange(seq_len + 1)
  return np.asarray(tokens[idx], np.int32)


def eval_starts(n_tokens: int, seq_len: int, n_batches: int, batch_size: int) -> np.ndarray:
  """Fixed, evenly spaced window starts [n_batches, batch_size] covering a validation array."""
  n = n_batches * batch_size
  return np.linspace(0, n_tokens - seq_len - 1, n).round().astype(np.int64).reshape(n_batches,
                                                                                      batch_size)
