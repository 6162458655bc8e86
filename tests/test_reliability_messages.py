"""Tracebacks where one line belongs (issue 11): damaged token files, HF folders that are not what
they say, unusable sweep values, task text that UTF-8 cannot write, and a misspelled config key.

Each fault is made for real (files truncated or replaced on disk, a pickle torch refuses, a real
ml_collections lookup error) and must end in one GPTError line; result files are never half written.
"""

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
import types
import zipfile

import numpy as np
import pytest

from conftest import REPO
from gpt import encode, evaluate, hf_checkpoint
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.evals.base import Truncation
from gpt.evals.runner import TaskResult
from gpt.config import unknown_key_message

sys.path.insert(0, str(REPO))
from experiments.sweep import run_sweep  # noqa: E402
from experiments.engines import make_engine  # noqa: E402
from experiments.sweep_spec import build_points, load_sweep  # noqa: E402


def _one_line(info) -> str:
  message = str(info.value)
  assert "\n" not in message and "Traceback" not in message
  return message


# ---------------------------------------------------------------- token files

@pytest.fixture
def npz(tmp_path):
  path = tmp_path / "tokens.npz"
  encode.write_tokens([encode.Piece(np.arange(5000, dtype=np.uint16) % 50257, chunk_end=True)] * 3,
                      path, eot_id=50256)
  return path


def test_truncated_npz(npz):
  raw = npz.read_bytes()
  npz.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(GPTError) as info:
    encode.load_token_file(npz, 50256)
  assert _one_line(info).startswith(f"{npz} is not a readable .npz token file (")
  assert str(info.value).endswith("it is truncated, damaged or not an .npz; encode the text again "
                                  "with python -m gpt.encode")


def test_npz_with_a_damaged_member(npz):
  """The zip directory is intact but a compressed member's bytes are not (a flipped run of bytes)."""
  with zipfile.ZipFile(npz) as z:
    info = z.infolist()[1]
  raw = bytearray(npz.read_bytes())
  start = info.header_offset + 30 + len(info.filename) + 20
  raw[start:start + 64] = bytes(64)
  npz.write_bytes(bytes(raw))
  with pytest.raises(GPTError, match=r"is not a readable .npz token file") as e:
    encode.load_token_file(npz, 50256)
  _one_line(e)


def test_npz_that_is_not_a_zip(tmp_path):
  path = tmp_path / "tokens.npz"
  path.write_text("just some text, not numpy's zip\n")
  with pytest.raises(GPTError, match=r"tokens.npz is not a readable .npz token file \(.*\): it is "
                     r"truncated, damaged or not an .npz") as info:
    encode.load_token_file(path, 50256)
  _one_line(info)


def test_npz_holding_a_pickle_is_refused_not_unpickled(tmp_path):
  path = tmp_path / "tokens.npz"
  np.savez(path, np.array([{"a": 1}], dtype=object))
  with pytest.raises(GPTError, match=r"is not a readable .npz token file \(Object arrays cannot be "
                     r"loaded when allow_pickle=False\)"):
    encode.load_token_file(path, 50256)


def test_bin_that_is_not_a_whole_number_of_tokens(tmp_path):
  path = tmp_path / "tokens.bin"
  encode.write_tokens([encode.Piece(np.arange(1000, dtype=np.uint16))], path, eot_id=50256)
  with open(path, "ab") as f:
    f.write(b"\x01")
  with pytest.raises(GPTError) as info:
    encode.load_token_file(path, 50256)
  assert _one_line(info) == (f"{path} has 2001 bytes, not a whole number of 2-byte uint16 tokens: it "
                             f"is truncated or its .json sidecar names the wrong dtype; encode the "
                             f"text again with python -m gpt.encode")


def test_unreadable_bin_sidecar(tmp_path):
  path = tmp_path / "tokens.bin"
  encode.write_tokens([encode.Piece(np.arange(10, dtype=np.uint16))], path, eot_id=50256)
  (tmp_path / "tokens.bin.json").write_text('{"dtype": "uint1')
  with pytest.raises(GPTError, match=r"tokens.bin.json \(the dtype of tokens.bin\) is unreadable "
                     r"\(JSONDecodeError"):
    encode.load_token_file(path, 50256)


# ---------------------------------------------------------------- Hugging Face folders

@pytest.fixture
def hf_copy(hf_fixture, tmp_path):
  folder = tmp_path / "hf"
  shutil.copytree(hf_fixture, folder)
  return folder


