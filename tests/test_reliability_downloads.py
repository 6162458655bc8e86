"""Downloads that look complete but are not (issue 11): each fault made for real by a loopback server.

The server sends an HTML page (with and without saying so), lies about the length, serves a damaged
file or states a checksum the body does not have; every case must end in one line, with no bad file
renamed into place and nothing good lost, and the next honest run must finish the folder.
"""

import base64
import hashlib
import shutil

import pytest

from gpt import data, download
from gpt.formats import tf_checkpoint
from gpt.errors import GPTError
from gpt.tokenizer import get_tokenizer
from http_fixture import FileServer
from test_tf_checkpoint import assert_matches_expected_logits

DATA = "model.ckpt.data-00000-of-00001"
LOGIN = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Proxy login</body></html>\n"


def _one_line(info) -> str:
  message = str(info.value)
  assert "\n" not in message and "Traceback" not in message
  return message


def _finish_and_load(www, models, openai_fixture):
  """An honest server completes the folder, which then loads with the fixture's logits."""
  with FileServer(www) as server:
    folder = download.download_model("124M", models, base_url=server.url)
  assert not list(folder.glob("*.part"))
  flat, hparams = tf_checkpoint.load_openai(folder)
  assert_matches_expected_logits(flat, hparams, openai_fixture)


def test_html_login_page_with_its_content_type_is_refused(www, openai_fixture, tmp_path):
  good = (www / "124M" / "hparams.json").read_bytes()
  (www / "124M" / "hparams.json").write_bytes(LOGIN)
  models = tmp_path / "models"
  html = {"/124M/hparams.json": {"Content-Type": "text/html; charset=utf-8"}}
  with FileServer(www, headers=html) as server:
    with pytest.raises(GPTError) as info:
      download.download_model("124M", models, base_url=server.url)
  message = _one_line(info)
  assert message.startswith(f"{server.url}/124M/hparams.json: the server sent an HTML page "
                            f"(Content-Type text/html), not hparams.json")
  assert "deleted the download; check the URL" in message
  folder = models / "124M"
  assert not (folder / "hparams.json").exists() and not list(folder.glob("*.part"))
  assert (folder / DATA).is_file()  # what was good stays
  (www / "124M" / "hparams.json").write_bytes(good)
  _finish_and_load(www, models, openai_fixture)


def test_html_without_a_content_type_is_recognised(www, tmp_path):
  """An index answered by an error page sent without a type: recognised by its first bytes."""
  (www / "124M" / "model.ckpt.index").write_bytes(b"\n  " + LOGIN)
  with FileServer(www) as server:
    with pytest.raises(GPTError, match=r"model.ckpt.index: the server sent an HTML page \(it starts "
                       r"like one\), not model.ckpt.index"):
      download.download_model("124M", tmp_path, base_url=server.url)
  folder = tmp_path / "124M"
  assert not (folder / "model.ckpt.index").exists() and not (folder / "hparams.json").exists()
  assert not list(folder.glob("*.part"))


def test_an_html_answer_leaves_an_earlier_part_as_it_was(www, tmp_path):
  """A resumable .part from an earlier run is not overwritten by a login page answered with 200."""
  folder = tmp_path / "124M"
  folder.mkdir()
  start = (www / "124M" / "checkpoint").read_bytes()[:10]
  (folder / "checkpoint.part").write_bytes(start)
  (www / "124M" / "checkpoint").write_bytes(LOGIN)
  with FileServer(www, ignore_range=True,
                  headers={"/124M/checkpoint": {"Content-Type": "text/html"}}) as server:
    with pytest.raises(GPTError, match=r"checkpoint: the server sent an HTML page .*deleted the download \(kept "
                       r"the earlier checkpoint.part\)"):
      download.download_model("124M", tmp_path, base_url=server.url)
  assert (folder / "checkpoint.part").read_bytes() == start


def test_content_length_shorter_than_the_data_file_is_caught_by_the_index(www, openai_fixture, tmp_path):
  """A proxy announces 1000 bytes less than the 3 MB data file: the body 'completes' short; the
  index's per-tensor extents and crc32c's then show it, and the short data file is deleted."""
  models = tmp_path / "models"
  with FileServer(www, extra_length={f"/124M/{DATA}": -1000}) as server:
    with pytest.raises(GPTError) as info:
      download.download_model("124M", models, base_url=server.url)
  message = _one_line(info)
  assert (f"the data file {DATA} does not match the index: it has 3245912 bytes but the index needs "
          f"3246912 (truncated?); deleted it too; deleted the download") in message
  folder = models / "124M"
  assert not (folder / DATA).exists() and not (folder / "model.ckpt.index").exists()
  assert not (folder / "hparams.json").exists()  # the folder is not taken for a checkpoint
  _finish_and_load(www, models, openai_fixture)


