"""Training logs: a line per `log_every` steps, TensorBoard event files and `metrics.jsonl`,
and the throughput (tokens/s, MFU) that goes into them.

Only process 0 writes. `metrics.jsonl` (one JSON object per logged step, train and validation)
is what tests and plots read; TensorBoard reads `<workdir>/tensorboard`.

A run resumed from checkpoint step S replays the steps after S that its killed predecessor had
already logged (S is 0 when that one died before its first checkpoint). So that the logs read like
an uninterrupted run's, `metrics.jsonl` is rewritten without the rows past S (and without a line
cut short by the kill), and the TensorBoard writer starts with `purge_step=S+1`: TensorBoard (and
experiments/tb_events.py) then discards the older events from step S+1 on.

TensorBoard's events are written synchronously (`EventFile`), not through tensorboardX's
SummaryWriter: that one hands events to a writer thread through a queue, and its flush() flushes
the file without waiting for the queue, so at a kill -9 TensorBoard could trail metrics.jsonl by
the events still queued. Here an event is in the file (flushed to the OS, as metrics.jsonl's
rows are) when `scalars` returns.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


def measure_peak_flops(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n matmul on the first device: the MFU denominator on this machine."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def quiet_orbax() -> None:
  """Drops orbax's INFO chatter (dozens of lines per save) from the absl log; warnings stay.

  Orbax's ERROR records (with tracebacks, several per failed save) go too: every save failure
  reaches gpt.checkpoint, which reports it as one line."""
  import logging as pylogging

  class _Filter(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
      return record.levelno == pylogging.WARNING or "orbax" not in record.pathname

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _Filter) or type(f).__name__ == "_Filter" for f in handler.filters):
    handler.addFilter(_Filter())


class Throughput:
  """Tokens/s and MFU since the last `restart` (which follows compiles, validation and saves)."""

  def __init__(self, cfg: Any, t: Any, n_devices: int):
    """`cfg`: the GPTConfig; `t`: config.train; peak FLOP/s is per device."""
    self.tokens_per_step = t.batch_size * t.seq_len
    self.flops_per_token = cfg.flops_per_token(t.seq_len)
    self.peak = (t.peak_flops or measure_peak_flops(cfg.compute_dtype)) * n_devices
    self.mark = None  # (time, step)

  def restart(self, step: int) -> None:
    self.mark = (time.perf_counter(), step)

  def rates(self, step: int) -> dict[str, float]:
    then, start = self.mark
    if step <= start:
      return {}
    tokens_per_sec = (step - start) * self.tokens_per_step / (time.perf_counter() - then)
    return {"tokens_per_sec": tokens_per_sec, "mfu": tokens_per_sec * self.flops_per_token / self.peak}


class EventFile:
  """One TensorBoard event file in `logdir`, written in the caller's thread (tensorboardX's
  EventsWriter and its protobufs, without SummaryWriter's queue and thread).

  `purge_step` starts the file as SummaryWriter(purge_step=...) does: with a SessionLog START
  event at that step, so readers discard events logged earlier at that step or later."""

  def __init__(self, logdir: str | Path, purge_step: int | None = None):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    Path(logdir).mkdir(parents=True, exist_ok=True)
    self._events = EventsWriter(str(Path(logdir) / "events"))  # writes the file_version event
    if purge_step is not None:
      self._events.write_event(Event(step=purge_step, file_version="brain.Event:2"))
      self._events.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
    self.flush()

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboardX.summary import scalar

    self._add(scalar(tag, value), step)

  def add_text(self, tag: str, text: str, step: int) -> None:
    from tensorboardX.summary import text as text_summary

    self._add(text_summary(tag, text), step)

  def _add(self, summary: Any, step: int) -> None:
    from tensorboardX.proto.event_pb2 import Event

    self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    """Hands everything written so far to the OS: it survives a kill -9 of this process."""
    self._events.flush()

  def close(self) -> None:
    self._events.close()


class TrainLog:
  """Writes scalars to the log, TensorBoard and metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str | Path, enabled: bool = True, start_step: int | None = None):
    """`start_step`: the step this run starts from (0 fresh, else its checkpoint's step); rows
    logged after it by an earlier run in the workdir go. None keeps every row."""
    self.enabled = enabled
    self.workdir = Path(workdir)
    self.writer = None
    if enabled:
      path = self.workdir / "metrics.jsonl"
      purge = None
      if start_step is not None:
        drop_rows_after(path, start_step)
        purge = start_step + 1
      self.writer = EventFile(self.workdir / "tensorboard", purge_step=purge)
      self.jsonl = open(path, "a", encoding="utf-8")

  def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
    """Records `values` at `step` under `prefix` ('train' or 'val') and prints one line."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    for k, v in values.items():
      self.writer.add_scalar(f"{prefix}/{k}", v, step)
    self.writer.flush()
    self.jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
    self.jsonl.flush()
    logging.info("%s", format_line(step, values, prefix))

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self.writer.add_text(tag, text, step)
      self.writer.flush()

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()


def drop_rows_after(path: Path, step: int) -> int:
  """Rewrites metrics.jsonl `path` (atomically) without rows logged after `step` and without
  unreadable lines; returns how many rows were dropped."""
  if not path.is_file():
    return 0
  keep, dropped = [], 0
  for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
    try:
      ok = int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
      ok = False
    if ok:
      keep.append(line + "\n")
    else:
      dropped += 1
  if dropped:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    tmp.replace(path)
  return dropped


def format_line(step: int, values: dict[str, float], prefix: str) -> str:
  """'step 100 | loss 3.2100 | lr 1.00e-03 | grad_norm 0.53 | tokens/s 812 | mfu 61.2%'."""
  parts = [f"step {step}"] + ([prefix] if prefix != "train" else [])
  for k, v in values.items():
    if k == "lr":
      parts.append(f"lr {v:.2e}")
    elif k == "mfu":
      parts.append(f"mfu {100 * v:.1f}%")
    elif k == "tokens_per_sec":
      parts.append(f"tokens/s {v:,.0f}")
    elif np.isfinite(v) and abs(v) >= 1e-3:
      parts.append(f"{k} {v:.4f}")
    else:
      parts.append(f"{k} {v:.3g}")
  return " | ".join(parts)
