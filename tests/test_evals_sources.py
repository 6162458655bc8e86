"""Task data fetched from a loopback server: mirror runs equal ../shared/data runs; bad downloads are
deleted and named in one line; offline lists every missing file; release zips; TFDS records."""

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import require_shared
from http_fixture import FileServer, closed_port_url
from gpt import evaluate, ranged_file
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.evals import TASKS, arithmetic, data_checks, fetch, get_task, scramble, sources, tfds_source

# Tasks that read task files (not `text`, which reads the user's file, nor the generated tasks).
FILE_TASKS = [name for name in TASKS
              if name != "text" and name not in {*arithmetic.NAMES, *scramble.NAMES}]


def copy_shared(shared: Path, dest: Path, *names: str) -> Path:
  for name in names:
    (dest / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared / "data" / name, dest / name)
  return dest


def replace_source(monkeypatch, path: str, **changes) -> None:
  monkeypatch.setitem(sources.SOURCES, path, dataclasses.replace(sources.SOURCES[path], **changes))


def eval_config(fixture, data_dir, **eval_settings):
  config = base_config()
  config.mode, config.init = "eval", str(fixture)
  e = config.eval
  e.shots, e.limit, e.batch_size, e.data_dir = "0,1", 2, 4, str(data_dir)
  for key, value in eval_settings.items():
    e[key] = value
  return config


def metrics_of(out: Path) -> dict:
  return {p.name: (r := json.loads(p.read_text()))["metrics"] | {"n": r["n_examples"]}
          for p in sorted(out.glob("*.json"))}


def test_default_data_dir_is_the_cache_and_env_moves_it(monkeypatch):
  monkeypatch.delenv("GPT_EVAL_DATA", raising=False)
  assert base_config().eval.data_dir == "data_cache/eval"
  monkeypatch.setenv("GPT_EVAL_DATA", "/data/evals")
  assert base_config().eval.data_dir == "/data/evals"


def test_every_file_task_has_sources_and_shared_files_pass_the_checks(shared_dir):
  for name in FILE_TASKS:
    forms = get_task(name).data_files()
    assert forms and all(f in sources.SOURCES for form in forms for f in form), name
    # Every file with an original release is reachable from a URL without a mirror.
    assert all(sources.SOURCES[f].url or sources.SOURCES[f].archive for f in forms[0]), name
  for path, source in sources.SOURCES.items():
    if (shared_dir / "data" / path).is_file():
      data_checks.verify(source, shared_dir / "data" / path)


def test_mirror_fills_an_empty_cache_and_results_equal_the_shared_folder(shared_dir, tmp_path):
  fixture = require_shared("fixtures", "openai-gpt2-tiny")
  settings = {"tasks": "hellaswag,winogrande", "shots": "1"}  # every task's data: the test below
  direct = tmp_path / "direct"
  evaluate.run(eval_config(fixture, shared_dir / "data", **settings), str(direct))
  cache = tmp_path / "cache"
  with FileServer(shared_dir / "data") as server:
    evaluate.run(eval_config(fixture, cache, mirror=server.url + "/", **settings), str(tmp_path / "m"))
    fetched = sorted(p for p, _, status in server.log if status == 200)
  assert metrics_of(direct / "eval") == metrics_of(tmp_path / "m" / "eval")
  # HellaSwag's official jsonl is not on this mirror (404): its text form was fetched instead.
  assert "/hellaswag/hellaswag_val.jsonl" not in fetched and "/hellaswag/hellaswag_val_full.txt.bz2" in fetched
  for path in fetched:
    assert (cache / path.lstrip("/")).read_bytes() == (shared_dir / "data" / path.lstrip("/")).read_bytes()
  assert not (cache / fetch.INCOMING).exists()


def test_every_task_loads_the_same_from_a_mirror(shared_dir, tmp_path):
  with FileServer(shared_dir / "data") as server:
    tasks = [get_task(n) for n in FILE_TASKS]
    fetch.ensure_tasks(tasks, tmp_path, server.url)
    n_requests = len(server.log)
    fetch.ensure_tasks(tasks, tmp_path, server.url)  # all present: nothing fetched again
    assert len(server.log) == n_requests
  for task in tasks:
    mirrored, direct = task.load(tmp_path), task.load(shared_dir / "data")
    assert mirrored.docs == direct.docs and mirrored.fewshot_pool == direct.fewshot_pool
    assert sorted(mirrored.files.values()) == sorted(direct.files.values())


