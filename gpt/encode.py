"""Encode text into token files (nshepperd's encode.py), streaming.

  python -m gpt.encode ../shared/data/kant/critique_of_pure_reason.txt kant.bin
  python -m gpt.encode 'corpus/**/*.txt' corpus.npz --combine=50000

Inputs are a file, a directory or a glob. Text is decoded and tokenized in blocks of about a
megabyte, cut only where the GPT-2 pre-tokenizer cannot join across the cut, so the tokens equal
those of encoding each whole file at once while memory stays bounded by the block size.

Token files:
  .bin  a flat little-endian uint16 array (nanoGPT's layout; uint32 when the vocabulary needs it),
        with a `<file>.json` sidecar naming the dtype and sources. Read through np.memmap.
  .npz  nshepperd's format: one array per `combine` chunk (`np.savez_compressed(out, *chunks)`).

Documents (files) are separated by <|endoftext|> (the real token id, where nshepperd's code
inserted the text '<|endoftext|>' and so encoded it as seven ordinary tokens). A UTF-8 byte-order
mark at the start of a file is dropped: it is an encoding artefact, not text (the Kant corpus starts
with one, and keeping it would teach the model three junk byte tokens at the start).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import glob
import json
import os
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from gpt.errors import GPTError, print_error

BLOCK_BYTES = 1 << 20  # bytes read per step when streaming a file
TOKEN_SUFFIXES = (".bin", ".npz")
_REDO = "encode the text again with python -m gpt.encode"  # the fix for a damaged token file


def token_dtype(n_vocab: int) -> np.dtype:
  """uint16 when every id fits (GPT-2's 50257 does), else uint32."""
  return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def expand_paths(spec: str) -> list[Path]:
  """The files named by `spec`: a file, a directory (recursively, sorted) or a glob pattern."""
  path = Path(spec).expanduser()
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith(".json"))
  else:
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
  if not files:
    raise GPTError(f"no input files found at {spec!r} (give a text file, a directory or a glob)")
  return files


