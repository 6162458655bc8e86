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


def candidates(logits: jax.Array, options: SamplingOptions) -> tuple[jax.Array, jax.Array | None]:
  """Temperature, top-k and top-p applied to float32 logits [B, V].

  Returns (scores [B, C], ids [B, C] or None): the tokens that may be sampled, with removed ones at
  -inf. `ids` maps candidate columns back to vocabulary ids; None means the columns are the
  vocabulary itself (no filtering).
  """
  scores = logits.astype(jnp.float32) / options.temperature
  V = scores.shape[-1]
  if options.top_k and options.top_k < V:
    scores, ids = jax.lax.top_k(scores, options.top_k)  # sorted, most likely first
    if options.top_p < 1:
      probs = jax.nn.softmax(scores, axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs
      # Keep a token while the mass of the more likely ones is still short of p: the smallest set
      # reaching p. The first column has mass_before = 0 < p, so the top token always survives.
      scores = jnp.where(mass_before < options.top_p, scores, -jnp.inf)
    return scores, ids
  if options.top_p < 1:
    ids = jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), scores.shape)
    return jnp.where(nucleus(scores, options.top_p), scores, -jnp.inf), ids
  return scores, None


def nucleus(scores: jax.Array, top_p: float) -> jax.Array:
  """[B, V] bool: the smallest set of most likely tokens whose probability reaches `top_p`, ties
  taken in index order (as a stable sort by descending score would), found without sorting.

  Sorting 50257 scores per row costs ~100x a decode step's top-k on XLA:CPU (BENCHMARKS.md,
  "batch 8: outside the matmuls"). Instead: the mass strictly above a score threshold only falls
  as the threshold rises, so a bisection over the 2^32 float32 values (32 masked sums) finds the
  least likely kept score t, the smallest score whose "mass above" is short of p. Every token
  above t is kept; of the tokens tied at t, those whose mass before them (the mass above t plus
  their earlier-index ties) is still short of p.
  """
  probs = jax.nn.softmax(scores, axis=-1)
  # -0.0 and 0.0 are one score (a tie) but two bit patterns: make every zero +0.0.
  bits = jax.lax.bitcast_convert_type(jnp.where(scores == 0, 0.0, scores), jnp.uint32)
  # float32 -> uint32 in the same order: flip every bit of negatives, only the sign of the rest.
  keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))
  above = lambda k: jnp.sum(jnp.where(keys > k, probs, 0.0), axis=-1, keepdims=True)

  def halve(_, bounds):
    # Invariant: the mass above lo reaches p (or lo is below every key); above hi it does not.
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    short = above(mid) < top_p
    return jnp.where(short, lo, mid), jnp.where(short, mid, hi)

  lo = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
  hi = keys.max(axis=-1, keepdims=True)  # nothing lies above the top score
  _, t = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  tied = keys == t
  ties_before = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) - tied
  return (keys > t) | (tied & (above(t) + probs * ties_before < top_p))


def sample_logits(key: jax.Array, logits: jax.Array, options: SamplingOptions) -> jax.Array:
  """One token id per row [B] (int32) drawn from float32 logits [B, V]."""
  if options.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return draw(key, *candidates(logits, options))


# `draw` picks among more columns than twice this in two stages (a block, then a column in it).
DRAW_BLOCK = 256


def draw(key: jax.Array, scores: jax.Array, ids: jax.Array | None, *, block: int = DRAW_BLOCK) -> jax.Array:
  """One candidate per row [B] (int32) drawn from `candidates`' (scores, ids): softmax(scores).

  jax.random.categorical draws a Gumbel variate per column: for the whole vocabulary (temperature
  or top-p alone) that is 50257 random numbers and two logs per row, ~10x a decode step's top-k.
  Wide rows are drawn in two stages with the same distribution: a block of `block` columns with
  probability its total mass (logsumexp of its scores), then a column within it.
  """
  B, V = scores.shape
  if V <= 2 * block:
    choice = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
  else:
    n = -(-V // block)
    blocks = jnp.pad(scores, ((0, 0), (0, n * block - V)), constant_values=-jnp.inf).reshape(B, n, block)
    first, second = jax.random.split(key)
    which = jax.random.categorical(first, jax.nn.logsumexp(blocks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, which[:, None, None], axis=1)[:, 0]
    choice = (which * block + jax.random.categorical(second, inside, axis=-1)).astype(jnp.int32)
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
