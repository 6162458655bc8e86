"""Generative tasks (GPT-3 section 3.9): the generated data, the scoring, and the greedy decoder path."""

import json
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.evals import arithmetic, get_task, scramble
from gpt.evals.base import Format
from gpt.evals.generative import evaluate_generative
from gpt.evals.greedy import TextGenerator, cut_at_stop
from gpt.evals.lambada_generate import END_OF_WORD
from gpt.model import GPTConfig, init_model
from gpt.tokenizer import get_tokenizer

FMT = Format()
TWO_OPERAND = re.compile(r"What is (\d+) (plus|minus|times) (\d+)\?")
COMPOSITE = re.compile(r"What is \((\d) ([-+*]) (\d)\) ([-+*]) (\d)\?")


@pytest.mark.parametrize("name", arithmetic.NAMES)
def test_arithmetic_problems_are_fixed_well_formed_and_right(name):
  data = get_task(name).load(None)
  assert len(data.docs) == 2000 and data.docs == arithmetic.draw(name, 2000)  # same every time
  digits = 1 if name.endswith("1dc") else int(name[len("arithmetic_")])
  operands = []
  for p in data.docs:
    if name.endswith("1dc"):
      a, o1, b, o2, c = COMPOSITE.fullmatch(p.question).groups()
      assert int(p.answer) == eval(f"({a} {o1} {b}) {o2} {c}")  # noqa: S307 (digits and + - * only)
      operands += [int(a), int(b), int(c)]
    else:
      a, op, b = TWO_OPERAND.fullmatch(p.question).groups()
      a, b = int(a), int(b)
      assert int(p.answer) == {"plus": a + b, "minus": a - b, "times": a * b}[op]
      assert op == {"a": "plus", "s": "minus", "m": "times"}[name[-1]]
      operands += [a, b]
    assert p.answer == str(int(p.answer))
  # Uniform on [0, 10^digits): the whole range is used, no more.
  top = 10 ** digits
  assert 0 <= min(operands) < max(1, top // 100) and top - max(1, top // 100) <= max(operands) < top
  assert np.mean(operands) == pytest.approx((10 ** digits - 1) / 2, rel=0.05)
  if name.endswith("s"):
    assert any(p.answer.startswith("-") for p in data.docs)  # answers may be negative
  # Demonstrations: a separate draw that never contains a scored problem.
  assert len(data.fewshot_pool) > 1000 and data.fewshot_pool != data.docs
  assert not {p.question for p in data.fewshot_pool} & {p.question for p in data.docs}
  task = get_task(name)
  prompt = task.prompt(data.docs[0], data.fewshot_pool[:2], FMT)
  d0, d1 = data.fewshot_pool[:2]
  assert prompt == (f"Q: {d0.question}\n\nA: {d0.answer}\n\nQ: {d1.question}\n\nA: {d1.answer}\n\n"
                    f"Q: {data.docs[0].question}\n\nA:")


def test_arithmetic_frame_is_gpt3s_released_data_as_lm_eval_reads_it():
  pytest.importorskip("lm_eval")
  datasets = pytest.importorskip("datasets")
  from lm_eval.tasks.arithmetic.utils import process_docs
  task = get_task("arithmetic_2da")
  query = task.example(arithmetic.Problem("What is 98 plus 45?", "143"), 0).query
  # The released file's context is the separator, then our query; lm-eval renames Q/A.
  (row,) = process_docs(datasets.Dataset.from_list([{"context": "\n\n" + query, "completion": " 143"}]))
  assert row["context"] == "Question: What is 98 plus 45?\nAnswer:"


def test_composite_uses_all_three_operations():
  ops = {m for p in arithmetic.draw("arithmetic_1dc", 2000) for m in COMPOSITE.fullmatch(p.question).groups()[1::2]}
  assert ops == {"+", "-", "*"}


def test_word_list_ships_with_the_package():
  words = scramble.word_list()
  assert len(words) > 15_000 and len(set(words)) == len(words)
  assert all(re.fullmatch(r"[a-z]{4,15}", w) for w in words)
  assert {"that", "with", "which", "government"} <= set(words[:3000])
  assert max(map(len, words)) == 15


@pytest.mark.parametrize("name", scramble.NAMES)
def test_scrambled_words_are_fixed_and_undo_to_the_word(name):
  data = get_task(name).load(None)
  assert len(data.docs) == 10_000 and data.docs == get_task(name).load(None).docs
  assert not {w for _, w in data.fewshot_pool} & {w for _, w in data.docs}
  changed = 0
  for scrambled, word in data.docs:
    if name == "cycle_letters":
      assert scrambled in {word[k:] + word[:k] for k in range(1, len(word))}
    elif name.startswith("anagrams"):
      keep = int(name[-1])
      assert sorted(scrambled) == sorted(word)
      assert scrambled[:keep] == word[:keep] and scrambled[-keep:] == word[-keep:]
    elif name == "random_insertion":
      assert len(scrambled) == 2 * len(word) - 1 and scrambled[::2] == word
      assert all(c in string.punctuation + " " and c != "=" for c in scrambled[1::2])
    else:
      assert scrambled == word[::-1]
    changed += scrambled != word
  assert changed == len(data.docs) and len(data.fewshot_pool) > 2000
  scrambled, word = data.docs[0]
  task = get_task(name)
  assert task.prompt(data.docs[0], [], FMT) == (
      f"Please unscramble the letters into a word, and write that word:\n{scrambled} =")
  assert task.example(data.docs[0], 0).answer == word
  (s1, w1), (s2, w2) = data.fewshot_pool[:2]
  assert task.prompt(data.docs[0], data.fewshot_pool[:2], FMT) == (
      f"Please unscramble the letters into a word, and write that word:\n{s1} = {w1}\n{s2} = {w2}\n"
      f"{scrambled} =")


def test_stops_cut_at_the_earliest_one():
  assert cut_at_stop(" 124\nQ: What", ["\n"]) == (" 124", True)
  assert cut_at_stop(" 124 and. more\n", ["\n", "."]) == (" 124 and", True)
  assert cut_at_stop(" 124", ["\n", ""]) == (" 124", False)
  assert cut_at_stop(" cat. The end", ["\n", END_OF_WORD]) == (" cat", True)
  assert cut_at_stop(" cat's toy", [END_OF_WORD]) == (" cat's", True)
  assert cut_at_stop(" well-known", [END_OF_WORD]) == (" well-known", False)
  assert cut_at_stop("\nfoo bar", ["\n", END_OF_WORD]) == ("", True)


def test_exact_match_after_normalisation():
  task = get_task("arithmetic_2da")
  doc = arithmetic.Problem("What is 1 plus 2?", "3")
  assert task.score(doc, " 3", 0) == {"exact_match": 1.0}
  assert task.score(doc, "3 ", 0) == {"exact_match": 1.0}
  assert task.score(doc, " 33", 0) == {"exact_match": 0.0}
  assert task.score(doc, " 3.", 0) == {"exact_match": 0.0}
  lam = get_task("lambada_generate")
  passage = "he looked at the sky and saw the moon"
  assert lam.example(passage, 0).query == "he looked at the sky and saw the"
  assert lam.example(passage, 3).query == "he looked at the sky and saw the ____. ->"
  output, _ = cut_at_stop(" moon, bright", lam.stops)
  assert lam.score(passage, output, 0) == {"exact_match": 1.0}


class AnswerSome:
  """Stands in for the decoder: answers item i right when i is even (the scoring is under test)."""

  n_ctx = 1024

  def __init__(self, answers):
    self.answers, self.calls = answers, []

  def generate_until(self, prompts, stops, max_new, desc=None):
    self.calls.append((prompts, stops, max_new))
    return [f" {a}" if i % 2 == 0 else " 0" for i, a in enumerate(self.answers[:len(prompts)])]


def test_exact_match_and_stderr_are_aggregated():
  task = get_task("arithmetic_3da")
  data = task.load(None)
  answers = [p.answer for p in data.docs]
  tok = get_tokenizer()
  result = evaluate_generative(task, data, AnswerSome(answers), tok, 2, FMT, limit=10, keep_examples=True)
  value, stderr = result.metrics["exact_match"]
  assert value == pytest.approx(0.5) and stderr == pytest.approx(np.std([1, 0] * 5, ddof=1) / np.sqrt(10))
  assert [e["index"] for e in result.examples] == list(range(10))
  first = result.examples[0]
  assert first["output"] == f" {answers[0]}" and first["answer"] == answers[0]
  assert first["prompt"].endswith(f"Q: {data.docs[0].question}\n\nA:") and first["prompt"].count("Q:") == 3


def test_demonstrations_are_dropped_to_fit_the_context():
  task = get_task("arithmetic_2da")
  data = task.load(None)
  tok = get_tokenizer()
  gen = AnswerSome([p.answer for p in data.docs])
  gen.n_ctx = 64  # room for the query and a few demonstrations only
  result = evaluate_generative(task, data, gen, tok, 50, FMT, limit=4)
  prompts, stops, max_new = gen.calls[0]
  assert result.truncation.demos_dropped == 4 and result.truncation.context_cut == 0
  assert all(len(p) + max_new - 1 <= 64 and len(p) > 40 for p in prompts)
  assert all(tok.decode(p).endswith(f"Q: {d.question}\n\nA:") for p, d in zip(prompts, data.docs))
  assert stops[0] == ("\n",)


@pytest.fixture(scope="module")
def tiny():
  """The shared tiny fixture model (trained weights, 64-token context), or without ../shared a
  random model of the same shape."""
  from conftest import SHARED
  folder = SHARED / "fixtures" / "openai-gpt2-tiny"
  if folder.is_dir():
    from gpt.config import base_config
    from gpt.weights import load_model
    config = base_config()
    config.init = str(folder)
    loaded = load_model(config)
    return loaded.model, loaded.tokenizer
  return init_model(GPTConfig(n_ctx=64, n_embd=16, n_head=2, n_layer=2), seed=3), get_tokenizer()


def test_greedy_decoder_equals_an_argmax_loop(tiny):
  model, tok = tiny
  prompts = [tok.encode(t) for t in ("Q: What is 48 plus 76? A:", "Hello", "The moon is a", "x y z w v")]
  gen = TextGenerator(model, tok, batch_size=3)  # two batches, the second one padded
  got = gen.generate_ids(prompts, [[]] * len(prompts), 12)
  forward = jax.jit(lambda tokens: model(tokens))
  for prompt, new in zip(prompts, got):
    ids = list(prompt)
    for _ in range(12):
      # Right-padded to the context so the loop compiles once; causal attention ignores the padding.
      tokens = np.zeros((1, model.cfg.n_ctx), np.int32)
      tokens[0, :len(ids)] = ids
      token = int(jnp.argmax(forward(jnp.asarray(tokens))[0, len(ids) - 1]))
      if token == tok.eot_id:
        break
      ids.append(token)
    assert new == ids[len(prompt):]
  full, stop = tok.decode(got[0]), tok.decode(got[0][2:4])
  texts = gen.generate_until(prompts, [[stop]] + [[]] * 3, 12)
  assert texts[0] == full[:full.index(stop)] and texts[1] == tok.decode(got[1])


@pytest.mark.slow
def test_eval_mode_writes_exact_match_for_each_shot_count(tmp_path):
  from conftest import REPO, require_shared
  from gpt.config import base_config
  from gpt.evaluate import run
  config = base_config()
  config.init = str(require_shared("fixtures", "openai-gpt2-tiny"))
  config.eval.tasks, config.eval.shots, config.eval.limit = "arithmetic_2da", "0,1,5", 4
  config.eval.write_examples = True
  run(config, str(tmp_path))
  for k in (0, 1, 5):
    record = json.loads((tmp_path / "eval" / f"arithmetic_2da_{k}shot.json").read_text())
    assert record["primary_metric"] == "exact_match" and record["n_examples"] == 4
    assert set(record["metrics"]["exact_match"]) == {"value", "stderr"}
    lines = (tmp_path / "eval" / f"arithmetic_2da_{k}shot.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(l)["demos"]) == k for l in lines)
  import importlib.util
  spec = importlib.util.spec_from_file_location("compare_shots", REPO / "experiments" / "compare_shots.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  data = script.series(script.load_results([str(tmp_path)]), {})
  table = script.markdown_table(data)
  assert "| arithmetic_2da | 0.81M | exact_match | 4 |" in table
  pytest.importorskip("matplotlib")
  script.plot(data, str(tmp_path / "shots.png"))
  assert (tmp_path / "shots.png").stat().st_size > 1000