def test_a_flipped_byte_in_the_served_data_fails_its_crc(www, tmp_path):
  path = www / "124M" / DATA
  raw = bytearray(path.read_bytes())
  raw[123_456] ^= 0x01
  path.write_bytes(bytes(raw))
  with FileServer(www) as server:
    with pytest.raises(GPTError, match=r"does not match the index: tensor '.*' fails its crc32c "
                       r"checksum"):
      download.download_model("124M", tmp_path, base_url=server.url)
  assert not (tmp_path / "124M" / DATA).exists()


@pytest.mark.parametrize("name, expect", [
    ("encoder.json", r"encoder.json: it is not valid JSON \(.*truncated\?\); deleted the download"),
    ("vocab.bpe", r"vocab.bpe: it is not GPT-2's merges file \(49999 merges, 50000 expected"),
    ("hparams.json", r"hparams.json: it is not valid JSON"),
    ("checkpoint", r"checkpoint: it has no model_checkpoint_path line"),
])
def test_small_files_cut_short_by_a_lying_length_are_refused(www, tmp_path, name, expect):
  raw = (www / "124M" / name).read_bytes()
  # vocab.bpe loses exactly its last line (still well-formed); checkpoint arrives empty.
  cut = len(raw) if name == "checkpoint" else 10
  if name == "vocab.bpe":
    cut = len(raw.rstrip(b"\n").rsplit(b"\n", 1)[1]) + 1
  with FileServer(www, extra_length={f"/124M/{name}": -cut}) as server:
    with pytest.raises(GPTError, match=expect) as info:
      download.download_model("124M", tmp_path, base_url=server.url)
  _one_line(info)
  assert not (tmp_path / "124M" / name).exists() and not (tmp_path / "124M" / f"{name}.part").exists()


def test_a_vocabulary_that_is_not_gpt2s_is_refused(www, tmp_path):
  (www / "124M" / "encoder.json").write_text('{"a": 0, "b": 1}')
  with FileServer(www) as server:
    with pytest.raises(GPTError, match=r"encoder.json: it is not GPT-2's vocabulary \(2 entries, "
                       r"50257 expected"):
      download.download_model("124M", tmp_path, base_url=server.url)


def _b64(digest: bytes) -> str:
  return base64.b64encode(digest).decode()


def test_server_checksums_are_checked(www, openai_fixture, tmp_path):
  meta = www / "124M" / "model.ckpt.meta"
  good_md5 = _b64(hashlib.md5(meta.read_bytes()).digest())
  wrong = {"/124M/model.ckpt.meta": {"Content-MD5": _b64(hashlib.md5(b"other").digest())}}
  with FileServer(www, headers=wrong) as server:
    with pytest.raises(GPTError, match=r"model.ckpt.meta: its md5 is [0-9a-f]{32}, [0-9a-f]{32} "
                       r"expected \(corrupted or truncated\); deleted the download"):
      download.download_model("124M", tmp_path, base_url=server.url)
  assert not (tmp_path / "124M" / "model.ckpt.meta").exists()
  # The right checksum, stated by Azure's whole-blob header on a resumed (206) transfer.
  (tmp_path / "124M" / "model.ckpt.meta.part").write_bytes(meta.read_bytes()[:1000])
  right = {"/124M/model.ckpt.meta": {"x-ms-blob-content-md5": good_md5}}
  with FileServer(www, headers=right) as server:
    download.download_model("124M", tmp_path, base_url=server.url)
    assert server.requests_for("/124M/model.ckpt.meta") == [("bytes=1000-", 206)]
  assert (tmp_path / "124M" / "model.ckpt.meta").read_bytes() == meta.read_bytes()


def test_caller_sha256_size_and_validate_hook(tmp_path):
  """The hook other downloaders (eval task files) use: sha256=, size= and validate=."""
  www = tmp_path / "www"
  www.mkdir()
  body = b'{"question": "2+2?", "answer": "4"}\n{"question": "3+3?", "answer": "6"}\n'
  (www / "task.jsonl").write_bytes(body)
  seen = []

  def at_least_three_rows(path):
    seen.append(path.name)
    rows = path.read_text().splitlines()
    if len(rows) < 3:
      raise ValueError(f"{len(rows)} rows, at least 3 expected")

  with FileServer(www) as server:
    url = server.url + "/task.jsonl"
    with pytest.raises(GPTError, match=r"task.jsonl: its sha256 is [0-9a-f]{64}, 0{64} expected"):
      download.fetch(url, tmp_path / "a" / "task.jsonl", sha256="0" * 64)
    with pytest.raises(GPTError, match=rf"task.jsonl: it has {len(body)} bytes, 99 expected"):
      download.fetch(url, tmp_path / "a" / "task.jsonl", size=99)
    with pytest.raises(GPTError, match=r"task.jsonl: it is not a valid task.jsonl \(2 rows, at least 3 "
                       r"expected\); deleted the download"):
      download.fetch(url, tmp_path / "a" / "task.jsonl", validate=at_least_three_rows)
    assert seen == ["task.jsonl.part"] and not list((tmp_path / "a").iterdir())
    sha = hashlib.sha256(body).hexdigest()
    assert download.fetch(url, tmp_path / "a" / "task.jsonl", sha256=sha.upper(), size=len(body),
                          validate=lambda p: None)
    assert (tmp_path / "a" / "task.jsonl").read_bytes() == body
    assert not download.fetch(url, tmp_path / "a" / "task.jsonl")  # there: not fetched again
    # A .jsonl cut short mid-row fails the built-in JSON-lines check.
    (www / "cut.jsonl").write_bytes(body[:-10])
    with pytest.raises(GPTError, match=r"cut.jsonl: line 2 is not valid JSON"):
      download.fetch(server.url + "/cut.jsonl", tmp_path / "a" / "cut.jsonl")


