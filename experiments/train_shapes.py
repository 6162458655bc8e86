"""The training shapes the benchmarks share, and the `train` config section each is measured with.

bench_train.py times gpt's step and its PyTorch peers (torch_peers.py) at these shapes, and the
peers must run the same optimizer as the jax row; both read them here, so a peer's child process
can rebuild its row from a shape's name alone.
"""

from __future__ import annotations

import runpy
from pathlib import Path

# name -> (n_layer, n_embd, n_head, seq_len, batch)
SHAPES = {
    "chapter": (12, 768, 12, 1024, 1),
    "tiny": (4, 256, 4, 128, 8),
    "30m": (6, 384, 6, 256, 8),
    "117m": (12, 768, 12, 128, 4),
}
VOCAB = 50257
# Shapes whose optimizer is configs/117m.py's (Adam, no weight decay) rather than AdamW 0.1.
CHAPTER_SHAPES = ("chapter",)


def train_section(shape_name: str):
  """The `train` config section the jax row uses (the torch row mirrors it): configs/117m.py's
  for the chapter shape, AdamW with weight decay 0.1 otherwise."""
  if shape_name in CHAPTER_SHAPES:
    path = Path(__file__).resolve().parent.parent / "configs" / "117m.py"
    return runpy.run_path(str(path))["get_config"]().train
  from gpt.config import base_config
  t = base_config().train
  t.update(optimizer="adamw", learning_rate=1e-4, weight_decay=0.1, grad_clip=1.0)
  return t
