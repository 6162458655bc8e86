"""Encoding text into token files, and the training windows cut from them (no model involved)."""

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from gpt import data, encode
from gpt.errors import GPTError
from gpt.tokenizer import get_tokenizer

from conftest import require_shared
from http_fixture import FileServer, closed_port_url

TOK = get_tokenizer()
EOT = TOK.eot_id


def data_cfg(tmp_path, **overrides):
  cfg = dict(path="", val_path="", val_fraction=0.0, encoding="utf-8", errors="strict",
             combine=50_000, cache_dir=str(tmp_path / "cache"), tfds_split="train",
             tfds_val_split="", tfds_field="text", tfds_data_dir="")
  cfg.update(overrides)
  return types.SimpleNamespace(**cfg)


def test_streamed_encoding_equals_whole_text(tmp_path):
  kant = require_shared("data", "kant", "critique_of_pure_reason.txt")
  shakespeare = require_shared("data", "tinyshakespeare", "input.txt")
  text = kant.read_text(encoding="utf-8-sig") + shakespeare.read_text(encoding="utf-8")
  text += "tail  \n\n  spaces\t\t\nend \u3000x  "  # whitespace runs at every kind of cut
  src = tmp_path / "corpus.txt"
  src.write_text(text, encoding="utf-8")
  whole = TOK.encode(text)
  blocks = encode.read_text(src, block_bytes=5000)  # many block and cut boundaries
  pieces = list(encode.encode_text_blocks(blocks, TOK, np.uint16, block_chars=4096))
  assert len(pieces) > 100
  assert np.concatenate(pieces).tolist() == whole
  n = encode.encode_paths([src], TOK, tmp_path / "corpus.bin", show_progress=False)
  assert n == len(whole)
  assert np.memmap(tmp_path / "corpus.bin", np.uint16, mode="r").tolist() == whole
  meta = json.loads((tmp_path / "corpus.bin.json").read_text())
  assert meta["dtype"] == "uint16" and meta["n_tokens"] == n


