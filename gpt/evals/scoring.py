"""Batched, jitted log-likelihood scoring of continuations given a context.

Each `TokenRequest` becomes one packed row: the context once, then every continuation after it
(minus its last token, which is only a target). Continuation i sees the context and itself, not the
other continuations: positions restart after the context and an attention mask keeps the segments
apart. So a multiple-choice context is run once for all its choices (four HellaSwag endings share
one pass over the context), and the LM head (a third of GPT-2 small's FLOPs per token) is applied
only at the positions that predict a continuation token.

Rows are sorted by length, batched, and right-padded into a ladder of bucket lengths. The trunk
compiles once per row-length bucket (a handful per run, not one per example); the head, one matmul
and a logsumexp over the batch's flattened targets, once per (row length, target count) bucket.
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

from gpt.evals.base import ContinuationScore, TokenRequest
from gpt.model import GPT

# Padded lengths come from a ladder of powers of two and 1.5x powers of two (a third of padding
# at most): rows have at least this many tokens, batches at least this many targets.
_MIN_TOKENS = 16
_MIN_TARGETS = 4
# The LM head runs over this many targets at a time when their count divides by it.
_HEAD_CHUNK = 128


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest length of the ladder 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 * 2^(k-1)) that is
  >= max(n, minimum)."""
  n = max(n, minimum)
  power = 1
  while True:
    if power >= n:
      return power
    if power >= 2 and power * 3 // 2 >= n:
      return power * 3 // 2
    power *= 2


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


def collate(rows: Sequence[PackedRow], batch_size: int) -> tuple[np.ndarray, ...]:
  """Right-padded arrays for up to `batch_size` rows (missing rows are padding).

  Targets of all rows are flattened into one list (`sources` index the flattened [B*T] states), so
  the LM head's padding depends on the batch's total, not on its longest row.
  """
  T = bucket(max(len(r.tokens) for r in rows), _MIN_TOKENS)
  M = bucket(sum(len(r.targets) for r in rows), _MIN_TARGETS)
  tokens = np.zeros((batch_size, T), np.int32)
  positions = np.zeros((batch_size, T), np.int32)
  segments = np.full((batch_size, T), -1, np.int32)  # -1: padding, attended by nothing real
  sources = np.zeros((M,), np.int32)
  targets = np.zeros((M,), np.int32)
  k = 0
  for b, r in enumerate(rows):
    n = len(r.tokens)
    tokens[b, :n], positions[b, :n], segments[b, :n] = r.tokens, r.positions, r.segments
    sources[k:k + len(r.targets)] = np.asarray(r.sources) + b * T
    targets[k:k + len(r.targets)] = r.targets
    k += len(r.targets)
  return tokens, positions, segments, sources, targets


def final_hidden(model: GPT, tokens: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
  """Final-LayerNorm states [B, T, D] for rows with explicit positions and attention mask [B,1,T,T].

  `GPT.hidden_states` covers plain causal rows only; packed rows need positions and a mask, which
  the model's trunk takes. test_evals_scoring checks the result against `model(tokens)`.
  """
  x, _ = model._trunk(tokens, positions, mask, None, None)
  return model.ln_f(x)


def _trunk(graphdef, state, tokens, positions, segments):
  """Final hidden states [B*T, D] of packed rows (compiled once per row length)."""
  model = nnx.merge(graphdef, state)
  B, T = tokens.shape
  key, query = segments[:, None, :], segments[:, :, None]
  mask = jnp.tril(jnp.ones((T, T), bool))[None] & ((key == 0) | (key == query))
  return final_hidden(model, tokens, positions, mask[:, None]).reshape(B * T, -1)


def _head(wte, hidden, sources, targets):
  """log P(target) [M] and whether it is the argmax [M], in chunks of rows to bound the [.., V]
  logits in memory (compiled once per (states, targets) shape; cheap next to the trunk)."""
  M = targets.shape[0]
  chunk = _HEAD_CHUNK if M % _HEAD_CHUNK == 0 else M

  def one(args):
    src, tgt = args
    h = hidden[src]
    logits = jnp.einsum("kd,vd->kv", h, wte.astype(h.dtype), preferred_element_type=jnp.float32)
    picked = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tgt

  logprobs, greedy = jax.lax.map(one, (sources.reshape(-1, chunk), targets.reshape(-1, chunk)))
  return logprobs.reshape(M), greedy.reshape(M)


class Scorer:
  """Scores `TokenRequest`s with one model; reuse it across tasks to reuse its compiled shapes."""

  def __init__(self, model: GPT, batch_size: int = 8):
    self.graphdef, self.state = nnx.split(model)
    self.wte = model.wte[...]
    self.n_ctx = model.cfg.n_ctx
    self.batch_size = batch_size
    self._trunk = jax.jit(functools.partial(_trunk, self.graphdef))
    self._head = jax.jit(_head)

  @property
  def compiles(self) -> int:
    """Number of distinct trunk shapes compiled so far (the head's compiles are cheap)."""
    return self._trunk._cache_size()

  def score(self, requests: Sequence[TokenRequest],
            desc: str | None = None) -> list[list[ContinuationScore]]:
    """One ContinuationScore per continuation of each request, in request order."""
    rows = [pack(r) for r in requests]
    # Longest first: an out-of-memory batch size shows up at once, and batches pad little.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    results: list[list[ContinuationScore]] = [[] for _ in rows]
    with tqdm(total=len(rows), desc=desc, unit="req", disable=desc is None, leave=False) as bar:
      for start in range(0, len(order), self.batch_size):
        chosen = order[start:start + self.batch_size]
        tokens, positions, segments, sources, targets = collate([rows[i] for i in chosen],
                                                                self.batch_size)
        hidden = self._trunk(self.state, tokens, positions, segments)
        logprobs, greedy = self._head(self.wte, hidden, sources, targets)
        logprobs, greedy = np.asarray(logprobs, np.float64), np.asarray(greedy)
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
