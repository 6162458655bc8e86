"""What every evaluation task shares: request types, the shot sampler, prompt assembly and truncation.

A task turns one item of its data set into `Request`s: a query (the scored item's context), the
continuations whose log-likelihood is compared, and the rendered demonstrations that go in front.
`encode_example` joins demonstrations and query into one prompt, tokenizes it the way
lm-evaluation-harness does, and makes it fit the model's context:

  1. drop demonstrations, oldest first, until the prompt fits (the same number in every prompt of
     the item, so its choices stay comparable);
  2. then cut the context from the left;
  3. never cut a continuation: an item whose longest continuation leaves no room for even one
     context token is skipped (and counted).

A prompt fits when len(context) + len(longest continuation) <= n_ctx + 1: the last token of a
continuation is only ever a target, never an input.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gpt.errors import GPTError
from gpt.hashing import hash_file


@dataclasses.dataclass(frozen=True)
class Format:
  """How prompts are joined (defaults as lm-evaluation-harness)."""

  # Between demonstrations, and between the last demonstration and the query.
  example_separator: str = "\n\n"
  # Between a question and its answer (put in front of every continuation).
  target_delimiter: str = " "


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt scored against one or more continuations (text, before tokenization)."""

  query: str
  continuations: tuple[str, ...]
  demos: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenRequest:
  """A tokenized request: one context and the continuations scored after it."""

  context: tuple[int, ...]
  continuations: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class ContinuationScore:
  """The model's verdict on one continuation given its context."""

  logprob: float  # sum of log P(token | everything before it) over the continuation
  n_tokens: int
  greedy: bool  # every continuation token is the argmax (lm-eval's `is_greedy`)
  last_greedy: bool  # the last token is the argmax (OpenAI's LAMBADA scoring)


@dataclasses.dataclass
class Truncation:
  """How many items of one run had to be shortened to fit the context."""

  demos_dropped: int = 0  # items that lost one or more demonstrations
  context_cut: int = 0  # items whose context was cut from the left
  skipped: int = 0  # items whose continuation alone does not fit (not scored)

  def add(self, other: "Truncation") -> None:
    self.demos_dropped += other.demos_dropped
    self.context_cut += other.context_cut
    self.skipped += other.skipped


@dataclasses.dataclass
class TaskData:
  """A task's loaded data: items to score, the pool demonstrations come from, and file checksums."""

  docs: list[Any]
  # Demonstrations are drawn from here; None means from `docs`, never the scored item itself.
  fewshot_pool: list[Any] | None
  files: dict[str, str]  # path -> sha256
  fewshot_source: str = ""  # which split the demonstrations come from, for the report


def file_hashes(*paths: Path) -> dict[str, str]:
  """TaskData.files for the files a task read: path -> sha256, so results say which data they
  came from."""
  return {str(p): hash_file(p) for p in paths}


