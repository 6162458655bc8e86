"""Training logs: a line per `log_every` steps, TensorBoard event files and `metrics.jsonl`.

Only process 0 writes. `metrics.jsonl` (one JSON object per logged step, train and validation)
is what tests and plots read; TensorBoard reads `<workdir>/tensorboard`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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


class TrainLog:
  """Writes scalars to the log, TensorBoard and metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str | Path, enabled: bool = True):
    self.enabled = enabled
    self.workdir = Path(workdir)
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      self.writer = SummaryWriter(str(self.workdir / "tensorboard"))
      self.jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

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

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()


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
