"""Runs one task at one shot count: draw demonstrations, build and encode prompts, score, aggregate."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from gpt.evals.base import Format, Task, TaskData, Truncation, sample_demos
from gpt.evals.scoring import Scorer


@dataclasses.dataclass
class TaskResult:
  """Everything a run of (task, shots) reports."""

  task: str
  shots: int
  metrics: dict[str, tuple[float, float]]  # name -> (value, stderr)
  n_examples: int  # items scored
  truncation: Truncation
  timing: dict[str, float]
  examples: list[dict[str, Any]]  # per-item records (filled when asked for)


def evaluate(task: Task, data: TaskData, scorer: Scorer, tokenizer, shots: int, fmt: Format,
             seed: int = 1234, limit: int = 0, keep_examples: bool = False,
             generator=None) -> TaskResult:
  """Scores the first `limit` items (0 = all) of `data` with `shots` demonstrations each.

  Demonstrations for item i are `sample_demos(pool, shots, seed, i)`: from the task's few-shot split,
  or from the scored split without item i when the task has none. Generative tasks run on
  `generator` (a gpt.evals.greedy.TextGenerator) instead of `scorer`.
  """
  if task.generative:
    from gpt.evals.generative import evaluate_generative
    if generator is None:
      raise ValueError(f"{task.name} is a generative task: pass a TextGenerator")
    return evaluate_generative(task, data, generator, tokenizer, shots, fmt, seed, limit,
                               keep_examples)
  start = time.perf_counter()
  docs = data.docs[:limit] if limit else data.docs
  pool = data.docs if data.fewshot_pool is None else data.fewshot_pool
  shots = shots if task.uses_shots else 0
  stats, per_doc, demo_ids = Truncation(), [], []
  for i, doc in enumerate(docs):
    ids = sample_demos(len(pool), shots, seed, i, exclude=i if data.fewshot_pool is None else None)
    token_requests, truncated = task.encode(doc, [pool[j] for j in ids], tokenizer, scorer.n_ctx, fmt)
    stats.add(truncated)
    per_doc.append(token_requests)
    demo_ids.append(ids)
  flat = [r for reqs in per_doc if reqs for r in reqs]
  encoded = time.perf_counter()
  compiles = scorer.compiles
  scores = iter(scorer.score(flat, desc=f"{task.name} {shots}-shot"))
  scored = time.perf_counter()

  results, examples = [], []
  for i, (doc, reqs) in enumerate(zip(docs, per_doc)):
    if reqs is None:
      continue
    doc_scores = [next(scores) for _ in reqs]
    result = task.process(doc, doc_scores)
    results.append(result)
    if keep_examples:
      examples.append({"index": i, "demos": demo_ids[i], "metrics": result,
                       "scores": [[dataclasses.asdict(s) for s in r] for r in doc_scores],
                       **task.example_record(doc, [pool[j] for j in demo_ids[i]], fmt)})
  metrics = task.aggregate(results) if results else {}
  timing = {"seconds": time.perf_counter() - start, "encode_seconds": encoded - start,
            "score_seconds": scored - encoded, "requests": len(flat),
            "context_tokens": sum(len(r.context) for r in flat),
            "target_tokens": sum(len(c) for r in flat for c in r.continuations),
            "compiles": scorer.compiles - compiles,
            "examples_per_second": len(results) / max(scored - start, 1e-9)}
  return TaskResult(task.name, shots, metrics, len(results), stats, timing, examples)
