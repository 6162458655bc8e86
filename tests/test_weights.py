"""Loading released weights (OpenAI TF and Hugging Face folders), resolving config.init, HF export."""

import json
import shutil

import numpy as np
import pytest
from scipy.special import logsumexp

from gpt.formats import convert
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.formats.hf_checkpoint import load_hf
from gpt.weights import export_hf, load_model, read_weights, resolve_init

from conftest import forward


def assert_matches_reference(model, fixture_dir, atol=1e-4):
  """Our logits against the fixture's TF reference: first 1024 logits, logsumexp, argmax."""
  ref = np.load(fixture_dir / "expected_logits.npz")
  logits = np.asarray(forward(model, ref["input_ids"]))
  np.testing.assert_allclose(logits[..., :1024], ref["logits_first_1024"], atol=atol)
  np.testing.assert_allclose(logsumexp(logits, axis=-1), ref["logsumexp"], atol=atol)
  np.testing.assert_array_equal(logits.argmax(-1), ref["argmax"])


def config_with_init(init, **model):
  config = base_config()
  config.init = str(init)
  config.model.update(model)
  return config


def test_openai_fixture_through_config_init(openai_fixture):
  loaded = load_model(config_with_init(openai_fixture))
  assert loaded.kind == "openai"
  assert (loaded.cfg.n_layer, loaded.cfg.n_embd, loaded.cfg.n_ctx) == (2, 16, 64)
  assert_matches_reference(loaded.model, openai_fixture)
  assert loaded.tokenizer.encode("Hello world") == [15496, 995]


def test_hf_fixture_gives_the_same_logits(hf_fixture):
  loaded = load_model(config_with_init(hf_fixture))
  assert loaded.kind == "hf"
  assert_matches_reference(loaded.model, hf_fixture)


def test_checkpoint_shape_wins_over_config_shape_but_options_are_kept(openai_fixture):
  loaded = load_model(config_with_init(openai_fixture, n_layer=12, n_embd=768, dtype="bfloat16",
                                       scan_layers=False))
  assert loaded.cfg.n_layer == 2 and loaded.cfg.dtype == "bfloat16" and not loaded.cfg.scan_layers


def test_export_hf_round_trip(hf_fixture, tmp_path):
  loaded = load_model(config_with_init(hf_fixture))
  out = export_hf(loaded.model, loaded.tokenizer, tmp_path / "export")
  assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "vocab.json",
                                            "merges.txt", "generation_config.json"}
  flat, hparams = load_hf(out)
  original, _ = load_hf(hf_fixture)
  assert hparams == {"n_vocab": 50257, "n_ctx": 64, "n_embd": 16, "n_head": 2, "n_layer": 2}
  assert set(flat) == set(original)
  for name in flat:
    np.testing.assert_array_equal(flat[name], original[name], err_msg=name)
  assert (out / "vocab.json").read_bytes() == (hf_fixture / "vocab.json").read_bytes()
  assert (out / "merges.txt").read_bytes() == (hf_fixture / "merges.txt").read_bytes()


def test_exported_folder_loads_in_transformers(hf_fixture, tmp_path):
  torch = pytest.importorskip("torch", reason="the [hf] extra (torch) is not installed")
  transformers = pytest.importorskip("transformers", reason="the [hf] extra is not installed")
  loaded = load_model(config_with_init(hf_fixture))
  out = export_hf(loaded.model, loaded.tokenizer, tmp_path / "export")
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ref = np.load(hf_fixture / "expected_logits.npz")
  with torch.no_grad():
    theirs = hf_model(torch.tensor(ref["input_ids"])).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(forward(loaded.model, ref["input_ids"])), atol=1e-4)


def _copy(src, dst):
  shutil.copytree(src, dst)
  for p in dst.iterdir():
    p.chmod(0o644)
  return dst


def test_hf_shape_mismatch_names_tensor_and_shapes(hf_fixture, tmp_path):
  folder = _copy(hf_fixture, tmp_path / "hf")
  config = json.loads((folder / "config.json").read_text())
  config["n_embd"] = 32
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(GPTError, match=r"tensor 'wte' has shape \(50257, 16\), expected \(50257, 32\)"):
    load_model(config_with_init(folder))