@pytest.mark.parametrize("key", ["n_embd", "vocab_size", "n_layer"])
def test_hf_config_missing_a_key(hf_copy, key):
  config = json.loads((hf_copy / "config.json").read_text())
  del config[key]
  (hf_copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(GPTError) as info:
    hf_checkpoint.load_hf(hf_copy)
  assert _one_line(info) == (f"{hf_copy / 'config.json'} has no integer {key}: it is not a GPT-2 "
                             f"config.json (or it is damaged); download it again")


def test_hf_config_that_is_not_an_object(hf_copy):
  (hf_copy / "config.json").write_text("[1, 2]")
  with pytest.raises(GPTError, match=r"config.json is not a JSON object"):
    hf_checkpoint.load_hf(hf_copy)


class _RunsCode:
  """Unpickling this calls a function: what weights_only=True exists to refuse."""

  def __reduce__(self):
    return (print, ("this ran while loading",))


def _bin_folder(hf_copy, state):
  torch = pytest.importorskip("torch")
  for shard in hf_copy.glob("*.safetensors"):
    shard.unlink()
  torch.save(state, hf_copy / "pytorch_model.bin")
  return torch


def test_pytorch_model_bin_refused_by_weights_only_says_so_and_why(hf_copy, capsys):
  torch = pytest.importorskip("torch")
  _bin_folder(hf_copy, {"transformer.wte.weight": torch.zeros(2, 2), "extra": _RunsCode()})
  with pytest.raises(GPTError) as info:
    hf_checkpoint.load_hf(hf_copy)
  message = _one_line(info)
  assert message.startswith(f"{hf_copy / 'pytorch_model.bin'} was refused: loading it with "
                            f"weights_only=True found Python objects besides tensors, which can run "
                            f"code when unpickled (")
  assert "print" in message  # names what it refused
  assert message.endswith("if you trust its source, convert it to model.safetensors with transformers")
  assert "this ran" not in capsys.readouterr().out


def test_truncated_pytorch_model_bin(hf_copy):
  torch = pytest.importorskip("torch")
  _bin_folder(hf_copy, {"transformer.wte.weight": torch.zeros(64, 64)})
  path = hf_copy / "pytorch_model.bin"
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(GPTError, match=r"pytorch_model.bin is not a readable PyTorch checkpoint \(.*\); "
                     r"download it again") as info:
    hf_checkpoint.load_hf(hf_copy)
  _one_line(info)


def test_pytorch_model_bin_of_plain_tensors_still_loads(hf_copy, hf_fixture):
  torch = pytest.importorskip("torch")
  flat_ref, hparams_ref = hf_checkpoint.load_hf(hf_fixture)
  from safetensors.numpy import load_file
  tensors = load_file(str(hf_fixture / "model.safetensors"))
  _bin_folder(hf_copy, {k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
  flat, hparams = hf_checkpoint.load_hf(hf_copy)
  assert hparams == hparams_ref and flat.keys() == flat_ref.keys()
  assert all(np.array_equal(flat[k], flat_ref[k]) for k in flat)


# ---------------------------------------------------------------- sweep values

def _sweep_file(tmp_path, value_literal: str):
  path = tmp_path / "bad_sweep.py"
  path.write_text(textwrap.dedent(f"""
      base = "configs/tiny.py"
      program = ["{{python}}", "-c", "import sys; open(sys.argv[-1].split('=', 1)[1], 'w')"]
      product = {{"data.path": ["ok.txt", {value_literal}]}}
  """))
  return path


@pytest.mark.parametrize("literal, kind", [
    ('"corpus\\x00.txt"', "a NUL byte at character 6"),
    ('"corpus\\udc80.txt"', r"a lone surrogate \\udc80 at character 6"),
])
def test_unusable_characters_in_a_sweep_value_are_refused_before_anything_runs(
    tmp_path, monkeypatch, literal, kind):
  monkeypatch.chdir(REPO)
  sweep_file = _sweep_file(tmp_path, literal)
  with pytest.raises(GPTError, match=rf"^data.path='corpus.*\.txt' holds {kind}, which cannot be "
                     r"passed to a process; fix the value in the sweep file or --set$") as info:
    build_points(load_sweep(str(sweep_file)), str(tmp_path / "runs"))
  _one_line(info)
  engine = make_engine("local", parallel=1, devices="none")
  with pytest.raises(GPTError, match=kind):
    run_sweep(str(sweep_file), str(tmp_path / "runs"), engine)
  assert not (tmp_path / "runs").exists()  # refused before any point was set up or run


def test_unusable_characters_in_set_and_env(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  sweep_file = _sweep_file(tmp_path, '"b.txt"')
  with pytest.raises(GPTError, match=r"^init='a\\x00b' holds a NUL byte"):
    build_points(load_sweep(str(sweep_file), {"init": "a\x00b"}), str(tmp_path / "runs"))
  sweep_file.write_text(sweep_file.read_text() + 'env = {"TOKEN": "a\\x00b"}\n')
  with pytest.raises(GPTError, match=r"^env TOKEN='a\\x00b' holds a NUL byte"):
    build_points(load_sweep(str(sweep_file)), str(tmp_path / "runs"))


# ---------------------------------------------------------------- eval result files

def _write(out_dir, examples):
  config = base_config()
  config.init = "fixture"
  task = types.SimpleNamespace(primary_metric="acc")
  data = types.SimpleNamespace(docs=[0] * 3, fewshot_source="validation", files={"x.jsonl": "0" * 64})
  cfg = types.SimpleNamespace(num_params=lambda: 123, n_layer=2, n_embd=16, n_ctx=64, dtype="float32")
  loaded = types.SimpleNamespace(source="fixture", cfg=cfg)
  result = TaskResult("toy", 0, {"acc": (0.5, 0.1)}, len(examples), Truncation(), {"seconds": 1.0},
                      examples)
  return evaluate.write_result(out_dir, task, data, result, config, loaded)


def test_a_lone_surrogate_in_task_text_is_written_and_reads_back(tmp_path):
  examples = [{"index": 0, "context": "caf\udce9 ok"}, {"index": 1, "context": "plain"}]
  path = _write(tmp_path, examples)
  lines = (tmp_path / "toy_0shot.jsonl").read_text(encoding="utf-8").splitlines()
  assert [json.loads(line) for line in lines] == examples
  assert json.loads(path.read_text())["n_examples"] == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_0shot.json", "toy_0shot.jsonl"]


def test_a_failed_write_leaves_the_earlier_results_whole(tmp_path):
  _write(tmp_path, [{"index": 0, "context": "first run"}])
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  with pytest.raises(TypeError):  # a record json cannot write: fails midway through the .jsonl
    _write(tmp_path, [{"index": 0, "context": "second"}, {"index": 1, "context": object()}])
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no half file, no temp


# ---------------------------------------------------------------- misspelled config keys

def _real_lookup_error(path):
  from ml_collections.config_flags import config_path
  with pytest.raises((KeyError, AttributeError)) as info:
    config_path.get_value(path, base_config())
  return info.value


@pytest.mark.parametrize("bad, expected", [
    ("model.n_layr", 'unknown config key "n_layr" (did you mean "n_layer"?) in --config.model.n_layr'),
    ("zzz", 'unknown config key "zzz" in --config.zzz'),
    ("model.n_layer.x", 'unknown config key "model.n_layer.x" (model.n_layer is a value, not a '
     'section) in --config.model.n_layer.x'),
])
def test_misspelled_key_names_only_that_override(bad, expected):
  argv = ["gpt", "--config=configs/tiny.py", "--config.train.steps=3", f"--config.{bad}=2",
          "--config.mode=train", "--config.model.n_embd=32"]
  assert unknown_key_message(_real_lookup_error(bad), argv) == (
      f"{expected}; see the config file for valid keys")


@pytest.mark.slow
def test_misspelled_key_from_the_command_line():
  result = subprocess.run(
      [sys.executable, "-m", "gpt.main", "--config=configs/tiny.py", "--config.train.steps=3",
       "--config.model.n_layr=2", "--config.mode=train"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      'error: unknown config key "n_layr" (did you mean "n_layer"?) in --config.model.n_layr; see the '
      'config file for valid keys')


@pytest.mark.slow
def test_eval_run_with_a_lone_surrogate_in_task_data(openai_fixture, tmp_path):
  """The whole eval mode on task data holding a lone surrogate (a bad \\udXXX escape in a .jsonl):
  both result files are complete and parse, and the surrogate reads back as it was."""
  (tmp_path / "data" / "lambada").mkdir(parents=True)
  rows = [{"text": "The old caf\udce9 was closed, so we went home"}, {"text": "It rained all day long"}]
  (tmp_path / "data" / "lambada" / "lambada_test.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  config = base_config()
  config.mode, config.init = "eval", str(openai_fixture)
  e = config.eval
  e.tasks, e.shots, e.limit, e.batch_size, e.write_examples = "lambada", "0", 2, 2, True
  e.data_dir = str(tmp_path / "data")
  evaluate.run(config, str(tmp_path / "run"))
  out = tmp_path / "run" / "eval"
  assert sorted(p.name for p in out.iterdir()) == ["lambada_0shot.json", "lambada_0shot.jsonl"]
  assert json.loads((out / "lambada_0shot.json").read_text())["n_examples"] == 2
  items = [json.loads(l) for l in (out / "lambada_0shot.jsonl").read_text(encoding="utf-8").splitlines()]
  assert len(items) == 2 and "caf\udce9" in json.dumps(items[0], ensure_ascii=False)
