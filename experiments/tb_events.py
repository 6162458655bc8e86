"""Reads scalars from TensorBoard event files (TFRecord framing + tensorboardX's Event proto).

No TensorFlow or tensorboard needed: each record is `uint64 length, uint32 masked crc32c(length),
bytes, uint32 masked crc32c(bytes)`, and each payload an `Event` protobuf. CRCs are checked; a
record cut short at the end (a run still writing) ends the file quietly, a corrupt one is an error.
"""

from __future__ import annotations

import struct
from pathlib import Path

import crc32c

from gpt.errors import GPTError


def _masked_crc(data: bytes) -> int:
  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str | Path):
  """Yields the payload of every complete record in a TFRecord file."""
  data = Path(path).read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
    if _masked_crc(header) != header_crc:
      raise GPTError(f"{path}: corrupt event record header at byte {pos}")
    end = pos + 12 + length + 4
    if end > len(data):
      return  # truncated tail: the writer is still busy
    payload = data[pos + 12:pos + 12 + length]
    if _masked_crc(payload) != struct.unpack("<I", data[end - 4:end])[0]:
      raise GPTError(f"{path}: corrupt event record at byte {pos}")
    yield payload
    pos = end


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} sorted by step, over every event file in `logdir`.

  Files are read oldest first (their names start with the creation time), so when a resumed run
  logs a step again, the later value wins. A resumed run's writer starts with a SessionLog START
  event at its purge step (gpt.train_log): as TensorBoard does, everything logged before it at
  that step or later is discarded, so steps the resumed run did not replay do not linger.
  """
  from tensorboardX.proto import event_pb2

  by_tag: dict[str, dict[int, float]] = {}
  files = sorted(Path(logdir).glob("events.out.tfevents.*"),
                 key=lambda p: (int(p.name.split(".")[3]) if p.name.split(".")[3].isdigit() else 0, p.name))
  for file in files:
    for payload in read_records(file):
      event = event_pb2.Event.FromString(payload)
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        for steps in by_tag.values():
          for step in [s for s in steps if s >= event.step]:
            del steps[step]
      for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
          x = value.simple_value
        elif kind == "tensor" and value.tensor.float_val:
          x = value.tensor.float_val[0]
        elif kind == "tensor" and value.tensor.double_val:
          x = value.tensor.double_val[0]
        else:
          continue
        by_tag.setdefault(value.tag, {})[int(event.step)] = float(x)
  return {tag: sorted(steps.items()) for tag, steps in by_tag.items()}
