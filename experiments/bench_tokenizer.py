"""Tokenizer throughput: gpt.tokenizer vs tiktoken's `gpt2` encoding, measured side by side.

  python experiments/bench_tokenizer.py [--text ../shared/data/tinyshakespeare/input.txt] [--repeats 9]

The reference is tiktoken's own Encoding built offline from ../shared/data/gpt2/gpt2.tiktoken with
tiktoken's gpt2 pattern and special token. Every method is timed once per round, round-robin, so
machine load hits all of them alike, in a shuffled order; the table gives the median (and best)
over the rounds, the median of per-round time ratios to tiktoken's one call, and whether each
method's output equals that of one call. Prints a Markdown table.
"""

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tiktoken  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402
from tiktoken_ext.openai_public import r50k_pat_str  # noqa: E402

from experiments.machine import cpu_model, load_average  # noqa: E402
from gpt import tokenizer as tokenizer_lib  # noqa: E402
from gpt.tokenizer import EOT_TEXT, get_tokenizer, split_for_parallel  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def reference(vocab: Path) -> tiktoken.Encoding:
  """tiktoken's `gpt2` encoding, built from a local .tiktoken file (no download)."""
  return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(str(vocab)),
                           special_tokens={EOT_TEXT: 50256}, explicit_n_vocab=50257)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--text", type=Path, default=SHARED / "data/tinyshakespeare/input.txt")
  parser.add_argument("--vocab", type=Path, default=SHARED / "data/gpt2/gpt2.tiktoken")
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()

  text = args.text.read_text(encoding="utf-8")
  lines = text.splitlines(keepends=True)
  chunks = split_for_parallel(text)
  ref, ours = reference(args.vocab), get_tokenizer()
  expected = ref.encode_ordinary(text)
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

  def forced_threads():
    """ours.encode with threads whatever the load (it normally skips them on a busy machine)."""
    free_cpus, tokenizer_lib.free_cpus = tokenizer_lib.free_cpus, lambda: threads
    try:
      return ours.encode(text)
    finally:
      tokenizer_lib.free_cpus = free_cpus

  join = lambda batches: [i for ids in batches for i in ids]
  encoders = {
      "tiktoken `encode_ordinary(text)` (one call)": lambda: ref.encode_ordinary(text),
      "tiktoken `encode(text, allowed_special=all)` (one call)": lambda: ref.encode(text, allowed_special="all"),
      f"tiktoken `encode_ordinary_batch` ({len(lines)} lines, 8 threads)": lambda: join(ref.encode_ordinary_batch(lines)),
      f"tiktoken `encode_ordinary_batch` ({len(chunks)} safe chunks, 8 threads)": lambda: join(ref.encode_ordinary_batch(chunks)),
      "ours `encode(text)`": lambda: ours.encode(text),
      "ours `encode(text, allow_special=True)`": lambda: ours.encode(text, allow_special=True),
      f"ours `encode(text)` forced onto {threads} threads": forced_threads,
      f"ours `encode_batch` ({len(lines)} lines)": lambda: join(ours.encode_batch(lines)),
  }
  decoders = {
      "tiktoken `decode(ids)`": lambda: ref.decode(expected),
      "ours `decode(ids)`": lambda: ours.decode(expected),
  }
  free_at_start = tokenizer_lib.free_cpus()
  times = {name: [] for name in (*encoders, *decoders)}
  same = {}
  methods = [*encoders.items(), *decoders.items()]
  for r in range(args.repeats):  # Every method once per round, in a new (seeded) order each round.
    random.Random(r).shuffle(methods)
    for name, fn in methods:
      start = time.perf_counter()
      out = fn()
      times[name].append(time.perf_counter() - start)
      same[name] = out == (expected if name in encoders else text)

  # Batches of lines are not the text's tokenization (cutting after a newline changes the
  # tokens of indented lines and blank-line runs), but ours must still match tiktoken per line.
  if ours.encode_batch(lines) != ref.encode_ordinary_batch(lines):
    raise SystemExit("ours encode_batch(lines) differs from tiktoken's encode_ordinary_batch(lines)")
  n_bytes = len(text.encode("utf-8"))
  print(f"load average at the end: {load_average()}; CPUs ours judged free at start/end: "
        f"{free_at_start}/{tokenizer_lib.free_cpus()}")
  print(f"text: {args.text.name}, {n_bytes:,} bytes, {len(expected):,} tokens; "
        f"{args.repeats} interleaved rounds; {threads} CPUs usable; {cpu_model()}; "
        f"tiktoken {tiktoken.__version__}\n")
  # Paired per round, so that load changes between rounds cancel out.
  base = {name: times[next(iter(group))] for group in (encoders, decoders) for name in group}
  print("| method | median ms | best ms | M tokens/s (median) | MB/s (median) | time vs tiktoken one call "
        "(median of per-round ratios) | same output as one call |")
  print("|---|---:|---:|---:|---:|---:|---|")
  for name, ts in times.items():
    med = statistics.median(ts)
    ratio = statistics.median(t / b for t, b in zip(ts, base[name]))
    print(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {len(expected) / med / 1e6:.2f} | "
          f"{n_bytes / med / 1e6:.1f} | {ratio:.2f} | {'yes' if same[name] else 'no'} |")


if __name__ == "__main__":
  main()
