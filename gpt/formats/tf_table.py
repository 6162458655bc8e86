"""LevelDB-format SSTables and the protobuf wire format, as TensorFlow's checkpoint index uses them.

Only what tensor bundles need: uncompressed tables (TF writes them without compression), bytewise
key order, and a protobuf encoder/decoder for varint, fixed32/64 and length-delimited fields.
An SSTable is data blocks, an (empty) metaindex block, an index block and a 48-byte footer (two
block handles padded to 40 bytes, then the magic). Each block is prefix-compressed entries, a
restart array and a 5-byte trailer: compression type + masked crc32c(block + type byte).
`build_table` follows TF's TableBuilder (tensorflow/core/lib/io: restart interval 16 in data blocks
and 1 in the index block, 256 KiB blocks, shortest separators, no compression as BundleWriter asks);
for the test fixture its output is byte for byte the index TensorFlow wrote.
"""

from __future__ import annotations

import struct

import crc32c

MAGIC = 0xDB4775248B80FB57  # kTableMagicNumber
FOOTER_LEN = 48
TRAILER_LEN = 5  # compression type byte + masked crc32c
BLOCK_SIZE = 256 * 1024  # TF table::Options default


class TableError(Exception):
  """What is wrong with a table or message; callers turn it into a GPTError naming the file."""


def mask(crc: int) -> int:
  """TF/LevelDB store crc32c 'masked' so that CRCs of data containing CRCs stay well-distributed."""
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc(data) -> int:
  """Masked crc32c of a bytes-like object."""
  return mask(crc32c.crc32c(data))


# ---------------------------------------------------------------- protobuf wire format (minimal)

def varint(buf: bytes, pos: int) -> tuple[int, int]:
  """(value, position after it) of the base-128 varint at `pos`."""
  value, shift = 0, 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise TableError("malformed varint")
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return value, pos


def encode_varint(value: int) -> bytes:
  """Base-128 varint bytes of an unsigned (or two's-complement int64) value."""
  value &= (1 << 64) - 1  # negative int64s are sent as 10-byte two's complement
  out = bytearray()
  while True:
    b = value & 0x7F
    value >>= 7
    if value:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def fields(buf: bytes) -> list[tuple[int, int | bytes]]:
  """(field number, value) pairs of a serialized message; value is int or bytes by wire type."""
  out, pos = [], 0
  while pos < len(buf):
    tag, pos = varint(buf, pos)
    field, wire = tag >> 3, tag & 7
    if wire == 0:
      value, pos = varint(buf, pos)
    elif wire in (1, 5):
      n = 8 if wire == 1 else 4
      if pos + n > len(buf):
        raise TableError("truncated fixed-width protobuf field")
      value, pos = int.from_bytes(buf[pos:pos + n], "little"), pos + n
    elif wire == 2:
      n, pos = varint(buf, pos)
      if pos + n > len(buf):
        raise TableError("truncated protobuf field")
      value, pos = bytes(buf[pos:pos + n]), pos + n
    else:
      raise TableError(f"unsupported protobuf wire type {wire}")
    out.append((field, value))
  return out


def key(field: int, wire: int) -> bytes:
  """A field's tag: number and wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)."""
  return encode_varint(field << 3 | wire)


def message(field: int, payload: bytes) -> bytes:
  """A length-delimited field (sub-message, bytes or string)."""
  return key(field, 2) + encode_varint(len(payload)) + payload



# ---------------------------------------------------------------- SSTable

def read_block(data: bytes, offset: int, size: int) -> bytes:
  """The contents of the block at `offset` after checking its trailer (crc, no compression)."""
  end = offset + size + TRAILER_LEN
  if end > len(data) - FOOTER_LEN:
    raise TableError(f"block [{offset}, {end}) runs past the end of the table ({len(data)} bytes)")
  block, kind = data[offset:offset + size], data[offset + size]
  (stored,) = struct.unpack_from("<I", data, offset + size + 1)
  if masked_crc(data[offset:offset + size + 1]) != stored:
    raise TableError(f"checksum mismatch in the block at byte {offset}")
  if kind != 0:
    raise TableError(f"block at byte {offset} uses compression type {kind} (only uncompressed "
                     f"tables are supported, as TF writes them)")
  return block


