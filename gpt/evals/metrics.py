"""Metrics over continuation scores: accuracies (plain, length-normalised), perplexities, stderrs.

The normalisations follow lm-evaluation-harness and GPT-3:
  acc              argmax of the summed log-likelihood
  acc_norm         argmax of log-likelihood / characters of the choice (lm-eval's acc_norm)
  acc_norm_tokens  argmax of log-likelihood / tokens of the choice (GPT-3's per-token likelihood)
  acc_uncond       argmax of log P(choice | context) - log P(choice | "Answer:") (GPT-3, ARC)
Standard errors of means are the sample standard deviation / sqrt(n), as lm-eval reports them
(for a 0/1 accuracy p that is sqrt(p (1 - p) / (n - 1))); ratios such as perplexity use a seeded
bootstrap over items.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from gpt.evals.base import ContinuationScore

BOOTSTRAP_ITERS = 1000


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean); the error is nan for fewer than two values."""
  x = np.asarray(values, np.float64)
  if len(x) == 0:
    return math.nan, math.nan
  stderr = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
  return float(x.mean()), stderr


def bootstrap_stderr(statistic: Callable[[np.ndarray], float], data: np.ndarray,
                     iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> float:
  """Standard deviation of `statistic` over `iters` resamples (with replacement) of the rows of
  `data`; nan for fewer than two rows."""
  if len(data) < 2:
    return math.nan
  rng = np.random.default_rng(seed)
  stats = [statistic(data[rng.integers(0, len(data), len(data))]) for _ in range(iters)]
  return float(np.std(stats, ddof=1))


def argmax(values: Sequence[float]) -> int:
  """Index of the largest value; the first one on ties (as numpy and lm-eval)."""
  return int(np.argmax(np.asarray(values, np.float64)))


def choice_metrics(scores: Sequence[ContinuationScore], choices: Sequence[str],
                   gold: int) -> dict[str, float]:
  """acc, acc_norm (chars) and acc_norm_tokens for one multiple-choice item.

  `choices` are the answer texts without the target delimiter, whose length lm-eval divides by.
  """
  ll = np.array([s.logprob for s in scores])
  chars = np.array([max(len(c), 1) for c in choices], np.float64)
  tokens = np.array([s.n_tokens for s in scores], np.float64)
  return {
      "acc": float(argmax(ll) == gold),
      "acc_norm": float(argmax(ll / chars) == gold),
      "acc_norm_tokens": float(argmax(ll / tokens) == gold),
  }


def label_probabilities(scores: Sequence[ContinuationScore]) -> np.ndarray:
  """The continuations' likelihoods renormalised over the candidates (a softmax of the logprobs)."""
  ll = np.array([s.logprob for s in scores])
  p = np.exp(ll - ll.max())
  return p / p.sum()


def perplexity(logprobs: np.ndarray) -> float:
  """exp(-mean log-likelihood) over items (lm-eval's LAMBADA perplexity)."""
  return float(math.exp(-np.mean(logprobs)))


def ratio_perplexity(data: np.ndarray) -> float:
  """exp(-sum(logprob) / sum(units)) for rows (logprob, units): per token, word or byte."""
  return float(math.exp(-data[:, 0].sum() / data[:, 1].sum()))
