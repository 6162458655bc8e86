"""Autoregressive sampling over a fixed-size cache, knowing nothing about the model.

The decoder is given two functions and treats everything else as opaque pytrees:

  logits_fn(params, tokens [B, T], cache, token_mask [B, T] | None) -> (float32 logits [B, T, V], cache)
  init_cache(batch, length) -> cache            (a fixed-size cache with `length` slots)

`params` is passed through as a jit argument (not closed over), so weights are never baked into the
compiled program as constants. A prompt batch is left-padded (`prompt_mask` marks real tokens) and
run through `logits_fn` in one call (prefill); after that the loop feeds one token per step inside
a single `lax.while_loop`, so the whole decode is one XLA program with no per-token Python.

Decoding is split into `start` (prefill + first token) and `advance` (run until a given number of new
tokens, or every row hit <|endoftext|>) so callers can stream: `advance` in chunks returns to
the host between chunks; `advance` to the end runs the whole loop in one call. The sampling key
for new token i is `fold_in(key, i)`, so the text does not depend on how the loop was chunked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt.errors import GPTError

LogitsFn = Callable[[Any, jax.Array, Any, "jax.Array | None"], tuple[jax.Array, Any]]
InitCache = Callable[[int, int], Any]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How the next token is chosen from the logits (hashable: a static jit argument).

  temperature: softmax temperature; 0 means greedy (argmax).
  top_k: keep the k most likely tokens (0 = off).
  top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches p; the most
    likely token is always kept (1.0 = off). Applied after top_k, on the renormalized distribution.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise GPTError(f"sampling.temperature={self.temperature} must be >= 0 (0 means greedy)")
    if self.top_k < 0:
      raise GPTError(f"sampling.top_k={self.top_k} must be >= 0 (0 turns top-k off)")
    if not 0 < self.top_p <= 1:
      raise GPTError(f"sampling.top_p={self.top_p} must be in (0, 1] (1.0 turns nucleus sampling off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


# Nucleus sampling without top-k first looks at this many most likely tokens (see `sample_logits`).
NUCLEUS_PREFILTER = 1024


def candidates(logits: jax.Array, options: SamplingOptions) -> tuple[jax.Array, jax.Array | None]:
  """Temperature, top-k and top-p applied to float32 logits [B, V].

  Returns (scores [B, C], ids [B, C] or None): the tokens that may be sampled, with removed ones at
  -inf. `ids` maps candidate columns back to vocabulary ids; None means the columns are the
  vocabulary itself (no filtering, so no sort is needed).
  """
  scores = logits.astype(jnp.float32) / options.temperature
  V = scores.shape[-1]
  if options.top_k and options.top_k < V:
    scores, ids = jax.lax.top_k(scores, options.top_k)  # sorted, most likely first
  elif options.top_p < 1:
    iota = jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), scores.shape)
    neg, ids = jax.lax.sort((-scores, iota), dimension=-1, num_keys=1)
    scores = -neg
  else:
    return scores, None
  if options.top_p < 1:
    scores, _ = nucleus(scores, options.top_p)
  return scores, ids


def nucleus(sorted_scores: jax.Array, top_p: float, total: jax.Array | None = None):
  """Top-p on scores [B, C] sorted most likely first: (scores with the removed at -inf, the kept
  mass [B]). The probabilities are softmax(sorted_scores), or, when the columns are only the most
  likely C of a larger vocabulary, exp(score - max) / `total` [B, 1] with `total` the sum of
  exp(score - max) over the whole vocabulary (the same softmax, over all of it)."""
  if total is None:
    probs = jax.nn.softmax(sorted_scores, axis=-1)
  else:
    probs = jnp.exp(sorted_scores - sorted_scores[:, :1]) / total
  mass = jnp.cumsum(probs, axis=-1)
  mass_before = mass - probs
  # Keep a token while the mass of the more likely ones is still short of p: the smallest set
  # reaching p. The first column has mass_before = 0 < p, so the top token always survives.
  return jnp.where(mass_before < top_p, sorted_scores, -jnp.inf), mass[:, -1]


def sample_logits(key: jax.Array, logits: jax.Array, options: SamplingOptions, *,
                  prefilter: int = NUCLEUS_PREFILTER) -> jax.Array:
  """One token id per row [B] (int32) drawn from float32 logits [B, V].

  Nucleus sampling alone (top_p < 1, no top_k) needs the tokens in order of probability: a sort
  of the whole vocabulary per row, ~100x the cost of a decode step's top-k at V = 50257 (BENCHMARKS.md,
  "batch 8: outside the matmuls"). It first takes the `prefilter` most likely tokens (lax.top_k,
  ties in index order as the stable sort); when they hold at least p of every row's mass, no
  token past them can be in the nucleus, so the draw from them is the same distribution. Only
  otherwise (a flat distribution) does it sort everything.
  """
  if options.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if options.top_p < 1 and not (options.top_k and options.top_k < logits.shape[-1]) \
      and logits.shape[-1] > prefilter:
    scores = logits.astype(jnp.float32) / options.temperature
    top, ids = jax.lax.top_k(scores, prefilter)
    total = jnp.sum(jnp.exp(scores - top[:, :1]), axis=-1, keepdims=True)
    kept, mass = nucleus(top, options.top_p, total)
    return jax.lax.cond(jnp.all(mass >= options.top_p), lambda: draw(key, kept, ids),
                        lambda: draw(key, *candidates(logits, options)))
  return draw(key, *candidates(logits, options))


def draw(key: jax.Array, scores: jax.Array, ids: jax.Array | None) -> jax.Array:
  """One candidate per row [B] (int32) drawn from `candidates`' (scores, ids)."""
  choice = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
  if ids is None:
    return choice
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class DecodeState(NamedTuple):
  """Everything the decode loop carries between calls.

  tokens [B, N]: new tokens so far (columns >= step are unwritten; rows that stopped are padded
  with the stop token). last [B]: the latest token, fed at the next step. done [B]: row hit the
  stop token. step: number of new tokens written. key: the sampling key of this decode.
  """

  cache: Any
  tokens: jax.Array
  last: jax.Array
  done: jax.Array
  step: jax.Array
  key: jax.Array


