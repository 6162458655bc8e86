"""The lm-eval model `gpt` (gpt/harness.py) against lm-eval's own `hf` model on the same weights.

The tiny OpenAI-format fixture is exported to a Hugging Face folder (as tests/test_evals_hf.py does)
and both models run the same lm-eval tasks, written here as YAML files that read ../shared/data
(`include_path`, local `data_files`): a loglikelihood task (LAMBADA), a multiple-choice one (PIQA,
whose choices share a context and so one packed row), a loglikelihood_rolling one (WikiText
articles) and two generate_until ones (short stops, and long generations that fill the 64-token
context so prompts are cut). Every request's result must agree: log-likelihoods within 2e-4,
greedy flags and generated strings identical.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'gpt[harness]'")

from conftest import REPO, require_shared  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from gpt.harness import GPTLM  # noqa: E402

LIMIT = 6
# Runs gpt.harness as `python -m` does, with torch and transformers looking uninstalled (find_spec
# says no, importing them fails as for a missing package).
NO_TORCH = """
import atexit, importlib.abc, importlib.util, runpy, sys
BLOCKED = ("torch", "transformers")
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in BLOCKED else _find(name, package))
class NotInstalled(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
sys.argv[0] = "gpt.harness"
runpy.run_module("gpt.harness", run_name="__main__")
"""


def _task_files(folder: Path, data: Path) -> Path:
  """lm-eval task YAMLs reading ../shared/data (and a WikiText jsonl made from it) into `folder`."""
  from gpt.evals.perplexity import split_articles
  articles = split_articles((data / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8"))
  with open(folder / "wiki.jsonl", "w", encoding="utf-8") as f:
    for article in articles[:LIMIT]:
      f.write(json.dumps({"page": article[:1200]}) + "\n")
  lambada = data / "lambada" / "lambada_test.jsonl"
  common = "dataset_path: json\noutput_type: {type}\ntest_split: test\n" \
           "dataset_kwargs:\n  data_files:\n    test: {path}\n"
  tasks = {
      "gptp_lambada": (common.format(type="loglikelihood", path=lambada) +
                       "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                       "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                       "metric_list:\n  - metric: acc\n  - metric: perplexity\n"),
      "gptp_piqa": (common.format(type="multiple_choice", path=data / "piqa" / "valid.jsonl") +
                    "doc_to_text: \"Question: {{goal}}\\nAnswer:\"\n"
                    "doc_to_choice: \"{{[sol1, sol2]}}\"\ndoc_to_target: 0\n"
                    "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
      "gptp_wikitext": (common.format(type="loglikelihood_rolling", path=folder / "wiki.jsonl") +
                        "doc_to_text: \"\"\ndoc_to_target: \"{{page}}\"\n"
                        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"),
      "gptp_lambada_gen": (common.format(type="generate_until", path=lambada) +
                           "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                           "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                           "generation_kwargs:\n  until: [\"\\n\", \".\", \" the\"]\n  max_gen_toks: 12\n"
                           "  do_sample: false\n"
                           "metric_list:\n  - metric: exact_match\n"),
      "gptp_long_gen": (common.format(type="generate_until", path=lambada) +
                        "doc_to_text: \"{{text}}\"\ndoc_to_target: \"x\"\n"
                        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 40\n"
                        "metric_list:\n  - metric: exact_match\n"),
  }
  for name, body in tasks.items():
    (folder / f"{name}.yaml").write_text(f"task: {name}\n{body}")
  return folder


TASKS = ["gptp_lambada", "gptp_piqa", "gptp_wikitext", "gptp_lambada_gen", "gptp_long_gen"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(task folder, fixture path, exported HF folder)."""
  pytest.importorskip("torch", reason="the parity check runs lm-eval's hf model: needs the [hf] extra")
  pytest.importorskip("transformers", reason="needs the [hf] extra")
  from gpt.export import export
  fixture = require_shared("fixtures", "openai-gpt2-tiny")
  tasks = _task_files(tmp_path_factory.mktemp("tasks"), require_shared("data"))
  hf = export(str(fixture), str(tmp_path_factory.mktemp("hf")), "hf")
  return tasks, fixture, hf


def _run(model: str, model_args: str, tasks: Path, num_fewshot: int) -> dict:
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, num_fewshot=num_fewshot,
                         batch_size=3, device="cpu", limit=LIMIT, log_samples=True,
                         bootstrap_iters=0, task_manager=TaskManager(include_path=str(tasks)))


def _responses(result: dict) -> dict[tuple[str, int], list]:
  """(task, doc_id) -> that document's raw responses, one per request."""
  return {(task, s["doc_id"]): [r[0] for r in s["resps"]]
          for task, samples in result["samples"].items() for s in samples}


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 1])
def test_every_request_matches_lm_eval_hf_model(setup, shots):
  tasks, fixture, hf = setup
  ours = _responses(_run("gpt", f"init={fixture},batch_size=3", tasks, shots))
  theirs = _responses(_run("hf", f"pretrained={hf},dtype=float32", tasks, shots))
  assert ours.keys() == theirs.keys() and len(ours) == LIMIT * len(TASKS)
  generated = []
  for key in sorted(ours):
    for mine, ref in zip(ours[key], theirs[key], strict=True):
      if key[0].endswith("_gen"):
        assert mine == ref, key
        generated.append(mine)
      elif key[0] == "gptp_wikitext":
        assert float(mine) == pytest.approx(float(ref), abs=2e-4), key
      else:
        assert float(mine[0]) == pytest.approx(float(ref[0]), abs=2e-4), key
        assert bool(mine[1]) == bool(ref[1]), key
  assert any(len(g) > 10 for g in generated) and any(g != generated[0] for g in generated)


