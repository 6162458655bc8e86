"""Our evaluation against lm-evaluation-harness on the same weights (the `[hf]` extra).

We load the tiny OpenAI-format fixture and export it with gpt.weights.export_hf to a Hugging Face
folder, which lm-eval's `hf` backend loads. On a slice of every task, at 0 and 1 shot, each
continuation's log-likelihood and greedy flag from our scorer must equal lm-eval's for the same
prompt, and so must the per-item accuracies. Prompt templates are checked against lm-eval's own task files.
"""

import json
from pathlib import Path

import pytest
import yaml

from conftest import require_shared
from gpt.config import base_config
from gpt.evals import get_task
from gpt.evals.base import ContinuationScore, Format, assemble, encode_example, sample_demos
from gpt.evals.perplexity import TextDoc, split_articles, wikitext_detokenize
from gpt.evals.scoring import Scorer
from gpt.weights import export_hf, load_model

pytestmark = pytest.mark.slow  # lm-eval runs

hf_backend = lm_eval = Instance = TASK_FILES = None  # set by _harness below


@pytest.fixture(scope="module", autouse=True)
def _harness():
  """Imports torch, transformers and lm-eval when these tests run, not when pytest collects this
  file: seconds of CPU in every pytest process, the fast tier's (which deselects them) included."""
  global hf_backend, lm_eval, Instance, TASK_FILES
  pytest.importorskip("torch", reason="needs the [hf] extra: pip install torch transformers lm-eval")
  pytest.importorskip("transformers", reason="needs the [hf] extra: pip install transformers")
  hf_backend = pytest.importorskip(
      "lm_eval.models.huggingface", reason="needs lm-evaluation-harness: pip install lm-eval accelerate")
  import lm_eval
  from lm_eval.api.instance import Instance
  TASK_FILES = Path(lm_eval.__file__).parent / "tasks"


FMT = Format()
ITEMS = 3


@pytest.fixture(scope="module")
def ours():
  config = base_config()
  config.init = str(require_shared("fixtures", "openai-gpt2-tiny"))
  loaded = load_model(config)
  return loaded, Scorer(loaded.model, batch_size=4)


@pytest.fixture(scope="module")
def harness(ours, tmp_path_factory):
  """lm-eval's `hf` backend on our model exported to a Hugging Face folder."""
  loaded, _ = ours
  folder = export_hf(loaded.model, loaded.tokenizer, tmp_path_factory.mktemp("hf"))
  return hf_backend.HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4)


@pytest.mark.parametrize("name", ["lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge",
                                  "winogrande", "boolq", "sst2"])
def test_loglikelihoods_and_accuracies_match_lm_eval(name, ours, harness):
  loaded, scorer = ours
  task = get_task(name)
  data = task.load(require_shared("data"))
  pool = data.docs if data.fewshot_pool is None else data.fewshot_pool
  for shots in (0, 1):
    items, text_calls, token_calls = [], [], []
    for i, doc in enumerate(data.docs[:ITEMS]):
      ids = sample_demos(len(pool), shots, 1234, i, exclude=i if data.fewshot_pool is None else None)
      requests = task.requests(doc, [pool[j] for j in ids], FMT)
      encoded, stats = encode_example(requests, loaded.tokenizer, loaded.cfg.n_ctx, FMT)
      if encoded is None:
        continue
      truncated = stats.demos_dropped or stats.context_cut
      for req, tr in zip(requests, encoded):
        for cont_text, cont_ids in zip(req.continuations, tr.continuations):
          if truncated:  # lm-eval cuts text differently: compare scoring on our tokens
            token_calls.append(((req.query, cont_text), list(tr.context), list(cont_ids)))
          else:  # the whole path: lm-eval tokenizes our prompt itself
            text_calls.append(Instance("loglikelihood", {}, (assemble(req.demos, req.query, FMT), cont_text), 0))
      items.append((doc, encoded, truncated))
    assert len(text_calls) + len(token_calls) >= ITEMS
    theirs_text = iter(harness.loglikelihood(text_calls, disable_tqdm=True))
    theirs_tokens = iter(harness._loglikelihood_tokens(token_calls, disable_tqdm=True))
    mine = iter(scorer.score([r for _, enc, _ in items for r in enc]))
    for doc, encoded, truncated in items:
      my_scores = [next(mine) for _ in encoded]
      their_scores = []
      for req_scores in my_scores:
        row = []
        for s in req_scores:
          ll, greedy = next(theirs_tokens if truncated else theirs_text)
          assert s.logprob == pytest.approx(ll, abs=2e-4, rel=1e-6), (name, shots)
          assert s.greedy == greedy, (name, shots)
          row.append(ContinuationScore(ll, s.n_tokens, greedy, s.last_greedy))
        their_scores.append(row)
      assert task.process(doc, my_scores) == pytest.approx(task.process(doc, their_scores), abs=2e-4)


