"""int8 weights' quality: WikiText-2 token perplexity, float32 vs model.quantize=int8 (and with
model.int8_activations as well), and how often greedy continuations of a set of prompts agree.

  python experiments/quantize_quality.py                       # trains a small model here first
  python experiments/quantize_quality.py --init=models/124M    # any model folder gpt.weights reads

Without `--init` (no released weights can be downloaded here) a small GPT (GPT-2's tokenizer,
`--n_layer` x `--n_embd`) is trained for `--steps` Adam steps on wiki.valid.tokens
(experiments.quick_train, as tests/test_quantize.py trains its model), so that the
comparison is on a model that has learned something; perplexity is measured on the first
`--eval_tokens` of wiki.test.tokens in `--ctx`-token windows (non-overlapping), the same windows for
both. Greedy: the first 12 tokens of `--prompts` test lines that have them, continued by
`--new` tokens through gpt.sample's decoder (the prepared model: gpt.kernels.gemv where it runs).
Data: ../shared/data/wikitext-2 (see its SOURCES.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.console import quiet_native_logs  # noqa: E402

quiet_native_logs()  # a table, not libtpu's notices nor XLA's C++ logs (gpt.main does the same)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments.quick_train import perplexity, train_on_windows  # noqa: E402
from gpt import quantize, sample  # noqa: E402
from gpt.config import base_config  # noqa: E402
from gpt.decoding import prepare_for_decoding  # noqa: E402
from gpt.model import GPTConfig  # noqa: E402
from gpt.sampling import SamplingOptions  # noqa: E402
from gpt.tokenizer import get_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"


def greedy(model, prompts: list[list[int]], new: int) -> np.ndarray:
  """`new` greedy tokens after each of `prompts` (left-padded), through gpt.sample's decoder."""
  decoder = sample.make_decoder(model.cfg, SamplingOptions(temperature=0.0), stop_token=-1,
                                stop_at_token=False)
  tokens, mask = sample.pad_left(prompts, max(map(len, prompts)))
  out = decoder.generate(sample.decoding_params(model), tokens, mask, jax.random.key(0), new,
                         cache_length=tokens.shape[1] + new)
  return np.asarray(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init", default="", help="a model folder (default: train one here)")
  parser.add_argument("--n_layer", type=int, default=4)
  parser.add_argument("--n_embd", type=int, default=256)
  parser.add_argument("--ctx", type=int, default=128)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--eval_tokens", type=int, default=32768)
  parser.add_argument("--prompts", type=int, default=32)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--data", default=str(DATA))
  args = parser.parse_args()

  data = Path(args.data)
  if not (data / "wiki.test.tokens").is_file():
    raise SystemExit(f"error: {data}/wiki.test.tokens not found; pass --data=<wikitext-2 folder>")
  tok = get_tokenizer(None)
  test_text = (data / "wiki.test.tokens").read_text(encoding="utf-8")
  if args.init:
    from gpt.weights import load_model
    config = base_config()
    config.init = args.init
    loaded = load_model(config)
    model, tok, source = loaded.model, loaded.tokenizer, loaded.source
  else:
    valid = np.asarray(tok.encode((data / "wiki.valid.tokens").read_text(encoding="utf-8")), np.int32)
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(1, args.n_embd // 64),
                    n_ctx=args.ctx)
    if args.steps < 2:
      raise SystemExit(f"error: --steps={args.steps}: at least 2 (warm-up, then cosine decay)")
    # 20 warm-up steps (fewer in a short smoke run: the cosine needs steps left to decay over).
    warmup = min(20, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0, 3e-3, warmup, args.steps, 3e-4)
    model = train_on_windows(valid, cfg, args.steps, args.batch, learning_rate=schedule,
                             log_every=50)
    source = (f"trained here: {args.n_layer}x{args.n_embd}, ctx {args.ctx}, {args.steps} Adam steps "
              f"of {args.batch} windows on wiki.valid.tokens")
  T = min(args.ctx, model.cfg.n_ctx - 1)
  test = np.asarray(tok.encode(test_text), np.int32)[:args.eval_tokens]
  windows = test[:(len(test) // (T + 1)) * (T + 1)].reshape(-1, T + 1)
  q = quantize.quantize_model(model)
  a8 = quantize.with_int8_activations(q)
  f32, int8 = perplexity(model, windows), perplexity(q, windows)
  # int8 activations apply in decoding's layout (the same arithmetic as the VNNI kernel, in XLA here)
  int8a8 = perplexity(prepare_for_decoding(a8), windows)

  lines = [l.strip() for l in test_text.splitlines() if l.strip() and not l.strip().startswith("=")]
  prompts = [ids[:12] for ids in map(tok.encode, lines) if len(ids) >= 12][:args.prompts]
  a = greedy(model, prompts, args.new)

  def agreement(b):
    prefix = np.argmin(np.concatenate([a == b, np.zeros((len(a), 1), bool)], axis=1), axis=1)
    return float((a == b).mean()), float((prefix == args.new).mean()), prefix.mean()

  agree = {"int8": agreement(greedy(q, prompts, args.new)), "int8 + int8 activations": agreement(greedy(a8, prompts, args.new))}

  print(f"\nModel: {source}. WikiText-2 test, first {windows.size - len(windows)} predicted tokens "
        f"({len(windows)} windows of {T}); greedy over {len(prompts)} test-line prompts of 12 tokens, "
        f"{args.new} new tokens each.\n")
  print("| weights | perplexity | vs float32 |")
  print("|---|---|---|")
  print(f"| float32 | {f32:.3f} | - |")
  print(f"| int8 (per-output-channel) | {int8:.3f} | {100 * (int8 / f32 - 1):+.2f}% |")
  print(f"| int8 + int8 activations (per row) | {int8a8:.3f} | {100 * (int8a8 / f32 - 1):+.2f}% |")
  for name, (same_token, whole, prefix) in agree.items():
    print(f"\nGreedy agreement, {name} vs float32: {100 * same_token:.1f}% of tokens at equal positions; "
          f"{100 * whole:.0f}% of continuations identical; mean identical prefix "
          f"{prefix:.1f} of {args.new} tokens.")


if __name__ == "__main__":
  main()