@pytest.mark.parametrize("body, why", ids=["html", "cut-mid-line", "short", "other-file"], argvalues=[
    (b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n", "HTML"),
    (b'{"goal": "a", "sol1": "b", "sol2": "c"}\n' * 1837 + b'{"goal": "a", "so', "truncated"),
    (b'{"goal": "a", "sol1": "b", "sol2": "c"}\n' * 1000, "1000 records where the release has 1838"),
    (b'{"goal": "a", "sol1": "b", "sol2": "c"}\n' * 1838, "sha256"),
])
def test_a_bad_download_is_deleted_and_named_in_one_line(tmp_path, body, why):
  www = tmp_path / "www" / "piqa"
  www.mkdir(parents=True)
  (www / "valid.jsonl").write_bytes(body)
  cache = tmp_path / "cache"
  with FileServer(tmp_path / "www") as server, pytest.raises(GPTError) as err:
    fetch.ensure_tasks([get_task("piqa")], cache, server.url)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"{server.url}/piqa/valid.jsonl: ")
  assert why in message and "deleted" in message
  assert message.endswith("; for task 'piqa' pass --config.eval.data_dir=<folder holding piqa/> or "
                          "--config.eval.mirror=<base URL of a copy of that folder>")
  assert [p for p in cache.rglob("*") if p.is_file()] == []  # neither the file nor its download


def test_offline_lists_every_missing_file_with_both_ways_out(monkeypatch, tmp_path):
  dead = closed_port_url()
  for path in ("lambada/lambada_test.jsonl", "piqa/valid.jsonl", "piqa/valid-labels.lst"):
    replace_source(monkeypatch, path, url=f"{dead}/{path}")
  with pytest.raises(GPTError) as err:
    fetch.ensure_tasks([get_task("lambada"), get_task("piqa")], tmp_path)
  lines = str(err.value).splitlines()
  assert lines[0].startswith("task data missing and its source unreachable")
  assert len(lines) == 4
  for line, path in zip(lines[1:], ("lambada/lambada_test.jsonl", "piqa/valid.jsonl",
                                     "piqa/valid-labels.lst")):
    assert line.strip().startswith(f"cannot download {dead}/{path} (")
    assert f"--config.eval.data_dir=<folder holding {path.split('/')[0]}/>" in line
    assert "--config.eval.mirror=" in line


def test_offline_in_the_eval_mode_is_an_error_line_before_the_model_loads(tmp_path):
  dead = closed_port_url()
  config = eval_config("/nonexistent/model", tmp_path / "cache", tasks="lambada", mirror=dead)
  with pytest.raises(GPTError, match=f"cannot download {dead}/lambada/lambada_test.jsonl"):
    evaluate.run(config, str(tmp_path / "run"))


def test_original_hosts_files_and_release_zips(shared_dir, monkeypatch, tmp_path):
  """No mirror: a plain file and two members of a release zip, checked, the zip deleted after."""
  www = tmp_path / "www"
  copy_shared(shared_dir, www, "lambada/lambada_test.jsonl")
  with zipfile.ZipFile(www / "winogrande_1.1.zip", "w") as z:
    for name in ("dev.jsonl", "train_s.jsonl", "dev-labels.lst"):
      z.write(shared_dir / "data" / "winogrande" / name, f"winogrande_1.1/{name}")
  zip_sha = hashlib.sha256((www / "winogrande_1.1.zip").read_bytes()).hexdigest()
  cache = tmp_path / "cache"
  with FileServer(www) as server:
    replace_source(monkeypatch, "lambada/lambada_test.jsonl", url=f"{server.url}/lambada/lambada_test.jsonl")
    archive = sources.Archive(f"{server.url}/winogrande_1.1.zip", zip_sha)
    for path in get_task("winogrande").data_files()[0]:
      replace_source(monkeypatch, path, archive=archive)
    fetch.ensure_tasks([get_task("lambada"), get_task("winogrande")], cache)
    assert [p for p, _, _ in server.log].count("/winogrande_1.1.zip") == 1  # one download, two members
  for task in ("lambada", "winogrande"):
    assert get_task(task).load(cache).docs == get_task(task).load(shared_dir / "data").docs
  assert not (cache / fetch.ARCHIVE_DIR).exists()

  # A zip that is not the pinned one is deleted and named.
  (cache / "winogrande" / "dev.jsonl").unlink()
  with FileServer(www) as server:
    replace_source(monkeypatch, "winogrande/dev.jsonl",
                   archive=sources.Archive(f"{server.url}/winogrande_1.1.zip", "0" * 64))
    with pytest.raises(GPTError, match=r"winogrande_1.1.zip: sha256 .* deleted"):
      fetch.ensure_tasks([get_task("winogrande")], cache)
  assert not (cache / fetch.ARCHIVE_DIR).exists()