def test_hugging_face_safetensors_cut_short_and_linked_etag(hf_fixture, tmp_path):
  served = tmp_path / "www" / "gpt2" / "resolve" / "main"
  served.mkdir(parents=True)
  for name in download.HF_FILES:
    shutil.copy(hf_fixture / name, served / name)
  path = "/gpt2/resolve/main/model.safetensors"
  models = tmp_path / "models"
  with FileServer(tmp_path / "www", extra_length={path: -4096}) as server:
    with pytest.raises(GPTError, match=r"model.safetensors: its header describes 3249480 bytes but the "
                       r"file has 3245384: truncated; deleted the download"):
      download.download_model("124M", models, source="hf", base_url=server.url)
  assert not (models / "gpt2" / "model.safetensors").exists()
  assert not (models / "gpt2" / "config.json").exists()  # comes last: the folder is not a model yet
  wrong = {path: {"X-Linked-Etag": '"' + "ab" * 32 + '"'}}
  with FileServer(tmp_path / "www", headers=wrong) as server:
    with pytest.raises(GPTError, match=r"its sha256 is [0-9a-f]{64}, (ab){32} expected"):
      download.download_model("124M", models, source="hf", base_url=server.url)
  sha = hashlib.sha256((served / "model.safetensors").read_bytes()).hexdigest()
  with FileServer(tmp_path / "www", headers={path: {"X-Linked-Etag": f'"{sha}"'}}) as server:
    folder = download.download_model("124M", models, source="hf", base_url=server.url)
  for name in download.HF_FILES:
    assert (folder / name).read_bytes() == (hf_fixture / name).read_bytes()


# ---------------------------------------------------------------- data.path=<URL>

TOK = get_tokenizer()


def _data_cfg(tmp_path):
  import types
  return types.SimpleNamespace(path="", val_path="", val_fraction=0.0, encoding="utf-8",
                               errors="strict", combine=50_000, cache_dir=str(tmp_path / "cache"),
                               tfds_split="train", tfds_val_split="", tfds_field="text",
                               tfds_data_dir="")


def test_two_urls_with_the_same_file_name_do_not_share_a_cache(tmp_path):
  for server_dir, text in (("a", "the first corpus\n"), ("b", "a different second corpus\n")):
    (tmp_path / "www" / server_dir).mkdir(parents=True)
    (tmp_path / "www" / server_dir / "corpus.txt").write_text(text)
  cfg = _data_cfg(tmp_path)
  with FileServer(tmp_path / "www") as server:
    first, _ = data.resolve_tokens(server.url + "/a/corpus.txt", TOK, cfg)
    second, _ = data.resolve_tokens(server.url + "/b/corpus.txt", TOK, cfg)
    data.resolve_tokens(server.url + "/a/corpus.txt", TOK, cfg)
    assert len(server.log) == 2  # each fetched once
  assert TOK.decode(first.tolist()) == "the first corpus\n"
  assert TOK.decode(second.tolist()) == "a different second corpus\n"


def test_a_dropped_connection_resumes_instead_of_a_traceback(tmp_path):
  text = "".join(f"line {i} of a corpus that arrives in pieces\n" for i in range(3000))
  (tmp_path / "www").mkdir()
  (tmp_path / "www" / "corpus.txt").write_text(text)
  with FileServer(tmp_path / "www", cuts={"/corpus.txt": [10_000, 20_000]}) as server:
    tokens, _ = data.resolve_tokens(server.url + "/corpus.txt", TOK, _data_cfg(tmp_path))
    assert server.requests_for("/corpus.txt") == [(None, 200), ("bytes=10000-", 206),
                                                  ("bytes=30000-", 206)]
  assert TOK.decode(tokens.tolist()) == text