def test_hf_truncated_safetensors_is_one_clear_error(hf_fixture, tmp_path):
  folder = _copy(hf_fixture, tmp_path / "hf")
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(GPTError, match="model.safetensors is not a readable safetensors file"):
    read_weights(folder)


def test_hf_missing_layer_is_reported(hf_fixture, tmp_path):
  flat, hparams = load_hf(hf_fixture)
  hparams["n_layer"] = 3
  with pytest.raises(GPTError, match="missing tensor 'h2/"):
    convert.flat_to_model(flat, convert.GPTConfig(**hparams), source="x")


def test_resolve_init_errors(tmp_path):
  with pytest.raises(GPTError, match="not 'scratch', a model name"):
    resolve_init("no/such/folder", str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(GPTError, match="holds no OpenAI checkpoint"):
    resolve_init(str(tmp_path / "empty"), str(tmp_path))


def test_model_names_resolve_to_the_models_dir_in_both_spellings(openai_fixture, tmp_path):
  shutil.copytree(openai_fixture, tmp_path / "124M")
  assert resolve_init("117M", str(tmp_path)) == ("openai", tmp_path / "124M")
  assert resolve_init("124m", str(tmp_path)) == ("openai", tmp_path / "124M")


def test_scratch_init_follows_config_model():
  loaded = load_model(config_with_init("scratch", n_layer=2, n_embd=32, n_head=2, n_ctx=16))
  assert loaded.kind == "scratch" and loaded.cfg.n_layer == 2 and loaded.cfg.n_ctx == 16


def test_export_cli_openai_then_hf_keeps_logits(hf_fixture, tmp_path):
  from gpt.export import main
  assert main([f"--init={hf_fixture}", f"--out={tmp_path / 'oa'}", "--format=openai"]) == 0
  assert main([f"--init={tmp_path / 'oa'}", f"--out={tmp_path / 'hf'}", "--format=hf"]) == 0
  loaded = load_model(config_with_init(tmp_path / "hf"))
  assert loaded.kind == "hf"
  assert_matches_reference(loaded.model, hf_fixture)
  assert main(["--init=/no/such", f"--out={tmp_path / 'x'}"]) == 2


def test_exported_files_get_the_umask_mode_like_any_file(hf_fixture, tmp_path):
  """safetensors writes through a private 0600 temporary file; the export must not keep that."""
  import os
  from gpt.weights import export
  loaded = load_model(config_with_init(hf_fixture))
  old = os.umask(0o022)
  try:
    for fmt in ("hf", "openai"):
      out = export(loaded.model, loaded.tokenizer, tmp_path / fmt, fmt)
      modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
      assert set(modes.values()) == {0o644}, modes
  finally:
    os.umask(old)
  with pytest.raises(GPTError, match="--format='onnx': choose hf or openai"):
    export(loaded.model, loaded.tokenizer, tmp_path / "x", "onnx")


def test_workdir_config_gives_the_shape_and_keeps_the_run_options(tmp_path):
  """Training (resume, restore_from) and `config.init=<workdir>` take the shape from one place."""
  from gpt.weights import init_tokenizer, model_config, workdir_model_config
  saved = base_config()
  saved.model.update(n_layer=2, n_embd=32, n_head=2, n_ctx=16)
  (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
  cfg = workdir_model_config(config_with_init("scratch", dtype="bfloat16").model, tmp_path)
  assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.dtype) == (2, 32, 2, 16, "bfloat16")
  assert workdir_model_config(base_config().model, tmp_path / "none") is None
  assert model_config(base_config().model, None).n_layer == 12
  (tmp_path / "config.json").write_text('{"model": ')
  with pytest.raises(GPTError, match=r"config\.json is damaged .*restore it, or delete it"):
    workdir_model_config(base_config().model, tmp_path)
  assert init_tokenizer(str(tmp_path)).encode("Hello world") == [15496, 995]