def block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
  """(key, value) pairs of a block, undoing the prefix compression."""
  if len(block) < 4:
    raise TableError("block shorter than its restart count")
  (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
  limit = len(block) - 4 - 4 * num_restarts
  if limit < 0:
    raise TableError("bad restart array")
  entries, pos, key = [], 0, b""
  while pos < limit:
    shared, pos = varint(block, pos)
    unshared, pos = varint(block, pos)
    vlen, pos = varint(block, pos)
    if shared > len(key) or pos + unshared + vlen > limit:
      raise TableError("malformed block entry")
    key = key[:shared] + block[pos:pos + unshared]
    pos += unshared
    entries.append((key, block[pos:pos + vlen]))
    pos += vlen
  return entries


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
  """All (key, value) pairs of an SSTable, in key order."""
  if len(data) < FOOTER_LEN:
    raise TableError(f"only {len(data)} bytes, shorter than the {FOOTER_LEN}-byte table footer")
  footer = data[-FOOTER_LEN:]
  if struct.unpack_from("<Q", footer, 40)[0] != MAGIC:
    raise TableError("bad magic number in the footer (not a TensorFlow checkpoint index)")
  _, pos = varint(footer, 0)  # metaindex handle: TF keeps no meta blocks
  _, pos = varint(footer, pos)
  index_offset, pos = varint(footer, pos)
  index_size, _ = varint(footer, pos)
  entries = []
  for _, handle in block_entries(read_block(data, index_offset, index_size)):
    offset, pos = varint(handle, 0)
    size, _ = varint(handle, pos)
    entries.extend(block_entries(read_block(data, offset, size)))
  return entries


class BlockBuilder:
  """LevelDB BlockBuilder: keys share a prefix with the previous key except at restart points."""

  def __init__(self, restart_interval: int):
    self.interval, self.buf, self.restarts = restart_interval, bytearray(), [0]
    self.count, self.last = 0, b""  # entries since the last restart point, previous key

  def add(self, key: bytes, value: bytes) -> None:
    shared = 0
    if self.count < self.interval:
      while shared < min(len(key), len(self.last)) and key[shared] == self.last[shared]:
        shared += 1
    else:
      self.restarts.append(len(self.buf))
      self.count = 0
    self.buf += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
    self.buf += key[shared:] + value
    self.last, self.count = key, self.count + 1

  def size_estimate(self) -> int:
    return len(self.buf) + 4 * len(self.restarts) + 4

  def finish(self) -> bytes:
    return bytes(self.buf) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts,
                                            len(self.restarts))


def write_block(out: bytearray, block: BlockBuilder) -> bytes:
  """Appends block + trailer to `out`; returns the encoded BlockHandle (offset, size)."""
  contents, offset = block.finish(), len(out)
  out += contents + b"\x00" + struct.pack("<I", masked_crc(contents + b"\x00"))
  return encode_varint(offset) + encode_varint(len(contents))


def separator(start: bytes, limit: bytes) -> bytes:
  """Shortest key k with start <= k < limit (LevelDB BytewiseComparator::FindShortestSeparator)."""
  n = 0
  while n < min(len(start), len(limit)) and start[n] == limit[n]:
    n += 1
  if n < min(len(start), len(limit)) and start[n] < 0xFF and start[n] + 1 < limit[n]:
    return start[:n] + bytes([start[n] + 1])
  return start


def successor(key: bytes) -> bytes:
  """Shortest key >= `key` (FindShortSuccessor)."""
  for i, b in enumerate(key):
    if b != 0xFF:
      return key[:i] + bytes([b + 1])
  return key


def build_table(items: list[tuple[bytes, bytes]]) -> bytes:
  """An SSTable holding `items` (sorted by key), laid out as TF's TableBuilder does."""
  out, data, index = bytearray(), BlockBuilder(16), BlockBuilder(1)
  pending, last = None, b""
  for key, value in items:
    if pending is not None:
      index.add(separator(last, key), pending)
      pending = None
    data.add(key, value)
    last = key
    if data.size_estimate() >= BLOCK_SIZE:
      pending, data = write_block(out, data), BlockBuilder(16)
  if data.buf:
    pending = write_block(out, data)
  meta_handle = write_block(out, BlockBuilder(16))
  if pending is not None:
    index.add(successor(last), pending)
  footer = meta_handle + write_block(out, index)
  return bytes(out) + footer.ljust(40, b"\x00") + struct.pack("<Q", MAGIC)
