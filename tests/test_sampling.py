"""gpt.sampling with fake logits functions: no model anywhere in this file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gpt.errors import GPTError
from gpt.sampling import Decoder, SamplingOptions, candidates, draw, nucleus, sample_logits, trim

V = 12
STOP = V - 1


def successor_fn(params, tokens, cache, token_mask):
  """Next token = last token + 1 (mod V), sharply peaked; the cache counts the tokens fed per row."""
  del params
  fed = jnp.ones(tokens.shape, jnp.int32) if token_mask is None else token_mask.astype(jnp.int32)
  logits = 10.0 * jax.nn.one_hot((tokens + 1) % V, V)
  return logits, cache + fed.sum(axis=1)


def fixed_fn(params, tokens, cache, token_mask):
  """The same distribution (`params`, logits [V]) at every position."""
  del token_mask
  return jnp.broadcast_to(params, (*tokens.shape, params.shape[-1])), cache


def zero_cache(batch, length):
  del length
  return jnp.zeros((batch,), jnp.int32)


def nucleus_reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """Renormalized probabilities after temperature, top-k and top-p, computed directly in numpy."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = order[:top_k] if top_k else order
  p = np.exp(z[keep] - z[keep].max())
  p /= p.sum()
  mass_before = np.cumsum(p) - p
  keep = keep[mass_before < top_p]
  probs = np.zeros_like(z)
  probs[keep] = np.exp(z[keep] - z[keep].max())
  return probs / probs.sum()


@pytest.mark.parametrize("kwargs, word", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_options_say_which(kwargs, word):
  with pytest.raises(GPTError, match=f"sampling.{word}="):
    SamplingOptions(**kwargs)


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (5, 100))
  got = sample_logits(jax.random.key(1), logits, SamplingOptions(temperature=0.0))
  np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (8, 0.5), (0, 1e-6), (1, 1.0)])
def test_samples_stay_in_allowed_set(top_k, top_p):
  rows = np.asarray(jax.random.normal(jax.random.key(2), (4, 64))) * 3
  options = SamplingOptions(temperature=0.8, top_k=top_k, top_p=top_p)
  keys = jax.random.split(jax.random.key(3), 2000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(k, jnp.asarray(rows), options)))(keys))
  for r in range(len(rows)):
    allowed = set(np.flatnonzero(nucleus_reference(rows[r], 0.8, top_k, top_p)))
    seen = set(draws[:, r].tolist())
    assert seen <= allowed, f"row {r}: sampled {sorted(seen - allowed)} outside {sorted(allowed)}"
    if len(allowed) <= 8:  # small sets: 2000 draws reach every member
      assert seen == allowed
  if top_p == 1e-6 or top_k == 1:  # the top token is always kept, even for a tiny p
    np.testing.assert_array_equal(draws[0], np.argmax(rows, -1))


def test_candidates_keep_smallest_set_reaching_p():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None]
  for p, n_kept in [(0.49, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.99, 4)]:
    scores, ids = candidates(logits, SamplingOptions(top_p=p))
    kept = np.isfinite(np.asarray(scores[0]))
    assert kept.sum() == n_kept, p
    assert sorted(np.asarray(ids[0])[kept].tolist()) == list(range(n_kept))
  scores, ids = candidates(logits, SamplingOptions(top_p=1.0))
  assert ids is None and np.isfinite(np.asarray(scores)).all()


