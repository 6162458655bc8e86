"""Perplexity of WikiText-2 (test) or any text file, with sliding windows.

Each document is read as <|endoftext|> followed by its tokens. The first window predicts the first
n_ctx tokens; every later window moves on by `stride` tokens and predicts only those, seeing the
n_ctx + 1 - stride tokens before them as context. stride = n_ctx gives lm-evaluation-harness's
disjoint `loglikelihood_rolling` windows; a smaller stride gives each token more context (and
costs n_ctx / stride times more compute).

Reported per token, per word and per byte (and bits per byte). As in lm-eval's `wikitext` task,
WikiText is scored after its detokenizer, while words and bytes are counted on the original text,
so the per-word and per-byte numbers do not depend on the tokenizer or the detokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gpt.errors import GPTError
from gpt.evals import metrics
from gpt.evals.base import (ContinuationScore, Format, Task, TaskData, TokenRequest, Truncation,
                            file_hashes, require_files)

WIKITEXT_FILE = "wikitext-2/wiki.test.tokens"
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


@dataclasses.dataclass(frozen=True)
class TextDoc:
  text: str  # what the model reads
  words: int  # whitespace-separated words of the original text
  bytes: int  # UTF-8 bytes of the original text


def rolling_windows(ids: Sequence[int], n_ctx: int, stride: int) -> list[TokenRequest]:
  """Requests that predict ids[1:] once each (ids[0] is the <|endoftext|> prefix); see module doc."""
  if not 1 <= stride <= n_ctx:
    raise GPTError(f"eval.stride={stride} must be between 1 and the context length {n_ctx}")
  out, done, step = [], 1, n_ctx
  while done < len(ids):
    end = min(done + step, len(ids))
    start = max(0, end - 1 - n_ctx)
    out.append(TokenRequest(tuple(ids[start:done]), (tuple(ids[done:end]),)))
    done, step = end, stride
  return out


def wikitext_detokenize(text: str) -> str:
  """lm-evaluation-harness's `wikitext_detokenizer`: undoes WikiText's tokenization artifacts."""
  s = text.replace("s '", "s'")
  s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
  for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                   (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
    s = s.replace(old, new)
  s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
  s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
  s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
  s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
  s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
  for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                   (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                   (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
    s = s.replace(old, new)
  return s


def split_articles(text: str) -> list[str]:
  """WikiText's articles: each starts at a top-level ' = Title = ' line."""
  articles, current = [], []
  for line in text.splitlines(keepends=True):
    if _ARTICLE_TITLE.match(line.rstrip("\n")) and any(l.strip() for l in current):
      articles.append("".join(current))
      current = []
    current.append(line)
  if any(l.strip() for l in current):
    articles.append("".join(current))
  return articles


def count_words(text: str) -> int:
  """lm-eval's word count: the pieces of re.split(r"\\s+", text)."""
  return len(re.split(r"\s+", text))


class Perplexity(Task):
  """Rolling-window perplexity of documents; subclasses read them."""

  primary_metric = "word_perplexity"
  uses_shots = False

  def __init__(self, stride: int = 0):
    self.stride = stride  # 0 = n_ctx // 2

  def encode(self, doc: TextDoc, demos: Sequence[Any], tokenizer, n_ctx: int,
             fmt: Format) -> tuple[list[TokenRequest], Truncation]:
    ids = [tokenizer.eot_id] + tokenizer.encode(doc.text)
    return rolling_windows(ids, n_ctx, self.stride or max(n_ctx // 2, 1)), Truncation()

  def process(self, doc: TextDoc, scores: list[list[ContinuationScore]]) -> dict[str, float]:
    return {"logprob": sum(s[0].logprob for s in scores), "tokens": sum(s[0].n_tokens for s in scores),
            "words": doc.words, "bytes": doc.bytes}

  def aggregate(self, results: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    ll = np.array([r["logprob"] for r in results])
    out = {}
    for unit in ("tokens", "words", "bytes"):
      data = np.stack([ll, [r[unit] for r in results]], axis=1)
      name = {"tokens": "token", "words": "word", "bytes": "byte"}[unit] + "_perplexity"
      out[name] = (metrics.ratio_perplexity(data),
                   metrics.bootstrap_stderr(metrics.ratio_perplexity, data))
    bpb = lambda d: math.log2(metrics.ratio_perplexity(d))  # noqa: E731
    data = np.stack([ll, [r["bytes"] for r in results]], axis=1)
    out["bits_per_byte"] = (bpb(data), metrics.bootstrap_stderr(bpb, data))
    out["tokens"] = (float(sum(r["tokens"] for r in results)), math.nan)
    return out

  def example_record(self, doc: TextDoc, demos: Sequence[Any], fmt: Format) -> dict[str, Any]:
    return {"text_start": doc.text[:80], "words": doc.words, "bytes": doc.bytes}


class WikiText2(Perplexity):
  name = "wikitext2"

  def data_files(self) -> list[tuple[str, ...]]:
    return [(WIKITEXT_FILE,)]

  def load(self, data_dir: Path) -> TaskData:
    path = require_files(data_dir, self.name, WIKITEXT_FILE)[WIKITEXT_FILE]
    articles = split_articles(path.read_text(encoding="utf-8"))
    docs = [TextDoc(wikitext_detokenize(a), count_words(a), len(a.encode("utf-8"))) for a in articles]
    return TaskData(docs, None, file_hashes(path))


class TextFile(Perplexity):
  """Any UTF-8 text file (eval.text_path), scored as one document without detokenization."""

  name = "text"

  def __init__(self, path: str, stride: int = 0):
    super().__init__(stride)
    self.path = path

  def load(self, data_dir: Path) -> TaskData:
    if not self.path:
      raise GPTError("task 'text' needs a file: --config.eval.text_path=path/to/file.txt")
    path = Path(self.path).expanduser()
    if not path.is_file():
      raise GPTError(f"eval.text_path={self.path}: no such file")
    try:
      text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
      raise GPTError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
    return TaskData([TextDoc(text, count_words(text), len(text.encode("utf-8")))], None,
                    file_hashes(path))