@pytest.mark.slow
def test_command_line_runs_lm_eval_with_the_gpt_model(setup, tmp_path):
  tasks, fixture, _ = setup
  env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1")
  # `python -m gpt.harness` where torch and transformers look uninstalled: lm-eval runs without them.
  cmd = [sys.executable, "-c", NO_TORCH, "--model", "gpt", "--model_args",
         f"init={fixture},batch_size=2,max_gen_toks=8", "--tasks", "gptp_lambada_gen,gptp_piqa",
         "--include_path", str(tasks), "--limit", "3", "--output_path", str(tmp_path)]
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "torch imported: False" in done.stderr
  assert "gptp_piqa" in done.stdout and "exact_match" in done.stdout
  (result,) = tmp_path.rglob("results_*.json")
  assert json.loads(result.read_text())["results"]["gptp_piqa"]["acc,none"] is not None

  bad = subprocess.run(cmd[:6] + [f"init={fixture},beams=4"] + cmd[7:], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=600)
  assert bad.returncode == 2 and "error: unknown --model_args beams" in bad.stderr, bad.stderr[-2000:]


# Direct calls (no lm-eval run): grouping, truncation and generation arguments.

@pytest.fixture(scope="module")
def lm():
  return GPTLM(init=str(require_shared("fixtures", "openai-gpt2-tiny")), batch_size=3, max_gen_toks=8)


def _instance(kind, args):
  from lm_eval.api.instance import Instance
  return Instance(kind, {}, args, 0)


def test_loglikelihood_packs_shared_contexts_and_cuts_long_ones_like_hf(lm):
  from gpt.evals.base import TokenRequest
  long_context = "word " * 100  # > n_ctx = 64 tokens: cut from the left
  calls = [("The cat sat on the", " mat"), ("The cat sat on the", " hat and the dog"),
           (long_context, " end"), ("", "Hello there")]
  got = lm.loglikelihood([_instance("loglikelihood", c) for c in calls], disable_tqdm=True)
  tok = lm.gpt_tokenizer
  ctx, cont = tok.encode("The cat sat on the"), [tok.encode(" mat"), tok.encode(" hat and the dog")]
  packed = lm.scorer.score([TokenRequest(tuple(ctx), tuple(map(tuple, cont)))])[0]
  assert [g[0] for g in got[:2]] == pytest.approx([s.logprob for s in packed], abs=1e-4)
  ctx_ids, cont_ids = lm._encode_pair(long_context, " end")
  room = lm.n_ctx + 1 - len(cont_ids)
  assert len(ctx_ids) > room
  (alone,) = lm.scorer.score([TokenRequest(tuple(ctx_ids[-room:]), (tuple(cont_ids),))])[0]
  assert got[2][0] == pytest.approx(alone.logprob, abs=1e-4)
  (empty,) = lm.scorer.score([TokenRequest((tok.eot_id,), (tuple(tok.encode("Hello there")),))])[0]
  assert got[3] == (pytest.approx(empty.logprob, abs=1e-4), empty.greedy)


def test_generation_arguments(lm):
  prompt = "The meaning of life is"
  greedy = lm.generate_until([_instance("generate_until", (prompt, {"until": ["\n"]}))], True)
  assert greedy == lm.generate_until([_instance("generate_until", (prompt, {
      "until": ["\n"], "do_sample": True, "temperature": 1.0, "top_k": 1}))], True)
  sampled = lm.generate_until([_instance("generate_until", (prompt, {
      "until": [], "do_sample": True, "temperature": 1.5, "max_gen_toks": 6}))] * 2, True)
  assert sampled[0] != greedy[0] and all(s for s in sampled)
  with pytest.raises(GPTError, match="num_beams"):
    lm.generate_until([_instance("generate_until", (prompt, {"num_beams": 4}))], True)
  with pytest.raises(GPTError, match="max_gen_toks=64 leaves no room"):
    lm.generate_until([_instance("generate_until", (prompt, {"max_gen_toks": 64}))], True)


def test_benchmark_builds_every_request_type():
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_harness", REPO / "experiments" / "bench_harness.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  args = bench.parse_args(["--data_dir", str(require_shared("data")), "--loglikelihood", "4",
                           "--rolling", "2", "--generate", "3", "--max_gen_toks", "5"])
  reqs = bench.requests(args)
  assert {k: len(v) for k, v in reqs.items()} == {"loglikelihood": 8, "loglikelihood_rolling": 2,
                                                  "generate_until": 3}
  assert all(r.args[1]["max_gen_toks"] == 5 for r in reqs["generate_until"])
  assert all(r.args[1].startswith(" ") for r in reqs["loglikelihood"])
