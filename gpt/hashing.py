"""The one file-hash function of the package.

Downloads check a file against the sha256/md5 a caller or server states, checkpoints record the
sha256 of every file in their manifest, and eval results record the sha256 of the data they read.
All of them hash a file the same way, here, a block at a time so that a 3 GB checkpoint shard is
never held in memory at once.
"""

from __future__ import annotations

import hashlib
import os

_BLOCK = 1 << 20


def hash_file(path: str | os.PathLike, algorithm: str = "sha256") -> str:
  """Hex digest of a file's bytes (`algorithm`: any name hashlib.new accepts, e.g. 'md5')."""
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_BLOCK), b""):
      digest.update(block)
  return digest.hexdigest()
