"""Prompt construction on real records, the shot sampler and the truncation rules (gpt.evals.base)."""

import json

import pytest

from conftest import require_shared
from gpt.errors import GPTError
from gpt.evals import get_task
from gpt.evals.base import Format, Request, TokenRequest, assemble, encode_example, sample_demos
from gpt.evals.perplexity import rolling_windows, split_articles, wikitext_detokenize
from gpt.tokenizer import get_tokenizer

FMT = Format()


@pytest.fixture(scope="module")
def data_dir():
  return require_shared("data")


@pytest.fixture(scope="module")
def tok():
  return get_tokenizer()


def load(name, data_dir):
  task = get_task(name)
  return task, task.load(data_dir)


def prompts(task, doc, demos):
  return [(assemble(r.demos, r.query, FMT), r.continuations) for r in task.requests(doc, demos, FMT)]


def test_lambada_zero_and_one_shot(data_dir, tok):
  task, data = load("lambada", data_dir)
  assert len(data.docs) == 5153 and data.fewshot_pool is None
  doc = data.docs[1022]
  assert prompts(task, doc, []) == [(
      "Can I come over?”\n“Okay.” I pocket my phone. “Let’s get this over with.”\n“Sarah.”\n"
      "“What?”\nMy mom shakes her head. “Get this over with...you say it like it’s a chore.”\n"
      "“No, mom, it’s not a", (" chore",))]
  # One-shot: GPT-3's fill-in-the-blank frame for the demonstration and the query.
  assert prompts(task, data.docs[3604], [data.docs[879]]) == [(
      "“is that a yes yes, or a Nicky yes?”\n“it's a no.”\n“ok. good. so the plan…?”\n"
      "“before all that, we need to go to the florist.”\ni took a few hits of wine. “we have to go to "
      "the ____. -> florist\n\n"
      "“Happy to comply,” I said.\n“So, you’re Ben. Ben what?” \n“No, I’m Matt…Matt Casale. I live "
      "down the street.”\n“Wasn’t he just calling you ‘Ben’ just now?”\n“No, ‘Bean’—it’s a ____. ->",
      (" nickname",))]
  # Context + continuation tokens are the passage's tokens, so the last continuation token is the
  # passage's last BPE token: OpenAI's last-token accuracy comes from the same forward pass.
  (req,), _ = task.encode(doc, [], tok, 1024, FMT)
  assert list(req.context + req.continuations[0]) == tok.encode(doc)


def test_hellaswag(data_dir):
  task, data = load("hellaswag", data_dir)
  assert len(data.docs) == 10042
  doc = data.docs[5]
  assert doc.gold == 1
  assert prompts(task, doc, [data.docs[1]]) == [(
      "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady stands "
      "and lifts the weight over her head.\n\n"
      "High jump: The boy lands on his back on to a red mat. The boy gets up from the mat. the boy",
      (" starts doing spins.", " celebrates by clapping and flexing both arms.", " is dancing on the mat.",
       " does jump jacks on his stick."))]


# The first validation item in rowanz/hellaswag's official jsonl (the ../shared text form holds its
# context as "Roof shingle removal: A man is sitting on a roof. he").
OFFICIAL_HELLASWAG = {
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
    "label": 3, "source_id": "v_-JhWjGDPHMY",
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}


