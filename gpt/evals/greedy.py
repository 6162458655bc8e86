"""Generation until stop strings, for the generative eval tasks and the lm-eval `generate_until`.

The one place where evaluation touches the decoder: everything here goes through the public
`gpt.generate.Generator` (the jitted KV-cache decoder of gpt.sampling), so when the decoder moves
only this module changes.

Prompts (token ids, of different lengths) are sorted longest first and decoded `batch_size` at a
time, left-padded in one batch as `Generator.stream` does; a short last batch is filled with copies
of its last prompt so every batch has the same shape and reuses the compiled programs. A row stops
at <|endoftext|>, and the host decodes each row's text every `chunk` new tokens and ends the batch
once every row contains one of its stop strings (or has `max_new` tokens). The text returned is cut
before the earliest stop, as lm-evaluation-harness cuts `generate_until` output. A stop is a string
or a compiled regular expression (cut at the start of its first match: e.g. the end of a word).
"""

from __future__ import annotations

import re
from typing import Sequence, Union

import jax
import numpy as np
from tqdm import tqdm

from gpt.errors import GPTError
from gpt.generate import Generator
from gpt.sampling import SamplingOptions

Stop = Union[str, "re.Pattern[str]"]
GREEDY = SamplingOptions(temperature=0.0)
# New tokens between two host-side checks of the stop strings.
CHUNK = 8


def cut_at_stop(text: str, stops: Sequence[Stop]) -> tuple[str, bool]:
  """(text before the earliest stop, whether any stop occurs); empty strings are ignored."""
  end = None
  for stop in stops:
    if isinstance(stop, str):
      at = text.find(stop) if stop else -1
    else:
      match = stop.search(text)
      at = match.start() if match else -1
    if at >= 0 and (end is None or at < end):
      end = at
  return (text, False) if end is None else (text[:end], True)


class TextGenerator:
  """A model wrapped for batched generation of text until stop strings (see module docstring).

  One `gpt.generate.Generator` (hence one set of compiled decode programs) is kept per sampling
  setting, so the greedy and sampled requests of a run each compile once per shape.
  """

  def __init__(self, model, tokenizer, batch_size: int = 8, seed: int = 0):
    if batch_size < 1:
      raise GPTError(f"batch_size={batch_size} must be at least 1")
    self.model = model
    self.tokenizer = tokenizer
    self.n_ctx = model.cfg.n_ctx
    self.batch_size = batch_size
    self.key = jax.random.key(seed)
    self._generators: dict[SamplingOptions, Generator] = {}
    self._calls = 0

  def generator(self, options: SamplingOptions) -> Generator:
    """The decoder for `options` (built on first use)."""
    if options not in self._generators:
      self._generators[options] = Generator(self.model, self.tokenizer, options, stop_at_eot=True)
    return self._generators[options]

  def generate_ids(self, prompts: Sequence[Sequence[int]], stops: Sequence[Sequence[Stop]],
                   max_new: int, options: SamplingOptions = GREEDY,
                   desc: str | None = None) -> list[list[int]]:
    """New token ids of each prompt: up to `max_new`, cut before <|endoftext|>, not at the stops
    (decoding of a batch ends early once every row's text holds one of its stops)."""
    if len(stops) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(stops)} stop lists")
    if not prompts:
      return []
    if max_new < 1:
      raise GPTError(f"max_new={max_new} must be at least 1")
    for ids in prompts:
      if not ids or len(ids) + max_new - 1 > self.n_ctx:
        raise GPTError(f"a prompt of {len(ids)} tokens with {max_new} new tokens does not fit the "
                       f"context of {self.n_ctx} tokens; cut it to {self.n_ctx + 1 - max_new}")
    gen = self.generator(options)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=desc is None,
              leave=False) as bar:
      for start in range(0, len(order), self.batch_size):
        chosen = order[start:start + self.batch_size]
        rows = [list(prompts[i]) for i in chosen]
        rows += [rows[-1]] * (self.batch_size - len(rows))
        key = jax.random.fold_in(self.key, self._calls)
        self._calls += 1
        new = [[] for _ in rows]
        for piece in gen.stream(rows, max_new, key, chunk=CHUNK):
          for r, ids in enumerate(np.asarray(piece).tolist()):
            new[r] += ids
          if all(self._stopped(new[r], stops[i]) for r, i in enumerate(chosen)):
            break
        for r, i in enumerate(chosen):
          out[i] = self._cut_eot(new[r][:max_new])
        bar.update(len(chosen))
    return out

  def generate_until(self, prompts: Sequence[Sequence[int]], stops: Sequence[Sequence[Stop]],
                     max_new: int, options: SamplingOptions = GREEDY,
                     desc: str | None = None) -> list[str]:
    """Generated text of each prompt, cut before its earliest stop (see module docstring)."""
    ids = self.generate_ids(prompts, stops, max_new, options, desc)
    return [cut_at_stop(self.tokenizer.decode(row), s)[0] for row, s in zip(ids, stops)]

  def _cut_eot(self, ids: list[int]) -> list[int]:
    eot = self.tokenizer.eot_id
    return ids[:ids.index(eot)] if eot in ids else ids

  def _stopped(self, ids: list[int], stops: Sequence[Stop]) -> bool:
    if self.tokenizer.eot_id in ids:
      return True
    return bool(stops) and cut_at_stop(self.tokenizer.decode(ids), stops)[1]


def generate_until(model, tokenizer, prompts: Sequence[Sequence[int]],
                   stops: Sequence[Sequence[Stop]], max_new: int, batch_size: int = 8) -> list[str]:
  """Greedy continuations of token prompts, each cut before its earliest stop (one-off helper;
  keep a `TextGenerator` to reuse compiled programs across calls)."""
  return TextGenerator(model, tokenizer, batch_size).generate_until(prompts, stops, max_new)
