"""Silently wrong results (issue 11): inputs that used to run and give a wrong answer without a word.

Token files with negative or non-integer ids, and a negative eval.limit, must be refused with one
line, before any training or scoring.
"""

import json
import types

import numpy as np
import pytest

from gpt import data, encode, evaluate
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.tokenizer import get_tokenizer

TOK = get_tokenizer()


def _cfg(tmp_path, path):
  return types.SimpleNamespace(path=str(path), val_path="", val_fraction=0.0, encoding="utf-8",
                               errors="strict", combine=50_000, cache_dir=str(tmp_path / "cache"),
                               tfds_split="train", tfds_val_split="", tfds_field="text",
                               tfds_data_dir="")


def _one_line(info) -> str:
  message = str(info.value)
  assert "\n" not in message
  return message


def test_negative_ids_in_an_int32_npz_are_refused(tmp_path):
  ids = np.arange(100, dtype=np.int32)
  ids[57] = -3
  np.savez(tmp_path / "tokens.npz", ids)
  with pytest.raises(GPTError) as info:
    data.load_dataset(_cfg(tmp_path, tmp_path / "tokens.npz"), TOK, seq_len=8)
  assert _one_line(info) == (f"{tmp_path / 'tokens.npz'} holds a negative token id (-3 at position "
                             f"57); token ids are 0..50256; encode the text again with "
                             f"python -m gpt.encode")


def test_float_ids_are_refused(tmp_path):
  np.savez(tmp_path / "tokens.npz", np.arange(100, dtype=np.float32))
  with pytest.raises(GPTError, match=r"tokens.npz: array 'arr_0' has dtype float32 and shape \(100,\); "
                     r"token files hold 1-D integer token ids"):
    data.load_dataset(_cfg(tmp_path, tmp_path / "tokens.npz"), TOK, seq_len=8)


def test_a_signed_bin_sidecar_is_refused(tmp_path):
  np.arange(100, dtype=np.int32).tofile(tmp_path / "tokens.bin")
  (tmp_path / "tokens.bin.json").write_text(json.dumps({"dtype": "int32"}))
  with pytest.raises(GPTError, match=r"tokens.bin.json says tokens.bin holds int32; token ids are "
                     r"unsigned integers"):
    data.load_dataset(_cfg(tmp_path, tmp_path / "tokens.bin"), TOK, seq_len=8)


def test_valid_signed_ids_still_load(tmp_path):
  """int32/int64 arrays of valid ids (as numpy writes by default) keep working."""
  np.savez(tmp_path / "tokens.npz", np.arange(100, dtype=np.int64), np.arange(5, dtype=np.int32))
  dataset = data.load_dataset(_cfg(tmp_path, tmp_path / "tokens.npz"), TOK, seq_len=8)
  assert dataset.train.tolist() == list(range(100)) + [TOK.eot_id] + list(range(5))


def test_ids_past_the_vocabulary_are_still_refused(tmp_path):
  np.savez(tmp_path / "tokens.npz", np.array([1, 2, 50257] + [3] * 20, np.uint16))
  with pytest.raises(GPTError, match=r"holds token id 50257 but the model's vocabulary has 50257 ids"):
    data.load_dataset(_cfg(tmp_path, tmp_path / "tokens.npz"), TOK, seq_len=8)


def test_encoding_a_token_file_with_negative_ids_is_refused(tmp_path):
  """gpt.encode passes token files through: a cast to uint16 would turn -1 into 65535."""
  np.savez(tmp_path / "in.npz", np.array([5, -1, 7], np.int16))
  with pytest.raises(GPTError, match=r"in.npz holds a negative token id \(-1 at position 1\)"):
    encode.encode_paths([tmp_path / "in.npz"], TOK, tmp_path / "out.bin", show_progress=False)
  assert not (tmp_path / "out.bin").exists()


def test_negative_eval_limit_is_refused_before_loading_a_model():
  config = base_config()
  config.mode, config.init, config.eval.limit = "eval", "/no/such/model", -1800
  with pytest.raises(GPTError) as info:
    evaluate.run(config, None)
  assert _one_line(info) == ("eval.limit=-1800: give the number of items to score per task, or 0 "
                             "for all")