# Ties cut by the nucleus at p = 0.5 (temperature 0.9): row 0's four 4.0s straddle it (the first
# three by index are kept), row 1 ties the top two, row 2 is nearly flat, row 3 has removed (-inf)
# tokens and one token above p alone.
TIED = np.array([[1.0, 4.0, 0.0, 4.0, 4.0, 2.0, 4.0, 0.0, 1.0, 0.0, 2.0, 0.0],
                 [3.0, 0.0, 3.0, 1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                 [0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0],
                 [-np.inf, 0.0, 5.0, -np.inf, 1.0, 1.0, 0.0, -2.0, 3.0, 3.0, -np.inf, 0.0]], np.float32)


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.5, 0.62, 0.9, 0.999])
@pytest.mark.parametrize("temperature", [0.9, 1.7])
def test_nucleus_without_sort_keeps_what_a_stable_sort_keeps(top_p, temperature):
  """The sort-free top-p (bisection on the score) against numpy's stable argsort, ties included."""
  kept = np.asarray(nucleus(jnp.asarray(TIED) / temperature, top_p))
  for r, row in enumerate(TIED):
    want = nucleus_reference(row, temperature, 0, top_p) > 0
    np.testing.assert_array_equal(kept[r], want, err_msg=f"row {r}")
  if (top_p, temperature) == (0.5, 0.9):
    assert np.flatnonzero(kept[0]).tolist() == [1, 3, 4]  # a tie cut in index order
  signed = np.array([[-0.0, 0.0, -0.0, 0.0, -5.0]], np.float32)  # four tied zeros, two signs
  assert np.flatnonzero(np.asarray(nucleus(jnp.asarray(signed), 0.4))).tolist() == [0, 1]


def test_nucleus_samples_the_renormalized_distribution():
  """Frequencies of 4000 draws of top-p alone against the numpy nucleus, per row."""
  options = SamplingOptions(temperature=0.9, top_p=0.8)
  keys = jax.random.split(jax.random.key(7), 4000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(k, jnp.asarray(TIED), options)))(keys))
  for r, row in enumerate(TIED):
    expected = nucleus_reference(row, 0.9, 0, 0.8)
    counts = np.bincount(draws[:, r], minlength=V)
    assert counts[expected == 0].sum() == 0, (r, counts)
    support = expected > 0
    if support.sum() > 1:
      assert stats.chisquare(counts[support], 4000 * expected[support]).pvalue > 1e-3, (r, counts)


def test_two_stage_draw_has_the_same_distribution():
  """`draw` in blocks of 3 over 12 columns (one whole block removed, a padded last block at 10
  columns) against softmax, by the frequencies of 6000 draws; and the ids mapping."""
  scores = np.array([[0.5, -np.inf, 1.0, -np.inf, -np.inf, -np.inf, 2.0, 0.0, 1.5, 0.2, 0.1, 1.0],
                     [0.0] * 12], np.float32)
  ids = jnp.asarray(np.arange(12)[::-1].copy()[None].repeat(2, 0), jnp.int32)
  keys = jax.random.split(jax.random.key(11), 6000)
  for width, mapped in [(12, False), (10, False), (12, True)]:
    x = jnp.asarray(scores[:, :width])
    fn = lambda k: draw(k, x, ids[:, :width] if mapped else None, block=3)
    draws = np.asarray(jax.jit(jax.vmap(fn))(keys))
    if mapped:
      draws = 11 - draws
    for r in range(2):
      expected = np.exp(scores[r, :width].astype(np.float64) - scores[r, :width].max())
      expected /= expected.sum()
      counts = np.bincount(draws[:, r], minlength=width)
      assert counts[expected == 0].sum() == 0, (width, r, counts)
      support = expected > 0
      assert stats.chisquare(counts[support], 6000 * expected[support]).pvalue > 1e-3, (width, r, counts)


@pytest.mark.parametrize("options", [
    SamplingOptions(temperature=1.0),
    SamplingOptions(temperature=0.7, top_k=5),
    SamplingOptions(temperature=1.3, top_p=0.8),
    SamplingOptions(temperature=1.0, top_k=6, top_p=0.9),
])
def test_frequencies_match_renormalized_probabilities(options):
  """Chi-square goodness of fit of 4096 draws from the whole decode loop (fixed seed)."""
  logits = np.log(np.array([0.3, 0.2, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02], np.float32))
  decoder = Decoder(fixed_fn, zero_cache, options, stop_token=0, stop_at_token=False)
  prompt = np.zeros((64, 1), np.int32)
  tokens = decoder.generate(jnp.asarray(logits), prompt, np.ones_like(prompt, bool),
                            jax.random.key(4), 64, cache_length=65)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=len(logits))
  expected = nucleus_reference(logits, options.temperature, options.top_k, options.top_p)
  assert counts[expected == 0].sum() == 0, "sampled a token outside the allowed set"
  support = expected > 0
  result = stats.chisquare(counts[support], counts.sum() * expected[support])
  assert result.pvalue > 1e-3, (counts, expected * counts.sum())


