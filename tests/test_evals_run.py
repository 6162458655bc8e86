"""The eval mode end to end on the tiny OpenAI-format fixture: every task, 0 and 1 shot."""

import json
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, require_shared
from gpt import evaluate
from gpt.config import base_config
from gpt.evals import TASKS
from gpt.weights import load_model

LIMIT = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """One eval run over every task (shared by the tests below: compiles are the cost)."""
  fixture = require_shared("fixtures", "openai-gpt2-tiny")
  data_dir = require_shared("data")
  config = base_config()  # the fixture's checkpoint decides the model's shape
  config.mode = "eval"
  config.init = str(fixture)
  text = tmp_path_factory.mktemp("text") / "story.txt"
  text.write_text("\ufeffOnce upon a time there was a tiny model.\nIt was evaluated.\n", encoding="utf-8")
  e = config.eval
  e.tasks, e.shots, e.limit, e.batch_size = ",".join(TASKS), "0,1", LIMIT, 4
  e.data_dir, e.text_path, e.write_examples = str(data_dir), str(text), True
  workdir = tmp_path_factory.mktemp("eval")
  evaluate.run(config, str(workdir))
  return workdir / "eval", config


@pytest.mark.slow  # runs the eval mode end to end over every task
def test_every_task_and_shot_count_writes_a_result(run_dir):
  out, _ = run_dir
  for name, factory in TASKS.items():
    shots = (0, 1) if factory(None).uses_shots else (0,)
    for k in shots:
      record = json.loads((out / f"{name}_{k}shot.json").read_text())
      assert record["task"] == name and record["shots"] == k
      assert record["primary_metric"] in record["metrics"]
      assert record["n_examples"] + record["truncation"]["skipped"] == (LIMIT if name != "text" else 1)
      assert all(len(sha) == 64 for sha in record["data"].values())
      assert record["model"]["n_layer"] == 2 and record["eval_config"]["limit"] == LIMIT
      lines = (out / f"{name}_{k}shot.jsonl").read_text().splitlines()
      assert len(lines) == record["n_examples"]
  assert not (out / "wikitext2_1shot.json").exists()


@pytest.mark.slow  # runs the eval mode end to end over every task
def test_accuracies_are_the_means_of_the_per_item_records(run_dir):
  out, _ = run_dir
  record = json.loads((out / "hellaswag_1shot.json").read_text())
  items = [json.loads(l) for l in (out / "hellaswag_1shot.jsonl").read_text().splitlines()]
  for metric in ("acc", "acc_norm", "acc_norm_tokens"):
    assert record["metrics"][metric]["value"] == pytest.approx(np.mean([i["metrics"][metric] for i in items]))
  for item in items:
    ll = [c["logprob"] for c in item["scores"][0]]
    assert item["metrics"]["acc"] == float(int(np.argmax(ll)) == int(item["gold"]))
    assert len(item["demos"]) == 1 and item["demos"][0] != item["index"]


@pytest.mark.slow  # runs the eval mode end to end over every task
def test_recorded_loglikelihoods_equal_a_direct_forward(run_dir):
  """sst2 prompts fit the fixture's 64-token context untruncated: rescore them with model(tokens)."""
  out, config = run_dir
  loaded = load_model(config)
  tok, n_ctx = loaded.tokenizer, loaded.cfg.n_ctx
  # One plain forward per prompt, right-padded to n_ctx so that it compiles once.
  forward = jax.jit(lambda t: jax.nn.log_softmax(loaded.model(t), axis=-1))
  checked = 0
  for line in (out / "sst2_0shot.jsonl").read_text().splitlines():
    item = json.loads(line)
    for prompt, scores in zip(item["prompts"], item["scores"]):
      context = tok.encode(prompt["context"])
      for cont_text, score in zip(prompt["continuations"], scores):
        cont = tok.encode(prompt["context"] + cont_text)[len(context):]
        tokens = np.zeros((1, n_ctx), np.int32)
        tokens[0, :len(context) + len(cont) - 1] = (context + cont)[:-1]
        logp = np.asarray(forward(tokens)[0], np.float64)
        expected = sum(logp[len(context) - 1 + j, t] for j, t in enumerate(cont))
        assert score["logprob"] == pytest.approx(expected, abs=1e-5)
        checked += 1
  assert checked == LIMIT * 4 * 2  # items x patterns x labels


def test_console_table_lists_every_metric():
  class FakeTask:
    primary_metric = "acc_norm"
  from gpt.evals.base import Truncation
  from gpt.evals.runner import TaskResult
  result = TaskResult("piqa", 1, {"acc": (0.5, 0.1), "acc_norm": (0.625, float("nan"))}, 8,
                      Truncation(2, 1, 0), {}, [])
  table = evaluate.format_table([(FakeTask(), result)]).splitlines()
  assert table[2] == "| piqa | 1 | acc_norm | 0.6250 |  | 8 | 2 demos, 1 cut, 0 skipped |"
  assert table[3] == "| piqa | 1 | acc | 0.5000 | 0.1000 | 8 | 2 demos, 1 cut, 0 skipped |"


@pytest.mark.parametrize("override, message", [
    ("--config.eval.tasks=lambada,nope", "unknown eval task 'nope'"),
    ("--config.eval.shots=0,x", "eval.shots='0,x'"),
])
def test_bad_eval_settings_are_one_line_errors(gpt_main, override, message):
  code, _, stderr = gpt_main("--config=configs/tiny.py", "--config.mode=eval", override)
  assert code == 2
  assert stderr.strip().splitlines()[-1].startswith(f"error: {message}")