def test_hellaswag_official_jsonl_is_fetched_first_and_read(shared_dir, monkeypatch, tmp_path):
  """Without a mirror the official validation jsonl is the file fetched; its records are read with
  lm-eval's preprocessing (ctx_b capitalised), otherwise the same items as the text form."""
  rows = [{"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
           "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
           "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
           "source_id": "activitynet~v_-JhWjGDPHMY", "label": 3}] * 3
  body = "".join(json.dumps(r) + "\n" for r in rows).encode()
  www = tmp_path / "www" / "hellaswag"
  www.mkdir(parents=True)
  (www / "hellaswag_val.jsonl").write_bytes(body)
  with FileServer(tmp_path / "www") as server:
    replace_source(monkeypatch, "hellaswag/hellaswag_val.jsonl", url=f"{server.url}/hellaswag/hellaswag_val.jsonl",
                   records=3, sha256=hashlib.sha256(body).hexdigest())
    fetch.ensure_tasks([get_task("hellaswag")], tmp_path / "cache")
  docs = get_task("hellaswag").load(tmp_path / "cache").docs
  assert docs[0].query == "Roof shingle removal: A man is sitting on a roof. He"
  assert docs[0].choices[3] == "starts pulling up roofing on a roof." and docs[0].gold == 3


# ---- eval.source=tfds ----

def build_tfds(tfds, root: Path, cls_name: str, features: dict, splits: dict) -> str:
  """Prepares a tiny TFDS dataset (array_record) under `root`; returns its registered name."""
  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(rows) for name, rows in splits.items()}

  def _generate_examples(self, rows):
    for i, row in enumerate(rows):
      yield i, row

  builder = type(cls_name, (tfds.core.GeneratorBasedBuilder,), {
      "VERSION": tfds.core.Version("1.0.0"), "_info": _info,
      "_split_generators": _split_generators, "_generate_examples": _generate_examples})
  builder(data_dir=str(root), file_format="array_record").download_and_prepare()
  return builder.name


def tfds_datasets(tfds, root: Path) -> dict[str, tuple[str, str, str | None]]:
  """Tiny copies of TFDS's hellaswag/piqa/ai2_arc/winogrande/bool_q/glue sst2, with their features."""
  T, C = tfds.features.Text(), tfds.features.ClassLabel
  import numpy as np
  arc_q = [{"id": f"q{i}", "question": f"Which one is {i}?", "answerKey": i % 4,
            "choices": {"text": [f"c{i}{j}" for j in range(4)], "label": [0, 1, 2, 3]}} for i in range(5)]
  wino = [{"sentence": f"Tom {i} gave it to _ because.", "option1": "Ann", "option2": "Bob", "label": i % 2}
          for i in range(4)]
  return {
      "hellaswag": (build_tfds(tfds, root, "TinyHellaswag", {
          "context": T, "endings": tfds.features.Sequence(T), "activity_label": T, "label": np.int32,
          "split_type": T, "source_id": T}, {"validation": [
              {"context": f"A man [title] sits {i}. he", "endings": [f"e{j}" for j in range(4)],
               "activity_label": "Roofing", "label": i % 4, "split_type": "indomain", "source_id": "x"}
              for i in range(3)]}), "validation", None),
      "piqa": (build_tfds(tfds, root, "TinyPiqa", {
          "id": T, "goal": T, "sol1": T, "sol2": T, "label": C(num_classes=2)}, {"validation": [
              {"id": str(i), "goal": f"goal {i}", "sol1": "one", "sol2": "two", "label": i % 2}
              for i in range(3)]}), "validation", None),
      "arc_easy": (build_tfds(tfds, root, "TinyArc", {
          "id": T, "question": T, "answerKey": C(names=list("ABCDE")),
          "choices": tfds.features.Sequence({"text": T, "label": C(names=list("ABCDE"))})},
          {"test": arc_q[:3], "train": arc_q[3:]}), "test", "train"),
      "winogrande": (build_tfds(tfds, root, "TinyWinogrande", {
          "sentence": T, "option1": T, "option2": T, "label": C(names=["1", "2"])},
          {"validation": wino[:2], "train_s": wino[2:]}), "validation", "train_s"),
      "boolq": (build_tfds(tfds, root, "TinyBoolq", {
          "question": T, "passage": T, "answer": np.bool_, "title": T}, {"validation": [
              {"question": f"is it {i}", "passage": f"passage {i}", "answer": bool(i % 2), "title": "t"}
              for i in range(3)]}), "validation", None),
      "sst2": (build_tfds(tfds, root, "TinySst2", {
          "sentence": T, "label": C(names=["negative", "positive"]), "idx": np.int32},
          {"validation": [{"sentence": f"it 's fine {i} . ", "label": i % 2, "idx": i} for i in range(3)],
           "train": [{"sentence": "bad .", "label": 0, "idx": 0}]}), "validation", "train"),
  }


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """(TFDS data_dir, task -> TFDS_TASKS entry) of the tiny datasets, built once (TFDS registers a
  builder class by name, once per process)."""
  tfds = pytest.importorskip("tensorflow_datasets", reason="eval.source=tfds needs the [tfds] extra")
  root = tmp_path_factory.mktemp("tfds")
  return str(root), tfds_datasets(tfds, root)