def test_byte_order_mark_is_dropped(tmp_path):
  (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfThe Critique")
  (tmp_path / "plain.txt").write_bytes(b"The Critique")
  with_bom = "".join(encode.read_text(tmp_path / "bom.txt"))
  assert with_bom == "The Critique"
  assert "".join(encode.read_text(tmp_path / "plain.txt")) == with_bom


@pytest.mark.parametrize("block_bytes", [1, 3, 1 << 20])
def test_undecodable_byte_names_file_and_offset(tmp_path, block_bytes):
  bad = tmp_path / "bad.txt"
  bad.write_bytes("héllo wörld ".encode() * 3 + b"\xff tail")  # é/ö are 2 bytes: offset 42
  with pytest.raises(GPTError, match=r"bad\.txt: byte 42 \(0xff\) is not valid utf-8.*errors=replace"):
    "".join(encode.read_text(bad, block_bytes=block_bytes))
  replaced = "".join(encode.read_text(bad, errors="replace", block_bytes=block_bytes))
  assert replaced.endswith("\ufffd tail")
  assert "".join(encode.read_text(bad, encoding="latin-1")).endswith("\xff tail")


def test_combine_chunks_npz_and_bin(tmp_path):
  texts = {"a.txt": "first file", "b.txt": "second one", "c.txt": "third file is much longer than the others"}
  folder = tmp_path / "docs"
  folder.mkdir()
  for name, text in texts.items():
    (folder / name).write_text(text)
  (folder / ".hidden").write_text("skipped")
  paths = encode.expand_paths(str(folder))
  assert [p.name for p in paths] == ["a.txt", "b.txt", "c.txt"]
  assert encode.expand_paths(str(folder / "*.txt")) == paths
  a, b, c = (TOK.encode(t) for t in texts.values())
  # nshepperd's combine: a (10 chars) + <eot> + b reaches 15 characters, then c is its own chunk.
  encode.encode_paths(paths, TOK, tmp_path / "out.npz", combine=15, show_progress=False)
  with np.load(tmp_path / "out.npz") as npz:
    chunks = [npz[k].tolist() for k in npz.files]
  assert chunks == [a + [EOT] + b, c]
  # A .bin is one stream with every document separated by <eot>, whatever `combine` is.
  encode.encode_paths(paths, TOK, tmp_path / "out.bin", combine=15, show_progress=False)
  flat = a + [EOT] + b + [EOT] + c
  assert encode.load_token_file(tmp_path / "out.bin", EOT).tolist() == flat
  assert encode.load_token_file(tmp_path / "out.npz", EOT).tolist() == flat
  # An .npz written by nshepperd's encode.py (int64 arrays from lists) reads the same way.
  np.savez_compressed(tmp_path / "nshepperd.npz", np.array(a + [EOT] + b), np.array(c))
  assert encode.load_token_file(tmp_path / "nshepperd.npz", EOT).tolist() == flat
  # Token files can be inputs too, passed through as their own chunks.
  encode.encode_paths([tmp_path / "out.npz", paths[0]], TOK, tmp_path / "again.npz",
                      show_progress=False)
  with np.load(tmp_path / "again.npz") as npz:
    assert [npz[k].tolist() for k in npz.files] == chunks + [a]


def test_missing_inputs_are_one_line_errors(tmp_path):
  with pytest.raises(GPTError, match="no input files found"):
    encode.expand_paths(str(tmp_path / "*.txt"))
  with pytest.raises(GPTError, match="does not exist; pass --config.data.path"):
    data.resolve_tokens(str(tmp_path / "nope.txt"), TOK, data_cfg(tmp_path))


def test_encode_cli(tmp_path, capsys):
  src = tmp_path / "in.txt"
  src.write_text("Hello world. " * 50)
  assert encode.main([str(src), str(tmp_path / "o.npz")]) == 0
  assert f"wrote {len(TOK.encode(src.read_text()))} tokens" in capsys.readouterr().out
  with np.load(tmp_path / "o.npz") as npz:
    assert npz["arr_0"].tolist() == TOK.encode(src.read_text())
  assert encode.main([str(src), str(tmp_path / "o.txt")]) == 2
  assert "must end in .bin or .npz" in capsys.readouterr().err


@pytest.mark.slow
def test_encoding_memory_is_bounded(tmp_path):
  """A 12 MB corpus encodes in well under 10x its size of memory (streaming, 1 MB blocks)."""
  kant = require_shared("data", "kant", "critique_of_pure_reason.txt").read_bytes()
  big = tmp_path / "big.txt"
  with open(big, "wb") as f:
    for _ in range(10):
      f.write(kant)
  size_mb = big.stat().st_size / 2**20
  # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child of a big
  # pytest process would report the parent's peak.
  code = ("import re, sys; from gpt import encode; "
          "sys.exit(encode.main([sys.argv[1], sys.argv[2]]) or print(int(re.search("
          "r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024))")
  out = subprocess.run([sys.executable, "-c", code, str(big), str(tmp_path / "big.bin")],
                       capture_output=True, text=True, check=True).stdout
  peak_mb = int(out.strip().splitlines()[-1])
  n_tokens = np.memmap(tmp_path / "big.bin", np.uint16, mode="r").size
  assert n_tokens > 2_500_000
  # Holding the text and its token list at once would take ~250 MB here; the baseline process
  # (numpy, tiktoken, the vocabulary) is ~90 MB.
  assert peak_mb < 3 * size_mb + 100, (peak_mb, size_mb)
  print(f"peak {peak_mb} MB for {size_mb:.0f} MB")


def test_text_is_encoded_once_into_the_cache(tmp_path):
  src = tmp_path / "t.txt"
  src.write_text("Some words for the cache. " * 20)
  cfg = data_cfg(tmp_path)
  tokens, _ = data.resolve_tokens(str(src), TOK, cfg)
  cached = list((tmp_path / "cache").glob("t-*.bin"))
  assert len(cached) == 1 and tokens.tolist() == TOK.encode(src.read_text())
  mtime = cached[0].stat().st_mtime_ns
  data.resolve_tokens(str(src), TOK, cfg)
  assert cached[0].stat().st_mtime_ns == mtime
  src.write_text("Changed text, different tokens.")
  tokens, _ = data.resolve_tokens(str(src), TOK, cfg)
  assert tokens.tolist() == TOK.encode("Changed text, different tokens.")
  assert len(list((tmp_path / "cache").glob("t-*.bin"))) == 2


def test_validation_split(tmp_path):
  tokens = np.arange(1000, dtype=np.uint16) % 500
  encode.write_tokens([encode.Piece(tokens)], tmp_path / "t.bin", eot_id=EOT)
  ds = data.load_dataset(data_cfg(tmp_path, path=str(tmp_path / "t.bin"), val_fraction=0.1), TOK, 16)
  assert ds.train.tolist() == tokens[:900].tolist() and ds.val.tolist() == tokens[900:].tolist()
  ds = data.load_dataset(data_cfg(tmp_path, path=str(tmp_path / "t.bin"),
                                  val_path=str(tmp_path / "t.bin")), TOK, 16)
  assert len(ds.train) == len(ds.val) == 1000
  assert data.load_dataset(data_cfg(tmp_path, path=str(tmp_path / "t.bin")), TOK, 16).val is None
  with pytest.raises(GPTError, match="fewer than one window"):
    data.load_dataset(data_cfg(tmp_path, path=str(tmp_path / "t.bin"), val_fraction=0.01), TOK, 16)
  with pytest.raises(GPTError, match="vocabulary has 100 ids"):
    data.load_dataset(data_cfg(tmp_path, path=str(tmp_path / "t.bin")), TOK, 16, n_vocab=100)


def test_windows_are_a_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.uint16)
  w = data.Windows(tokens, seq_len=32, batch_size=4, seed=7)
  again = data.Windows(tokens, seq_len=32, batch_size=4, seed=7)
  batches = [w.batch(s) for s in range(50)]
  # Any order of requests (a resumed run starts mid-way) gives the same batches.
  assert all(np.array_equal(again.batch(s), batches[s]) for s in reversed(range(50)))
  assert not np.array_equal(batches[0], batches[1])
  assert not np.array_equal(data.Windows(tokens, 32, 4, seed=8).batch(0), batches[0])
  for b in batches:  # consecutive tokens, inside the array
    assert b.shape == (4, 33) and b.dtype == np.int32
    assert np.all(np.diff(b, axis=1) == 1)
  starts = np.concatenate([w.starts(s) for s in range(2000)])
  assert starts.min() >= 0 and starts.max() <= len(tokens) - 33
  assert starts.max() > len(tokens) - 200  # the whole array is reachable
  ev = data.eval_starts(1000, 32, n_batches=3, batch_size=4)
  assert ev.shape == (3, 4) and ev.min() == 0 and ev.max() == 1000 - 33


