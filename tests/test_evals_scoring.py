"""The packed, bucketed scorer against direct full-forward log-likelihoods (gpt.evals.scoring)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gpt.evals.base import TokenRequest
from gpt.evals.perplexity import rolling_windows
from gpt.evals.buckets import bucket, plan_lengths, round_up
from gpt.evals.scoring import Scorer, pack
from gpt.model import GPTConfig, init_model

CFG = GPTConfig(n_vocab=300, n_ctx=48, n_embd=32, n_head=4, n_layer=2)


@pytest.fixture(scope="module")
def model():
  return init_model(CFG, seed=3)


@pytest.fixture(scope="module")
def scorer(model):
  """One scorer for the tests below, so that they share its compiled shapes."""
  return Scorer(model, batch_size=4, max_buckets=2)


@pytest.fixture(scope="module")
def log_probs(model):
  """Log-softmax of one plain forward, rows right-padded to n_ctx (one compile for every call)."""
  forward = jax.jit(lambda t: jax.nn.log_softmax(model(t), axis=-1))

  def run(tokens):
    padded = np.zeros((1, CFG.n_ctx), np.int32)
    padded[0, :len(tokens)] = tokens
    return np.asarray(forward(padded)[0, :len(tokens)], np.float64)
  return run


def direct(log_probs, context, cont):
  """log P(cont | context) summed, and per-token argmax flags, from a plain forward."""
  logp = log_probs(list(context) + list(cont)[:-1])
  rows = np.arange(len(context) - 1, len(context) + len(cont) - 1)
  return logp[rows, list(cont)].sum(), logp[rows].argmax(-1) == np.asarray(cont)


def random_requests(rng, n, n_ctx=CFG.n_ctx):
  out = []
  for _ in range(n):
    n_choices = int(rng.integers(1, 6))
    conts = [tuple(int(t) for t in rng.integers(0, CFG.n_vocab, int(rng.integers(1, 9))))
             for _ in range(n_choices)]
    room = n_ctx + 1 - max(map(len, conts))
    context = tuple(int(t) for t in rng.integers(0, CFG.n_vocab, int(rng.integers(1, room + 1))))
    out.append(TokenRequest(context, tuple(conts)))
  return out


def test_hidden_states_with_explicit_causal_mask_and_positions_are_the_default(model):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.n_vocab, (2, 11)))
  positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((11, 11), bool)), (2, 1, 11, 11))
  ours = jax.jit(lambda m, t, p, k: m(t, p, k, logits_at=None))(model, tokens, positions, mask)
  np.testing.assert_allclose(ours, jax.jit(lambda m, t: m(t, logits_at=None))(model, tokens), atol=1e-6)


def test_every_loglikelihood_equals_a_direct_forward(scorer, log_probs):
  requests = random_requests(np.random.default_rng(1), 13)  # 13 rows: the last batch is partial
  scores = scorer.score(requests)
  for req, req_scores in zip(requests, scores):
    assert len(req_scores) == len(req.continuations)
    for cont, s in zip(req.continuations, req_scores):
      logprob, flags = direct(log_probs, req.context, cont)
      assert abs(s.logprob - logprob) <= 1e-5, (s.logprob, logprob)
      assert s.n_tokens == len(cont)
      assert (s.greedy, s.last_greedy) == (bool(flags.all()), bool(flags[-1]))


def test_greedy_flags_on_the_models_own_continuation(scorer, log_probs):
  context = (5, 17, 99, 3)
  cont = []
  for _ in range(4):  # greedy decoding by full forwards
    cont.append(int(log_probs(list(context) + cont)[-1].argmax()))
  wrong_last = cont[:-1] + [(cont[-1] + 1) % CFG.n_vocab]
  greedy, last_wrong = scorer.score(
      [TokenRequest(context, (tuple(cont), tuple(wrong_last)))])[0]
  assert greedy.greedy and greedy.last_greedy
  assert not last_wrong.greedy and not last_wrong.last_greedy


def test_compiles_are_bounded_and_reused(model):
  scorer = Scorer(model, batch_size=4, max_buckets=2)
  requests = random_requests(np.random.default_rng(2), 16)
  first = scorer.score(requests)
  assert scorer.compiles == 2  # 4 batches of different lengths, 2 shapes
  again = scorer.score(list(reversed(requests)))[::-1]  # the same lengths: nothing new to compile
  assert scorer.compiles == 2
  assert [[s.logprob for s in r] for r in again] == [[s.logprob for s in r] for r in first]


def test_planned_lengths_minimise_padding_then_new_compiles():
  import itertools
  rng = np.random.default_rng(5)
  for _ in range(60):
    maxima = [int(m) for m in rng.integers(1, 300, int(rng.integers(1, 10)))]
    max_lengths = int(rng.integers(1, 4))
    compiled = {int(c) for c in rng.choice(np.arange(8, 320, 8), int(rng.integers(0, 3)))}
    got = plan_lengths(maxima, max_lengths, compiled)
    need = [round_up(m) for m in maxima]
    assert all(g >= n and g % 8 == 0 for g, n in zip(got, need)) and len(set(got)) <= max_lengths
    values = sorted(set(need) | {c for c in compiled if c >= min(need)})
    best = min((sum(min(v for v in chosen if v >= n) for n in need), len(set(chosen) - compiled))
               for r in range(1, max_lengths + 1) for chosen in itertools.combinations(values, r)
               if max(chosen) >= max(need))  # brute force over every choice of lengths
    assert (sum(got), len(set(got) - compiled)) == best


def test_rolling_windows_sum_to_the_direct_loglikelihood(scorer, log_probs):
  ids = [int(t) for t in np.random.default_rng(4).integers(0, CFG.n_vocab, 40)]
  expected, _ = direct(log_probs, ids[:1], ids[1:])  # fits one window: a single forward
  for stride in (CFG.n_ctx, 7):
    scores = scorer.score(rolling_windows(ids, CFG.n_ctx, stride))
    assert abs(sum(s[0].logprob for s in scores) - expected) <= 1e-5
  long_ids = ids * 3  # longer than n_ctx: each window is its own forward
  windows = rolling_windows(long_ids, CFG.n_ctx, 16)
  scores = scorer.score(windows)
  for w, s in zip(windows, scores):
    assert abs(s[0].logprob - direct(log_probs, w.context, w.continuations[0])[0]) <= 1e-5


@given(st.integers(1, 5000), st.integers(1, 64))
def test_bucket_ladder(n, minimum):
  b = bucket(n, minimum)
  assert max(n, minimum) <= b <= 3 * max(n, minimum) // 2 + 1  # at most ~1.5x padding
  power = b // 3 if b % 3 == 0 else b
  assert power & (power - 1) == 0  # 2^k or 3 * 2^k


def test_pack_layout():
  row = pack(TokenRequest((10, 11, 12), ((20, 21), (30,), (40, 41, 42))))
  assert row.tokens == [10, 11, 12, 20, 40, 41]  # each continuation without its last token
  assert row.positions == [0, 1, 2, 3, 3, 4]
  assert row.segments == [0, 0, 0, 1, 3, 3]
  assert row.targets == [20, 21, 30, 40, 41, 42]
  assert row.sources == [2, 3, 2, 2, 4, 5]
  assert row.spans == [(0, 2), (2, 3), (3, 6)]