def test_decodes_per_row_prompts_of_different_lengths():
  """Left-padded prompts: each row continues from its own last token; one prefill, then 1 token/step."""
  decoder = Decoder(successor_fn, zero_cache, SamplingOptions(temperature=0.0),
                    stop_token=STOP, stop_at_token=False)
  prompt = np.array([[0, 0, 3], [0, 1, 4], [2, 5, 7]], np.int32)
  mask = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 1]], bool)
  state = decoder.start(None, prompt, mask, jax.random.key(0), cache_length=8, max_new=5)
  state = decoder.advance(None, state, 5)
  np.testing.assert_array_equal(state.tokens, [[4, 5, 6, 7, 8], [5, 6, 7, 8, 9], [8, 9, 10, 11, 0]])
  # The cache saw each row's real prompt tokens, then the 4 fed tokens (the 5th is never fed).
  np.testing.assert_array_equal(state.cache, [1 + 4, 2 + 4, 3 + 4])


def test_stops_at_stop_token_and_exits_early():
  decoder = Decoder(successor_fn, zero_cache, SamplingOptions(temperature=0.0),
                    stop_token=STOP, stop_at_token=True)
  prompt = np.array([[7], [8]], np.int32)
  state = decoder.start(None, prompt, np.ones_like(prompt, bool), jax.random.key(0),
                        cache_length=40, max_new=32)
  state = decoder.advance(None, state, 32)
  assert int(state.step) == 4, "the loop should end once every row has produced the stop token"
  assert trim(state.tokens, STOP, True, 32) == [[8, 9, 10], [9, 10]]
  assert trim(state.tokens, STOP, False, 5)[1] == [9, 10, 11, 11, 11]


def test_seeds_reproducible_and_chunking_invisible():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=V).astype(np.float32))
  decoder = Decoder(fixed_fn, zero_cache, SamplingOptions(temperature=1.0, top_k=8),
                    stop_token=STOP, stop_at_token=False)
  prompt = np.zeros((3, 2), np.int32)
  mask = np.ones_like(prompt, bool)

  def run(seed, chunks):
    state = decoder.start(logits, prompt, mask, jax.random.key(seed), cache_length=64, max_new=30)
    for until in chunks:
      state = decoder.advance(logits, state, until)
    return np.asarray(state.tokens)

  one_go = run(7, [30])
  np.testing.assert_array_equal(one_go, run(7, [30]))
  np.testing.assert_array_equal(one_go, run(7, [3, 4, 11, 29, 30]))
  assert not np.array_equal(one_go, run(8, [30]))
  assert not np.array_equal(one_go[0], one_go[1]), "rows of a batch should differ"


def test_compiles_once_per_shape():
  decoder = Decoder(fixed_fn, zero_cache, SamplingOptions(temperature=1.0, top_p=0.9),
                    stop_token=STOP, stop_at_token=True)
  logits = jnp.zeros(V)
  for seed, (lengths, n_new) in enumerate([((1, 4), 10), ((3, 2), 16), ((4, 4), 7)]):
    prompt = np.zeros((2, 4), np.int32)
    mask = np.arange(4)[None, :] >= 4 - np.array(lengths)[:, None]
    decoder.generate(logits, prompt, mask, jax.random.key(seed), n_new, cache_length=20, max_new=16)
  assert decoder.compiles == {"start": 1, "advance": 1}


def test_cache_too_small_is_refused():
  decoder = Decoder(fixed_fn, zero_cache, SamplingOptions(), stop_token=STOP, stop_at_token=False)
  with pytest.raises(ValueError, match="cache_length"):
    decoder.start(jnp.zeros(V), np.zeros((1, 4), np.int32), np.ones((1, 4), bool), jax.random.key(0),
                  cache_length=8, max_new=6)