def test_hellaswag_official_jsonl_is_read_as_lm_eval_does(tmp_path):
  (tmp_path / "hellaswag").mkdir()
  wikihow = dict(OFFICIAL_HELLASWAG, activity_label="Home and Garden", ctx_b="",
                 ctx_a="[header] How to clean a roof. [title] Get a ladder. [step] Climb up.",
                 endings=["[title] Sweep it.  [step] Done."] * 4, label=0)
  (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text(
      json.dumps(OFFICIAL_HELLASWAG) + "\n" + json.dumps(wikihow) + "\n")
  task, data = load("hellaswag", tmp_path)
  roof, garden = data.docs
  assert roof.query == "Roof shingle removal: A man is sitting on a roof. He"
  assert roof.choices == tuple(OFFICIAL_HELLASWAG["endings"]) and roof.gold == 3
  assert garden.query == "Home and Garden: How to clean a roof.. Get a ladder. Climb up."
  assert garden.choices[0] == " Sweep it.  Done."  # lm-eval's rules, quirks included


def test_piqa(data_dir):
  task, data = load("piqa", data_dir)
  doc = data.docs[3]
  assert doc.gold == 1
  assert prompts(task, doc, []) == [(
      "Question: Make outdoor pillow.\nAnswer:",
      (" Blow into tin can and tie with rubber band.", " Blow into trash bag and tie with rubber band."))]


def test_arc_challenge_with_unconditional_prompt(data_dir):
  task, data = load("arc_challenge", data_dir)
  assert (len(data.docs), len(data.fewshot_pool)) == (1172, 1119)
  doc = data.docs[3]
  assert doc.gold == 3  # answerKey D
  conts = (" the control", " the hypothesis statement", " the dependent (responding) variable",
           " the independent (manipulated) variable")
  demo = data.fewshot_pool[0]
  assert prompts(task, doc, [demo]) == [
      (f"{demo.query} {demo.choices[demo.gold]}\n\n"
       "Question: A physicist wants to determine the speed a car must reach to jump over a ramp. The "
       "physicist conducts three trials. In trials two and three, the speed of the car is increased by "
       "20 miles per hour. What is the physicist investigating when he changes the speed?\nAnswer:",
       conts),
      ("Answer:", conts)]


def test_winogrande_partial_scoring(data_dir):
  task, data = load("winogrande", data_dir)
  doc, demo = data.docs[3], data.fewshot_pool[3]
  shown = "He never comes to my home, but I always go to his house because the house is bigger.\n\n"
  assert prompts(task, doc, [demo]) == [
      (shown + "Terry tried to bake the eggplant in the toaster oven but the eggplant", (" was too big.",)),
      (shown + "Terry tried to bake the eggplant in the toaster oven but the toaster", (" was too big.",))]
  assert doc.gold == 0


def test_boolq_patterns(data_dir):
  task, data = load("boolq", data_dir)
  doc = data.docs[2644]
  assert doc.label == 1
  p, q = "The season is set for release in 2019.", "are they going to make a punisher season 2"
  assert prompts(task, doc, []) == [
      (f"{p}\nQuestion: {q}?\nAnswer:", (" no", " yes")),
      (f"{p} Question: {q}? Answer:", (" No", " Yes")),
      (f"{p} Based on the previous passage, {q}?", (" No", " Yes"))]


def test_sst2_patterns_with_demo(data_dir):
  task, data = load("sst2", data_dir)
  doc, demo = data.docs[0], data.fewshot_pool[0]
  assert (doc.label, demo.label) == (0, 1)
  d = "a stirring , funny and finally transporting re-imagining of beauty and the beast and 1930s horror films"
  s = "one long string of cliches ."
  assert prompts(task, doc, [demo]) == [
      (f"Review: {d}\nSentiment: Positive\n\nReview: {s}\nSentiment:", (" Negative", " Positive")),
      (f"{d} It was great\n\n{s} It was", (" terrible", " great")),
      (f"{d} All in all, it was good\n\n{s} All in all, it was", (" bad", " good")),
      (f"{d}\nQuestion: Is this sentence positive or negative?\nAnswer: positive\n\n"
       f"{s}\nQuestion: Is this sentence positive or negative?\nAnswer:", (" negative", " positive"))]


def test_wikitext_articles_and_detokenizer(data_dir):
  text = (data_dir / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")
  articles = split_articles(text)
  assert len(articles) == 62 and "".join(articles) == text
  assert articles[1].startswith(" = Du Fu = \n")
  assert wikitext_detokenize(articles[0][:269]) == (
      "\n= Robert <unk> =\n\nRobert <unk> is an English film, television and theatre actor. He had a "
      "guest-starring role on the television series The Bill in 2000. This was followed by a starring "
      "role in the play Herons written by Simon Stephens, which was performed")


# --- shot sampler ---

def test_sampler_is_seeded_per_item_and_never_draws_the_item():
  a = sample_demos(100, 5, seed=1234, index=7, exclude=7)
  assert a == sample_demos(100, 5, seed=1234, index=7, exclude=7)
  assert len(set(a)) == 5 and 7 not in a and all(0 <= i < 100 for i in a)
  assert a != sample_demos(100, 5, seed=1235, index=7, exclude=7)
  assert a != sample_demos(100, 5, seed=1234, index=8, exclude=8)
  for i in range(30):  # pool of 6 minus the item: every other item, each once
    assert sorted(sample_demos(6, 5, 0, i % 6, exclude=i % 6)) == [j for j in range(6) if j != i % 6]
  assert sample_demos(10, 0, 0, 3, exclude=3) == []


def test_sampler_rejects_more_shots_than_the_pool():
  with pytest.raises(GPTError, match="only 5"):
    sample_demos(6, 6, 0, 0, exclude=0)


# --- truncation ---

def test_prompt_that_fits_is_untouched(tok):
  req = Request("Question: why?\nAnswer:", (" because", " no"), ("Question: a\nAnswer: b",))
  (out,), stats = encode_example([req], tok, 1024, FMT)
  assert out.context == tuple(tok.encode("Question: a\nAnswer: b\n\nQuestion: why?\nAnswer:"))
  assert out.continuations == (tuple(tok.encode(" because")), tuple(tok.encode(" no")))
  assert vars(stats) == {"demos_dropped": 0, "context_cut": 0, "skipped": 0}


def test_demonstrations_are_dropped_oldest_first(tok):
  demos = ("one two three four five", "six seven eight nine ten", "eleven twelve")
  req = Request("query words here", (" answer",), demos)
  full = len(tok.encode(assemble(demos[1:], req.query, FMT)))
  (out,), stats = encode_example([req], tok, full + len(tok.encode(" answer")) - 1, FMT)
  assert out.context == tuple(tok.encode(assemble(demos[1:], req.query, FMT)))
  assert vars(stats) == {"demos_dropped": 1, "context_cut": 0, "skipped": 0}


def test_context_is_cut_from_the_left_never_the_continuation(tok):
  query = "a b c d e f g h i j k l m n o p"
  req = Request(query, (" q r s t",), ("demo one", "demo two"))
  (out,), stats = encode_example([req], tok, 8, FMT)
  cont = tuple(tok.encode(" q r s t"))
  assert out.continuations == (cont,)
  assert out.context == tuple(tok.encode(query))[-(9 - len(cont)):]
  assert len(out.context) + len(cont) == 9
  assert vars(stats) == {"demos_dropped": 1, "context_cut": 1, "skipped": 0}


def test_item_whose_continuation_cannot_fit_is_skipped(tok):
  out, stats = encode_example([Request("ctx", (" " + "word " * 20,))], tok, 10, FMT)
  assert out is None and stats.skipped == 1


def test_all_prompts_of_an_item_keep_the_same_demonstrations(tok):
  demos = ("alpha beta gamma", "delta epsilon")
  reqs = [Request("short", (" x",), demos), Request("a much longer query for option two", (" x",), demos)]
  limit = len(tok.encode(assemble(demos[1:], reqs[1].query, FMT))) + 1
  out, stats = encode_example(reqs, tok, limit, FMT)
  assert out[0].context == tuple(tok.encode(assemble(demos[1:], "short", FMT)))
  assert stats.demos_dropped == 1 and stats.context_cut == 0


def test_trailing_space_moves_into_continuations_and_empty_context_is_eot(tok):
  (out,), _ = encode_example([Request("Answer: ", ("yes",))], tok, 64, FMT)
  assert out.context == tuple(tok.encode("Answer:")) and out.continuations == (tuple(tok.encode(" yes")),)
  (out,), _ = encode_example([Request("", (" yes",))], tok, 64, FMT)
  assert out.context == (tok.eot_id,)


def test_demo_dropping_keeps_as_many_as_fit(data_dir, tok):
  """The shortcut that estimates how many demonstrations fit must agree with trying each count."""
  task, data = load("lambada", data_dir)
  doc, demos = data.docs[0], data.docs[1:9]
  (req,) = task.requests(doc, demos, FMT)
  for n_ctx in (150, 300, 600, 1024):
    (out,), _ = encode_example([req], tok, n_ctx, FMT)
    keep = next(k for k in range(len(demos), -1, -1)
                if k == 0 or len(tok.encode(assemble(req.demos[len(demos) - k:], req.query, FMT))) + 1 <= n_ctx + 1)
    expected = tok.encode(assemble(req.demos[len(demos) - keep:], req.query, FMT))[-n_ctx:]
    assert list(out.context) == expected, n_ctx


def test_rolling_windows_predict_every_token_once():
  ids = list(range(100, 150))  # ids[0] plays <|endoftext|>
  for n_ctx, stride in ((8, 8), (8, 3), (16, 5), (64, 32)):
    windows = rolling_windows(ids, n_ctx, stride)
    targets = [t for w in windows for t in w.continuations[0]]
    assert targets == ids[1:]
    for w in windows:
      assert len(w.context) >= 1 and len(w.context) + len(w.continuations[0]) <= n_ctx + 1
      assert ids[ids.index(w.context[0]):][:len(w.context) + len(w.continuations[0])] == list(
          w.context + w.continuations[0])
  # Disjoint windows (stride = n_ctx) as lm-eval's loglikelihood_rolling: one context token each,
  # except the last, which is filled up to n_ctx with earlier tokens.
  assert [len(w.context) for w in rolling_windows(ids, 8, 8)] == [1] * 6 + [8]
  with pytest.raises(GPTError, match="stride"):
    rolling_windows(ids, 8, 9)


def test_unknown_task_and_missing_data_are_one_line_errors(tmp_path):
  with pytest.raises(GPTError, match="unknown eval task 'lambda'"):
    get_task("lambda")
  with pytest.raises(GPTError, match="needs .*lambada_test.jsonl; set --config.eval.data_dir"):
    get_task("lambada").load(tmp_path)
  (tmp_path / "lambada").mkdir()
  (tmp_path / "lambada" / "lambada_test.jsonl").write_text(json.dumps({"text": "a b"}) + "\n{oops\n")
  with pytest.raises(GPTError, match="lambada_test.jsonl:2"):
    get_task("lambada").load(tmp_path)