def test_tfds_source_reads_the_same_items_as_the_files(monkeypatch, tiny_tfds):
  root, entries = tiny_tfds
  for task, entry in entries.items():
    monkeypatch.setitem(tfds_source.TFDS_TASKS, task, entry)
  docs = {t: tfds_source.load_tfds(get_task(t), root) for t in tfds_source.TFDS_TASKS if t != "arc_challenge"}
  sort = lambda items: sorted(items, key=repr)  # noqa: E731  (TFDS stores records shuffled)
  hs = sort(docs["hellaswag"].docs)
  assert hs[0].query == "Roofing: A man. sits 0. he" and hs[0].choices == ("e0", "e1", "e2", "e3")
  piqa = sort(docs["piqa"].docs)
  assert piqa[1] == get_task("piqa").to_doc({"goal": "goal 1", "sol1": "one", "sol2": "two"}, 1)
  arc = docs["arc_easy"]
  assert sort(arc.docs)[2].query == "Question: Which one is 2?\nAnswer:" and sort(arc.docs)[2].gold == 2
  assert len(arc.fewshot_pool) == 2 and arc.fewshot_source == "tfds train"
  wino = sort(docs["winogrande"].docs)
  assert [d.gold for d in wino] == [0, 1] and wino[0].options == ("Ann", "Bob")
  assert sorted(d.label for d in docs["boolq"].docs) == [0, 0, 1]
  assert sort(docs["sst2"].docs)[0]["sentence"] == "it 's fine 0 ."
  assert all(len(sha) == 64 for d in docs.values() for sha in d.files.values())


def test_tfds_errors_are_one_line(monkeypatch, tmp_path):
  pytest.importorskip("tensorflow_datasets", reason="eval.source=tfds needs the [tfds] extra")
  monkeypatch.setitem(tfds_source.TFDS_TASKS, "piqa", ("no_such_tiny_dataset", "validation", None))
  with pytest.raises(GPTError, match="cannot open TFDS dataset 'no_such_tiny_dataset'") as err:
    tfds_source.load_tfds(get_task("piqa"), str(tmp_path))
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("ranges", [True, False], ids=["range-requests", "server-ignores-range"])
def test_arc_members_are_read_out_of_the_release_zip(shared_dir, monkeypatch, tmp_path, ranges):
  """ARC's release is a 680 MB zip, nearly all corpus: with Range requests only the end record, the
  directory and the two members are read; a server without ranges gets the zip downloaded."""
  www = tmp_path / "www"
  www.mkdir()
  zip_path = www / "ARC-V1-Feb2018.zip"
  with zipfile.ZipFile(zip_path, "w") as z:
    z.writestr("ARC-V1-Feb2018-2/ARC_Corpus.txt", os.urandom(3 << 20))  # stands for the corpus
    for split in ("Test", "Train", "Dev"):
      name = f"ARC-Challenge-{split}.jsonl"
      z.write(shared_dir / "data" / "arc" / name, f"ARC-V1-Feb2018-2/ARC-Challenge/{name}",
              compress_type=zipfile.ZIP_DEFLATED)
  with FileServer(www, ignore_range=not ranges) as server:
    archive = sources.Archive(f"{server.url}/ARC-V1-Feb2018.zip",
                              hashlib.sha256(zip_path.read_bytes()).hexdigest(), ranged=True)
    monkeypatch.setattr(ranged_file.RangedFile, "BLOCK", 1 << 16)
    for path in get_task("arc_challenge").data_files()[0]:
      replace_source(monkeypatch, path, archive=archive)
    fetch.ensure_tasks([get_task("arc_challenge")], tmp_path / "cache")
    requests = server.requests_for("/ARC-V1-Feb2018.zip")
  for name in ("ARC-Challenge-Test.jsonl", "ARC-Challenge-Train.jsonl"):
    assert (tmp_path / "cache/arc" / name).read_bytes() == (shared_dir / "data/arc" / name).read_bytes()
  if ranges:
    assert all(status == 206 for _, status in requests)
    assert len(requests) < 20  # a few 64 KiB blocks, not the 3 MiB corpus
  else:
    assert requests[-1] == (None, 200)  # the whole zip, through gpt.download.fetch
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["arc"]  # no zip, no staging


