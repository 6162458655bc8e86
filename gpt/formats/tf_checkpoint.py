"""OpenAI's TensorFlow checkpoints, read and written with numpy only (no TensorFlow, no protobuf).

A checkpoint `<prefix>` (OpenAI's is `model.ckpt`) is a TF "tensor bundle":
  checkpoint                     text proto naming the prefix: `model_checkpoint_path: "model.ckpt"`
  <prefix>.index                 LevelDB-format SSTable, keys sorted bytewise: "" -> BundleHeaderProto,
                                 each tensor name -> BundleEntryProto (dtype, shape, shard, offset,
                                 size, masked crc32c of the bytes)
  <prefix>.data-00000-of-00001   the raw little-endian tensor bytes, back to back
The SSTable and protobuf plumbing lives in gpt/formats/tf_table.py. The writer follows TF's BundleWriter
choices (keys and data in bytewise name order, proto3 field omission), so its output for the test
fixture is byte for byte the files TensorFlow wrote.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from gpt.formats import tf_table as tt
from gpt.formats.convert import SHAPE_FIELDS
from gpt.errors import GPTError

_BUNDLE_VERSION = 1  # kTensorBundleVersion
# TF DataType enum -> numpy dtype (little-endian; byte-swapped for big-endian bundles).
DTYPES = {
    1: np.dtype("float32"), 2: np.dtype("float64"), 3: np.dtype("int32"), 4: np.dtype("uint8"),
    5: np.dtype("int16"), 6: np.dtype("int8"), 9: np.dtype("int64"), 10: np.dtype("bool"),
    14: np.dtype(ml_dtypes.bfloat16), 17: np.dtype("uint16"), 19: np.dtype("float16"),
    22: np.dtype("uint32"), 23: np.dtype("uint64"),
}
_DTYPE_ENUM = {v: k for k, v in DTYPES.items()}
_CONV_WEIGHT = re.compile(r"^h\d+/(attn|mlp)/c_\w+/w$")  # stored as [1, n_in, n_out] conv1d kernels


def _int64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _parse_header(value: bytes) -> dict:
  """BundleHeaderProto: num_shards=1, endianness=2 (0 little, 1 big), version=3 (VersionDef)."""
  header = {"num_shards": 0, "endianness": 0, "min_consumer": 0, "bad_consumers": []}
  for field, v in tt.fields(value):
    if field == 1:
      header["num_shards"] = v
    elif field == 2:
      header["endianness"] = v
    elif field == 3:
      for f, x in tt.fields(v):  # VersionDef: producer=1, min_consumer=2, bad_consumers=3
        if f == 2:
          header["min_consumer"] = x
        elif f == 3:
          header["bad_consumers"].append(x)
  return header


def _parse_entry(value: bytes) -> dict:
  """BundleEntryProto: dtype=1 shape=2 shard_id=3 offset=4 size=5 crc32c=6 (fixed32) slices=7."""
  entry = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "crc32c": 0,
           "sliced": False}
  names = {1: "dtype", 3: "shard_id", 4: "offset", 5: "size", 6: "crc32c"}
  for field, v in tt.fields(value):
    if field in names:
      entry[names[field]] = v
    elif field == 2:  # TensorShapeProto: dim=2 {size=1, name=2}, unknown_rank=3
      for f, dim in tt.fields(v):
        if f == 2:
          entry["shape"].append(_int64(dict(tt.fields(dim)).get(1, 0)))
    elif field == 7:
      entry["sliced"] = True
  return entry


def encode_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
  """A tensor's index entry (BundleEntryProto) in the proto3 encoding TF writes: zero scalars
  omitted, the shape message always present."""
  dims = b"".join(tt.message(2, tt.key(1, 0) + tt.encode_varint(d) if d else b"") for d in shape)
  out = tt.key(1, 0) + tt.encode_varint(dtype) + tt.message(2, dims)
  if offset:
    out += tt.key(4, 0) + tt.encode_varint(offset)
  if size:
    out += tt.key(5, 0) + tt.encode_varint(size)
  if crc:
    out += tt.key(6, 5) + struct.pack("<I", crc)
  return out


# ---------------------------------------------------------------- tensor bundles

def _data_path(prefix: Path, shard: int, num_shards: int) -> Path:
  return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


def _read_tensor(f, path: Path, file_size: int, name: str, entry: dict, dtype: np.dtype) -> np.ndarray:
  start, size = entry["offset"], entry["size"]
  if start + size > file_size:
    raise GPTError(f"{path} is truncated: tensor {name!r} needs bytes [{start}, {start + size}) but the "
                   f"file has {file_size}; download it again")
  f.seek(start)
  buf = bytearray(size)
  f.readinto(buf)
  if tt.masked_crc(buf) != entry["crc32c"]:
    raise GPTError(f"{path} is corrupt: checksum mismatch in tensor {name!r} (bytes [{start}, "
                   f"{start + size})); download it again")
  return np.frombuffer(buf, dtype).reshape(entry["shape"])


def read_index(index_path: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
  """(header, {tensor name: entry}) of a bundle index; entries hold dtype, shape, shard_id, offset,
  size and crc32c (masked) of each tensor's bytes in its data shard."""
  index_path = Path(index_path)
  try:
    raw = index_path.read_bytes()
  except OSError as e:
    raise GPTError(f"cannot read checkpoint index {index_path}: {e.strerror}") from None
  try:
    items = tt.read_table(raw)
    if not items or items[0][0] != b"":
      raise tt.TableError("no bundle header (the empty key)")
    return _parse_header(items[0][1]), {k.decode(): _parse_entry(v) for k, v in items[1:]}
  except (tt.TableError, UnicodeDecodeError) as e:
    raise GPTError(f"{index_path} is corrupt: {e}; download it again") from None


