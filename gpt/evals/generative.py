"""Tasks scored by what the model generates, not by log-likelihood (GPT-3 section 3.9).

Every item is a query and an expected answer. The prompt is the task's description (if it has
one, said once, as GPT-3 did), then K demonstrations ("query answer", from the task's separate
few-shot pool, drawn per item with `sample_demos` and so never the scored item), then the query,
joined by the task's separator (the example separator unless the task has its own). The model continues it
greedily through the KV-cache decoder (gpt.evals.greedy) until a newline or the task's stop, and
the item scores exact_match = 1 when the continuation equals the answer after the task's
normalisation (by default: surrounding whitespace stripped).

A prompt fits when its tokens plus `max_new_tokens` - 1 fit the context. When K demonstrations do
not fit, the oldest are dropped (counted as `demos_dropped`); when the query alone does not fit it
is cut from the left (`context_cut`). So K may go up to what fits the context.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from gpt.evals import metrics
from gpt.evals.base import Format, Task, TaskData, Truncation, sample_demos
from gpt.evals.greedy import Stop, TextGenerator
from gpt.evals.runner import TaskResult


@dataclasses.dataclass(frozen=True)
class Example:
  """One item as the prompt shows it: the query, then (in demonstrations) the answer."""

  query: str
  answer: str


class GenerativeTask(Task):
  """A task whose items the model answers by generating text; subclasses implement `load` and
  `example` (and may change `stops`, `max_new_tokens` and `normalize`)."""

  generative = True
  primary_metric = "exact_match"
  # Where a continuation ends besides a newline: strings, or regular expressions cut at their match.
  stops: tuple[Stop, ...] = ("\n",)
  # Most new tokens generated per item (enough for the longest answer plus its stop).
  max_new_tokens = 16
  # Said once at the start of every prompt (GPT-3's task description), before any demonstration.
  description = ""
  # Between demonstrations and before the query; None: the eval's example separator.
  separator: str | None = None

  def example(self, doc: Any, shots: int) -> Example:
    """The query and answer of `doc` in a prompt with `shots` demonstrations."""
    raise NotImplementedError

  def normalize(self, text: str) -> str:
    """What exact match compares (of the continuation and of the answer)."""
    return text.strip()

  def prompt(self, doc: Any, demos: Sequence[Any], fmt: Format) -> str:
    """Demonstrations ("query answer") then the query (see module docstring)."""
    shown = [self.example(d, len(demos)) for d in demos]
    return self.description + self._separator(fmt).join(
        [*(e.query + fmt.target_delimiter + e.answer for e in shown), self.example(doc, len(demos)).query])

  def _separator(self, fmt: Format) -> str:
    return fmt.example_separator if self.separator is None else self.separator

  def encode_prompt(self, doc: Any, demos: Sequence[Any], tokenizer, n_ctx: int,
                    fmt: Format) -> tuple[list[int] | None, Truncation]:
    """Prompt ids that leave room for `max_new_tokens` (None: not even one token fits)."""
    stats = Truncation()
    room = n_ctx + 1 - self.max_new_tokens
    if room < 1:
      stats.skipped = 1
      return None, stats
    keep = len(demos)
    ids = tokenizer.encode(self.prompt(doc, demos, fmt))
    if len(ids) > room and keep:
      keep = self._demos_that_fit(doc, demos, tokenizer, room, fmt)
      while True:
        ids = tokenizer.encode(self.prompt(doc, demos[len(demos) - keep:], fmt))
        if len(ids) <= room or keep == 0:
          break
        keep -= 1
      stats.demos_dropped = 1
    if len(ids) > room:
      ids = ids[-room:]
      stats.context_cut = 1
    return ids, stats

  def _demos_that_fit(self, doc, demos, tokenizer, room: int, fmt: Format) -> int:
    """Estimate from separately encoded pieces of how many of the latest demos fit (checked after)."""
    query = len(tokenizer.encode(self.description + self.example(doc, len(demos)).query))
    pieces = tokenizer.encode_batch([e.query + fmt.target_delimiter + e.answer + self._separator(fmt)
                                     for e in (self.example(d, len(demos)) for d in demos)])
    left, n = room - query, 0
    for piece in reversed(pieces):
      if len(piece) > left:
        break
      left -= len(piece)
      n += 1
    return n

  def score(self, doc: Any, output: str, shots: int) -> dict[str, float]:
    """Per-item metrics of a continuation (already cut at its stop)."""
    answer = self.example(doc, shots).answer
    return {"exact_match": float(self.normalize(output) == self.normalize(answer))}

  def aggregate(self, results: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {key: metrics.mean_stderr([r[key] for r in results]) for key in results[0]}


def evaluate_generative(task: GenerativeTask, data: TaskData, generator: TextGenerator, tokenizer,
                        shots: int, fmt: Format, seed: int = 1234, limit: int = 0,
                        keep_examples: bool = False) -> TaskResult:
  """Generates an answer to each of the first `limit` items (0 = all) and scores it."""
  start = time.perf_counter()
  docs = data.docs[:limit] if limit else data.docs
  pool = data.docs if data.fewshot_pool is None else data.fewshot_pool
  stats, prompts, kept, demo_ids = Truncation(), [], [], []
  for i, doc in enumerate(docs):
    ids = sample_demos(len(pool), shots, seed, i, exclude=i if data.fewshot_pool is None else None)
    prompt, truncated = task.encode_prompt(doc, [pool[j] for j in ids], tokenizer,
                                           generator.n_ctx, fmt)
    stats.add(truncated)
    if prompt is not None:
      prompts.append(prompt)
      kept.append(i)
      demo_ids.append(ids)
  encoded = time.perf_counter()
  outputs = generator.generate_until(prompts, [task.stops] * len(prompts), task.max_new_tokens,
                                     desc=f"{task.name} {shots}-shot")
  generated = time.perf_counter()
  results, examples = [], []
  for i, ids, prompt, output in zip(kept, demo_ids, prompts, outputs):
    result = task.score(docs[i], output, shots)
    results.append(result)
    if keep_examples:
      examples.append({"index": i, "demos": ids, "metrics": result,
                       "answer": task.example(docs[i], shots).answer, "output": output,
                       "prompt": task.prompt(docs[i], [pool[j] for j in ids], fmt),
                       "prompt_tokens": len(prompt)})
  timing = {"seconds": time.perf_counter() - start, "encode_seconds": encoded - start,
            "generate_seconds": generated - encoded, "requests": len(prompts),
            "context_tokens": sum(map(len, prompts)),
            "examples_per_second": len(results) / max(generated - start, 1e-9)}
  return TaskResult(task.name, shots, task.aggregate(results) if results else {}, len(results),
                    stats, timing, examples)
