"""Attention views (`--config.mode=attention`): where every head of every layer looks, for a prompt.

  python -m gpt.main --config=configs/124m.py --config.mode=attention --workdir=runs/attn \
      --config.attention.prompt="The cat sat on the mat because it was tired."

writes into `<workdir>/attention/`:
  attention.html   a self-contained page (no network): layer selector, head toggles, hover a token
                   to keep only its connections, line opacity = attention weight
  heads.png        a grid of heatmaps (rows = layers, columns = heads), for papers
  attention.npz    the raw weights `probs` float32 [L, H, T, T] (query x key) and token `ids`
Any `--config.init` works: a released size, an OpenAI/HF folder or a training workdir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from gpt import heads
from gpt.attention_page import render_html
from gpt.errors import GPTError


def prompt_ids(att: Any, tokenizer: Any, n_ctx: int) -> list[int]:
  """The prompt's token ids (from `attention.prompt_file` or `attention.prompt`), checked for size."""
  if att.prompt_file:
    try:
      text = Path(att.prompt_file).expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
      raise GPTError(f"cannot read --config.attention.prompt_file: {e}") from None
  else:
    text = att.prompt
  ids = ([tokenizer.eot_id] if att.prepend_eot else []) + tokenizer.encode(text)
  if not text or not ids:
    raise GPTError("the attention prompt is empty: pass --config.attention.prompt=\"...\" or "
                   "--config.attention.prompt_file=<file>")
  limit = min(int(att.max_tokens), n_ctx)
  if len(ids) > limit:
    raise GPTError(f"the attention prompt has {len(ids)} tokens, more than {limit} (attention.max_tokens="
                   f"{att.max_tokens}, model n_ctx={n_ctx}); shorten it or raise "
                   f"--config.attention.max_tokens")
  return ids


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
  """One display string per token (its own bytes; a UTF-8 character split across tokens shows as
  U+FFFD in each part, the way the token really is)."""
  return [tokenizer.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids]


def attention_weights(model: Any, ids: Sequence[int]) -> np.ndarray:
  """float32 [L, H, T, T] attention probabilities of `model` on one sequence of ids."""
  probs = heads.attention_probs(model, jnp.asarray([list(ids)], jnp.int32))
  return np.asarray(probs[:, 0], np.float32)


def parse_layers(spec: str, n_layer: int) -> list[int]:
  """'' -> all layers; '0,5,11' -> [0, 5, 11] (checked against the model's depth)."""
  if not spec.strip():
    return list(range(n_layer))
  try:
    layers = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError:
    raise GPTError(f"--config.attention.png_layers={spec!r} must be comma-separated layer "
                   f"numbers, e.g. 0,5,11") from None
  bad = [l for l in layers if not 0 <= l < n_layer]
  if bad or not layers:
    raise GPTError(f"--config.attention.png_layers={spec!r}: the model has layers 0..{n_layer - 1}")
  return layers


def heatmap_grid(probs: np.ndarray, labels: Sequence[str], layers: Sequence[int]):
  """A matplotlib Figure: one heatmap per (layer in `layers`, head), query rows x key columns."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n_head, n_tok = probs.shape[1], probs.shape[2]
  size = 1.3 if n_tok <= 16 else 1.8
  fig, axes = plt.subplots(len(layers), n_head, figsize=(size * n_head + 1, size * len(layers) + 0.6),
                           squeeze=False)
  show_ticks = n_tok <= 24  # token labels stay legible only for short prompts
  for r, layer in enumerate(layers):
    for h in range(n_head):
      ax = axes[r, h]
      ax.imshow(probs[layer, h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"head {h}", fontsize=8)
      if h == 0:
        ax.set_ylabel(f"layer {layer}", fontsize=8)
        if show_ticks:
          ax.set_yticks(range(n_tok), [repr(t)[1:-1] for t in labels], fontsize=5)
      if r == len(layers) - 1 and show_ticks:
        ax.set_xticks(range(n_tok), [repr(t)[1:-1] for t in labels], fontsize=5, rotation=90)
  fig.suptitle("attention (rows: query token, columns: key token)", fontsize=9)
  fig.tight_layout()
  return fig


def _shorten(text: str, n: int) -> str:
  return text if len(text) <= n else text[:n - 1] + "…"


def run(config: Any, workdir: str | None) -> None:
  """Writes the attention page, heatmap grid and raw weights for `config.attention.prompt`."""
  if not workdir:
    raise GPTError("the attention view needs --workdir=<folder> (files go to <workdir>/attention/)")
  from gpt.weights import load_model

  loaded = load_model(config)
  ids = prompt_ids(config.attention, loaded.tokenizer, loaded.cfg.n_ctx)
  probs = attention_weights(loaded.model, ids)
  labels = token_labels(loaded.tokenizer, ids)
  out = Path(workdir).expanduser() / "attention"
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / "attention.npz", probs=probs, ids=np.asarray(ids, np.int32))
  page = render_html(labels, probs, title=f"Attention: {_shorten(''.join(labels), 90)}", source=loaded.source)
  (out / "attention.html").write_text(page, encoding="utf-8")
  written = [out / "attention.html", out / "attention.npz"]
  layers = parse_layers(config.attention.png_layers, probs.shape[0])
  try:
    fig = heatmap_grid(probs, labels, layers)
  except ImportError:
    logging.warning("matplotlib is not installed, so no heads.png: pip install -e '.[plots]'")
  else:
    fig.savefig(out / "heads.png", dpi=110)
    written.append(out / "heads.png")
  print(f"{len(ids)} tokens, {probs.shape[0]} layers x {probs.shape[1]} heads from {loaded.source}")
  for path in written:
    print(f"wrote {path}")