class Task:
  """A task family. Subclasses set `name`, implement `load`, `requests` and `process`."""

  name: str = ""
  # The metric `compare_shots` and the console table lead with.
  primary_metric: str = "acc"
  # Whether shot counts apply (perplexity tasks score plain text and ignore them).
  uses_shots: bool = True
  # Scored by generated text (gpt.evals.generative) instead of log-likelihoods.
  generative: bool = False

  def load(self, data_dir: Path) -> TaskData:
    raise NotImplementedError

  def data_files(self) -> list[tuple[str, ...]]:
    """The files `load` reads, relative to eval.data_dir, as alternative forms (each a tuple of
    files that together hold the data), the preferred first; gpt.evals.fetch fetches a missing
    form. Empty for tasks that read nothing from data_dir."""
    return []

  def requests(self, doc: Any, demos: Sequence[Any], fmt: Format) -> list[Request]:
    """The prompts that score `doc`, with `demos` (docs of the few-shot pool) in front."""
    raise NotImplementedError

  def process(self, doc: Any, scores: list[list[ContinuationScore]]) -> dict[str, float]:
    """Per-item metric values from the scores of `requests(doc, ...)`, in the same order."""
    raise NotImplementedError

  def aggregate(self, results: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """metric -> (value, stderr) over all items; the mean and its standard error by default."""
    from gpt.evals import metrics
    return {key: metrics.mean_stderr([r[key] for r in results]) for key in results[0]}

  def encode(self, doc: Any, demos: Sequence[Any], tokenizer, n_ctx: int,
             fmt: Format) -> tuple[list[TokenRequest] | None, Truncation]:
    """Token requests for `doc` (None if it cannot be scored) and what truncation did."""
    return encode_example(self.requests(doc, demos, fmt), tokenizer, n_ctx, fmt)

  def example_record(self, doc: Any, demos: Sequence[Any], fmt: Format) -> dict[str, Any]:
    """What the per-example jsonl shows of an item besides its scores: the untruncated prompts."""
    gold = getattr(doc, "gold", getattr(doc, "label", None))
    return {"gold": gold, "prompts": [{"context": assemble(r.demos, r.query, fmt),
                         "continuations": list(r.continuations)}
                        for r in self.requests(doc, demos, fmt)]}


def sample_demos(pool_size: int, k: int, seed: int, index: int,
                 exclude: int | None = None) -> list[int]:
  """Indices of `k` distinct demonstrations for item `index`, drawn without replacement.

  Seeded by (seed, index), so an item gets the same demonstrations whatever `limit`, batch size or
  order; `exclude` (the scored item, when the pool is its own split) is never drawn.
  """
  available = pool_size - (exclude is not None)
  if k > available:
    raise GPTError(f"{k}-shot needs {k} demonstrations but the few-shot pool has only {available}; "
                   f"lower --config.eval.shots")
  if k == 0:
    return []
  rng = np.random.default_rng([seed, index])
  picks = rng.choice(available, size=k, replace=False)
  if exclude is not None:
    picks = np.where(picks >= exclude, picks + 1, picks)
  return [int(i) for i in picks]


def assemble(demos: Sequence[str], query: str, fmt: Format) -> str:
  """The prompt text: demonstrations then the query, joined by the example separator."""
  return fmt.example_separator.join([*demos, query])


def encode_pair(tokenizer, context: str,
                continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
  """lm-evaluation-harness's `_encode_pair` for a shared context.

  Trailing whitespace of the context moves to the front of each continuation, and a continuation's
  tokens are those of `context + continuation` after the context's, so BPE merges across the
  boundary are the ones the model sees when it reads the whole text.
  """
  stripped = context.rstrip()
  if stripped != context:
    continuations = [context[len(stripped):] + c for c in continuations]
    context = stripped
  context_ids = tokenizer.encode(context)
  wholes = tokenizer.encode_batch([context + c for c in continuations])
  return context_ids, [w[len(context_ids):] for w in wholes]


def encode_example(requests: Sequence[Request], tokenizer, n_ctx: int,
                   fmt: Format) -> tuple[list[TokenRequest] | None, Truncation]:
  """Tokenizes one item's requests under the truncation rules in the module docstring."""
  stats = Truncation()
  n_demos = max((len(r.demos) for r in requests), default=0)
  keep = n_demos
  while True:
    encoded = [_encode_request(r, keep, tokenizer, fmt) for r in requests]
    if keep == 0 or all(len(c) + _longest(conts) <= n_ctx + 1 for c, conts in encoded):
      break
    if keep == n_demos:  # too long: jump close to the answer instead of re-encoding once per demo
      keep = min(keep - 1, _demos_that_fit(requests, tokenizer, n_ctx, fmt) + 1)
    else:
      keep -= 1
  if keep < n_demos:
    stats.demos_dropped = 1
  out = []
  for context, conts in encoded:
    longest = _longest(conts)
    if longest == 0 or longest > n_ctx:
      stats.skipped = 1
      return None, stats
    room = n_ctx + 1 - longest
    if len(context) > room:
      context = context[-room:]
      stats.context_cut = 1
    out.append(TokenRequest(tuple(context), tuple(tuple(c) for c in conts)))
  return out, stats


def _encode_request(request: Request, keep: int, tokenizer,
                    fmt: Format) -> tuple[list[int], list[list[int]]]:
  """Context and continuation ids of `request` with its `keep` most recent demonstrations."""
  demos = request.demos[max(0, len(request.demos) - keep):]
  context, conts = encode_pair(tokenizer, assemble(demos, request.query, fmt), request.continuations)
  if not context:
    # An empty context conditions on <|endoftext|>, as lm-evaluation-harness does.
    context = [tokenizer.eot_id]
  return context, conts


def _demos_that_fit(requests: Sequence[Request], tokenizer, n_ctx: int, fmt: Format) -> int:
  """How many of the most recent demonstrations fit every request, counting tokens piecewise.

  Token counts of separately encoded pieces add up to the count of the joined text except at rare
  BPE merges across a boundary, so this is an estimate that `encode_example` then checks exactly.
  """
  fit = None
  for r in (r for r in requests if r.demos):
    query, conts = encode_pair(tokenizer, r.query, r.continuations)
    room = n_ctx + 1 - len(query) - _longest(conts)
    sizes = [len(ids) for ids in tokenizer.encode_batch([d + fmt.example_separator for d in r.demos])]
    n = 0
    for size in reversed(sizes):
      if size > room:
        break
      room -= size
      n += 1
    fit = n if fit is None else min(fit, n)
  return fit or 0


def _longest(conts: Sequence[Sequence[int]]) -> int:
  return max((len(c) for c in conts), default=0)


def require_files(data_dir: Path, task: str, *names: str) -> dict[str, Path]:
  """name -> path for a task's data files, or one GPTError naming the missing file."""
  paths = {}
  for name in names:
    path = Path(data_dir) / name
    if not path.is_file():
      raise GPTError(f"task {task!r} needs {path}; set --config.eval.data_dir to the folder holding "
                     f"'{name.split('/')[0]}/' (see the README's Evaluation section)")
    paths[name] = path
  return paths