class Decoder:
  """Jitted prefill and decode loop around a `logits_fn` (see the module docstring).

  `stop_token` (e.g. <|endoftext|>) ends a row when `stop_at_token` is True; the loop exits once
  every row has stopped. Compiled programs are cached per (batch, prompt length, cache length,
  max new tokens); prompt contents, seeds and the number of tokens to run are ordinary arguments.
  """

  def __init__(self, logits_fn: LogitsFn, init_cache: InitCache, options: SamplingOptions, *,
               stop_token: int, stop_at_token: bool):
    self.logits_fn = logits_fn
    self.init_cache = init_cache
    self.options = options
    self.stop_token = stop_token
    self.stop_at_token = stop_at_token
    self._start = jax.jit(self._start_impl, static_argnames=("cache_length", "max_new"))
    self._advance = jax.jit(self._advance_impl, donate_argnames=("state",))
    self._traces = {"start": 0, "advance": 0}

  @property
  def compiles(self) -> dict[str, int]:
    """How many programs `start` and `advance` have compiled (one per new shape)."""
    return dict(self._traces)

  def lower_advance(self, params: Any, state: DecodeState, until: int = 2) -> jax.stages.Lowered:
    """The decode loop lowered for `params` and `state` (e.g. `.compile().as_text()` for its HLO)."""
    return self._advance.lower(params, state, jnp.asarray(until, jnp.int32))

  def start(self, params: Any, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array, *,
            cache_length: int, max_new: int) -> DecodeState:
    """Prefills left-padded prompts [B, P] and samples the first new token of each row.

    `cache_length` must hold the (padded) prompt plus `max_new` tokens; every row needs at least
    one real prompt token (unconditional samples start from <|endoftext|>).
    """
    if cache_length < prompt.shape[1] + max_new - 1:
      raise ValueError(f"cache_length={cache_length} < prompt {prompt.shape[1]} + {max_new} - 1")
    return self._start(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_mask, bool), key,
                       cache_length=cache_length, max_new=max_new)

  def advance(self, params: Any, state: DecodeState, until: int) -> DecodeState:
    """Runs the loop until `until` new tokens (capped at the buffer) or every row has stopped.

    `state` is donated: use the returned state only.
    """
    return self._advance(params, state, jnp.asarray(until, jnp.int32))

  def generate(self, params: Any, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array,
               num_new: int, *, cache_length: int, max_new: int | None = None) -> jax.Array:
    """The whole decode in two calls: new tokens [B, max_new] (columns past `num_new`, or past a
    row's stop token, hold the stop token)."""
    max_new = num_new if max_new is None else max_new
    state = self.start(params, prompt, prompt_mask, key, cache_length=cache_length, max_new=max_new)
    return self.advance(params, state, num_new).tokens

  def _start_impl(self, params, prompt, prompt_mask, key, *, cache_length: int, max_new: int):
    self._traces["start"] += 1  # Python runs only while tracing: once per compiled shape
    B = prompt.shape[0]
    cache = self.init_cache(B, cache_length)
    logits, cache = self.logits_fn(params, prompt, cache, prompt_mask)
    # Rows are left-padded, so the last column is every row's last real token.
    first = sample_logits(jax.random.fold_in(key, 0), logits[:, -1], self.options)
    tokens = jnp.full((B, max_new), self.stop_token, jnp.int32).at[:, 0].set(first)
    return DecodeState(cache=cache, tokens=tokens, last=first, done=self._stopped(first),
                       step=jnp.ones((), jnp.int32), key=key)

  def _advance_impl(self, params, state: DecodeState, until: jax.Array) -> DecodeState:
    self._traces["advance"] += 1
    until = jnp.minimum(until, state.tokens.shape[1])

    def cond(s: DecodeState):
      return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState):
      logits, cache = self.logits_fn(params, s.last[:, None], s.cache, None)
      token = sample_logits(jax.random.fold_in(s.key, s.step), logits[:, 0], self.options)
      token = jnp.where(s.done, self.stop_token, token)
      tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
      return DecodeState(cache=cache, tokens=tokens, last=token, done=s.done | self._stopped(token),
                         step=s.step + 1, key=s.key)

    return jax.lax.while_loop(cond, body, state)

  def _stopped(self, token: jax.Array) -> jax.Array:
    if not self.stop_at_token:
      return jnp.zeros(token.shape, bool)
    return token == self.stop_token


def trim(tokens, stop_token: int, stop_at_token: bool, num_new: int) -> list[list[int]]:
  """Host-side: each row's new tokens up to `num_new`, cut before its stop token when stopping."""
  rows = []
  for row in np.asarray(jax.device_get(tokens)).tolist():
    row = row[:num_new]
    if stop_at_token and stop_token in row:
      row = row[:row.index(stop_token)]
    rows.append(row)
  return rows