def test_tfds_source_in_the_eval_mode_reads_tfds_tasks_and_files_for_the_rest(shared_dir, monkeypatch,
                                                                                tiny_tfds):
  root, entries = tiny_tfds
  monkeypatch.setitem(tfds_source.TFDS_TASKS, "piqa", entries["piqa"])
  e = base_config().eval
  e.source, e.tfds_data_dir, e.data_dir = "tfds", root, str(shared_dir / "data")
  load = evaluate.task_data_loader(e, [get_task("piqa"), get_task("lambada")])
  assert list(load(get_task("piqa")).files) == [f"tfds:{tfds_source.TFDS_TASKS['piqa'][0]}/validation"]
  assert len(load(get_task("lambada")).docs) == 5153
  e.source = "hub"
  with pytest.raises(GPTError, match="eval.source='hub': choose files or tfds"):
    evaluate.task_data_loader(e, [])


def test_readme_task_table_names_every_source(repo_dir):
  readme = (repo_dir / "README.md").read_text(encoding="utf-8")
  for source in sources.SOURCES.values():
    assert (source.archive.url if source.archive else source.url or source.path) in readme, source.path
    if source.sha256:
      assert source.sha256[:8] in readme or source.archive, source.path


def test_a_form_with_one_file_present_fetches_only_the_other(shared_dir, tmp_path):
  cache = copy_shared(shared_dir, tmp_path / "cache", "piqa/valid.jsonl")
  (cache / "piqa/valid.jsonl").write_bytes(b"mine\n")  # the user's file is never replaced
  with FileServer(shared_dir / "data") as server:
    fetch.ensure_tasks([get_task("piqa")], cache, server.url)
    assert [p for p, _, _ in server.log] == ["/piqa/valid-labels.lst"]
  assert (cache / "piqa/valid.jsonl").read_bytes() == b"mine\n"


def test_command_line_fills_a_data_dir(shared_dir, tmp_path, capsys):
  with FileServer(shared_dir / "data") as server:
    assert sources.main(["piqa", "sst2", f"--data_dir={tmp_path}", f"--mirror={server.url}"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "piqa: piqa/valid.jsonl, piqa/valid-labels.lst",
      "sst2: sst2/stsa.binary.dev, sst2/stsa.binary.train"]
  assert sources.main(["nope", f"--data_dir={tmp_path}"]) == 2
  assert capsys.readouterr().err.startswith("error: unknown eval task 'nope'")


def test_boolq_falls_back_to_superglue_when_googles_bucket_refuses(shared_dir, monkeypatch, tmp_path):
  """Google's bucket answers 404/403 here: SuperGLUE's BoolQ.zip is fetched and its val.jsonl read
  (passages led by their title, `label` for `answer`), the same items and answers."""
  rows = [json.loads(l) for l in (shared_dir / "data/boolq/dev.jsonl").read_text().splitlines()]
  www = tmp_path / "www"
  www.mkdir()
  with zipfile.ZipFile(www / "BoolQ.zip", "w") as z:
    z.writestr("BoolQ/val.jsonl", "".join(json.dumps(
        {"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i,
         "label": r["answer"]}) + "\n" for i, r in enumerate(rows)))
  with FileServer(www) as server:
    replace_source(monkeypatch, "boolq/dev.jsonl", url=f"{server.url}/boolq/dev.jsonl")
    replace_source(monkeypatch, "boolq/val.jsonl", archive=sources.Archive(f"{server.url}/BoolQ.zip"))
    fetch.ensure_tasks([get_task("boolq")], tmp_path / "cache")
  assert sorted(p.name for p in (tmp_path / "cache/boolq").iterdir()) == ["val.jsonl"]
  docs = get_task("boolq").load(tmp_path / "cache").docs
  assert [d.label for d in docs] == [int(r["answer"]) for r in rows]
  assert docs[0]["passage"] == f"{rows[0]['title']} -- {rows[0]['passage']}"


def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path):
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(GPTError) as err:
    fetch.ensure_tasks([get_task("lambada")], tmp_path / "file", closed_port_url())
  assert str(err.value).startswith(f"cannot create {tmp_path / 'file'}")
  assert str(err.value).endswith("set --config.eval.data_dir to a writable folder")