def test_a_connection_that_keeps_dropping_is_one_line_and_resumes_next_run(tmp_path):
  text = "".join(f"line {i}\n" for i in range(5000))
  (tmp_path / "www").mkdir()
  (tmp_path / "www" / "corpus.txt").write_text(text)
  cfg = _data_cfg(tmp_path)
  with FileServer(tmp_path / "www", cuts={"/corpus.txt": [1000] * 4}) as server:
    with pytest.raises(GPTError, match=r"the connection kept dropping \(4000 of \d+ bytes after 4 "
                       r"tries\); run the same command again to resume") as info:
      data.resolve_tokens(server.url + "/corpus.txt", TOK, cfg)
    _one_line(info)
    tokens, _ = data.resolve_tokens(server.url + "/corpus.txt", TOK, cfg)
    assert server.requests_for("/corpus.txt")[-1] == ("bytes=4000-", 206)
  assert TOK.decode(tokens.tolist()) == text


def test_an_html_page_is_not_cached_or_trained_on(tmp_path):
  (tmp_path / "www").mkdir()
  (tmp_path / "www" / "corpus.txt").write_bytes(LOGIN)
  cfg = _data_cfg(tmp_path)
  with FileServer(tmp_path / "www", headers={"/corpus.txt": {"Content-Type": "text/html"}}) as server:
    with pytest.raises(GPTError, match=r"corpus.txt: the server sent an HTML page") as info:
      data.resolve_tokens(server.url + "/corpus.txt", TOK, cfg)
  _one_line(info)
  assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_damaged_token_file_url_is_not_cached(tmp_path):
  import numpy as np
  (tmp_path / "www").mkdir()
  np.savez(tmp_path / "www" / "tokens.npz", np.arange(500, dtype=np.uint16))
  raw = (tmp_path / "www" / "tokens.npz").read_bytes()
  (tmp_path / "www" / "cut.npz").write_bytes(raw[:len(raw) // 2])
  cfg = _data_cfg(tmp_path)
  with FileServer(tmp_path / "www") as server:
    with pytest.raises(GPTError, match=rf"^{server.url}/cut.npz: the download is not a readable .npz "
                       r"token file \(.*\): it is truncated, damaged or not an .npz; deleted it; check "
                       r"the URL$") as info:
      data.resolve_tokens(server.url + "/cut.npz", TOK, cfg)
    _one_line(info)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    tokens, _ = data.resolve_tokens(server.url + "/tokens.npz", TOK, cfg)
  assert tokens.tolist() == list(range(500))


def test_a_bad_file_saved_by_an_older_downloader_is_moved_aside_and_fetched_again(
    www, openai_fixture, tmp_path, capsys):
  folder = tmp_path / "models" / "124M"
  folder.mkdir(parents=True)
  for name in download.OPENAI_FILES:
    shutil.copy(openai_fixture / name, folder / name)
  (folder / "hparams.json").write_bytes(LOGIN)  # what the old downloader renamed into place
  with FileServer(www) as server:
    download.download_model("124M", tmp_path / "models", base_url=server.url)
    assert [path for path, _, _ in server.log] == ["/124M/hparams.json"]  # only the bad one
  assert capsys.readouterr().err.splitlines()[0] == (
      f"{folder / 'hparams.json'}: it is an HTML page; moved it to hparams.json.invalid and "
      f"downloading it again")
  assert (folder / "hparams.json.invalid").read_bytes() == LOGIN  # moved aside, not lost
  flat, hparams = tf_checkpoint.load_openai(folder)
  assert_matches_expected_logits(flat, hparams, openai_fixture)


@pytest.mark.parametrize("header, value", [
    ("Digest", "SHA-256={}"), ("Repr-Digest", "sha-256=:{}:"), ("Digest", "md5={}"),
])
def test_digest_headers(tmp_path, header, value):
  (tmp_path / "www").mkdir()
  body = b"some text file\n" * 100
  (tmp_path / "www" / "f.txt").write_bytes(body)
  algo = "md5" if value.startswith("md5") else "sha256"
  good = _b64(hashlib.new(algo, body).digest())
  bad = _b64(hashlib.new(algo, b"x").digest())
  with FileServer(tmp_path / "www", headers={"/f.txt": {header: value.format(bad)}}) as server:
    with pytest.raises(GPTError, match=rf"f.txt: its {algo} is [0-9a-f]+, [0-9a-f]+ expected"):
      download.fetch(server.url + "/f.txt", tmp_path / "out" / "f.txt")
  assert not (tmp_path / "out" / "f.txt").exists()
  with FileServer(tmp_path / "www", headers={"/f.txt": {header: value.format(good)}}) as server:
    assert download.fetch(server.url + "/f.txt", tmp_path / "out" / "f.txt")
  assert (tmp_path / "out" / "f.txt").read_bytes() == body