def read_text(path: Path, encoding: str = "utf-8", errors: str = "strict",
              block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
  """Yields the decoded text of `path` block by block, without a leading byte-order mark.

  With errors='strict' an undecodable byte raises GPTError naming the file and its byte offset.
  """
  try:
    decoder = codecs.getincrementaldecoder(encoding)(errors)
  except LookupError:
    raise GPTError(f"unknown text encoding {encoding!r} (--config.data.encoding)") from None
  offset, first = 0, True
  with open(path, "rb") as f:
    while True:
      block = f.read(block_bytes)
      pending = len(decoder.getstate()[0])
      try:
        text = decoder.decode(block, final=not block)
      except UnicodeDecodeError as e:
        at = offset - pending + e.start
        raise GPTError(f"{path}: byte {at} (0x{e.object[e.start]:02x}) is not valid {encoding}; "
                       f"pass --config.data.encoding=... (e.g. latin-1) or "
                       f"--config.data.errors=replace") from None
      offset += len(block)
      if first and text:
        text, first = text.removeprefix("\ufeff"), False
      if text:
        yield text
      if not block:
        return


def encode_text_blocks(blocks: Iterable[str], tokenizer: Any, dtype: np.dtype,
                       block_chars: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
  """Tokenizes a stream of text blocks piecewise; equal to encoding their concatenation.

  The buffer is cut only where `split_for_parallel` proves a cut cannot change the tokens (after a
  non-space that is followed by a space, tab or newline); the tail after the last cut waits for
  more text.
  """
  from gpt.tokenizer import split_for_parallel

  buf = ""
  for block in blocks:
    buf += block
    if len(buf) > block_chars:
      *ready, buf = split_for_parallel(buf, block_chars)
      for piece in ready:
        yield np.asarray(tokenizer.encode(piece), dtype)
  if buf:
    yield np.asarray(tokenizer.encode(buf), dtype)


@dataclasses.dataclass
class Piece:
  """Tokens of one input piece; `chunk_end` closes a `combine` chunk after these tokens."""

  tokens: np.ndarray
  chunk_end: bool = False


def iter_pieces(paths: list[Path], tokenizer: Any, *, encoding: str = "utf-8",
                errors: str = "strict", combine: int = 50_000, dtype=np.uint16,
                progress: Any = None) -> Iterator[Piece]:
  """Token pieces of `paths`, files joined by <|endoftext|>, in chunks of >= `combine` characters.

  As nshepperd's load_dataset: text files accumulate into a chunk until it holds `combine`
  characters; token files (.npz chunks, .bin) pass through as their own chunks.
  """
  eot = np.asarray([tokenizer.eot_id], dtype)
  chars = 0  # characters in the open chunk
  for path in paths:
    if path.suffix in TOKEN_SUFFIXES:
      if chars:
        yield Piece(np.zeros(0, dtype), chunk_end=True)
        chars = 0
      for chunk in read_token_chunks(path):
        check_token_ids(chunk, tokenizer.n_vocab, str(path))  # astype would wrap negative ids
        yield Piece(chunk.astype(dtype), chunk_end=True)
      if progress is not None:
        progress.update(path.stat().st_size)
      continue
    if chars:
      yield Piece(eot)
    n_chars = [0]
    blocks = _count_chars(read_text(path, encoding, errors), n_chars, progress, encoding)
    for tokens in encode_text_blocks(blocks, tokenizer, dtype):
      yield Piece(tokens)
    chars += max(1, n_chars[0])
    if chars >= combine:
      yield Piece(np.zeros(0, dtype), chunk_end=True)
      chars = 0
  if chars:
    yield Piece(np.zeros(0, dtype), chunk_end=True)


def _count_chars(blocks: Iterator[str], counter: list[int], progress: Any,
                 encoding: str) -> Iterator[str]:
  """Passes text blocks through, adding their characters to counter[0] and bytes to `progress`."""
  for block in blocks:
    counter[0] += len(block)
    if progress is not None:
      progress.update(len(block.encode(encoding, errors="replace")))
    yield block


def write_tokens(pieces: Iterable[Piece], out: str | os.PathLike, *, eot_id: int,
                 dtype=np.uint16, sources: list[str] | None = None) -> int:
  """Writes pieces to `out` (.bin or .npz) atomically; returns the number of tokens written.

  In .bin, chunk boundaries become <|endoftext|> so documents stay separated in the flat stream.
  """
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
  dtype = np.dtype(dtype)
  total = 0
  if out.suffix == ".npz":
    chunks, current = [], []
    for piece in pieces:
      current.append(piece.tokens)
      if piece.chunk_end:
        chunks.append(np.concatenate(current).astype(dtype))
        current = []
    chunks = [c for c in chunks if c.size]
    total = sum(c.size for c in chunks)
    with open(tmp, "wb") as f:
      np.savez_compressed(f, *chunks)
  elif out.suffix == ".bin":
    sep = np.asarray([eot_id], dtype).tobytes()
    with open(tmp, "wb") as f:
      boundary = False
      for piece in pieces:
        if piece.tokens.size:
          if boundary:
            f.write(sep)
            total += 1
          f.write(np.ascontiguousarray(piece.tokens, dtype).tobytes())
          total += piece.tokens.size
          boundary = False
        boundary = boundary or (piece.chunk_end and total > 0)
    meta = {"dtype": dtype.name, "n_tokens": total, "eot_id": eot_id, "sources": sources or []}
    _atomic_write_text(Path(f"{out}.json"), json.dumps(meta, indent=1))
  else:
    raise GPTError(f"token file {out} must end in .bin (flat uint16) or .npz (nshepperd's chunks)")
  os.replace(tmp, out)
  return total


def read_token_chunks(path: str | os.PathLike) -> list[np.ndarray]:
  """The chunks of a token file: the arrays of an .npz, or the one flat array of a .bin (memmap).

  A file that cannot be token ids (a damaged or foreign .npz, a .bin that is not a whole number of
  tokens, float or multi-dimensional arrays) is a GPTError naming it, not a numpy traceback.
  """
  path = Path(path)
  if path.suffix == ".npz":
    return _read_npz(path)
  if path.suffix == ".bin":
    dtype = _bin_dtype(path)
    size = path.stat().st_size
    if size % dtype.itemsize:
      raise GPTError(f"{path} has {size} bytes, not a whole number of {dtype.itemsize}-byte "
                     f"{dtype.name} tokens: it is truncated or its .json sidecar names the wrong dtype; "
                     f"{_REDO}")
    if size == 0:
      return [np.zeros(0, dtype)]
    return [np.memmap(path, dtype=dtype, mode="r")]
  raise GPTError(f"{path} is not a token file (.bin or .npz)")


def _bin_dtype(path: Path) -> np.dtype:
  """The dtype a .bin's `<file>.json` sidecar names (uint16 without one)."""
  meta = Path(f"{path}.json")
  if not meta.is_file():
    return np.dtype(np.uint16)
  try:
    dtype = np.dtype(json.loads(meta.read_text(encoding="utf-8"))["dtype"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise GPTError(f"{meta} (the dtype of {path.name}) is unreadable ({type(e).__name__}: {e}); "
                   f"{_REDO}") from None
  if dtype.kind != "u":
    raise GPTError(f"{meta} says {path.name} holds {dtype.name}; token ids are unsigned integers "
                   f"(uint16 or uint32); {_REDO}")
  return dtype


def _read_npz(path: Path) -> list[np.ndarray]:
  """The arrays of an .npz token file, each checked to be a 1-D integer array."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      chunks = [(name, npz[name]) for name in npz.files]
  except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, OSError, KeyError) as e:
    reason = " ".join(str(e).split())[:200] or type(e).__name__
    raise GPTError(f"{path} is not a readable .npz token file ({reason}): it is truncated, damaged "
                   f"or not an .npz; {_REDO}") from None
  for name, chunk in chunks:
    if chunk.ndim != 1 or chunk.dtype.kind not in "ui":
      raise GPTError(f"{path}: array {name!r} has dtype {chunk.dtype} and shape {chunk.shape}; token "
                     f"files hold 1-D integer token ids; {_REDO}")
  return [chunk for _, chunk in chunks]


def check_token_ids(tokens: np.ndarray, n_vocab: int, source: str) -> None:
  """GPTError unless every id in `tokens` is an integer in [0, n_vocab)."""
  if tokens.dtype.kind not in "ui":
    raise GPTError(f"{source} holds {tokens.dtype} values; token ids must be integers; {_REDO}")
  if tokens.size == 0:
    return
  if tokens.dtype.kind == "i" and int(tokens.min()) < 0:  # unsigned files need only one pass
    at = int(np.argmax(tokens < 0))
    raise GPTError(f"{source} holds a negative token id ({int(tokens[at])} at position {at}); token "
                   f"ids are 0..{n_vocab - 1}; {_REDO}")
  high = int(tokens.max())
  if high >= n_vocab:
    raise GPTError(f"{source} holds token id {high} but the model's vocabulary has {n_vocab} ids "
                   f"(model.n_vocab)")


def load_token_file(path: str | os.PathLike, eot_id: int) -> np.ndarray:
  """One flat token array: a .bin memory-mapped, or an .npz's chunks joined by <|endoftext|>."""
  chunks = read_token_chunks(path)
  if len(chunks) == 1:
    return chunks[0]
  joined = []
  for i, c in enumerate(chunks):
    if i:
      joined.append(np.asarray([eot_id], c.dtype))
    joined.append(c)
  return np.concatenate(joined)


def _atomic_write_text(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def encode_paths(paths: list[Path], tokenizer: Any, out: str | os.PathLike, *,
                 encoding: str = "utf-8", errors: str = "strict", combine: int = 50_000,
                 show_progress: bool = True) -> int:
  """Encodes text/token files into the token file `out`; returns its token count."""
  from tqdm import tqdm

  dtype = token_dtype(tokenizer.n_vocab)
  total_bytes = sum(p.stat().st_size for p in paths)
  with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"encoding -> {Path(out).name}",
            disable=None if show_progress else True) as bar:
    pieces = iter_pieces(paths, tokenizer, encoding=encoding, errors=errors, combine=combine,
                         dtype=dtype, progress=bar)
    return write_tokens(pieces, out, eot_id=tokenizer.eot_id, dtype=dtype,
                        sources=[str(p) for p in paths])


def main(argv: list[str] | None = None) -> int:
  """`python -m gpt.encode INPUT OUT`: encodes a file, directory or glob into a .bin or .npz."""
  parser = argparse.ArgumentParser(prog="python -m gpt.encode", description=main.__doc__)
  parser.add_argument("input", help="a text file, a directory (recursive) or a glob pattern")
  parser.add_argument("out", help="output token file: .bin (flat uint16) or .npz (nshepperd's)")
  parser.add_argument("--combine", type=int, default=50_000,
                      help="join files (with <|endoftext|>) into chunks of at least this many chars")
  parser.add_argument("--encoding", default="utf-8", help="text encoding of the inputs")
  parser.add_argument("--errors", default="strict", choices=("strict", "replace"),
                      help="undecodable bytes: stop with the file and offset, or replace them")
  parser.add_argument("--tokenizer", default=None,
                      help="folder with encoder.json+vocab.bpe or vocab.json+merges.txt "
                           "(default: GPT-2's vocabulary)")
  args = parser.parse_args(argv)
  from gpt.tokenizer import get_tokenizer

  try:
    if Path(args.out).suffix not in TOKEN_SUFFIXES:
      raise GPTError(f"output {args.out} must end in .bin or .npz")
    tokenizer = get_tokenizer(args.tokenizer)
    paths = expand_paths(args.input)
    n = encode_paths(paths, tokenizer, args.out, encoding=args.encoding, errors=args.errors,
                     combine=args.combine)
  except GPTError as e:
    return print_error(e)
  print(f"wrote {n} tokens from {len(paths)} file(s) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