def test_rolling_perplexity_matches_lm_eval(ours, harness):
  loaded, scorer = ours
  path = require_shared("data", "wikitext-2", "wiki.test.tokens")
  article = split_articles(path.read_text(encoding="utf-8"))[1][:3000]
  text = wikitext_detokenize(article)
  task = get_task("wikitext2", {"stride": loaded.cfg.n_ctx})  # disjoint windows, as lm-eval
  windows, _ = task.encode(TextDoc(text, 0, 0), [], loaded.tokenizer, loaded.cfg.n_ctx, FMT)
  assert len(windows) > 5
  mine = sum(s[0].logprob for s in scorer.score(windows))
  (theirs,) = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                            disable_tqdm=True)
  assert mine == pytest.approx(theirs, abs=1e-3, rel=1e-6)


def _template(path: str) -> str:
  return yaml.safe_load((TASK_FILES / path).read_text())["doc_to_text"]


def test_prompt_templates_match_lm_eval_task_files(ours):
  from lm_eval.utils import apply_template
  data_dir = require_shared("data")
  raw = {name: [json.loads(l) for l in (data_dir / path).read_text(encoding="utf-8").splitlines()[:20]]
         for name, path in (("piqa", "piqa/valid.jsonl"), ("arc_easy", "arc/ARC-Easy-Test.jsonl"),
                            ("boolq", "boolq/dev.jsonl"), ("lambada", "lambada/lambada_test.jsonl"))}
  checks = {
      "piqa": ("piqa/piqa.yaml", lambda r: r),
      "arc_easy": ("arc/arc_easy.yaml", lambda r: {"question": r["question"]["stem"]}),
      "boolq": ("super_glue/boolq/default.yaml", lambda r: r),
  }
  for name, (path, to_hf) in checks.items():
    task, template = get_task(name), _template(path)
    for doc, row in zip(task.load(data_dir).docs, raw[name]):
      requests = task.requests(doc, [], FMT)
      assert requests[0].query == apply_template(template, to_hf(row)), name
  lambada = get_task("lambada")
  zero, cloze = _template("lambada/lambada_openai.yaml"), _template("lambada_cloze/lambada_openai_cloze.yaml")
  for row in raw["lambada"]:
    assert lambada.requests(row["text"], [], FMT)[0].query == apply_template(zero, row)
    assert lambada.requests(row["text"], [row["text"]], FMT)[0].query == apply_template(cloze, row)
  sst2 = get_task("sst2")
  sentence = "one long string of cliches ."
  assert sst2.patterns[3].render(sst2.load(data_dir).docs[0]) == apply_template(
      _template("glue/sst2/default.yaml"), {"sentence": sentence})


def test_winogrande_hellaswag_and_wikitext_preprocessing_match_lm_eval():
  from lm_eval.tasks.hellaswag.utils import preprocess
  from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
  from lm_eval.tasks.winogrande import preprocess_winogrande as wg
  data_dir = require_shared("data")
  rows = [json.loads(l) for l in (data_dir / "winogrande/dev.jsonl").read_text().splitlines()]
  for doc, row in zip(get_task("winogrande").load(data_dir).docs, rows):
    assert [doc.prefix(0), doc.prefix(1)] == wg.doc_to_choice(row)
    assert doc.rest == wg.doc_to_target(row) and doc.gold == wg.doc_to_text(row)
  # The HellaSwag file was cleaned with lm-eval's rules: cleaning again changes nothing.
  for doc in get_task("hellaswag").load(data_dir).docs[:2000]:
    assert all(preprocess(t) == t for t in (doc.query, *doc.choices))
  from datasets import Dataset
  from lm_eval.tasks.hellaswag.utils import process_docs
  from test_evals_prompts import OFFICIAL_HELLASWAG
  rows = [OFFICIAL_HELLASWAG, dict(OFFICIAL_HELLASWAG, ctx_b="", label=0, activity_label="Home",
                                   ctx_a="[header] How to x. [title] Get a ladder. [step] Climb.",
                                   endings=["[title] Sweep it.  [step] Done."] * 4)]
  for row, theirs in zip(rows, process_docs(Dataset.from_list(rows))):
    ours = get_task("hellaswag").from_official(row)
    assert (ours.query, list(ours.choices), ours.gold) == (theirs["query"], theirs["choices"], int(theirs["gold"]))
  text = (data_dir / "wikitext-2/wiki.test.tokens").read_text(encoding="utf-8")
  for article in split_articles(text):
    assert wikitext_detokenize(article) == wikitext_detokenizer({"page": article})
