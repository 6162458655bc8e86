"""Per-item metrics and their aggregation (gpt.evals.metrics and the tasks' process/aggregate)."""

import math

import numpy as np
import pytest

from gpt.evals import get_task, metrics
from gpt.evals.base import ContinuationScore, Format
from gpt.evals.cloze import LabeledText
from gpt.evals.multiple_choice import ChoiceDoc, WinograndeDoc
from gpt.evals.perplexity import TextDoc


def s(logprob, n_tokens=1, greedy=False, last_greedy=False):
  return ContinuationScore(logprob, n_tokens, greedy, last_greedy)


def test_choice_metrics_normalise_by_chars_and_tokens():
  # Sums favour the short choice 0; per character choice 1; per token choice 2.
  scores = [s(-4.0, 2), s(-6.0, 6), s(-5.0, 10)]
  choices = ["ab", "abcdefghijkl", "abcd"]
  assert metrics.choice_metrics(scores, choices, 0) == {"acc": 1.0, "acc_norm": 0.0, "acc_norm_tokens": 0.0}
  assert metrics.choice_metrics(scores, choices, 1) == {"acc": 0.0, "acc_norm": 1.0, "acc_norm_tokens": 0.0}
  assert metrics.choice_metrics(scores, choices, 2) == {"acc": 0.0, "acc_norm": 0.0, "acc_norm_tokens": 1.0}


def test_mean_stderr_is_the_binomial_formula_for_accuracies():
  values = [1.0] * 30 + [0.0] * 70
  mean, stderr = metrics.mean_stderr(values)
  assert mean == pytest.approx(0.3)
  assert stderr == pytest.approx(math.sqrt(0.3 * 0.7 / 99))
  assert math.isnan(metrics.mean_stderr([1.0])[1])


def test_bootstrap_stderr_is_seeded_and_close_to_the_analytic_one():
  x = np.random.default_rng(0).normal(size=400)
  a = metrics.bootstrap_stderr(np.mean, x)
  assert a == metrics.bootstrap_stderr(np.mean, x)
  assert a == pytest.approx(x.std(ddof=1) / 20, rel=0.15)


def test_arc_unconditional_normalisation():
  task = get_task("arc_easy")
  doc = ChoiceDoc("Question: q\nAnswer:", ("red", "blue", "green"), 2)
  conditional = [s(-2.0), s(-3.0), s(-2.5)]
  unconditional = [s(-1.0), s(-4.0), s(-4.0)]  # gains: -1, +1, +1.5
  out = task.process(doc, [conditional, unconditional])
  assert out["acc"] == 0.0 and out["acc_uncond"] == 1.0
  assert [r.query for r in task.requests(doc, [], Format())] == ["Question: q\nAnswer:", "Answer:"]


def test_winogrande_picks_the_likelier_prefix():
  doc = WinograndeDoc("A _ b.", ("x", "y"), 1)
  assert get_task("winogrande").process(doc, [[s(-3.0)], [s(-2.0)]]) == {"acc": 1.0}


def test_cloze_patterns_and_ensemble():
  task = get_task("sst2")
  doc = LabeledText((("sentence", "fine ."),), 1)
  # Pattern 0 is sure of label 0, patterns 1-3 lean slightly to label 1: the mean probability of
  # label 1 is (0.0 + 3 * 0.62) / 4 < 0.5, so the ensemble says 0.
  lean = math.log(0.62 / 0.38)
  scores = [[s(0.0), s(-20.0)]] + [[s(-lean), s(0.0)]] * 3
  out = task.process(doc, scores)
  assert out == {"acc": 0.0, "acc_p0": 0.0, "acc_p1": 1.0, "acc_p2": 1.0, "acc_p3": 1.0}
  assert metrics.label_probabilities([s(-lean), s(0.0)]) == pytest.approx([0.38, 0.62])


def test_lambada_metrics_and_perplexity():
  task = get_task("lambada")
  results = [task.process("a b", [[s(-1.0, 2, True, True)]]),
             task.process("a b", [[s(-3.0, 1, False, True)]])]
  assert results[1] == {"acc": 0.0, "acc_last_token": 1.0, "logprob": -3.0}
  agg = task.aggregate(results)
  assert agg["acc"][0] == 0.5 and agg["acc_last_token"][0] == 1.0
  assert agg["ppl"][0] == pytest.approx(math.exp(2.0))


def test_perplexity_per_token_word_and_byte():
  task = get_task("wikitext2")
  docs = [TextDoc("x", words=10, bytes=40), TextDoc("y", words=30, bytes=60)]
  results = [task.process(docs[0], [[s(-20.0, 8)], [s(-10.0, 4)]]),  # two windows
             task.process(docs[1], [[s(-50.0, 20)]])]
  agg = task.aggregate(results)
  assert agg["token_perplexity"][0] == pytest.approx(math.exp(80 / 32))
  assert agg["word_perplexity"][0] == pytest.approx(math.exp(80 / 40))
  assert agg["byte_perplexity"][0] == pytest.approx(math.exp(80 / 100))
  assert agg["bits_per_byte"][0] == pytest.approx(80 / 100 / math.log(2))
  assert agg["tokens"][0] == 32