GUTENBERG = ("The Project Gutenberg eBook of The Critique of Pure Reason\n\nLicence blah\n"
             "*** START OF THE PROJECT GUTENBERG EBOOK THE CRITIQUE OF PURE REASON ***\n"
             "THE CRITIQUE OF PURE REASON\nBy Immanuel Kant\n"
             "*** END OF THE PROJECT GUTENBERG EBOOK THE CRITIQUE OF PURE REASON ***\nMore licence\n")


def test_url_is_fetched_once_and_gutenberg_boilerplate_cut(tmp_path):
  www = tmp_path / "www"
  (www / "cache" / "epub" / "4280").mkdir(parents=True)
  (www / "cache" / "epub" / "4280" / "pg4280.txt").write_bytes(b"\xef\xbb\xbf" + GUTENBERG.encode())
  cfg = data_cfg(tmp_path)
  with FileServer(www) as server:
    url = server.url + "/cache/epub/4280/pg4280.txt"
    tokens, _ = data.resolve_tokens(url, TOK, cfg)
    data.resolve_tokens(url, TOK, cfg)
    assert len(server.requests_for("/cache/epub/4280/pg4280.txt")) == 1
  assert TOK.decode(tokens.tolist()) == "THE CRITIQUE OF PURE REASON\nBy Immanuel Kant\n"


def test_offline_url_says_what_to_pass(tmp_path):
  with pytest.raises(GPTError) as e:
    data.resolve_tokens(closed_port_url() + "/pg4280.txt", TOK, data_cfg(tmp_path))
  message = str(e.value)
  assert "cannot download" in message and "--config.data.path=" in message
  assert "\n" not in message


def test_tfds_text_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS source needs the [tfds] extra")
  paragraphs = [f"Paragraph number {i} of the tiny corpus." for i in range(30)]

  class TinyKant(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(paragraphs[:25]),
              "validation": self._generate_examples(paragraphs[25:])}

    def _generate_examples(self, items):
      for i, p in enumerate(items):
        yield i, {"text": p}

  TinyKant(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  cfg = data_cfg(tmp_path, path="tfds:tiny_kant", tfds_data_dir=str(tmp_path / "tfds"),
                 tfds_val_split="validation")
  ds = data.load_dataset(cfg, TOK, 8)
  docs = TOK.decode(ds.train.tolist()).split("<|endoftext|>")  # TFDS stores records shuffled
  assert sorted(docs) == sorted(paragraphs[:25])
  assert ds.train.tolist().count(EOT) == 24
  assert sorted(TOK.decode(ds.val.tolist()).split("<|endoftext|>")) == sorted(paragraphs[25:])
  with pytest.raises(GPTError, match="no text field 'body'"):
    data.load_dataset(data_cfg(tmp_path, path="tfds:tiny_kant", tfds_field="body",
                               tfds_data_dir=str(tmp_path / "tfds"), cache_dir=str(tmp_path / "c2")),
                      TOK, 8)
