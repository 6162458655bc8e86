"""The downloader against a loopback HTTP server serving the tiny OpenAI/HF fixtures."""

import shutil

import pytest

from gpt import download
from gpt.formats import tf_checkpoint
from gpt.errors import GPTError
from http_fixture import FileServer, closed_port_url
from test_tf_checkpoint import assert_matches_expected_logits

DATA = "model.ckpt.data-00000-of-00001"
DATA_PATH = f"/124M/{DATA}"


def _same_files(folder, reference, names):
  for name in names:
    assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
  assert not list(folder.glob("*.part"))


def test_download_loads_and_gives_the_fixture_logits(www, openai_fixture, tmp_path):
  with FileServer(www) as server:
    folder = download.download_model("117M", tmp_path / "models", base_url=server.url)
  assert folder == tmp_path / "models" / "124M"
  assert sorted(p.name for p in folder.iterdir()) == sorted(download.OPENAI_FILES)
  _same_files(folder, openai_fixture, download.OPENAI_FILES)
  assert {status for _, _, status in server.log} == {200}
  flat, hparams = tf_checkpoint.load_openai(folder)
  assert_matches_expected_logits(flat, hparams, openai_fixture)


def test_resume_after_a_cut_connection(www, openai_fixture, tmp_path):
  models = tmp_path / "models"
  cut = 1_000_000
  with FileServer(www, cuts={DATA_PATH: [cut]}) as server:
    with pytest.raises(GPTError, match=rf"connection kept dropping \({cut} of 3246912 bytes after 1 "
                       r"tries\); run the same command again to resume"):
      download.download_model("124M", models, base_url=server.url, retries=0)
    part = models / "124M" / f"{DATA}.part"
    assert part.stat().st_size == cut and not (models / "124M" / DATA).exists()
    # The marker files come after the data, so the half-done folder is not taken for a checkpoint.
    assert not (models / "124M" / "hparams.json").exists()
    download.download_model("124M", models, base_url=server.url, retries=0)
    assert server.requests_for(DATA_PATH) == [(None, 200), (f"bytes={cut}-", 206)]
    assert len(server.requests_for("/124M/checkpoint")) == 1  # complete files are not fetched again
    _same_files(models / "124M", openai_fixture, download.OPENAI_FILES)
    n = len(server.log)
    download.download_model("124M", models, base_url=server.url)
    assert len(server.log) == n  # everything is there: no request at all


def test_retries_resume_within_one_run(www, openai_fixture, tmp_path):
  with FileServer(www, cuts={DATA_PATH: [1000, 5000]}) as server:
    folder = download.download_model("124M", tmp_path, base_url=server.url, retries=2)
  assert server.requests_for(DATA_PATH) == [(None, 200), ("bytes=1000-", 206), ("bytes=6000-", 206)]
  _same_files(folder, openai_fixture, download.OPENAI_FILES)


def test_server_ignoring_range_restarts_from_zero(www, openai_fixture, tmp_path):
  (tmp_path / "124M").mkdir()
  (tmp_path / "124M" / f"{DATA}.part").write_bytes(b"x" * 100)
  with FileServer(www, ignore_range=True) as server:
    folder = download.download_model("124M", tmp_path, base_url=server.url)
  assert server.requests_for(DATA_PATH) == [("bytes=100-", 200)]
  _same_files(folder, openai_fixture, download.OPENAI_FILES)


def test_stale_part_longer_than_the_file_is_discarded(www, openai_fixture, tmp_path):
  (tmp_path / "124M").mkdir()
  (tmp_path / "124M" / "hparams.json.part").write_bytes(b"x" * 1000)
  with FileServer(www) as server:
    folder = download.download_model("124M", tmp_path, base_url=server.url)
  assert server.requests_for("/124M/hparams.json") == [("bytes=1000-", 416), (None, 200)]
  _same_files(folder, openai_fixture, download.OPENAI_FILES)


def test_size_mismatch_is_detected(www, tmp_path):
  # The server announces 10 bytes more than it sends, then (asked to resume) says the file is whole.
  with FileServer(www, extra_length={"/124M/encoder.json": 10}) as server:
    with pytest.raises(GPTError, match=r"encoder.json: the server first announced 1042311 bytes, then "
                       r"1042301; the file changed or a proxy is truncating it"):
      download.download_model("124M", tmp_path, base_url=server.url)
  assert not (tmp_path / "124M" / "encoder.json").exists()


def test_offline_is_one_clear_line(tmp_path):
  url = closed_port_url()
  with pytest.raises(GPTError) as info:
    download.download_model("124M", tmp_path, base_url=url)
  message = str(info.value)
  assert message.startswith(f"cannot reach {url}/124M/checkpoint (offline?): ")
  assert message.endswith("download the folder elsewhere and pass --config.init=/path/to/folder")
  assert "\n" not in message


def test_http_error(www, tmp_path):
  with FileServer(www) as server:
    with pytest.raises(GPTError, match=rf"^{server.url}/355M/checkpoint: HTTP 404 Not Found$"):
      download.download_model("345M", tmp_path, base_url=server.url)


def test_hugging_face_source(hf_fixture, tmp_path):
  served = tmp_path / "www" / "gpt2-medium" / "resolve" / "main"
  served.mkdir(parents=True)
  for name in download.HF_FILES:
    shutil.copy(hf_fixture / name, served / name)
  with FileServer(tmp_path / "www") as server:
    folder = download.download_model("345M", tmp_path / "models", source="hf", base_url=server.url)
  assert folder == tmp_path / "models" / "gpt2-medium"
  _same_files(folder, hf_fixture, download.HF_FILES)


def test_command_line(www, tmp_path, capsys):
  with FileServer(www) as server:
    assert download.main(["124M", "--models_dir", str(tmp_path), "--base_url", server.url]) == 0
  assert capsys.readouterr().out.strip() == f"124M: {tmp_path / '124M'}"
  assert download.main(["999M", "--models_dir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith("error: unknown GPT-2 model name '999M'")
  assert download.main(["124M", "--source", "hf", "--base_url", closed_port_url(),
                        "--models_dir", str(tmp_path)]) == 2
  assert "(offline?)" in capsys.readouterr().err
