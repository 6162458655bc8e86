"""OpenAI TF checkpoints without TensorFlow: the fixture's logits, byte-exact writing, corruptions."""

import shutil
import numpy as np
import pytest
import ml_dtypes

from gpt.formats import tf_checkpoint as tfc
from gpt.formats import tf_table
from gpt.formats.convert import flat_to_model, model_to_flat
from gpt.errors import GPTError
from gpt.model import GPTConfig

from conftest import forward

DATA = "model.ckpt.data-00000-of-00001"


def assert_matches_expected_logits(flat: dict, hparams: dict, fixture):
  """Our model on `flat` reproduces the fixture's TF logits (first 1024, logsumexp, argmax); returns it."""
  cfg = GPTConfig(**{k: hparams[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")})
  model = flat_to_model(flat, cfg, source=str(fixture))
  want = np.load(fixture / "expected_logits.npz")
  logits = np.asarray(forward(model, want["input_ids"]), np.float32)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  np.testing.assert_allclose(logits[..., :1024], want["logits_first_1024"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(lse, want["logsumexp"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(logits.argmax(-1), want["argmax"])
  return model


def test_fixture_loads_and_gives_tf_logits(openai_fixture, tmp_path):
  flat, hparams = tfc.load_openai(openai_fixture)
  assert hparams == {"n_vocab": 50257, "n_ctx": 64, "n_embd": 16, "n_head": 2, "n_layer": 2}
  assert flat["h1/attn/c_attn/w"].shape == (16, 48) and flat["wte"].shape == (50257, 16)
  assert all(a.dtype == np.float32 for a in flat.values())
  model = assert_matches_expected_logits(flat, hparams, openai_fixture)
  # Exporting the loaded model gives back exactly the files TensorFlow wrote.
  tfc.write_checkpoint(tmp_path, model_to_flat(model), hparams)
  for name in ("model.ckpt.index", DATA):
    assert (tmp_path / name).read_bytes() == (openai_fixture / name).read_bytes(), name


def test_read_checkpoint_keeps_stored_names(openai_fixture):
  tensors = tfc.read_checkpoint(openai_fixture)
  assert len(tensors) == 2 * 12 + 4
  assert tensors["model/h0/attn/c_attn/w"].shape == (1, 16, 48)
  assert tensors["model/h0/mlp/c_proj/w"].shape == (1, 64, 16)
  assert tensors["model/wpe"].shape == (64, 16)


def test_writer_reproduces_tensorflows_files_byte_for_byte(openai_fixture, tmp_path):
  flat, hparams = tfc.load_openai(openai_fixture)
  tfc.write_checkpoint(tmp_path, flat, hparams)
  for name in ("model.ckpt.index", DATA, "checkpoint"):
    assert (tmp_path / name).read_bytes() == (openai_fixture / name).read_bytes(), name
  flat2, hparams2 = tfc.load_openai(tmp_path)
  assert hparams2 == hparams and flat2.keys() == flat.keys()
  for k in flat:
    np.testing.assert_array_equal(flat2[k], flat[k])


def _random_tensors(rng) -> dict:
  return {
      "a/float": rng.standard_normal((3, 5)).astype(np.float32),
      "a/half": rng.standard_normal((7,)).astype(np.float16),
      "a/bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
      "b/double": rng.standard_normal((2, 2, 2)),
      "b/int32": rng.integers(-2**31, 2**31, (4,), dtype=np.int32),
      "b/int64": rng.integers(-2**62, 2**62, (3, 1), dtype=np.int64),
      "c/scalar": np.float32(3.5),
      "c/empty": np.zeros((0, 4), np.float32),
      "d/bool": rng.random((5,)) > 0.5,
      "global_step": np.int64(12345),
  }


@pytest.mark.parametrize("block_size", [256 * 1024, 64])
def test_bundle_round_trip_all_dtypes(tmp_path, monkeypatch, block_size):
  # A 64-byte block size forces one data block per few entries: exercises separators and the index.
  monkeypatch.setattr(tf_table, "BLOCK_SIZE", block_size)
  tensors = _random_tensors(np.random.default_rng(0))
  tfc.write_bundle(tmp_path / "x.ckpt", tensors)
  table = (tmp_path / "x.ckpt.index").read_bytes()
  n_blocks = len(tf_table.block_entries(tf_table.read_block(table, *_index_handle(table))))
  assert (n_blocks > 3) == (block_size == 64)
  back = tfc.read_bundle(tmp_path / "x.ckpt")
  assert back.keys() == tensors.keys()
  for k, v in tensors.items():
    assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v), k
    np.testing.assert_array_equal(back[k], v)


def _index_handle(table: bytes) -> tuple[int, int]:
  footer = table[-48:]
  _, pos = tf_table.varint(footer, 0)
  _, pos = tf_table.varint(footer, pos)
  offset, pos = tf_table.varint(footer, pos)
  return offset, tf_table.varint(footer, pos)[0]


def test_load_openai_skips_non_model_tensors_and_adds_conv_axis_on_write(tmp_path):
  flat = {"wte": np.ones((5, 4), np.float32), "h0/mlp/c_fc/w": np.ones((4, 16), np.float32)}
  tfc.write_checkpoint(tmp_path, flat, {"n_vocab": 5, "n_ctx": 2, "n_embd": 4, "n_head": 1,
                                        "n_layer": 1})
  stored = tfc.read_checkpoint(tmp_path)
  assert stored["model/h0/mlp/c_fc/w"].shape == (1, 4, 16) and stored["model/wte"].shape == (5, 4)
  stored["beta1_power"] = np.float32(0.9)
  tfc.write_bundle(tmp_path / "model.ckpt", stored)
  loaded, _ = tfc.load_openai(tmp_path)
  assert sorted(loaded) == ["h0/mlp/c_fc/w", "wte"] and loaded["h0/mlp/c_fc/w"].shape == (4, 16)


def test_absolute_checkpoint_path_from_another_machine(openai_fixture, tmp_path):
  _copy(openai_fixture, tmp_path)
  (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/mnt/gpt-2/models/124M/model.ckpt"\n')
  assert "model/wte" in tfc.read_checkpoint(tmp_path)


# ------------------------------------------------------------------------- corrupt inputs

def _copy(src, dst):
  for f in ("checkpoint", "hparams.json", "model.ckpt.index", DATA):
    shutil.copy(src / f, dst / f)
    (dst / f).chmod(0o644)
  return dst


def _flip(path, offset):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x01
  path.write_bytes(bytes(data))


def _expect(folder, pattern):
  with pytest.raises(GPTError, match=pattern) as info:
    tfc.load_openai(folder)
  assert "\n" not in str(info.value)


def test_truncated_data_file(openai_fixture, tmp_path):
  _copy(openai_fixture, tmp_path)
  size = (tmp_path / DATA).stat().st_size
  with open(tmp_path / DATA, "r+b") as f:
    f.truncate(size - 10)
  # model/wte sorts last, so it is the tensor that no longer fits.
  _expect(tmp_path, rf"{DATA} is truncated: tensor 'model/wte' needs bytes \[\d+, {size}\) but the "
          rf"file has {size - 10}")


def test_flipped_byte_in_data_is_a_crc_error(openai_fixture, tmp_path):
  _copy(openai_fixture, tmp_path)
  _flip(tmp_path / DATA, 100)  # inside model/h0/attn/c_attn/b, bytes [0, 192)
  _expect(tmp_path, rf"{DATA} is corrupt: checksum mismatch in tensor 'model/h0/attn/c_attn/b'")


def test_flipped_byte_in_index_block_is_a_crc_error(openai_fixture, tmp_path):
  _copy(openai_fixture, tmp_path)
  _flip(tmp_path / "model.ckpt.index", 40)
  _expect(tmp_path, r"model.ckpt.index is corrupt: checksum mismatch in the block at byte 0")


def test_bad_index_magic(openai_fixture, tmp_path):
  _copy(openai_fixture, tmp_path)
  _flip(tmp_path / "model.ckpt.index", (tmp_path / "model.ckpt.index").stat().st_size - 1)
  _expect(tmp_path, r"model.ckpt.index is corrupt: bad magic number")


def test_wrong_size_in_index_entry(tmp_path):
  tfc.write_bundle(tmp_path / "x", {"t": np.zeros((2, 3), np.float32)})
  items = [(b"", tf_table.key(1, 0) + tf_table.encode_varint(1)),
           (b"t", tfc.encode_entry(1, (2, 3), 0, 20, 0))]
  (tmp_path / "x.index").write_bytes(tf_table.build_table(items))
  with pytest.raises(GPTError, match=r"x.index is corrupt: tensor 't' of shape \[2, 3\] and dtype "
                     r"float32 should take 24 bytes, the index says 20"):
    tfc.read_bundle(tmp_path / "x")


@pytest.mark.parametrize("missing,pattern", [
    (DATA, rf"cannot read checkpoint data .*{DATA}: No such file"),
    ("model.ckpt.index", r"cannot read checkpoint index .*model.ckpt.index: No such file"),
    ("checkpoint", r"cannot read .*checkpoint: No such file"),
    ("hparams.json", r"cannot read .*hparams.json: No such file"),
])
def test_missing_file(openai_fixture, tmp_path, missing, pattern):
  _copy(openai_fixture, tmp_path)
  (tmp_path / missing).unlink()
  _expect(tmp_path, pattern)


@pytest.mark.parametrize("text,pattern", [
    ("{nope", r"hparams.json is not valid JSON"),
    ('{"n_vocab": 5}', r"hparams.json must be a JSON object with integer n_vocab, n_ctx"),
])
def test_bad_hparams(openai_fixture, tmp_path, text, pattern):
  _copy(openai_fixture, tmp_path)
  (tmp_path / "hparams.json").write_text(text)
  _expect(tmp_path, pattern)


def test_index_that_is_not_a_table(tmp_path):
  (tmp_path / "x.index").write_bytes(b"short")
  with pytest.raises(GPTError, match=r"x.index is corrupt: only 5 bytes"):
    tfc.read_bundle(tmp_path / "x")


def test_masked_crc_is_leveldbs_mask():
  # LevelDB's crc32c::Mask: rotate right by 15 bits, add a constant; Unmask inverts it.
  import crc32c
  raw = crc32c.crc32c(b"foo")
  masked = tf_table.mask(raw)
  rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
  assert masked != raw and ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF == raw
  assert tf_table.mask(0) == 0xA282EAD8


def test_separators_are_leveldbs():
  assert tf_table.separator(b"model/h0/ln_1/b", b"model/h9/x") == b"model/h1"
  assert tf_table.separator(b"abc", b"abd") == b"abc"  # no room between c and d
  assert tf_table.separator(b"ab", b"abc") == b"ab"  # a prefix of the limit
  assert tf_table.successor(b"model/wte") == b"n" and tf_table.successor(b"\xff\xffa") == b"\xff\xffb"
