"""Batched, jitted log-likelihood scoring of continuations given a context.

Each `TokenRequest` becomes one packed row: the context once, then every continuation after it
(minus its last token, which is only a target). Continuation i sees the context and itself, not the
other continuations: positions restart after the context and an attention mask keeps the segments
apart. So a multiple-choice context is run once for all its choices (four HellaSwag endings share
one pass over the context), and the LM head (a third of GPT-2 small's FLOPs per token) is applied
only at the positions that predict a continuation token.

Rows are sorted by length, batched, and right-padded to a few lengths planned per run
(`gpt.evals.buckets`): the trunk compiles once per length (at most `max_buckets` lengths per call,
not one per example, and none when a call's lengths were compiled before). The head, one matmul and a logsumexp, runs over the batch's flattened targets
in fixed chunks, so it compiles once per row length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from gpt import heads
from gpt.evals.base import ContinuationScore, TokenRequest
from gpt.evals.buckets import bucket, plan_lengths
from gpt.model import GPT

# The LM head scores this many targets per call (fewer, from the ladder, when a batch has fewer).
HEAD_CHUNK = 128
_MIN_TARGETS = 4


@dataclasses.dataclass
class PackedRow:
  """One request laid out as a row: inputs, then which hidden state predicts which target."""

  tokens: list[int]
  positions: list[int]
  segments: list[int]  # 0 = context, i = continuation i (1-based)
  sources: list[int]  # row index of the hidden state that predicts each target
  targets: list[int]
  spans: list[tuple[int, int]]  # continuation i's targets are targets[start:end]


def pack(request: TokenRequest) -> PackedRow:
  """Lays out one request (see the module docstring)."""
  context = list(request.context)
  n_ctx_tokens = len(context)
  row = PackedRow(context, list(range(n_ctx_tokens)), [0] * n_ctx_tokens, [], [], [])
  for i, cont in enumerate(request.continuations, start=1):
    start = len(row.tokens)
    inputs = list(cont[:-1])
    row.tokens += inputs
    row.positions += range(n_ctx_tokens, n_ctx_tokens + len(inputs))
    row.segments += [i] * len(inputs)
    first = len(row.targets)
    # Token 0 is predicted by the last context state, token j by the state of token j-1.
    row.sources += [n_ctx_tokens - 1] + [start + j for j in range(len(inputs))]
    row.targets += list(cont)
    row.spans.append((first, len(row.targets)))
  return row


def collate(rows: Sequence[PackedRow], batch_size: int, length: int) -> tuple[np.ndarray, ...]:
  """Arrays for up to `batch_size` rows right-padded to `length` (missing rows are padding).

  Targets of all rows are flattened into one list (`sources` index the flattened [B*T] states), so
  the LM head's padding depends on the batch's total, not on its longest row.
  """
  n_targets = sum(len(r.targets) for r in rows)
  M = bucket(n_targets, _MIN_TARGETS) if n_targets <= HEAD_CHUNK else (
      -(-n_targets // HEAD_CHUNK) * HEAD_CHUNK)
  tokens = np.zeros((batch_size, length), np.int32)
  positions = np.zeros((batch_size, length), np.int32)
  segments = np.full((batch_size, length), -1, np.int32)  # -1: padding, attended by nothing real
  sources = np.zeros((M,), np.int32)
  targets = np.zeros((M,), np.int32)
  k = 0
  for b, r in enumerate(rows):
    n = len(r.tokens)
    tokens[b, :n], positions[b, :n], segments[b, :n] = r.tokens, r.positions, r.segments
    sources[k:k + len(r.targets)] = np.asarray(r.sources) + b * length
    targets[k:k + len(r.targets)] = r.targets
    k += len(r.targets)
  return tokens, positions, segments, sources, targets


def _trunk(graphdef, state, tokens, positions, segments):
  """Final hidden states [B*T, D] of packed rows (compiled once per row length)."""
  model = nnx.merge(graphdef, state)
  B, T = tokens.shape
  key, query = segments[:, None, :], segments[:, :, None]
  mask = jnp.tril(jnp.ones((T, T), bool))[None] & ((key == 0) | (key == query))
  return model(tokens, positions, mask[:, None], logits_at=None).reshape(B * T, -1)


def _head(graphdef, state, hidden, sources, targets):
  """log P(target) [K] and whether each target is the argmax [K], from the states at `sources`
  (the model's own output head, applied only there)."""
  logits = heads.logits(nnx.merge(graphdef, state), hidden, at=sources)
  picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


class Scorer:
  """Scores `TokenRequest`s with one model; reuse it across tasks to reuse its compiled shapes."""

  def __init__(self, model: GPT, batch_size: int = 8, max_buckets: int = 8):
    self.graphdef, self.state = nnx.split(model)
    self.n_ctx = model.cfg.n_ctx
    self.batch_size = batch_size
    self.max_buckets = max_buckets
    self._trunk_traces = 0
    self._trunk = jax.jit(self._counted_trunk)
    self._head = jax.jit(functools.partial(_head, self.graphdef))
    self._lengths: set[int] = set()  # row lengths the trunk is compiled for

  def _counted_trunk(self, *args):
    self._trunk_traces += 1  # runs only while jit traces: once per new shape, i.e. per compile
    return _trunk(self.graphdef, *args)

  @property
  def compiles(self) -> int:
    """Number of row lengths the trunk has been compiled for (the head's compiles are cheap)."""
    return self._trunk_traces

  def score(self, requests: Sequence[TokenRequest],
            desc: str | None = None) -> list[list[ContinuationScore]]:
    """One ContinuationScore per continuation of each request, in request order."""
    rows = [pack(r) for r in requests]
    # Longest first: an out-of-memory batch size shows up at once, and batches pad little.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    lengths = plan_lengths([len(rows[b[0]].tokens) for b in batches], self.max_buckets,
                           self._lengths)
    self._lengths.update(lengths)
    results: list[list[ContinuationScore]] = [[] for _ in rows]
    with tqdm(total=len(rows), desc=desc, unit="req", disable=desc is None, leave=False) as bar:
      for chosen, length in zip(batches, lengths):
        tokens, positions, segments, sources, targets = collate(
            [rows[i] for i in chosen], self.batch_size, length)
        hidden = self._trunk(self.state, tokens, positions, segments)
        chunk = min(len(targets), HEAD_CHUNK)
        parts = [self._head(self.state, hidden, sources[c:c + chunk], targets[c:c + chunk])
                 for c in range(0, len(targets), chunk)]
        logprobs = np.concatenate([np.asarray(p[0], np.float64) for p in parts])
        greedy = np.concatenate([np.asarray(p[1]) for p in parts])
        k = 0
        for i in chosen:
          results[i] = [_continuation_score(logprobs[k + s:k + e], greedy[k + s:k + e])
                        for s, e in rows[i].spans]
          k += len(rows[i].targets)
        bar.update(len(chosen))
    return results


def _continuation_score(logprobs: np.ndarray, greedy: np.ndarray) -> ContinuationScore:
  return ContinuationScore(logprob=float(logprobs.sum()), n_tokens=len(logprobs),
                           greedy=bool(greedy.all()), last_greedy=bool(greedy[-1]))