def read_bundle(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of the bundle `<prefix>.index` + `<prefix>.data-*`, keyed by their stored names."""
  prefix = Path(prefix)
  index_path = prefix.with_name(prefix.name + ".index")
  header, entries = read_index(index_path)
  if header["min_consumer"] > _BUNDLE_VERSION or _BUNDLE_VERSION in header["bad_consumers"]:
    raise GPTError(f"{index_path} needs a newer tensor-bundle reader (min_consumer "
                   f"{header['min_consumer']})")
  byteorder = "<" if header["endianness"] == 0 else ">"
  files, tensors = {}, {}
  try:
    for name, entry in entries.items():
      tensors[name] = _load_entry(prefix, index_path, header, files, name, entry, byteorder)
  finally:
    for f, _, _ in files.values():
      f.close()
  return tensors


def _load_entry(prefix, index_path, header, files, name, entry, byteorder) -> np.ndarray:
  """One tensor, opening (and caching in `files`) its data shard."""
  if entry["sliced"]:
    raise GPTError(f"{index_path}: tensor {name!r} is saved as partitioned slices, which this reader "
                   f"does not support")
  if entry["dtype"] not in DTYPES:
    raise GPTError(f"{index_path}: tensor {name!r} has unsupported TF dtype enum {entry['dtype']}")
  dtype = DTYPES[entry["dtype"]].newbyteorder(byteorder)
  want = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
  if any(d < 0 for d in entry["shape"]) or want != entry["size"]:
    raise GPTError(f"{index_path} is corrupt: tensor {name!r} of shape {entry['shape']} and dtype "
                   f"{dtype} should take {want} bytes, the index says {entry['size']}")
  if entry["shard_id"] >= header["num_shards"]:
    raise GPTError(f"{index_path} is corrupt: tensor {name!r} is in shard {entry['shard_id']} of "
                   f"{header['num_shards']}")
  shard = entry["shard_id"]
  if shard not in files:
    path = _data_path(prefix, shard, header["num_shards"])
    try:
      files[shard] = (open(path, "rb"), path, path.stat().st_size)
    except OSError as e:
      raise GPTError(f"cannot read checkpoint data {path}: {e.strerror}") from None
  f, path, file_size = files[shard]
  arr = _read_tensor(f, path, file_size, name, entry, dtype)
  return arr.astype(dtype.newbyteorder("="), copy=False)


def write_bundle(prefix: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
  """Writes `<prefix>.index` and `<prefix>.data-00000-of-00001` (one shard, little-endian)."""
  prefix = Path(prefix)
  version = tt.message(3, tt.key(1, 0) + tt.encode_varint(_BUNDLE_VERSION))  # VersionDef.producer
  items = [(b"", tt.key(1, 0) + tt.encode_varint(1) + version)]  # header: num_shards=1, little-endian
  offset = 0
  with open(_data_path(prefix, 0, 1), "wb") as f:  # streamed: a 1.5B model is 6 GB
    for name in sorted(tensors, key=lambda n: n.encode()):  # TF's order: bytewise by name
      arr = np.asarray(tensors[name])
      dtype = arr.dtype.newbyteorder("=")
      if dtype not in _DTYPE_ENUM:
        raise GPTError(f"cannot write tensor {name!r}: dtype {arr.dtype} has no TF equivalent here")
      raw = np.ascontiguousarray(arr, dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
      f.write(raw)
      items.append((name.encode(), encode_entry(_DTYPE_ENUM[dtype], arr.shape, offset, raw.size,
                                                 tt.masked_crc(raw))))
      offset += raw.size
  prefix.with_name(prefix.name + ".index").write_bytes(tt.build_table(items))


# ---------------------------------------------------------------- OpenAI model folders

def checkpoint_prefix(folder: str | os.PathLike) -> Path:
  """The bundle prefix named by `<folder>/checkpoint` (TF's CheckpointState text proto)."""
  folder = Path(folder)
  state = folder / "checkpoint"
  try:
    text = state.read_text()
  except OSError as e:
    raise GPTError(f"cannot read {state}: {e.strerror} (an OpenAI model folder has a 'checkpoint' "
                   f"file naming model.ckpt)") from None
  match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
  if not match:
    raise GPTError(f"{state} has no model_checkpoint_path line")
  path = Path(match.group(1).encode().decode("unicode_escape"))
  if not path.is_absolute():
    return folder / path
  # An absolute path from the machine that saved it: use the same name in this folder if it's here.
  if not path.with_name(path.name + ".index").exists():
    return folder / path.name
  return path


def read_checkpoint(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint in `folder`, keyed as stored ('model/h0/attn/c_attn/w', ...)."""
  return read_bundle(checkpoint_prefix(folder))


def read_hparams(path: Path) -> dict:
  """The model shape from an OpenAI `hparams.json` (checked: integer n_vocab, n_ctx, n_embd, ...)."""
  try:
    hparams = json.loads(path.read_text())
  except OSError as e:
    raise GPTError(f"cannot read {path}: {e.strerror}") from None
  except json.JSONDecodeError as e:
    raise GPTError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(hparams, dict) or not all(isinstance(hparams.get(k), int) for k in SHAPE_FIELDS):
    raise GPTError(f"{path} must be a JSON object with integer {', '.join(SHAPE_FIELDS)}")
  return hparams


def load_openai(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
  """(flat OpenAI-named tensors as gpt.formats.convert uses them, hparams.json) from an OpenAI model folder.

  Strips the 'model/' scope and squeezes the conv1d kernels' leading 1 ([1, in, out] -> [in, out]).
  Shapes are checked against the hparams later, by convert.check_flat.
  """
  folder = Path(folder)
  hparams = read_hparams(folder / "hparams.json")
  flat = {}
  for name, arr in read_checkpoint(folder).items():
    if not name.startswith("model/"):
      continue  # e.g. optimizer slots or a global step saved beside the weights
    key = name.removeprefix("model/")
    if _CONV_WEIGHT.match(key) and arr.ndim == 3 and arr.shape[0] == 1:
      arr = arr[0]
    flat[key] = arr
  if not flat:
    raise GPTError(f"{folder}: the checkpoint holds no 'model/...' tensors; is it a GPT-2 checkpoint?")
  return flat, hparams


def write_checkpoint(folder: str | os.PathLike, flat: dict[str, np.ndarray], hparams: dict) -> Path:
  """Writes an OpenAI-layout folder (checkpoint, model.ckpt.index/.data, hparams.json); returns it."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for key, arr in flat.items():
    arr = np.asarray(arr)
    tensors[f"model/{key}"] = arr[None] if _CONV_WEIGHT.match(key) and arr.ndim == 2 else arr
  write_bundle(folder / "model.ckpt", tensors)
  (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                     'all_model_checkpoint_paths: "model.ckpt"\n')
  (folder / "hparams.json").write_text(json.dumps(hparams, indent=2) + "\n")
  return folder
